"""`lvr sft`: chain-of-thought SFT of a vision-language model on long videos, in one file.

Read top to bottom: the config dataclasses, `run_sft` (setup, loop, save) and the helpers it calls.
The model learns `<think>reasoning</think><answer>X</answer>` for the `sft` split of the `qa` table;
samples are built by the shared `lvr.models.inputs.build_sample` (the same prompt, video tokens and
3-D M-RoPE positions that RL rollouts and eval use).

Launch lines::

    # CPU, tiny model (tests, demo)
    lvr sft --config configs/sft/tiny_cpu.yaml --run runs/demo
    # 1 GPU (Qwen2.5-VL-7B, LoRA, bf16, plain torch)
    lvr sft --config configs/sft/qwen25vl_1gpu.yaml --run runs/exp1
    # 8 GPUs (full fine-tuning, DeepSpeed ZeRO-3); `deepspeed --num_gpus 8 --module lvr.cli sft ...`
    # works the same way
    torchrun --nproc_per_node 8 -m lvr.cli sft --config configs/sft/qwen25vl_8gpu.yaml -r runs/exp1
    # continue from the latest checkpoint in runs/exp1/sft/
    ... --resume

Loss: summed token cross-entropy of the whole optimizer step (all micro-batches, all ranks) divided
by the number of label tokens of the step, so the loss and the update do not depend on how a global
batch is split into micro-batches and ranks (a 2-process run equals a 1-process run).

Deliberate simplifications:
- One video per sample; no sequence packing (length-grouped batches instead); no sequence
  parallelism in SFT (MR-SP lives in RL).
- Length grouping uses text token counts (question, options, target): under one frame budget video
  tokens are nearly constant, and counting them exactly would mean decoding every video up front.
- A micro-batch whose every video fails to decode is covered by a zero-weight forward of the
  rank's other samples of the step (DeepSpeed/DDP need the same number of backward calls on
  every rank); a step whose videos all fail is skipped (counted as `steps_skipped`).
- Resuming needs the same world size (per-rank RNG state and ZeRO partitions).
- LoRA checkpoints export merged weights (for eval/vLLM) and keep the adapter state for resume.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from lvr.config import to_dict
from lvr.train import LORA_TARGETS
from lvr.train import common as C
from lvr.train import data as D

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelSection:
    """What is trained."""

    path: str = "tiny"  # hub id or folder; "tiny" builds lvr's tiny Qwen2.5-VL in <run>/models/
    train_vision: bool = False  # vision tower (ViT blocks)
    train_projector: bool = True  # vision-language merger
    lora: bool = False  # LoRA on the language model's linear layers (else full fine-tuning)
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    gradient_checkpointing: bool = False
    attn_implementation: str = "auto"  # auto | sdpa | flash_attention_2 | eager


@dataclass
class DataSection:
    """Which rows, how many frames, how long."""

    qa: str = ""  # qa table (file or folder); "" = <run>/filter/qa
    split: str = "sft"
    frames: int = 16  # uniform frames per video (with fps > 0: the maximum)
    fps: float = 0.0  # sample at this rate instead of a fixed count
    min_frames: int = 2  # fewest frames a too-long sample may be truncated to
    max_pixels: int = 0  # per-frame pixel cap applied when decoding (lvr.media); 0 = as decoded
    max_seq_len: int = 8192
    mode: Literal["think", "direct"] = "think"
    group_by_length: bool = True
    num_workers: int = 0  # DataLoader workers decoding ahead of the GPU
    cache_samples: bool = False  # keep built samples in memory across epochs (small data only)


@dataclass
class OptimSection:
    """AdamW and the learning-rate schedule."""

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class SFTConfig:
    """Config of `lvr sft` (see configs/sft/*.yaml)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    micro_batch_size: int = 1  # samples per rank per forward
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: int = 1
    max_steps: int = 0  # > 0 overrides epochs
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto = bf16 on GPU, fp32 on CPU
    deepspeed: str = ""  # ZeRO JSON (configs/deepspeed/zero2.json); "" = plain torch (DDP)
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # checkpoints kept (0 = all)
    progress: bool = True
    tensorboard: bool = False
    wandb_project: str = ""


# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------


@dataclass
class State:
    """Everything the loop touches (a plain record, not a trainer)."""

    cfg: SFTConfig
    info: C.DistInfo
    out_dir: Path
    model: torch.nn.Module  # the transformers model, possibly PEFT-wrapped
    processor: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    engine: Any = None  # DeepSpeedEngine, or None on the plain path
    ddp: Any = None  # DistributedDataParallel wrapper on the plain multi-process path
    bf16: bool = False
    counts: dict[str, int] = field(default_factory=dict)


def run_sft(cfg: SFTConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train, checkpoint and write `runs/<run>/sft/` (manifest, metrics, checkpoints).

    Args:
        cfg: The recipe config.
        run_dir: Run folder; outputs go to `run_dir/sft/`.
        resume: Continue from the latest finished checkpoint there (fresh start if none).

    Returns:
        The manifest dict (also written to `sft/manifest.json`).
    """
    info = C.init_distributed(cfg.device)
    if cfg.deepspeed:
        C.init_deepspeed_distributed(info)
    C.seed_everything(cfg.seed)
    out_dir = Path(run_dir) / "sft"
    ckpt = _checkpoint_to_resume(out_dir, resume, info)
    model, processor = _load_model(cfg, info, Path(run_dir))
    rows = D.read_qa(cfg.data.qa or Path(run_dir) / "filter" / "qa", cfg.data.split)
    global_batch = cfg.micro_batch_size * cfg.grad_accum * info.world_size
    total = cfg.max_steps or cfg.epochs * (len(rows) // global_batch)
    lengths = D.text_lengths(processor, rows, cfg.data.mode)
    plan = D.plan_steps(lengths, global_batch, total, cfg.seed, cfg.data.group_by_length)
    st = _setup_training(cfg, info, out_dir, model, processor, total)
    start = _resume(st, ckpt) if ckpt is not None else 0
    logger = C.MetricsLogger(
        out_dir, info.is_main, cfg.tensorboard, cfg.wandb_project or None, Path(run_dir).name,
        to_dict(cfg), start_step=start,
    )  # fmt: skip
    t0 = time.time()
    _train_loop(st, rows, plan, start, logger)
    logger.close()
    return _write_manifest(st, rows, total, start, ckpt, time.time() - t0, logger)


def _checkpoint_to_resume(out_dir: Path, resume: bool, info: C.DistInfo) -> Path | None:
    """The checkpoint to continue from; a fresh run never overwrites another run's checkpoints."""
    ckpt = C.latest_checkpoint(out_dir)
    if resume:
        return ckpt
    if ckpt is not None:
        raise C.TrainError(
            f"{out_dir} already holds {ckpt.name}; pass --resume to continue it or use another --run"
        )
    for old in out_dir.glob(f"skipped_rank{info.rank:05d}.jsonl"):
        old.unlink()  # reasons logged by an earlier attempt that never reached a checkpoint
    return None


def _load_model(cfg: SFTConfig, info: C.DistInfo, run_dir: Path) -> tuple[torch.nn.Module, Any]:
    """Load (or for "tiny", build once on rank 0) the VLM and processor, fp32 master weights."""
    from lvr.models.loading import load_vlm

    source: str | Path = cfg.model.path
    if source == "tiny":
        from lvr.models.tiny import build_tiny_vlm

        source = run_dir / "models" / "tiny-vlm"
        if info.is_main:
            build_tiny_vlm(source)
        C.barrier(info)
    bf16 = _use_bf16(cfg, info)
    # LoRA on the plain path keeps the frozen base in bf16; everything else trains fp32 masters
    # (DeepSpeed casts to bf16 itself and keeps fp32 copies in the optimizer).
    dtype = torch.bfloat16 if bf16 and cfg.model.lora and not cfg.deepspeed else torch.float32
    attn = None if cfg.model.attn_implementation == "auto" else cfg.model.attn_implementation
    model, processor = load_vlm(source, device=info.device, dtype=dtype, attn_implementation=attn)
    return model, processor


def _use_bf16(cfg: SFTConfig, info: C.DistInfo) -> bool:
    if cfg.precision == "auto":
        return info.device.type == "cuda"
    return cfg.precision == "bf16"


def _set_trainable(model: torch.nn.Module, m: ModelSection) -> torch.nn.Module:
    """Freeze/unfreeze the vision tower and projector; wrap with LoRA if asked."""
    for name, p in model.named_parameters():
        if ".visual.merger." in name or name.startswith("visual.merger."):
            p.requires_grad_(m.train_projector)
        elif ".visual." in name or name.startswith("visual."):
            p.requires_grad_(m.train_vision)
        else:
            p.requires_grad_(not m.lora)
    if m.lora:
        from peft import LoraConfig, get_peft_model

        # Only the language model's linear layers: the regex keeps LoRA out of the ViT.
        targets = "|".join(m.lora_targets)
        lcfg = LoraConfig(
            r=m.lora_r,
            lora_alpha=m.lora_alpha,
            lora_dropout=m.lora_dropout,
            target_modules=rf".*language_model.*\.({targets})",
        )
        model = get_peft_model(model, lcfg)
        # PEFT freezes everything but the adapters: re-enable the projector/ViT choices.
        for name, p in model.named_parameters():
            if ".visual.merger." in name:
                p.requires_grad_(m.train_projector)
            elif ".visual." in name and "lora_" not in name:
                p.requires_grad_(m.train_vision)
    if m.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _setup_training(
    cfg: SFTConfig,
    info: C.DistInfo,
    out_dir: Path,
    model: torch.nn.Module,
    processor: Any,
    total: int,
) -> State:
    """Trainable parameters, AdamW, the schedule and the DeepSpeed engine or DDP wrapper."""
    model = _set_trainable(model, cfg.model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise C.TrainError("nothing to train: enable lora, the language model, vision or projector")
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        params, lr=o.lr, betas=(o.betas[0], o.betas[1]), weight_decay=o.weight_decay
    )
    warmup = int(round(o.warmup_ratio * total))

    def make_sched(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return C.build_scheduler(opt, o.schedule, warmup, total, o.min_lr_ratio)

    bf16 = _use_bf16(cfg, info)
    st = State(cfg, info, out_dir, model, processor, optimizer, make_sched(optimizer), bf16=bf16)
    if cfg.deepspeed:
        import deepspeed

        ds_cfg = C.deepspeed_config(
            cfg.deepspeed, cfg.micro_batch_size, cfg.grad_accum, info.world_size, o.grad_clip, bf16
        )
        # A client torch optimizer: DeepSpeed's fused Adam would compile for ~40 s on first use.
        engine, ds_opt, _, ds_sched = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=make_sched, config=ds_cfg
        )
        st.engine, st.optimizer, st.scheduler = engine, ds_opt, ds_sched
    elif info.distributed:
        dev_ids = [info.device.index] if info.device.type == "cuda" else None
        st.ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=dev_ids)
    return st


# ---------------------------------------------------------------------------------------------
# Loop
# ---------------------------------------------------------------------------------------------


def _train_loop(
    st: State, rows: list[D.QARow], plan: list[list[int]], start: int, logger: Any
) -> None:
    """Run optimizer steps `start..len(plan)-1`, logging every step and checkpointing."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cfg, info = st.cfg, st.info
    batches = _step_loader(st, rows, plan, start)
    show = cfg.progress and info.is_main
    cols = (TextColumn("[bold]sft"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"))  # fmt: skip
    with Progress(*cols, disable=not show) as bar:
        task = bar.add_task("sft", total=len(plan), completed=start, loss=float("nan"))
        for step, micro in zip(range(start, len(plan)), batches, strict=True):
            metrics = _train_step(st, micro)
            logger.log(step + 1, metrics)
            bar.update(task, advance=1, loss=metrics.get("loss", float("nan")))
            last = step + 1 == len(plan)
            if last or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                _save_checkpoint(st, step + 1)


def _step_loader(st: State, rows: list[D.QARow], plan: list[list[int]], start: int) -> Any:
    """Yield, per step, this rank's micro-batches of `LoadedSample`s (decoded ahead by workers)."""
    cfg, info = st.cfg, st.info
    spec = D.FrameSpec(cfg.data.frames, cfg.data.fps, cfg.data.min_frames, cfg.data.max_pixels)
    items = [
        [[rows[i] for i in mb] for mb in D.rank_micro_batches(
            plan[s], cfg.micro_batch_size, cfg.grad_accum, info.rank, info.world_size)]
        for s in range(start, len(plan))
    ]  # fmt: skip
    loader = torch.utils.data.DataLoader(
        _StepDataset(
            items, st.processor, spec, cfg.data.max_seq_len, cfg.data.mode, cfg.data.cache_samples
        ),  # fmt: skip
        batch_size=None,
        num_workers=cfg.data.num_workers,
        collate_fn=lambda x: x,
    )
    return iter(loader)


class _StepDataset(torch.utils.data.Dataset):
    """Item k = the micro-batches of the k-th remaining step, as lists of `LoadedSample`."""

    def __init__(
        self, items: list, processor: Any, spec: D.FrameSpec, max_len: int, mode: str, cache: bool
    ) -> None:
        self.items, self.processor, self.spec = items, processor, spec
        self.max_len, self.mode = max_len, mode
        # Built samples by qa_id; with workers each worker fills its own copy.
        self.cache: dict[str, D.LoadedSample] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, row: D.QARow) -> D.LoadedSample:
        if self.cache is not None and row.qa_id in self.cache:
            return self.cache[row.qa_id]
        sample = D.load_sample(self.processor, row, self.spec, self.max_len, self.mode)
        if self.cache is not None:
            self.cache[row.qa_id] = sample
        return sample

    def __getitem__(self, k: int) -> list[list[D.LoadedSample]]:
        return [[self._load(r) for r in mb] for mb in self.items[k]]


def _label_count(sample: D.LoadedSample) -> int:
    return int((sample.inputs["labels"][:, 1:] != C.IGNORE_INDEX).sum()) if sample.inputs else 0


def _train_step(st: State, micro: list[list[D.LoadedSample]]) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches; returns the step's metrics."""
    info, cfg = st.info, st.cfg
    t0 = time.time()
    lr = _current_lr(st)  # the rate this step uses (the scheduler moves on after it)
    good = [[s for s in mb if s.inputs is not None] for mb in micro]
    _record_skips(st, micro)
    n_global = C.all_reduce_sum(sum(_label_count(s) for mb in good for s in mb), info)
    if n_global == 0:
        st.counts["steps_skipped"] = st.counts.get("steps_skipped", 0) + 1
        return {"skipped_step": 1.0, **_cumulative(st)}
    scale = info.world_size * cfg.grad_accum / n_global
    loss_sum, tokens, video_tokens, n_samples = 0.0, 0, 0, 0
    fallback = next((mb for mb in good if mb), None)
    if fallback is None and (info.distributed or st.engine is not None):
        raise C.TrainError(
            f"rank {info.rank} has no decodable video in this step; other ranks do. Drop broken "
            "videos from the qa table or raise micro_batch_size"
        )
    for m, mb in enumerate(good):
        if not mb and st.engine is None and not info.distributed:
            continue  # single process, plain torch: nothing to synchronize with
        weight = 1.0 if mb else 0.0  # zero-weight forward keeps collectives in step (docstring)
        samples = mb or fallback
        s_sum = _forward_backward(st, samples, scale * weight, last=m == len(good) - 1)
        loss_sum += s_sum * weight
        if mb:
            tokens += sum(int(s.inputs["attention_mask"].sum()) for s in mb)
            video_tokens += sum(s.video_tokens for s in mb)
            n_samples += len(mb)
    grad_norm = _optimizer_step(st)
    seconds = time.time() - t0
    return {
        "loss": C.all_reduce_sum(loss_sum, info) / n_global,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": C.all_reduce_sum(tokens, info) / max(seconds, 1e-9),
        "video_tokens_per_sample": video_tokens / max(1, n_samples),
        "samples": C.all_reduce_sum(n_samples, info),
        "step_s": seconds,
        **_cumulative(st),
    }


def _record_skips(st: State, micro: list[list[D.LoadedSample]]) -> None:
    """Count truncated and skipped samples; append skip reasons to `skipped.jsonl` (per rank)."""
    for s in (s for mb in micro for s in mb):
        if s.truncated:
            st.counts["truncated"] = st.counts.get("truncated", 0) + 1
        if s.error is None:
            continue
        kind = "skipped_decode" if s.error.startswith("decode") else "skipped_too_long"
        st.counts[kind] = st.counts.get(kind, 0) + 1
        st.out_dir.mkdir(parents=True, exist_ok=True)
        line = {"qa_id": s.row.qa_id, "video_path": s.row.video_path, "reason": s.error}
        with (st.out_dir / f"skipped_rank{st.info.rank:05d}.jsonl").open("a") as fh:
            fh.write(json.dumps(line) + "\n")


def _cumulative(st: State) -> dict[str, float]:
    keys = ("truncated", "skipped_decode", "skipped_too_long", "steps_skipped")
    return {k: C.all_reduce_sum(st.counts.get(k, 0), st.info) for k in keys}


def _forward_backward(st: State, samples: list[D.LoadedSample], scale: float, last: bool) -> float:
    """Forward one micro-batch, backward `scale * summed CE`; returns the summed CE (a float)."""
    from contextlib import nullcontext

    from lvr.models.batching import collate

    pad = st.processor.tokenizer.pad_token_id
    batch = collate([s.inputs for s in samples], pad, padding_side="right")
    if "mm_token_type_ids" not in batch:  # never let positions fall back to 1-D
        raise C.TrainError("batch lacks mm_token_type_ids: 3-D M-RoPE positions would be 1-D")
    batch = {k: v.to(st.info.device) for k, v in batch.items()}
    labels = batch.pop("labels")  # [B, L]
    # Only positions that predict a label need logits: from the first label column on.
    first = int((labels != C.IGNORE_INDEX).float().argmax(dim=1).min())
    keep = torch.arange(max(first - 1, 0), labels.shape[1] - 1, device=labels.device)  # [K]
    module = st.engine or st.ddp or st.model
    sync = nullcontext() if st.ddp is None or last else st.ddp.no_sync()
    dev = st.info.device.type
    amp = (
        torch.autocast(dev, dtype=torch.bfloat16)
        if st.bf16 and st.engine is None
        else nullcontext()
    )
    with sync:
        with amp:
            logits = module(**batch, logits_to_keep=keep, use_cache=False).logits  # [B, K, V]
        ce = F.cross_entropy(
            logits.float().flatten(0, 1), labels[:, keep + 1].flatten(),
            ignore_index=C.IGNORE_INDEX, reduction="sum",
        )  # fmt: skip
        if st.engine is not None:
            st.engine.backward(ce * scale)  # the engine divides by grad_accum again: see scale
        else:
            (ce * scale / st.cfg.grad_accum).backward()
    if st.engine is not None:
        st.engine.step()  # applies the update only at the accumulation boundary
    return float(ce.detach())


def _optimizer_step(st: State) -> float:
    """Clip, step, schedule (plain path); read the grad norm DeepSpeed computed."""
    if st.engine is not None:
        norm = st.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")
    params = [p for p in st.model.parameters() if p.requires_grad]
    clip = st.cfg.optim.grad_clip
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    st.optimizer.step()
    st.scheduler.step()
    st.optimizer.zero_grad(set_to_none=True)
    return float(norm)


def _current_lr(st: State) -> float:
    return float(st.scheduler.get_last_lr()[0])


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _base_model(st: State) -> torch.nn.Module:
    model = st.engine.module if st.engine is not None else st.model
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _export_state_dict(st: State) -> dict[str, torch.Tensor] | None:
    """Full weights for the HF export (collective under ZeRO-3); None = the model's own."""
    if st.engine is not None and st.engine.zero_optimization_stage() == 3:
        state = st.engine._zero3_consolidated_16bit_state_dict()  # gathered on rank 0 only
    elif st.cfg.model.lora:
        state = (st.engine.module if st.engine is not None else st.model).state_dict()
    else:
        return None
    if st.cfg.model.lora and state:
        state = C.merge_lora_state_dict(state, st.cfg.model.lora_alpha / st.cfg.model.lora_r)
    return state


def _trainable_state(st: State) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu() for n, p in st.model.named_parameters() if p.requires_grad}


def _save_checkpoint(st: State, step: int) -> Path:
    """Write `checkpoint-<step>/`: HF export, optimizer/scheduler/RNG state, then the marker."""
    ckpt = C.checkpoint_dir(st.out_dir, step)
    state = _export_state_dict(st)
    if st.info.is_main:
        C.save_hf_export(_base_model(st), st.processor, ckpt, state)
    train_dir = ckpt / "training_state"
    if st.engine is not None:
        st.engine.save_checkpoint(str(train_dir / "deepspeed"), tag="state")
    elif st.info.is_main:
        train_dir.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"trainable": _trainable_state(st), "optimizer": st.optimizer.state_dict(),
             "scheduler": st.scheduler.state_dict()},
            train_dir / "train.pt",
        )  # fmt: skip
    C.save_rng(ckpt, st.info.rank)
    counts = _cumulative(st)  # summed over ranks; only rank 0 takes them back on resume
    C.barrier(st.info)
    if st.info.is_main:
        C.write_trainer_state(
            ckpt, {"step": step, "counts": counts, "world_size": st.info.world_size}
        )
        C.prune_checkpoints(st.out_dir, st.cfg.keep_last)
    C.barrier(st.info)
    return ckpt


def _resume(st: State, ckpt: Path) -> int:
    """Restore weights, optimizer, scheduler, counters and RNG from `ckpt`; return its step."""
    state = C.read_trainer_state(ckpt, st.info.world_size)
    if st.engine is not None:
        st.engine.load_checkpoint(str(ckpt / "training_state" / "deepspeed"), tag="state")
    else:
        saved = torch.load(ckpt / "training_state" / "train.pt", weights_only=False)
        missing = set(saved["trainable"]) ^ {
            n for n, p in st.model.named_parameters() if p.requires_grad
        }
        if missing:
            raise C.TrainError(
                f"{ckpt} was trained with other trainable parameters: {sorted(missing)[:3]}"
            )
        st.model.load_state_dict(saved["trainable"], strict=False)
        st.optimizer.load_state_dict(saved["optimizer"])
        st.scheduler.load_state_dict(saved["scheduler"])
    if st.info.is_main:
        st.counts.update({k: int(v) for k, v in state.get("counts", {}).items()})
    C.load_rng(ckpt, st.info.rank)
    return int(state["step"])


def _write_manifest(
    st: State, rows: list, total: int, start: int, ckpt: Path | None, seconds: float, logger: Any
) -> dict[str, Any]:
    """`sft/manifest.json`: config + hash, data, counts, final checkpoint, last metrics."""
    from lvr.artifacts import atomic_write_json, package_versions
    from lvr.config import config_hash

    counts = _cumulative(st)
    manifest = {
        "stage": "sft",
        "status": "done",
        "config": to_dict(st.cfg),
        "config_hash": config_hash(st.cfg),
        "rows": len(rows),
        "steps": total,
        "resumed_from": str(ckpt) if ckpt else None,
        "start_step": start,
        "world_size": st.info.world_size,
        "engine": "deepspeed" if st.engine is not None else ("ddp" if st.ddp else "torch"),
        "counts": counts,
        "final_checkpoint": str(C.checkpoint_dir(st.out_dir, total)),
        "last_metrics": (logger.rows() or [{}])[-1] if st.info.is_main else {},
        "seconds": round(seconds, 3),
        "versions": package_versions(),
    }
    if st.info.is_main:
        atomic_write_json(st.out_dir / "manifest.json", manifest)
    return manifest
