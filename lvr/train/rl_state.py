"""State of an `lvr rl` run: the records the loop passes around, checkpoints and the manifest.

Split from lvr/train/rl.py so that the recipe file holds the loop itself (setup, collect, score,
prefill, update); everything here is plain bookkeeping with exact resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lvr.config import to_dict
from lvr.train import common as C
from lvr.train import rewards as R
from lvr.train.rl_config import RLConfig
from lvr.train.rl_parallel import Topology


@dataclass
class Prompt:
    """One question of a step: the row, its video inputs and (after encoding) its embeddings."""

    row: Any  # lvr.train.data.QARow
    inputs: Any  # lvr.mrsp.batch.PromptInput
    pixels: torch.Tensor  # [t*h*w, C*2*p*p]
    key: Any  # lvr.mrsp.encode.VideoKey


@dataclass
class Group:
    """The G rollouts of one prompt, scored."""

    prompt: Prompt
    responses: list[torch.Tensor]  # G x [R_i]
    rewards: list[float]
    parts: dict[str, list[float]]


@dataclass
class State:
    """Everything the loop touches (a plain record, not a trainer)."""

    cfg: RLConfig
    info: C.DistInfo
    group: Any  # this rank's SP process group (None in one process)
    out_dir: Path
    model: torch.nn.Module  # policy; PEFT-wrapped with LoRA
    base: torch.nn.Module  # the transformers model the MR-SP functions run (LoRA injected in it)
    ref: torch.nn.Module | None  # frozen reference copy (None with LoRA or without KL)
    processor: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    cache: Any  # EmbeddingCache
    engine: Any  # rollout engine (vLLM: only on rank 0, dp 1; None elsewhere)
    rows: list
    reward_specs: list[R.RewardSpec]
    pad_id: int
    eos_ids: list[int]
    cursor: int = 0  # questions drawn so far by ALL DP groups (the global data position)
    opt_steps: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    topo: Topology = field(default_factory=Topology)
    order: list[int] = field(default_factory=list)  # row order of epoch `order_epoch` (seeded)
    order_epoch: int = -1


def counts(st: State) -> dict[str, float]:
    """The skip counters every step's metrics and the manifest report."""
    keys = (
        "skipped_decode", "skipped_nonfinite", "steps_skipped", "no_signal_steps",
        "no_signal_updates",
    )  # fmt: skip
    return {k: float(st.counts.get(k, 0)) for k in keys}


def merged_state(st: State) -> dict[str, torch.Tensor] | None:
    """LoRA: the policy's weights with the adapters folded in, keyed like the plain model (what the
    HF export and a vLLM engine load; the training modules are untouched). None without LoRA."""
    if not st.cfg.model.lora:
        return None
    return C.merge_lora_state_dict(
        st.model.state_dict(), st.cfg.model.lora_alpha / st.cfg.model.lora_r
    )


def save_checkpoint(st: State, step: int) -> Path:
    """`checkpoint-<step>/`: HF export, optimizer/scheduler/RNG/cursor, then the marker."""
    ckpt = C.checkpoint_dir(st.out_dir, step)
    if st.info.is_main:
        C.save_hf_export(st.base, st.processor, ckpt, merged_state(st))
        (ckpt / "training_state").mkdir(parents=True, exist_ok=True)
        trainable = {n: p.detach().cpu() for n, p in st.model.named_parameters() if p.requires_grad}
        torch.save(
            {"trainable": trainable, "optimizer": st.optimizer.state_dict(),
             "scheduler": st.scheduler.state_dict()},
            ckpt / "training_state" / "train.pt",
        )  # fmt: skip
    C.save_rng(ckpt, st.info.rank)
    C.barrier(st.info)
    if st.info.is_main:
        state = {"step": step, "cursor": st.cursor, "opt_steps": st.opt_steps,
                 "counts": st.counts, "world_size": st.info.world_size}  # fmt: skip
        C.write_trainer_state(ckpt, state)
        C.prune_checkpoints(st.out_dir, st.cfg.keep_last)
    C.barrier(st.info)
    return ckpt


def resume(st: State, ckpt: Path) -> int:
    """Restore weights, optimizer, scheduler, data cursor, counters and RNG; return the step."""
    state = C.read_trainer_state(ckpt, st.info.world_size)
    saved = torch.load(ckpt / "training_state" / "train.pt", weights_only=False)
    mine = {n for n, p in st.model.named_parameters() if p.requires_grad}
    if set(saved["trainable"]) != mine:
        raise C.TrainError(f"{ckpt} was trained with other trainable parameters (LoRA vs full?)")
    st.model.load_state_dict(saved["trainable"], strict=False)
    st.optimizer.load_state_dict(saved["optimizer"])
    st.scheduler.load_state_dict(saved["scheduler"])
    st.cursor, st.opt_steps = int(state["cursor"]), int(state["opt_steps"])
    st.counts.update({k: int(v) for k, v in state.get("counts", {}).items()})
    C.load_rng(ckpt, st.info.rank)
    return int(state["step"])


def write_manifest(
    st: State, start: int, ckpt: Path | None, seconds: float, logger: C.MetricsLogger
) -> dict[str, Any]:
    """`rl/manifest.json`: config + hash, data, counts, final checkpoint, last metrics."""
    from lvr.artifacts import atomic_write_json, package_versions
    from lvr.config import config_hash

    manifest = {
        "stage": "rl",
        "status": "done",
        "config": to_dict(st.cfg),
        "config_hash": config_hash(st.cfg),
        "rows": len(st.rows),
        "steps": st.cfg.steps,
        "optimizer_steps": st.opt_steps,
        "resumed_from": str(ckpt) if ckpt else None,
        "start_step": start,
        "world_size": st.info.world_size,
        "counts": counts(st),
        "final_checkpoint": str(C.checkpoint_dir(st.out_dir, st.cfg.steps)),
        "last_metrics": (logger.rows() or [{}])[-1] if st.info.is_main else {},
        "seconds": round(seconds, 3),
        "versions": package_versions(),
    }
    if st.info.is_main:
        atomic_write_json(st.out_dir / "manifest.json", manifest)
    return manifest
