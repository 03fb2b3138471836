"""`lvr sft`: chain-of-thought SFT of a vision-language model on long videos, in one file.

Read top to bottom: the config, `run_sft` (setup, loop, save) and the helpers it calls. The parts
both recipes share are components: the config sections (lvr/train/config.py), the policy and
its freezing/LoRA (lvr/train/policy.py), checkpoints and manifests (lvr/train/checkpoint.py) and
the video -> sample path (lvr/train/data.py, the same prompt, video tokens and 3-D M-RoPE
positions that RL rollouts and eval use). The model learns
`<think>reasoning</think><answer>X</answer>` for the `sft` split of the `qa` table.

Launch lines::

    # CPU, tiny model (tests, demo)
    lvr sft --config configs/sft/tiny_cpu.yaml --run runs/demo
    # 1 GPU (Qwen2.5-VL-7B, LoRA, bf16, plain torch)
    lvr sft --config configs/sft/qwen25vl_1gpu.yaml --run runs/exp1
    # 8 GPUs (full fine-tuning, DeepSpeed ZeRO-3); `deepspeed --num_gpus 8 --module lvr.cli sft ...`
    # works the same way
    torchrun --nproc_per_node 8 -m lvr.cli sft --config configs/sft/qwen25vl_8gpu.yaml -r runs/exp1
    # 2 nodes x 8 GPUs: the same line on every node, meeting at the first node (scripts/slurm/sft.sbatch);
    # the run folder on a file system every node sees
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node1:29500 \
        --rdzv-id exp1 -m lvr.cli sft --config configs/sft/qwen25vl_8gpu.yaml -r /shared/runs/exp1
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
  every rank); a step whose videos all fail is skipped (counted as `steps_skipped`). A run that
  trained on no sample at all (every video broken, every row too long) is an error naming the
  reasons, raised before a checkpoint of the untrained model is written; a run that skipped
  some samples finishes and its manifest (`skipped`) and summary line count them by reason.
- Resuming needs the same world size (per-rank RNG state and ZeRO partitions).
- LoRA checkpoints export merged weights (for eval/vLLM) and keep the adapter state for resume.
"""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as functional
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lvr.config import to_dict
from lvr.layout import check_layout
from lvr.models import family
from lvr.models.batching import collate
from lvr.models.inputs import IGNORE_INDEX
from lvr.train import checkpoint
from lvr.train.common import (
    SKIPPED_FILE,
    DistInfo,
    MetricsLogger,
    TrainError,
    all_reduce_sum,
    build_scheduler,
    deepspeed_config,
    init_deepspeed_distributed,
    init_distributed,
    nothing_trained,
    seed_everything,
    skipped_summary,
    skips_in,
    truncate_skipped,
    uses_bf16,
)
from lvr.train.config import SFTConfig
from lvr.train.data import (
    FrameSpec,
    LoadedSample,
    QARow,
    load_sample,
    plan_steps,
    rank_micro_batches,
    read_qa,
    text_lengths,
)
from lvr.train.policy import base_model, load_policy, lora_scaling, set_trainable

# ---------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------


@dataclass
class SFTRun:
    """Everything the loop touches (a plain record, not a trainer)."""

    cfg: SFTConfig
    info: DistInfo
    out_dir: Path  # <run>/sft
    model: torch.nn.Module  # the transformers model, possibly PEFT-wrapped
    processor: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ds_engine: Any = None  # DeepSpeedEngine, or None on the plain path
    ddp: Any = None  # DistributedDataParallel wrapper on the plain multi-process path
    bf16: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    trained: int = 0  # samples trained on since this process started (all ranks)
    skip_reasons: list[str] = field(default_factory=list)  # since this process started (all ranks)
    skipped_ids: set[str] = field(default_factory=set)  # qa_ids of those skips


def run_sft(cfg: SFTConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train, checkpoint and write `<run>/sft/` (manifest, metrics, checkpoints).

    Args:
        cfg: The recipe config.
        run_dir: Run folder; outputs go to `<run>/sft/`.
        resume: Continue from the latest finished checkpoint there (fresh start if none).

    Returns:
        The manifest dict (also written to `sft/manifest.json`).

    Raises:
        TrainError: A bad setup, `<run>/sft/` holds checkpoints and `resume` is False, or every
            sample was skipped (no checkpoint of an untrained model is written).
        LayoutError: `run_dir` is a file or a run in the older layout.
    """
    layout = check_layout(run_dir)
    info = init_distributed(cfg.device)
    if cfg.deepspeed:
        init_deepspeed_distributed(info)
    seed_everything(cfg.seed)
    ckpt = checkpoint.checkpoint_to_resume(layout.sft, resume)
    if ckpt is None and info.is_main:
        (layout.sft / SKIPPED_FILE).unlink(missing_ok=True)  # an attempt with no checkpoint
    rows = read_qa(cfg.data.qa or layout.qa, cfg.data.split)  # a bad table fails before loading
    global_batch = cfg.micro_batch * cfg.grad_accum * info.world_size
    if len(rows) < global_batch:  # plan_steps refuses it too, but only after the model loads
        raise TrainError(
            f"{len(rows)} qa rows with split {cfg.data.split!r} cannot fill one step of "
            f"{global_batch} samples (micro_batch x grad_accum x ranks); lower micro_batch or "
            "grad_accum"
        )
    total = cfg.max_steps or cfg.epochs * (len(rows) // global_batch)
    bf16 = uses_bf16(cfg.precision, info.device)
    # LoRA on the plain path keeps the frozen base in bf16; everything else trains fp32 masters
    # (DeepSpeed casts to bf16 itself and keeps fp32 copies in the optimizer).
    dtype = torch.bfloat16 if bf16 and cfg.model.lora and not cfg.deepspeed else torch.float32
    model, processor, _ = load_policy(cfg.model, layout, info, dtype)
    lengths = text_lengths(processor, rows, cfg.data.mode)
    plan = plan_steps(lengths, global_batch, total, cfg.seed, cfg.data.group_by_length)
    run = _setup_training(cfg, info, layout.sft, model, processor, total, bf16)
    start = _resume(run, ckpt) if ckpt is not None else 0
    logger = MetricsLogger(
        run.out_dir, info.is_main, cfg.tensorboard, cfg.wandb_project or None, layout.root.name,
        to_dict(cfg), start_step=start,
    )  # fmt: skip
    began = time.time()
    _train_loop(run, rows, plan, start, logger)
    logger.close()
    return checkpoint.write_manifest(run.out_dir, "sft", cfg, info, {
        "rows": len(rows),
        "steps": total,
        "resumed_from": str(ckpt) if ckpt else None,
        "start_step": start,
        "engine": "deepspeed" if run.ds_engine is not None else ("ddp" if run.ddp else "torch"),
        "counts": _cumulative(run),
        "skipped": skipped_summary(run.out_dir) if info.is_main else {},
        "final_checkpoint": str(checkpoint.checkpoint_dir(run.out_dir, total)),
        "last_metrics": (logger.rows() or [{}])[-1] if info.is_main else {},
        "seconds": round(time.time() - began, 3),
    })  # fmt: skip


def _setup_training(
    cfg: SFTConfig,
    info: DistInfo,
    out_dir: Path,
    model: torch.nn.Module,
    processor: Any,
    total: int,
    bf16: bool,
) -> SFTRun:
    """Trainable parameters, AdamW, the schedule and the DeepSpeed engine or DDP wrapper."""
    model = set_trainable(model, cfg.model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        params, lr=o.lr, betas=(o.betas[0], o.betas[1]), weight_decay=o.weight_decay
    )

    def make_schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return build_scheduler(opt, o.schedule, o.warmup_for(total), total, o.min_lr_ratio)

    run = SFTRun(
        cfg, info, out_dir, model, processor, optimizer, make_schedule(optimizer), bf16=bf16
    )
    if cfg.deepspeed:
        import deepspeed  # the `train` extra; only this path needs it

        ds_cfg = deepspeed_config(
            cfg.deepspeed, cfg.micro_batch, cfg.grad_accum, info.world_size, o.grad_clip, bf16
        )
        # A client torch optimizer: DeepSpeed's fused Adam would compile for ~40 s on first use.
        engine, ds_opt, _, ds_sched = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=make_schedule, config=ds_cfg
        )
        run.ds_engine, run.optimizer, run.scheduler = engine, ds_opt, ds_sched
    elif info.distributed:
        dev_ids = [info.device.index] if info.device.type == "cuda" else None
        run.ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=dev_ids)
    return run


# ---------------------------------------------------------------------------------------------
# Loop
# ---------------------------------------------------------------------------------------------


def _train_loop(
    run: SFTRun, rows: list[QARow], plan: list[list[int]], start: int, logger: MetricsLogger
) -> None:
    """Run optimizer steps `start..len(plan)-1`, logging every step and checkpointing."""
    cfg, info = run.cfg, run.info
    batches = _step_loader(run, rows, plan, start)
    columns = (TextColumn("[bold]sft"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("loss {task.fields[loss]:.4f}"))  # fmt: skip
    with Progress(*columns, disable=not (cfg.progress and info.is_main)) as bar:
        task = bar.add_task("sft", total=len(plan), completed=start, loss=float("nan"))
        for step, micro in zip(range(start, len(plan)), batches, strict=True):
            metrics = _train_step(run, micro)
            logger.log(step + 1, metrics)
            bar.update(task, advance=1, loss=metrics.get("loss", float("nan")))
            last = step + 1 == len(plan)
            untrained = start == 0 and run.trained == 0
            if untrained and (last or len(run.skipped_ids) >= len(rows)):  # every row failed
                raise nothing_trained("sft", run.out_dir, run.skip_reasons)
            if untrained:
                continue  # no checkpoint of an untrained model, not even an intermediate one
            if last or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                _save_checkpoint(run, step + 1)


def _step_loader(run: SFTRun, rows: list[QARow], plan: list[list[int]], start: int) -> Any:
    """Yield, per step, this rank's micro-batches of `LoadedSample`s (decoded ahead by workers)."""
    cfg, info = run.cfg, run.info
    data = cfg.data
    spec = FrameSpec(data.frames, data.fps, data.min_frames, data.max_pixels)
    items = [
        [[rows[i] for i in mb] for mb in rank_micro_batches(
            plan[s], cfg.micro_batch, cfg.grad_accum, info.rank, info.world_size)]
        for s in range(start, len(plan))
    ]  # fmt: skip
    dataset = _StepDataset(
        items, run.processor, spec, data.max_seq_len, data.mode, data.cache_samples
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=data.num_workers, collate_fn=lambda x: x
    )
    return iter(loader)


class _StepDataset(torch.utils.data.Dataset):
    """Item k = the micro-batches of the k-th remaining step, as lists of `LoadedSample`."""

    def __init__(
        self, items: list, processor: Any, spec: FrameSpec, max_len: int, mode: str, cache: bool
    ) -> None:
        self.items, self.processor, self.spec = items, processor, spec
        self.max_len, self.mode = max_len, mode
        # Built samples by qa_id; with workers each worker fills its own copy.
        self.cache: dict[str, LoadedSample] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.items)

    def _load(self, row: QARow) -> LoadedSample:
        if self.cache is not None and row.qa_id in self.cache:
            return self.cache[row.qa_id]
        sample = load_sample(self.processor, row, self.spec, self.max_len, self.mode)
        if self.cache is not None:
            self.cache[row.qa_id] = sample
        return sample

    def __getitem__(self, k: int) -> list[list[LoadedSample]]:
        return [[self._load(r) for r in mb] for mb in self.items[k]]


def _label_count(sample: LoadedSample) -> int:
    return int((sample.inputs["labels"][:, 1:] != IGNORE_INDEX).sum()) if sample.inputs else 0


def _train_step(run: SFTRun, micro: list[list[LoadedSample]]) -> dict[str, float]:
    """One optimizer step over this rank's micro-batches; returns the step's metrics."""
    info, cfg = run.info, run.cfg
    began = time.time()
    lr = float(run.scheduler.get_last_lr()[0])  # the rate this step uses
    good = [[s for s in mb if s.inputs is not None] for mb in micro]
    _record_skips(run, micro)
    n_global = all_reduce_sum(sum(_label_count(s) for mb in good for s in mb), info)
    if n_global == 0:
        run.counts["steps_skipped"] = run.counts.get("steps_skipped", 0) + 1
        return {"skipped_step": 1.0, **_cumulative(run)}
    scale = info.world_size * cfg.grad_accum / n_global
    loss_sum, tokens, video_tokens, n_samples = 0.0, 0, 0, 0
    fallback = next((mb for mb in good if mb), None)
    if fallback is None and (info.distributed or run.ds_engine is not None):
        raise TrainError(
            f"rank {info.rank} has no decodable video in this step; other ranks do. Drop broken "
            "videos from the qa table or raise micro_batch"
        )
    for m, mb in enumerate(good):
        if not mb and run.ds_engine is None and not info.distributed:
            continue  # single process, plain torch: nothing to synchronize with
        weight = 1.0 if mb else 0.0  # zero-weight forward keeps collectives in step (docstring)
        samples = mb or fallback
        s_sum = _forward_backward(run, samples, scale * weight, last=m == len(good) - 1)
        loss_sum += s_sum * weight
        if mb:
            tokens += sum(int(s.inputs["attention_mask"].sum()) for s in mb)
            video_tokens += sum(s.video_tokens for s in mb)
            n_samples += len(mb)
    grad_norm = _optimizer_step(run)
    seconds = time.time() - began
    samples = all_reduce_sum(n_samples, info)
    run.trained += int(samples)
    return {
        "loss": all_reduce_sum(loss_sum, info) / n_global,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": all_reduce_sum(tokens, info) / max(seconds, 1e-9),
        "video_tokens_per_sample": video_tokens / max(1, n_samples),
        "samples": samples,
        "step_s": seconds,
        **_cumulative(run),
    }


def _record_skips(run: SFTRun, micro: list[list[LoadedSample]]) -> None:
    """Count truncated and skipped samples; the main rank appends every rank's skip reasons to
    `sft/skipped.jsonl` (as `lvr rl` does)."""
    lines = []
    for s in (s for mb in micro for s in mb):
        if s.truncated:
            run.counts["truncated"] = run.counts.get("truncated", 0) + 1
        if s.error is None:
            continue
        kind = "skipped_decode" if s.error.startswith("decode") else "skipped_too_long"
        run.counts[kind] = run.counts.get(kind, 0) + 1
        lines.append({"qa_id": s.row.qa_id, "video_path": s.row.video_path, "reason": s.error})
    if run.info.distributed:  # every rank joins, even with nothing to report
        parts: list[Any] = [None] * run.info.world_size
        torch.distributed.all_gather_object(parts, lines)
        lines = [line for part in parts for line in part]
    run.skip_reasons.extend(line["reason"] for line in lines)
    run.skipped_ids.update(line["qa_id"] for line in lines)
    if lines and run.info.is_main:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        with (run.out_dir / SKIPPED_FILE).open("a") as fh:
            fh.writelines(json.dumps(line) + "\n" for line in lines)


def _cumulative(run: SFTRun) -> dict[str, float]:
    keys = ("truncated", "skipped_decode", "skipped_too_long", "steps_skipped")
    return {k: all_reduce_sum(run.counts.get(k, 0), run.info) for k in keys}


def _forward_backward(run: SFTRun, samples: list[LoadedSample], scale: float, last: bool) -> float:
    """Forward one micro-batch, backward `scale * summed CE`; returns the summed CE (a float)."""
    pad = run.processor.tokenizer.pad_token_id
    try:
        batch = collate([s.inputs for s in samples], pad, padding_side="right")
    except ValueError as exc:  # LLaVA-OneVision: whole videos of different frame counts
        raise TrainError(f"micro-batch {[s.row.qa_id for s in samples]}: {exc}") from None
    if "mm_token_type_ids" not in batch:  # never let M-RoPE positions fall back to 1-D
        raise TrainError("batch lacks mm_token_type_ids: 3-D M-RoPE positions would be 1-D")
    batch = family.model_inputs(run.model, {k: v.to(run.info.device) for k, v in batch.items()})
    labels = batch.pop("labels")  # [B, L]
    # Only positions that predict a label need logits: from the first label column on.
    first = int((labels != IGNORE_INDEX).float().argmax(dim=1).min())
    keep = torch.arange(max(first - 1, 0), labels.shape[1] - 1, device=labels.device)  # [K]
    module = run.ds_engine or run.ddp or run.model
    sync = nullcontext() if run.ddp is None or last else run.ddp.no_sync()
    device = run.info.device.type
    amp = (
        torch.autocast(device, dtype=torch.bfloat16)
        if run.bf16 and run.ds_engine is None
        else nullcontext()
    )
    with sync:
        with amp:
            logits = module(**batch, logits_to_keep=keep, use_cache=False).logits  # [B, K, V]
        ce = functional.cross_entropy(
            logits.float().flatten(0, 1), labels[:, keep + 1].flatten(),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )  # fmt: skip
        if run.ds_engine is not None:
            run.ds_engine.backward(ce * scale)  # the engine divides by grad_accum again: see scale
        else:
            (ce * scale / run.cfg.grad_accum).backward()
    if run.ds_engine is not None:
        run.ds_engine.step()  # applies the update only at the accumulation boundary
    return float(ce.detach())


def _optimizer_step(run: SFTRun) -> float:
    """Clip, step, schedule (plain path); read the grad norm DeepSpeed computed."""
    if run.ds_engine is not None:
        norm = run.ds_engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")
    params = [p for p in run.model.parameters() if p.requires_grad]
    clip = run.cfg.optim.grad_clip
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return float(norm)


# ---------------------------------------------------------------------------------------------
# Checkpoints (lvr/train/checkpoint.py writes them; here: what SFT puts in)
# ---------------------------------------------------------------------------------------------


def _policy(run: SFTRun) -> torch.nn.Module:
    return run.ds_engine.module if run.ds_engine is not None else run.model


def _export_state_dict(run: SFTRun) -> dict[str, torch.Tensor] | None:
    """Full weights for the HF export (collective under ZeRO-3); None = the model's own."""
    if run.ds_engine is not None and run.ds_engine.zero_optimization_stage() == 3:
        state = run.ds_engine._zero3_consolidated_16bit_state_dict()  # gathered on rank 0 only
    elif run.cfg.model.lora:
        state = _policy(run).state_dict()
    else:
        return None
    scaling = lora_scaling(run.cfg.model)
    if scaling is not None and state:
        state = checkpoint.merge_lora_state_dict(state, scaling)
    return state


def _save_checkpoint(run: SFTRun, step: int) -> Path:
    """`sft/checkpoint-<step>/`: HF export (LoRA merged), training state, counters."""
    state = _export_state_dict(run)  # a collective under ZeRO-3: every rank, before the export

    def export(folder: Path) -> None:
        checkpoint.save_hf_export(base_model(_policy(run)), run.processor, folder, state)

    def training_state(folder: Path) -> None:
        if run.ds_engine is not None:
            run.ds_engine.save_checkpoint(str(folder / "deepspeed"), tag="state")
        else:
            checkpoint.save_plain_state(folder, run.model, run.optimizer, run.scheduler, run.info)

    counts = _cumulative(run)  # summed over ranks; only rank 0 takes them back on resume
    return checkpoint.save_checkpoint(
        run.out_dir, step, run.info, export, training_state, {"counts": counts}, run.cfg.keep_last
    )


def _resume(run: SFTRun, ckpt: Path) -> int:
    """Restore weights, optimizer, scheduler, counters and RNG from `ckpt`; return its step."""
    state = checkpoint.resume_trainer_state(ckpt, run.info, _policy(run))
    if run.ds_engine is not None:
        run.ds_engine.load_checkpoint(str(ckpt / "training_state" / "deepspeed"), tag="state")
    else:
        checkpoint.load_plain_state(ckpt, run.model, run.optimizer, run.scheduler)
    if run.info.is_main:
        run.counts.update({k: int(v) for k, v in state.get("counts", {}).items()})
        truncate_skipped(run.out_dir, skips_in(run.counts))  # the steps ahead log theirs again
    return int(state["step"])
