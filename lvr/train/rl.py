"""`lvr rl`: GRPO-family RL of a vision-language model on long videos, with MR-SP.

Read top to bottom: `run_rl` (setup, loop, save) and the helpers it calls; the config dataclasses
live in lvr/train/rl_config.py, the run state, checkpoints and manifest in rl_state.py, the
rollout engines (hf / vLLM, weight sync) in rl_engines.py, the dp x sp groups in rl_parallel.py.

One RL step:

1. take the next `rollout_batch` questions of the `rl` split (a seeded order; the cursor is saved);
   with dp > 1 SP groups each takes its rollout_batch/dp slice of them;
2. decode frames (`lvr.media`) and encode each video ONCE (`lvr.mrsp.encode.EmbeddingCache`, frames
   split over the SP group); the embeddings serve every rollout and every prefill of the step;
3. roll out G responses per prompt from the cached embeddings (`lvr.mrsp.rollout`, same 3-D
   M-RoPE positions as training; the SP group's rank 0 samples, seeded by the global prompt
   index) and score them (`lvr.train.rewards`);
4. advantages per group (`lvr.train.algos`; DAPO's dynamic sampling drops all-equal groups and
   draws further prompts to refill the batch);
5. old-policy and reference log-probs, then `update_epochs` passes of mini-batches of `update_batch`
   prompts: clipped surrogate + KL loss, aggregated over the whole mini-batch (all DP groups: global
   token/sequence counts), gradients summed over the world and clipped, non-finite steps skipped
   (counted). Log-probs come from the sequence-parallel prefill
   (`lvr.mrsp.prefill.sp_prefill_logprobs`: logits only at response positions);
6. log metrics (`rl/metrics.jsonl`, `rl/metrics.parquet`), checkpoint (`rl/checkpoint-NNNNNN/`: an HF
   folder loadable by `lvr eval` plus optimizer/scheduler/RNG/cursor state for exact resume).

Launch lines::

    # CPU, tiny model (tests, demo)
    lvr rl --config configs/rl/tiny_cpu.yaml --run runs/demo
    # 1 GPU, Qwen2.5-VL-7B from an `lvr sft` checkpoint, LoRA, 64 frames
    lvr rl --config configs/rl/qwen25vl_1gpu.yaml --run runs/exp1
    # 8 GPUs, one SP group of 8 (hour-long videos: up to 3,600 frames), LoRA
    torchrun --nproc_per_node 8 -m lvr.cli rl --config configs/rl/qwen25vl_8gpu_long.yaml --run runs/exp1
    # 8 GPUs as 4 data-parallel SP groups of 2 (shorter videos: more prompts in flight)
    ... --config configs/rl/qwen25vl_8gpu_long.yaml --set sp_size=2 --set data.frames=128
    # continue from the latest checkpoint in runs/exp1/rl/
    ... --resume

Metrics per RL step (`rl/metrics.jsonl`): `reward/mean|std`, `reward/<component>/mean|std`,
`accuracy`, `format_rate`, `response_len/mean|max`, `truncated_rate` (no end token),
`identical_groups`, `groups`, `groups_dropped` / `gen_rounds` (dynamic sampling), `pg_loss`, `kl`,
`entropy`, `clip_frac/low|high|dual`, `ratio/mean` (token means over the update), `grad_norm`,
`opt_steps`, `lr`, `no_signal` (1 on a step without any informative group), seconds `data_s`
(decode + tokenize), `encode_s`, `rollout_s` (includes `reward_s`), `prefill_s` (old-policy +
reference), `update_s`, `sync_s` (new weights into the vLLM engine; ~0 with `hf`), `step_s`, `encodes` (vision-tower runs this step: one per video with
reuse), and cumulative `skipped_decode`, `skipped_nonfinite`, `steps_skipped`, `no_signal_steps`,
`no_signal_updates`, `weight_syncs`.

Steps without a learning signal. A group whose G rewards are all equal has advantage 0 under
every estimator; lvr never lets such groups move the policy:

- a step whose groups are ALL equal (e.g. a model that already answers every prompt right) runs
  no prefill and no update: no Adam step (its moments are untouched), no weight decay, no
  scheduler tick. Metrics: `no_signal` 1 on that step, cumulative `no_signal_steps`;
- a mini-batch (`update_batch` prompts) whose groups are all equal is skipped the same way
  (cumulative `no_signal_updates`); a mini-batch with at least one informative group runs whole,
  zero-advantage rows included: their KL / entropy terms are part of that mini-batch's objective
  and its token normaliser, as in the paper's loss;
- the decision uses the rewards of the GLOBAL batch (gathered over the DP groups), so every rank
  takes the same branch and the collectives stay aligned;
- with DAPO's dynamic sampling the all-equal groups are dropped before the update; if the refill
  rounds find no informative group at all, the step counts as a no-signal step;
- the learning-rate schedule counts optimizer steps actually taken: a warm-up is spent on real
  updates (it exists to tame Adam's first steps), so a run with skipped steps ends before the end
  of a decaying schedule (the `lr` metric shows where it is).

Why: the only gradient left on such a step is the KL term's (exactly 0 while the policy equals
the reference, float noise of ~1e-7 just after) plus the entropy bonus; Adam divides by its own
tiny second moment, so that noise becomes a full `lr`-sized step in a random direction, and
AdamW's decoupled decay shrinks every weight on top. That is how the demo's RL once undid its SFT
on one machine and not on another. verl and TRL step anyway (TRL's tracker treats the KL-only
gradient of zero-variance groups as expected GRPO behaviour: issue #5588, the opt-in mask of PR
#7068 was not merged); DAPO-style dynamic sampling (verl's recipe, OpenRLHF's dynamic filtering)
removes such groups before the update. lvr's rule is the safe end of both: an update happens only
where a reward difference asks for one.

Rollout engines (`rollout.engine`): `hf` samples with the policy's own module (nothing to sync);
`vllm` (the `gpu` extra, or the CPU venv of scripts/vllm_env.sh; dp 1 only) runs a separate vLLM
engine on rank 0, started from the folder the policy was loaded from (on resume: the checkpoint's
HF folder), fed the cached video embeddings, and reloaded in place with the policy's weights (LoRA
merged into plain weights) after every RL step that stepped the optimizer. Extra `vllm.LLM`
arguments go in `rollout.vllm` (dtype, gpu_memory_utilization, max_model_len, ...).

Long-video settings: `data.frames` sets the frames per video (the paper trains with 512 and reaches
3,600 on 8 GPUs). The world is split as dp x sp (`sp_size`; 0 = one SP group of all ranks): each
sequence-parallel group (contiguous ranks) splits the vision encoding by frames and the prefill by
sequence, so the per-GPU activation memory falls roughly as 1/SP; the dp groups take disjoint
slices of every step's prompts (rollout_batch and update_batch must divide by dp). Use the
smallest SP that fits the video length: every extra SP group samples its prompts in parallel.
Keep `micro_batch` small (1-2 rows) for long videos.

Data parallelism keeps the single-group result: the prompt order and the cursor are global (the
groups together take what one process would), rollout seeds follow the global prompt index, the
mini-batches are drawn from the global batch with global loss normalisers, and the gradients are
summed over the world (the SP sum and the DP sum in one all-reduce). So dp 2 x sp 1 equals one
process up to float rounding (tests/test_rl_sp.py). Advantages stay per prompt group (local), and
the logged metrics cover the whole batch (gathered over the DP groups); only the timers
(`*_s`) are rank 0's own.

Deliberate simplifications:
- Within an SP group all ranks hold the same samples: its rank 0 generates and scores, then
  broadcasts the rollouts to the group (no rollout workers).
- With dp > 1 a mini-batch's prompts stay on the DP group that sampled them (no re-sharding of
  embeddings), so one optimizer step may give the groups uneven shares of rows; over an RL step
  each group runs exactly its own rollout_batch/dp prompts. DAPO dynamic sampling and the vLLM
  engine (started on global rank 0 only) need dp = 1: both are refused with dp > 1.
- The vision tower and projector are frozen (the paper's embedding reuse); the language model is
  trained fully or with LoRA (the reference is then the adapter-disabled base).
- Every rank holds the whole policy (no FSDP / ZeRO-3 parameter sharding, no DeepSpeed engine in
  RL): full fine-tuning fits small models; a 7B policy on 80 GB GPUs needs LoRA
  (configs/rl/qwen25vl_*.yaml).
- The vLLM engine shares the training GPU(s) of rank 0 (no separate rollout workers), and weights
  reach it through host memory after each RL step (no CUDA IPC / NCCL weight broadcast).
- A video that fails to decode drops its question from the step (counted, logged to
  `rl/skipped.jsonl`), never replaced by another video.
"""

from __future__ import annotations

import copy
import json
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lvr.config import to_dict
from lvr.train import algos as A
from lvr.train import common as C
from lvr.train import rewards as R
from lvr.train import rl_engines as E
from lvr.train import rl_parallel as P
from lvr.train import rl_state as S
from lvr.train.rl_config import (  # noqa: F401  (re-exported: `from lvr.train.rl import RLConfig`)
    AlgoSection,
    DataSection,
    ModelSection,
    OptimSection,
    RLConfig,
    RolloutSection,
)
from lvr.train.rl_state import Group, Prompt, State

# ---------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------


def run_rl(cfg: RLConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Train with RL and write `run_dir/rl/` (manifest, metrics, checkpoints).

    Args:
        cfg: The recipe config.
        run_dir: Run folder; outputs go to `run_dir/rl/`.
        resume: Continue from the latest finished checkpoint there (fresh start if none).

    Returns:
        The manifest dict (also written to `rl/manifest.json`).
    """
    ckpt = C.latest_checkpoint(Path(run_dir) / "rl") if resume else None
    st = setup(cfg, Path(run_dir), ckpt)
    start = S.resume(st, ckpt) if ckpt is not None else 0
    logger = C.MetricsLogger(
        st.out_dir, st.info.is_main, cfg.tensorboard, cfg.wandb_project or None,
        Path(run_dir).name, to_dict(cfg), start_step=start,
    )  # fmt: skip
    t0 = time.time()
    _loop(st, start, logger)
    logger.close()
    return S.write_manifest(st, start, ckpt, time.time() - t0, logger)


def setup(cfg: RLConfig, run_dir: Path, ckpt: Path | None = None) -> State:
    """Processes, model, reference, optimizer, embedding cache, rollout engine and data.

    `ckpt` is the checkpoint a resume will load (`S.resume`): a vLLM engine starts from its HF
    folder, which holds the weights the policy is about to get, so no reload is needed.
    """
    from lvr.mrsp.encode import EmbeddingCache
    from lvr.train import data as D

    _check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # the world init_distributed joins
    info = C.init_distributed(cfg.device)
    group, topo = P.topology(cfg, info)
    C.seed_everything(cfg.seed)
    specs = R.build_reward_specs(cfg.rewards)  # bad reward paths fail before any loading
    rows = D.read_qa(cfg.data.qa or run_dir / "filter" / "qa", cfg.data.split)
    model, processor, folder = _load_policy(cfg, info, run_dir)
    model, ref = _trainable_and_reference(cfg, model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = [p for p in model.parameters() if p.requires_grad]
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay
    )
    total = cfg.steps * cfg.algo.update_epochs * max(1, cfg.rollout_batch // cfg.update_batch)
    scheduler = C.build_scheduler(optimizer, o.schedule, o.warmup_steps, total)
    cache = EmbeddingCache(base, group, cfg.data.cache_dir or None)
    pad_id, eos_ids = _special_ids(base, processor)
    engine = E.rollout_engine(cfg, info, base, eos_ids, pad_id, ckpt or folder)
    return State(
        cfg, info, group, run_dir / "rl", model, base, ref, processor, optimizer, scheduler,
        cache, engine, rows, specs, pad_id, eos_ids, topo=topo,
    )  # fmt: skip


def _check_config(cfg: RLConfig, world: int) -> None:
    P.check_topology(cfg, world)
    if cfg.rollout_batch % cfg.update_batch:
        raise C.TrainError(
            f"rollout_batch ({cfg.rollout_batch}) must be a multiple of update_batch ({cfg.update_batch})"
        )
    if cfg.rollout.n < 2:
        raise C.TrainError("rollout.n (G) must be >= 2: group-relative advantages need a group")
    if cfg.rollout.temperature <= 0:
        raise C.TrainError(
            "rollout.temperature must be > 0 (log-probs are taken at that temperature)"
        )
    if cfg.micro_batch < 1 or cfg.steps < 1 or cfg.algo.update_epochs < 1:
        raise C.TrainError("micro_batch, steps and algo.update_epochs must be >= 1")
    if cfg.rollout.engine == "vllm":  # every rank: one failing alone would leave the others waiting
        E.check_vllm(cfg.rollout.vllm)


def _load_policy(
    cfg: RLConfig, info: C.DistInfo, run_dir: Path
) -> tuple[torch.nn.Module, Any, str | Path]:
    """Load the starting weights in fp32 (masters; bf16 autocast on GPU).

    Returns the model, its processor and where they came from (folder or hub id; a vLLM rollout
    engine loads the same).
    """
    from lvr.models.loading import load_vlm

    source: str | Path = cfg.model.path
    if source == "tiny":
        from lvr.models.tiny import build_tiny_vlm

        source = run_dir / "models" / "tiny-vlm"
        if info.is_main:
            build_tiny_vlm(source)
        C.barrier(info)
    elif source == "sft":
        source = C.latest_checkpoint(run_dir / "sft")
        if source is None:
            raise C.TrainError(f"model.path=sft but {run_dir / 'sft'} has no finished checkpoint")
    attn = None if cfg.model.attn_implementation == "auto" else cfg.model.attn_implementation
    if attn is None and info.device.type == "cuda":
        attn = "sdpa"  # the SP prefill runs the decoder layers itself (sdpa/eager, Ulysses)
    model, processor = load_vlm(
        source, device=info.device, dtype=torch.float32, attn_implementation=attn
    )
    return model, processor, source


def _trainable_and_reference(
    cfg: RLConfig, model: torch.nn.Module
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """Freeze vision + projector; LoRA or full language model; the frozen reference if KL is on."""
    for name, p in model.named_parameters():
        p.requires_grad_(".visual." not in name and not name.startswith("visual."))
    use_kl = cfg.algo.kl != "none" and cfg.algo.kl_coef > 0
    if cfg.model.lora:
        from peft import LoraConfig, get_peft_model

        targets = "|".join(cfg.model.lora_targets)
        lcfg = LoraConfig(
            r=cfg.model.lora_r, lora_alpha=cfg.model.lora_alpha,
            target_modules=rf".*language_model.*\.({targets})",
        )  # fmt: skip
        return get_peft_model(model, lcfg), None  # reference = adapters disabled
    ref = None
    if use_kl:
        ref = copy.deepcopy(model).eval()
        ref.requires_grad_(False)
    model.train()
    return model, ref


def _special_ids(model: torch.nn.Module, processor: Any) -> tuple[int, list[int]]:
    """Padding id and the ids that end a response (end of turn + the model's eos ids)."""
    from lvr.models.inputs import end_of_turn_ids

    tok = processor.tokenizer
    eos = model.generation_config.eos_token_id
    eos_ids = list(
        dict.fromkeys(
            [*end_of_turn_ids(processor), *([eos] if isinstance(eos, int) else eos or [])]
        )
    )
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]
    return int(pad), [int(i) for i in eos_ids]


# ---------------------------------------------------------------------------------------------
# Loop
# ---------------------------------------------------------------------------------------------


def _loop(st: State, start: int, logger: C.MetricsLogger) -> None:
    """RL steps `start..steps-1`: collect, update, log, checkpoint."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    cfg = st.cfg
    cols = (TextColumn("[bold]rl"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("reward {task.fields[reward]:.3f}"))  # fmt: skip
    with Progress(*cols, disable=not (cfg.progress and st.info.is_main)) as bar:
        task = bar.add_task("rl", total=cfg.steps, completed=start, reward=float("nan"))
        for step in range(start, cfg.steps):
            metrics = rl_step(st, step)
            logger.log(step + 1, metrics)
            bar.update(task, advance=1, reward=metrics.get("reward/mean", float("nan")))
            if step + 1 == cfg.steps or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                S.save_checkpoint(st, step + 1)


def rl_step(st: State, step: int) -> dict[str, float]:
    """One RL step: collect scored groups, compute advantages, update. Returns its metrics."""
    t0 = time.time()
    timers: dict[str, float] = {}
    encodes0, opt0 = st.cache.encodes, st.opt_steps
    groups, ds = _collect(st, step, timers)
    summary = [s for part in P.dp_gather(st.topo, [_summary(st, g) for g in groups]) for s in part]
    metrics: dict[str, float] = {"groups": float(len(summary)), "gen_rounds": float(ds.rounds)}
    metrics["groups_dropped"] = float(ds.dropped)
    # Decided on the global batch: a DP group without prompts still joins the update's collectives.
    if not summary:
        key = "no_signal_steps" if ds.dropped else "steps_skipped"  # DAPO dropped every group
        st.counts[key] = st.counts.get(key, 0) + 1
        return {**metrics, "skipped_step": 1.0, **S.counts(st)}
    metrics.update(_reward_metrics(summary))
    # Per prompt of the GLOBAL batch (the same list on every rank): does its group carry a
    # learning signal? An all-equal group has advantage 0 under every estimator.
    signal = [len(set(s["rewards"])) > 1 for s in summary]
    if not any(signal):  # nothing to learn: the policy, Adam and the schedule stay untouched
        st.counts["no_signal_steps"] = st.counts.get("no_signal_steps", 0) + 1
        metrics.update({"no_signal": 1.0, "opt_steps": float(st.opt_steps)})
        metrics["lr"] = float(st.scheduler.get_last_lr()[0])
        return {**metrics, "step_s": round(time.time() - t0, 4), **S.counts(st)}
    rows = _flatten(groups)
    lengths = [n for s in summary for n in s["lengths"]]  # [P_global*G] response tokens
    rewards = torch.tensor([r for g in groups for r in g.rewards])  # [P*G]
    adv = A.compute_advantages(rewards, st.cfg.rollout.n, st.cfg.algo.advantage)  # [P*G]
    if st.cfg.algo.invert_advantage:
        adv = -adv  # negative control of the learning check only
    with _timed(timers, "prefill_s"):
        old = _prefill_all(st, rows, st.base)
        ref = _reference_logprobs(st, rows)
    with _timed(timers, "update_s"):
        metrics.update(_update(st, rows, adv, old.logprobs, ref, step, lengths, signal))
    with _timed(timers, "sync_s"):
        if st.opt_steps > opt0:  # unchanged weights (all steps non-finite) need no reload
            E.sync_engine(st)
    metrics["weight_syncs"] = float(st.counts.get("weight_syncs", 0))
    metrics.update({k: round(v, 4) for k, v in timers.items()})
    metrics["encodes"] = P.dp_sum(st.topo, {"e": float(st.cache.encodes - encodes0)})["e"]
    metrics["step_s"] = round(time.time() - t0, 4)
    metrics["lr"] = float(st.scheduler.get_last_lr()[0])
    return {**metrics, **S.counts(st)}


class _timed:
    """Add the elapsed seconds of a `with` block to `timers[name]`."""

    def __init__(self, timers: dict[str, float], name: str) -> None:
        self.timers, self.name = timers, name

    def __enter__(self) -> None:
        self.t0 = time.time()

    def __exit__(self, *exc: object) -> None:
        self.timers[self.name] = self.timers.get(self.name, 0.0) + time.time() - self.t0


# ---------------------------------------------------------------------------------------------
# Collect: prompts -> embeddings -> rollouts -> rewards (-> dynamic sampling)
# ---------------------------------------------------------------------------------------------


def _collect(
    st: State, step: int, timers: dict[str, float]
) -> tuple[list[Group], A.DynamicSampling]:
    """Scored groups for one step (refilled by dynamic sampling when enabled)."""
    cfg = st.cfg
    st.cache.new_step()

    def draw(round_: int) -> list[tuple[Group, list[float]]]:
        prompts = _next_prompts(st, cfg.rollout_batch, timers)
        groups = _rollout_and_score(st, prompts, step, round_, timers)
        return [(g, g.rewards) for g in groups]

    if cfg.algo.dynamic_sampling:
        res = A.dynamic_sampling(draw, cfg.rollout_batch, cfg.algo.max_gen_batches)
        return res.groups, res
    batch = draw(0)
    return [g for g, _ in batch], A.DynamicSampling(groups=[], rounds=1, drawn=len(batch))


def _next_prompts(st: State, k: int, timers: dict[str, float]) -> list[Prompt]:
    """This SP group's share of the next `k` decodable questions in the seeded order.

    The order and the cursor are global: the DP groups try disjoint slices of the next candidates,
    share which ones decoded, and draw again until `k` did, so the union over groups is what one
    process takes (and the cursor ends after the k-th decodable question). DP group d then owns
    the decodable questions `[d*k/dp, (d+1)*k/dp)`.
    """
    decoded: dict[int, Any] = {}  # candidate position -> decoded sample (this group's tries)
    good: list[int] = []  # positions that decoded, in draw order (all groups)
    budget = k + len(st.rows)  # bounded: a table of undecodable videos cannot loop forever
    while len(good) < k and budget > 0:
        cands = list(range(st.cursor, st.cursor + min(k - len(good), budget)))
        st.cursor += len(cands)
        budget -= len(cands)
        tries = {pos: _decode(st, _row_at(st, pos), timers) for pos in P.share(st.topo, cands)}
        decoded.update({pos: r for pos, r in tries.items() if not isinstance(r, str)})
        reasons = {pos: r for pos, r in tries.items() if isinstance(r, str)}
        failed = {p: r for part in P.dp_gather(st.topo, reasons) for p, r in part.items()}
        for pos in cands:
            if pos in failed:
                _skip(st, _row_at(st, pos), failed[pos])
            else:
                good.append(pos)
    per = k // st.topo.dp_size
    mine = good[st.topo.dp_rank * per : (st.topo.dp_rank + 1) * per]
    out = []
    for pos in mine:
        # A failure elsewhere shifts ownership: a question another group decoded is decoded again.
        got = decoded.get(pos) or _decode(st, _row_at(st, pos), timers)
        if isinstance(got, str):  # it decoded there but not here: the SP collectives stay aligned
            raise C.TrainError(f"video decoded on another DP group but not here: {got}")
        out.append(_encode(st, _row_at(st, pos), got, timers))
    return out


def _row_at(st: State, pos: int) -> Any:
    """The row at global draw position `pos` (each epoch reshuffled with the run's seed)."""
    import random

    epoch, i = divmod(pos, len(st.rows))
    if st.order_epoch != epoch:  # one shuffle per epoch, not per question
        st.order = list(range(len(st.rows)))
        random.Random(st.cfg.seed * 7919 + epoch).shuffle(st.order)
        st.order_epoch = epoch
    return st.rows[st.order[i]]


def _decode(st: State, row: Any, timers: dict[str, float]) -> tuple[Any, dict] | str:
    """The cache key and processed sample of a question, or why its video failed to decode.

    The raw frames are not kept: a step holds many decoded questions before they are encoded.
    """
    from lvr.artifacts import content_id
    from lvr.media import VideoDecodeError, sample_frames
    from lvr.models.inputs import build_sample
    from lvr.mrsp.encode import VideoKey

    d = st.cfg.data
    with _timed(timers, "data_s"):
        try:
            how = {"fps": d.fps, "max_frames": d.frames} if d.fps > 0 else {"num_frames": d.frames}
            fr = sample_frames(row.video_path, max_pixels=d.max_pixels or None, **how)
        except (VideoDecodeError, OSError) as exc:
            return f"decode: {type(exc).__name__}: {exc}"
        ts = [float(t) for t in fr.timestamps_s]
        rate: dict[str, Any] = {"timestamps": ts} if len(ts) >= 2 else {"fps": 1.0}
        sample = build_sample(
            st.processor, row.question, row.options or None, frames=fr.frames, mode=d.mode, **rate
        )
    key = VideoKey(
        content_id(row.video_path), tuple(int(i) for i in fr.indices), tuple(fr.frames.shape[1:3])
    )
    return key, sample


def _encode(st: State, row: Any, decoded: tuple[Any, dict], timers: dict[str, float]) -> Prompt:
    """Encode a decoded question's video once (a collective over the SP group)."""
    from lvr.mrsp.batch import PromptInput

    key, sample = decoded
    grid = sample["video_grid_thw"][0]  # [3]
    pixels = sample["pixel_values_videos"].to(st.info.device)  # [t*h*w, C*2*p*p]
    with _timed(timers, "encode_s"):
        emb = st.cache.get(key, pixels, grid)  # [N_video_tokens, D], once per video per step
    inputs = PromptInput(
        sample["input_ids"][0], sample["mm_token_type_ids"][0], grid,
        float(sample["second_per_grid_ts"][0]), emb, key=row.qa_id,
    )  # fmt: skip
    return Prompt(row, inputs, pixels, key)


def _skip(st: State, row: Any, reason: str) -> None:
    """Count a dropped question and append why to `rl/skipped.jsonl` (main rank; every rank
    counts every DP group's drops, so the counters are global)."""
    st.counts["skipped_decode"] = st.counts.get("skipped_decode", 0) + 1
    if st.info.is_main:
        st.out_dir.mkdir(parents=True, exist_ok=True)
        line = {"qa_id": row.qa_id, "video_path": row.video_path, "reason": reason}
        with (st.out_dir / "skipped.jsonl").open("a") as fh:
            fh.write(json.dumps(line) + "\n")


def _reencoded(st: State, p: Prompt) -> Any:
    """`p.inputs`, or with `reuse_embeddings=False` a copy whose video is encoded again."""
    import dataclasses

    if st.cfg.reuse_embeddings:
        return p.inputs
    st.cache.new_step()  # forget: the next get runs the vision tower again
    emb = st.cache.get(p.key, p.pixels, p.inputs.video_grid_thw)
    return dataclasses.replace(p.inputs, video_embeds=emb)


def _rollout_and_score(
    st: State, prompts: list[Prompt], step: int, round_: int, timers: dict[str, float]
) -> list[Group]:
    """G responses per prompt (the SP leader samples, its SP group receives them), scored."""
    from lvr.mrsp.comm import sp_rank, sp_size

    cfg = st.cfg
    g = cfg.rollout.n
    seed = ((cfg.seed * 100_003 + step) * 16 + round_) * 1_000_000  # prompt i uses seed + i
    # i is the GLOBAL prompt index: a prompt gets the same samples whatever the DP split.
    seed += st.topo.dp_rank * (cfg.rollout_batch // st.topo.dp_size)
    with _timed(timers, "rollout_s"):
        if not cfg.reuse_embeddings:  # baseline: the tower runs again for every rollout
            for p in prompts:
                for _ in range(g - 1):
                    _reencoded(st, p)
        payload: list[Any] = [None]
        if sp_rank(st.group) == 0 and prompts:
            r = cfg.rollout
            ro = st.engine.generate(
                [p.inputs for p in prompts], n=g, temperature=r.temperature, top_p=r.top_p,
                max_new_tokens=r.max_new_tokens, seed=seed,
            )  # fmt: skip
            with _timed(timers, "reward_s"):
                total, parts = _score(st, prompts, ro.response_ids)
            payload = [(ro.response_ids, total, parts)]
        if sp_size(st.group) > 1:  # src is a global rank
            torch.distributed.broadcast_object_list(payload, src=st.topo.leader, group=st.group)
    if payload[0] is None:
        return []
    responses, total, parts = payload[0]
    return [
        Group(p, responses[i * g : (i + 1) * g], total[i * g : (i + 1) * g],
              {k: v[i * g : (i + 1) * g] for k, v in parts.items()})
        for i, p in enumerate(prompts)
    ]  # fmt: skip


def _score(
    st: State, prompts: list[Prompt], responses: list[torch.Tensor]
) -> tuple[list[float], dict[str, list[float]]]:
    """Decode the responses (prompt-major) and apply the weighted rewards."""
    g = st.cfg.rollout.n
    texts = [st.processor.tokenizer.decode(_strip_eos(r, st.eos_ids)) for r in responses]
    rows = [p.row for p in prompts for _ in range(g)]
    columns = {
        "answer": [r.answer for r in rows],
        "options": [list(r.options) for r in rows],
        "format": [r.format for r in rows],
        "question": [r.question for r in rows],
        "qa_id": [r.qa_id for r in rows],
        "video_path": [r.video_path for r in rows],
    }
    return R.compute_rewards(st.reward_specs, texts, columns)


def _strip_eos(ids: torch.Tensor, eos_ids: Sequence[int]) -> list[int]:
    out = ids.tolist()
    return out[:-1] if out and out[-1] in eos_ids else out


def _summary(st: State, g: Group) -> dict[str, Any]:
    """What the step's metrics and loss normalisers need of a group (small: gathered over DP)."""
    return {
        "rewards": g.rewards, "parts": g.parts,
        "lengths": [int(r.numel()) for r in g.responses],
        "ended": [bool(r.numel()) and int(r[-1]) in st.eos_ids for r in g.responses],
    }  # fmt: skip


def _reward_metrics(summary: list[dict[str, Any]]) -> dict[str, float]:
    """Reward mean/std overall and per component, accuracy, format rate, response lengths, over
    the groups of the whole (global) batch."""
    rewards = torch.tensor([r for s in summary for r in s["rewards"]])
    out = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std(unbiased=False))}
    for name in summary[0]["parts"]:
        vals = torch.tensor([v for s in summary for v in s["parts"][name]])
        out[f"reward/{name}/mean"] = float(vals.mean())
        out[f"reward/{name}/std"] = float(vals.std(unbiased=False))
    for name, key in (("accuracy", "accuracy"), ("format", "format_rate")):
        if f"reward/{name}/mean" in out:
            out[key] = out[f"reward/{name}/mean"]
    lengths = torch.tensor([float(n) for s in summary for n in s["lengths"]])
    ended = [e for s in summary for e in s["ended"]]
    out["response_len/mean"] = float(lengths.mean())
    out["response_len/max"] = float(lengths.max())
    out["truncated_rate"] = 1.0 - sum(ended) / len(ended)
    out["identical_groups"] = float(sum(len(set(s["rewards"])) <= 1 for s in summary))
    return out


# ---------------------------------------------------------------------------------------------
# Log-probs (MR-SP prefill) and the policy update
# ---------------------------------------------------------------------------------------------


def _flatten(groups: list[Group]) -> list[tuple[Prompt, torch.Tensor]]:
    """Prompt-major (prompt, response) rows, aligned with the flat rewards."""
    return [(g.prompt, r) for g in groups for r in g.responses]


def _prefill(st: State, model: torch.nn.Module, rows: list[tuple[Prompt, torch.Tensor]]) -> Any:
    """`PrefillOutput` ([b, R] logprobs, entropy, mask) of a micro-batch of rows."""
    import dataclasses

    from lvr.mrsp.batch import pack_batch
    from lvr.mrsp.prefill import sp_prefill_logprobs

    inputs = [_reencoded(st, p) for p, _ in rows]
    batch = pack_batch(model, inputs, [r for _, r in rows], st.pad_id)
    dev = st.info.device
    batch = dataclasses.replace(
        batch, **{f.name: getattr(batch, f.name).to(dev) for f in dataclasses.fields(batch)
                  if isinstance(getattr(batch, f.name), torch.Tensor)},
    )  # fmt: skip
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if _bf16(st) else nullcontext()
    with amp:
        return sp_prefill_logprobs(model, batch, st.group, temperature=st.cfg.rollout.temperature)


def _bf16(st: State) -> bool:
    p = st.cfg.precision
    return p == "bf16" or (p == "auto" and st.info.device.type == "cuda")


@torch.no_grad()
def _prefill_all(st: State, rows: list[tuple[Prompt, torch.Tensor]], model: torch.nn.Module) -> Any:
    """Per-row `[R_i]` log-probs of every row under `model` (no grad), in micro-batches."""
    out = []
    mb = st.cfg.micro_batch
    for i in range(0, len(rows), mb):
        res = _prefill(st, model, rows[i : i + mb])
        for b, (_, r) in enumerate(rows[i : i + mb]):
            out.append(res.logprobs[b, : r.numel()].float().cpu())
    return _LogProbs(out)


@dataclass
class _LogProbs:
    logprobs: list[torch.Tensor]  # per row [R_i]


def _reference_logprobs(
    st: State, rows: list[tuple[Prompt, torch.Tensor]]
) -> list[torch.Tensor] | None:
    """Reference log-probs: the frozen copy, or the LoRA policy with adapters disabled."""
    if st.cfg.algo.kl == "none" or st.cfg.algo.kl_coef <= 0:
        return None
    if st.ref is not None:
        return _prefill_all(st, rows, st.ref).logprobs
    with st.model.disable_adapter():
        return _prefill_all(st, rows, st.base).logprobs


def _padded(values: list[torch.Tensor], length: int, device: torch.device) -> torch.Tensor:
    """Stack `[R_i]` tensors into `[b, length]`, zero-padded."""
    out = torch.zeros(len(values), length)
    for i, v in enumerate(values):
        out[i, : v.numel()] = v
    return out.to(device)


def _update(
    st: State,
    rows: list[tuple[Prompt, torch.Tensor]],
    adv: torch.Tensor,
    old: list[torch.Tensor],
    ref: list[torch.Tensor] | None,
    step: int,
    lengths: list[int],
    signal: list[bool],
) -> dict[str, float]:
    """`update_epochs` passes over shuffled mini-batches of `update_batch` prompts (whole groups).

    A mini-batch whose groups all lack a learning signal (`signal`: per global prompt) is not
    run: its only gradient would be the KL / entropy terms' (zero at the reference, noise
    otherwise), which Adam would blow up to a full `lr`-sized step.

    The mini-batches are drawn from the GLOBAL batch (`lengths`: response tokens of every row of
    every DP group, prompt-major in DP order); each DP group runs the rows of the mini-batch it
    holds, with the mini-batch's global normalisers, and the gradients are summed over the world.
    So the update is the single-process one whatever dp is (the price: a mini-batch's rows are
    not spread evenly over the DP groups).
    """
    cfg, g = st.cfg, st.cfg.rollout.n
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    sums: dict[str, float] = {}
    norms = []
    n_prompts = len(lengths) // g
    first = st.topo.dp_rank * (cfg.rollout_batch // st.topo.dp_size)  # global index of ours
    held = range(first, first + len(rows) // g)
    for _ in range(cfg.algo.update_epochs):
        order = torch.randperm(n_prompts, generator=gen).tolist()
        for s in range(0, n_prompts, cfg.update_batch):
            batch = order[s : s + cfg.update_batch]
            if not any(signal[p] for p in batch):  # the same decision on every rank
                st.counts["no_signal_updates"] = st.counts.get("no_signal_updates", 0) + 1
                continue
            n_seq = len(batch) * g  # global normalisers of this mini-batch
            n_tok = sum(lengths[p * g + j] for p in batch for j in range(g))
            ids = [(p - first) * g + j for p in batch if p in held for j in range(g)]
            for m in range(0, len(ids), cfg.micro_batch):
                _micro_step(
                    st, rows, ids[m : m + cfg.micro_batch], adv, old, ref, n_tok, n_seq, sums
                )
            norms.append(_optimizer_step(st))
    sums = P.dp_sum(st.topo, sums)  # token sums of the statistics over the whole batch
    tokens = max(sums.pop("tokens", 1.0), 1.0)
    out = {k: v / tokens for k, v in sums.items()}
    if norms:
        out["grad_norm"] = float(sum(norms) / len(norms))
    out["opt_steps"] = float(st.opt_steps)
    return out


def _micro_step(
    st: State,
    rows: list[tuple[Prompt, torch.Tensor]],
    ids: list[int],
    adv: torch.Tensor,
    old: list[torch.Tensor],
    ref: list[torch.Tensor] | None,
    n_tok: int,
    n_seq: int,
    sums: dict[str, float],
) -> None:
    """Forward + backward of one micro-batch; adds token sums of the statistics to `sums`."""
    a = st.cfg.algo
    out = _prefill(st, st.base, [rows[i] for i in ids])  # logprobs/entropy/mask [b, R]
    logp, mask = out.logprobs, out.mask
    length, dev = logp.shape[1], logp.device
    old_b = _padded([old[i] for i in ids], length, dev)  # [b, R]
    pl = A.policy_loss(logp, old_b, adv[ids].to(dev), a.clip_low, a.clip_high, a.dual_clip or None)
    per_tok = pl.loss  # [b, R]
    kl = None
    if ref is not None:
        kl = A.kl_penalty(logp, _padded([ref[i] for i in ids], length, dev), a.kl)
        per_tok = per_tok + a.kl_coef * kl
    if a.entropy_coef:
        per_tok = per_tok - a.entropy_coef * out.entropy
    A.aggregate(per_tok, mask, a.loss_agg, num_tokens=n_tok, num_seqs=n_seq).backward()
    m = mask.detach()
    stats = {
        "pg_loss": pl.loss.detach(), "entropy": out.entropy.detach(),
        "clip_frac/low": pl.clipped_low.float(), "clip_frac/high": pl.clipped_high.float(),
        "clip_frac/dual": pl.dual_clipped.float(), "ratio/mean": pl.ratio,
    }  # fmt: skip
    if kl is not None:
        stats["kl"] = kl.detach()
    for k, v in stats.items():
        sums[k] = sums.get(k, 0.0) + float((v * m).sum())
    sums["tokens"] = sums.get("tokens", 0.0) + float(m.sum())


def _optimizer_step(st: State) -> float:
    """Sum gradients over the world, clip, and step unless the gradient is not finite (skipped,
    counted).

    Summing over the world is the SP sum (each SP rank holds the gradient of its shard) and the DP
    sum (each DP group holds its rows' share of the globally normalised loss) in one all-reduce.
    """
    from lvr.mrsp.comm import sync_sp_grads

    params = [p for p in st.model.parameters() if p.requires_grad]
    sync_sp_grads(params, torch.distributed.group.WORLD if st.info.distributed else None)
    clip = st.cfg.optim.grad_clip
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    if not torch.isfinite(norm):
        st.counts["skipped_nonfinite"] = st.counts.get("skipped_nonfinite", 0) + 1
    else:
        st.optimizer.step()
        st.scheduler.step()
        st.opt_steps += 1
    st.optimizer.zero_grad(set_to_none=True)
    return float(norm)
