"""What an `lvr rl` run holds between steps, and how it is checkpointed and resumed exactly.

Plain records (no trainer): `RLRun` is built once by `lvr.train.rl.recipe.setup` and passed to
`lvr.train.rl.step.rl_step`; `save` / `resume` write and restore it (weights, optimizer,
scheduler, the question cursor, counters, RNG) through the shared `lvr.train.checkpoint`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lvr.mrsp.batch import PromptInput
from lvr.mrsp.encode import EmbeddingCache, VideoKey
from lvr.mrsp.topology import Topology
from lvr.train import checkpoint
from lvr.train.common import DistInfo, skips_in, truncate_skipped
from lvr.train.config import RLConfig
from lvr.train.data import QARow
from lvr.train.policy import lora_scaling
from lvr.train.rewards import RewardSpec

# Cumulative counters every step's metrics and the manifest report.
COUNTERS = (
    "skipped_decode", "skipped_too_long", "skipped_nonfinite", "steps_skipped",
    "no_signal_steps", "no_signal_updates", "weight_syncs",
)  # fmt: skip


@dataclass
class Questions:
    """The questions of the rl split in a seeded order, and how many were drawn so far.

    The order is reshuffled every epoch with the run's seed; `cursor` counts questions drawn by
    ALL data-parallel groups (the global data position, saved in checkpoints).
    """

    rows: list[QARow]
    seed: int
    cursor: int = 0
    _order: list[int] = field(default_factory=list)
    _epoch: int = -1

    def at(self, pos: int) -> QARow:
        """The row at global draw position `pos`."""
        epoch, i = divmod(pos, len(self.rows))
        if self._epoch != epoch:  # one shuffle per epoch, not per question
            self._order = list(range(len(self.rows)))
            random.Random(self.seed * 7919 + epoch).shuffle(self._order)
            self._epoch = epoch
        return self.rows[self._order[i]]


@dataclass
class Prompt:
    """One question of a step: its row, model inputs with the video's embeddings, pixels, key."""

    row: QARow
    inputs: PromptInput  # input ids, positions' inputs, video embeddings [N_video_tokens, D]
    pixels: torch.Tensor  # [t*h*w, C*2*p*p] (kept to re-encode in the no-reuse baseline)
    key: VideoKey


@dataclass
class Group:
    """The G rollouts of one prompt, scored."""

    prompt: Prompt
    responses: list[torch.Tensor]  # G x [R_i] token ids
    rewards: list[float]  # G weighted totals
    parts: dict[str, list[float]]  # reward component -> G values


@dataclass
class RLRun:
    """Everything the RL loop touches (a record, not a trainer)."""

    cfg: RLConfig
    info: DistInfo
    topo: Topology  # SP group (encode, prefill) and the DP replicas
    out_dir: Path  # <run>/rl
    policy: torch.nn.Module  # what the optimizer trains (PEFT-wrapped with LoRA)
    model: torch.nn.Module  # the transformers model MR-SP runs (LoRA injected in it)
    reference: torch.nn.Module | None  # frozen copy for the KL (None: LoRA's adapter-free base)
    processor: Any
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    cache: EmbeddingCache  # one vision encode per video per step (or across steps on disk)
    sampler: Any  # rollout engine (vLLM: only on the SP leader)
    questions: Questions
    rewards: list[RewardSpec]
    pad_id: int
    eos_ids: list[int]
    opt_steps: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # COUNTERS, plus questions_used
    skip_reasons: list[str] = field(default_factory=list)  # why questions were dropped (global)

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def counters(self) -> dict[str, float]:
        """The cumulative counters as metrics."""
        return {k: float(self.counts.get(k, 0)) for k in COUNTERS}


def merged_weights(run: RLRun) -> dict[str, torch.Tensor] | None:
    """LoRA: the policy's weights with the adapters folded in, keyed like the plain model (what
    the HF export and a vLLM engine load; the training modules are untouched). None without."""
    scaling = lora_scaling(run.cfg.model)
    if scaling is None:
        return None
    return checkpoint.merge_lora_state_dict(run.policy.state_dict(), scaling)


def save(run: RLRun, step: int) -> Path:
    """`rl/checkpoint-<step>/`: HF export (LoRA merged), training state, cursor and counters."""

    def export(folder: Path) -> None:
        checkpoint.save_hf_export(run.model, run.processor, folder, merged_weights(run))

    def training_state(folder: Path) -> None:
        checkpoint.save_plain_state(folder, run.policy, run.optimizer, run.scheduler, run.info)

    state = {"cursor": run.questions.cursor, "opt_steps": run.opt_steps, "counts": run.counts}
    return checkpoint.save_checkpoint(
        run.out_dir, step, run.info, export, training_state, state, run.cfg.keep_last
    )


def resume(run: RLRun, ckpt: Path) -> int:
    """Restore weights, optimizer, scheduler, cursor, counters and RNG; return the step."""
    state = checkpoint.resume_trainer_state(ckpt, run.info, run.model)
    checkpoint.load_plain_state(ckpt, run.policy, run.optimizer, run.scheduler)
    run.questions.cursor, run.opt_steps = int(state["cursor"]), int(state["opt_steps"])
    run.counts.update({k: int(v) for k, v in state.get("counts", {}).items()})
    if run.info.is_main:  # the steps ahead append their skips again: keep only the saved ones
        truncate_skipped(run.out_dir, skips_in(run.counts))
    return int(state["step"])
