"""`lvr rl`: GRPO-family RL of a vision-language model on long videos, with MR-SP.

Read top to bottom: `run_rl` (setup, loop, save). One step, the whole GRPO computation, is
`lvr.train.rl.step.rl_step`; what the run holds and how it is checkpointed is in `state.py`, its
config in `config.py`; sequence parallelism, the embedding cache, the dp x sp groups and the
rollout engines live in `lvr.mrsp`.

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
    # 2 nodes x 8 GPUs (scripts/slurm/rl.sbatch): SP groups inside a node (sp_size divides 8),
    # data-parallel groups across the nodes; the same line on every node
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node1:29500 \
        --rdzv-id exp1 -m lvr.cli rl --config configs/rl/qwen25vl_8gpu_long.yaml \
        --set sp_size=8 -r /shared/runs/exp1
    # continue from the latest checkpoint in runs/exp1/rl/
    ... --resume

Metrics per RL step (`rl/metrics.jsonl`): `reward/mean|std`, `reward/<component>/mean|std`,
`accuracy`, `format_rate`, `response_len/mean|max`, `truncated_rate` (no end token),
`identical_groups`, `groups`, `groups_dropped` / `gen_rounds` (dynamic sampling), `pg_loss`, `kl`,
`entropy`, `clip_frac/low|high|dual`, `ratio/mean` (token means over the update), `grad_norm`,
`opt_steps`, `lr`, `no_signal` (1 on a step without any informative group), seconds `data_s`
(decode + tokenize), `encode_s`, `rollout_s` (includes `reward_s`), `prefill_s` (old-policy +
reference), `update_s`, `sync_s` (new weights into the vLLM engine; ~0 with `hf`), `step_s`,
`encodes` (vision-tower runs this step: one per video with reuse), and cumulative
`skipped_decode`, `skipped_too_long`, `skipped_nonfinite`, `steps_skipped`, `no_signal_steps`,
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
`vllm` (the `gpu` extra, or the CPU venv of scripts/vllm_env.sh) runs a separate vLLM engine on
the leader of every SP group (dp engines for dp data-parallel groups, each sampling its own
group's prompts), started from the folder the policy was loaded from (on resume: the checkpoint's
HF folder), fed the group's cached video embeddings, and reloaded in place with the policy's
weights (LoRA merged into plain weights) after every RL step that stepped the optimizer. Extra
`vllm.LLM` arguments go in `rollout.vllm` (dtype, gpu_memory_utilization, max_model_len, ...).

Long-video settings: `data.frames` sets the frames per video (the paper trains with 512 and reaches
3,600 on 8 GPUs). The world is split as dp x sp (`sp_size`; 0 = one SP group of all ranks): each
sequence-parallel group (contiguous ranks) splits the vision encoding by frames and the prefill by
sequence, so the per-GPU activation memory falls roughly as 1/SP; the dp groups take disjoint
slices of every step's prompts (rollout_batch and update_batch must divide by dp). Use the
smallest SP that fits the video length: every extra SP group samples its prompts in parallel.
Keep `micro_batch` small (1-2 rows) for long videos; a prompt longer than `data.max_seq_len`
minus `rollout.max_new_tokens` is rebuilt with fewer frames (as in SFT), or skipped and logged.

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
  each group runs exactly its own rollout_batch/dp prompts. DAPO dynamic sampling needs dp = 1
  (refused with dp > 1).
- The vision tower and projector are frozen (the paper's embedding reuse); the language model is
  trained fully or with LoRA (the reference is then the adapter-disabled base).
- Every rank holds the whole policy (no FSDP / ZeRO-3 parameter sharding, no DeepSpeed engine in
  RL): full fine-tuning fits small models; a 7B policy on 80 GB GPUs needs LoRA
  (configs/rl/qwen25vl_*.yaml).
- Each vLLM engine shares its SP leader's training GPU (no separate rollout workers), and weights
  reach it through host memory after each RL step (no CUDA IPC / NCCL weight broadcast).
- A video that fails to decode drops its question from the step (counted, logged to
  `rl/skipped.jsonl`), never replaced by another video. A run whose first step finds no usable
  question (the draw tries the whole table) stops with the reasons counted, before any
  checkpoint; the manifest (`skipped`) and the summary line count the skips of a finished run.
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lvr.config import to_dict
from lvr.layout import RunLayout, check_layout
from lvr.models.inputs import end_of_turn_ids
from lvr.mrsp.encode import EmbeddingCache
from lvr.mrsp.engines import check_vllm, make_rollout_engine
from lvr.mrsp.topology import Node, build_topology, check_sp_in_node, dp_size_for
from lvr.train import checkpoint
from lvr.train.common import (
    SKIPPED_FILE,
    MetricsLogger,
    TrainError,
    init_distributed,
    nothing_trained,
    seed_everything,
    skipped_summary,
    uses_bf16,
)
from lvr.train.config import RLConfig
from lvr.train.data import read_qa
from lvr.train.policy import base_model, load_policy, make_optimizer, set_trainable
from lvr.train.rewards import build_reward_specs
from lvr.train.rl import state
from lvr.train.rl.state import Questions, RLRun
from lvr.train.rl.step import rl_step


def run_rl(cfg: RLConfig, run_dir: Path, resume: bool = False) -> dict[str, Any]:
    """GRPO on the run's rl split: `cfg.steps` RL steps (`rl_step`), checkpoints, a manifest.

    `run_dir/rl/` receives `metrics.jsonl` (one line per step), `checkpoint-NNNNNN/` folders and
    `manifest.json`, which is also returned. With `resume`, the latest finished checkpoint there
    is continued exactly (weights, optimizer, scheduler, question cursor, RNG); without it a
    folder that already holds checkpoints raises `TrainError`, as does a config that cannot run
    and a run whose every question is skipped (decode failure, too long): it fails after its
    first step, which tried the whole table, and writes no checkpoint. A run folder that is a
    file or in the older layout raises `LayoutError` before anything loads.
    """
    layout = check_layout(run_dir)
    ckpt = checkpoint.checkpoint_to_resume(layout.rl, resume)
    run = setup(cfg, layout, ckpt)
    if ckpt is None and run.info.is_main:
        (run.out_dir / SKIPPED_FILE).unlink(missing_ok=True)  # an attempt with no checkpoint
    start = state.resume(run, ckpt) if ckpt is not None else 0
    logger = MetricsLogger(
        run.out_dir, run.info.is_main, cfg.tensorboard, cfg.wandb_project or None,
        layout.root.name, to_dict(cfg), start_step=start,
    )  # fmt: skip
    began = time.time()
    columns = (TextColumn("[bold]rl"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("reward {task.fields[reward]:.3f}"))  # fmt: skip
    with Progress(*columns, disable=not (cfg.progress and run.info.is_main)) as bar:
        task = bar.add_task("rl", total=cfg.steps, completed=start, reward=float("nan"))
        for step in range(start, cfg.steps):
            metrics = rl_step(run, step)
            if start == 0 and not run.counts.get("questions_used"):  # a step tries every row
                raise nothing_trained("rl", run.out_dir, run.skip_reasons)
            logger.log(step + 1, metrics)
            bar.update(task, advance=1, reward=metrics.get("reward/mean", float("nan")))
            if step + 1 == cfg.steps or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                state.save(run, step + 1)
    logger.close()
    return checkpoint.write_manifest(run.out_dir, "rl", cfg, run.info, {
        "rows": len(run.questions.rows),
        "steps": cfg.steps,
        "optimizer_steps": run.opt_steps,
        "resumed_from": str(ckpt) if ckpt else None,
        "start_step": start,
        "counts": run.counters(),
        "skipped": skipped_summary(run.out_dir) if run.info.is_main else {},
        "final_checkpoint": str(checkpoint.checkpoint_dir(run.out_dir, cfg.steps)),
        "last_metrics": (logger.rows() or [{}])[-1] if run.info.is_main else {},
        "seconds": round(time.time() - began, 3),
    })  # fmt: skip


def setup(cfg: RLConfig, layout: RunLayout, ckpt: Path | None = None) -> RLRun:
    """Processes and groups, policy and reference, optimizer, embedding cache, sampler, data.

    `ckpt` is the checkpoint a resume will load: a vLLM engine starts from its HF folder, which
    holds the weights the policy is about to get, so no reload is needed.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))  # the world init_distributed joins
    check_config(cfg, world, Node.from_env(os.environ, world))
    info = init_distributed(cfg.device)
    topo = build_topology(cfg.sp_size, info.world_size, info.rank)
    seed_everything(cfg.seed)
    rewards = build_reward_specs(cfg.rewards)  # bad reward paths fail before any loading
    rows = read_qa(cfg.data.qa or layout.qa, cfg.data.split)
    # fp32 masters for what trains (bf16 autocast on GPU); with LoRA in bf16 the frozen base
    # (and so the adapter-free reference) is kept in bf16, as SFT does: a 7B base in fp32 alone
    # is 30 GB.
    bf16_base = cfg.model.lora and uses_bf16(cfg.precision, info.device)
    dtype = torch.bfloat16 if bf16_base else torch.float32
    policy, processor, source = load_policy(cfg.model, layout, info, dtype)
    reference = _frozen_reference(cfg, policy)
    policy = set_trainable(policy, cfg.model)
    policy.train()
    model = base_model(policy)
    steps_per_rl_step = cfg.algo.update_epochs * max(1, cfg.rollout_batch // cfg.update_batch)
    optimizer, scheduler = make_optimizer(policy, cfg.optim, cfg.steps * steps_per_rl_step)
    pad_id, eos_ids = _special_ids(model, processor)
    # vllm: one engine per SP group, on its leader (the rank that samples the group's prompts)
    sampler = make_rollout_engine(cfg.rollout.engine, model, eos_ids, pad_id, ckpt or source,
                                  info.rank == topo.leader, cfg.rollout.vllm)  # fmt: skip
    return RLRun(
        cfg=cfg, info=info, topo=topo, out_dir=layout.rl, policy=policy, model=model,
        reference=reference, processor=processor, optimizer=optimizer, scheduler=scheduler,
        cache=EmbeddingCache(model, topo.sp_group, cfg.data.cache_dir or None), sampler=sampler,
        questions=Questions(rows, cfg.seed), rewards=rewards, pad_id=pad_id, eos_ids=eos_ids,
    )  # fmt: skip


def check_config(cfg: RLConfig, world: int, node: Node | None = None) -> None:
    """Settings that cannot work, refused before anything loads (one line each).

    Args:
        cfg: The recipe config.
        world: The number of ranks.
        node: This rank's node under torchrun ``--nnodes`` (None: one node holds every rank).

    Raises:
        TrainError: The first problem found.
    """
    dp = dp_size_for(cfg.sp_size, world)
    check_sp_in_node(cfg.sp_size, world, node or Node(world, 0, 1))
    if cfg.rollout_batch % cfg.update_batch:
        raise TrainError(
            f"rollout_batch ({cfg.rollout_batch}) must be a multiple of update_batch ({cfg.update_batch})"
        )
    if dp > 1 and (cfg.rollout_batch % dp or cfg.update_batch % dp):
        raise TrainError(
            f"rollout_batch ({cfg.rollout_batch}) and update_batch ({cfg.update_batch}) must be "
            f"multiples of the data-parallel size {dp} (world {world} / sp_size {cfg.sp_size})"
        )
    if dp > 1 and cfg.algo.dynamic_sampling:  # refills would draw different counts per group
        raise TrainError("algo.dynamic_sampling needs one SP group (sp_size 0 or = world size)")
    if cfg.rollout.n < 2:
        raise TrainError("rollout.n (G) must be >= 2: group-relative advantages need a group")
    if cfg.rollout.temperature <= 0:
        raise TrainError(
            "rollout.temperature must be > 0 (log-probs are taken at that temperature)"
        )
    if cfg.micro_batch < 1 or cfg.steps < 1 or cfg.algo.update_epochs < 1:
        raise TrainError("micro_batch, steps and algo.update_epochs must be >= 1")
    if cfg.model.train_vision or cfg.model.train_projector:
        raise TrainError(
            "lvr rl keeps the vision tower and projector frozen (the cached video embeddings "
            "are reused by every rollout and prefill): set model.train_vision and "
            "model.train_projector to false"
        )
    if cfg.data.max_seq_len <= cfg.rollout.max_new_tokens:
        raise TrainError(
            f"data.max_seq_len ({cfg.data.max_seq_len}) must exceed rollout.max_new_tokens "
            f"({cfg.rollout.max_new_tokens}): the prompt needs room"
        )
    if cfg.rollout.engine == "vllm":  # every rank: one failing alone would leave the others waiting
        check_vllm(cfg.rollout.vllm)


def _frozen_reference(cfg: RLConfig, policy: torch.nn.Module) -> torch.nn.Module | None:
    """A frozen copy of the starting policy for the KL term; None without KL or with LoRA (the
    reference is then the policy with its adapters disabled)."""
    if cfg.model.lora or cfg.algo.kl == "none" or cfg.algo.kl_coef <= 0:
        return None
    reference = copy.deepcopy(policy).eval()
    reference.requires_grad_(False)
    return reference


def _special_ids(model: torch.nn.Module, processor: Any) -> tuple[int, list[int]]:
    """Padding id and the ids that end a response (end of turn + the model's eos ids)."""
    tok = processor.tokenizer
    eos = model.generation_config.eos_token_id
    eos_ids = list(
        dict.fromkeys(
            [*end_of_turn_ids(processor), *([eos] if isinstance(eos, int) else eos or [])]
        )
    )
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]
    return int(pad), [int(i) for i in eos_ids]
