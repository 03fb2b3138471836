"""Checkpoints and manifests of both recipes: save, find, resume exactly, prune, describe.

`runs/<run>/<sft|rl>/checkpoint-000020/` holds the Hugging Face export (loadable by `lvr eval`,
`lvr rl`, vLLM), `training_state/` (trainable weights, optimizer, scheduler or the DeepSpeed engine
state, per-rank RNG state) and `trainer_state.json`, written LAST as the completion marker, so
`latest_checkpoint` never picks a half-written folder. The recipe's `manifest.json` sits next to
the checkpoints.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lvr.artifacts import atomic_write_json, package_versions
from lvr.config import config_hash, to_dict
from lvr.train.common import DistInfo, TrainError, barrier, get_rng_state, set_rng_state

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
TRAIN_STATE = "train.pt"  # trainable weights, optimizer and scheduler (plain torch path)


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    """Folder of the checkpoint after step `step`."""
    return Path(out_dir) / f"{CHECKPOINT_PREFIX}{step:06d}"


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The finished checkpoint with the highest step under `out_dir` (None if there is none).

    A folder counts only when its `trainer_state.json` exists (written last).
    """
    found = [(step, p) for step, p in _checkpoint_folders(out_dir) if (p / STATE_FILE).is_file()]
    return max(found)[1] if found else None


def _checkpoint_folders(out_dir: Path) -> list[tuple[int, Path]]:
    """Every `checkpoint-<step>` folder under `out_dir`, finished or not, with its step."""
    found = []
    for p in Path(out_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return found


def checkpoint_to_resume(out_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to continue from; a fresh run never overwrites another run's checkpoints.

    Raises:
        TrainError: Not resuming, but `out_dir` already holds a finished checkpoint.
    """
    ckpt = latest_checkpoint(out_dir)
    if resume:
        return ckpt
    if ckpt is not None:
        newest = max(_checkpoint_folders(out_dir))[1]
        unfinished = (
            f" (the latest finished one; {newest.name} is unfinished: no {STATE_FILE})"
            if newest != ckpt
            else ""
        )
        raise TrainError(
            f"{out_dir} already holds {ckpt.name}{unfinished}; pass --resume to continue it or "
            "use another --run"
        )
    return None


def prune_checkpoints(out_dir: Path, keep_last: int) -> None:
    """Delete all but the `keep_last` newest finished checkpoints (0 keeps all)."""
    if keep_last <= 0:
        return
    done = sorted(
        p for p in Path(out_dir).glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()
    )
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def read_trainer_state(ckpt: Path, world_size: int | None = None) -> dict[str, Any]:
    """Read a checkpoint's `trainer_state.json`.

    Args:
        ckpt: The checkpoint folder.
        world_size: When given, the number of ranks about to resume from it (per-rank RNG and
            data state only fit the same number).

    Raises:
        TrainError: The folder is not a finished checkpoint, or was written by another number of
            ranks.
    """
    path = Path(ckpt) / STATE_FILE
    if not path.is_file():
        raise TrainError(f"{ckpt} is not a finished checkpoint (no {STATE_FILE})")
    state = json.loads(path.read_text())
    if world_size is not None and state.get("world_size", 1) != world_size:
        raise TrainError(
            f"{ckpt} was written by {state.get('world_size')} ranks; resume with the same number"
        )
    return state


def merge_lora_state_dict(
    state: dict[str, torch.Tensor], scaling: float
) -> dict[str, torch.Tensor]:
    """Fold LoRA adapters into their base weights and restore the plain model's key names.

    PEFT keys look like `base_model.model.X.base_layer.weight`, `...X.lora_A.default.weight` and
    `...X.lora_B.default.weight`; the result has `X.weight = W + scaling * B @ A` and no LoRA keys,
    which is what `save_pretrained` of the base model, vLLM and `lvr eval` expect.

    Args:
        state: Full state dict of a PEFT-wrapped model (one adapter named "default").
        scaling: lora_alpha / r.

    Returns:
        A merged state dict with base-model key names.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        name = key.removeprefix("base_model.model.")
        if ".base_layer." in name:
            prefix = key.rsplit(".base_layer.", 1)[0]
            name = name.replace(".base_layer.", ".")
            a = state.get(f"{prefix}.lora_A.default.weight")
            b = state.get(f"{prefix}.lora_B.default.weight")
            if a is not None and b is not None and key.endswith(".weight"):
                delta = (b.float() @ a.float()) * scaling  # [out, r] @ [r, in]
                value = (value.float() + delta).to(value.dtype)
        out[name] = value
    return out


def save_hf_export(
    model: torch.nn.Module, processor: Any, out: Path, state_dict: dict[str, torch.Tensor] | None
) -> None:
    """Write the Hugging Face folder (weights + config + processor) with `save_pretrained`.

    Args:
        model: The plain transformers model (not PEFT- or engine-wrapped).
        processor: Its processor/tokenizer.
        out: Target folder.
        state_dict: Weights to write (e.g. merged LoRA, ZeRO-3 gathered); None = the model's own.
    """
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    processor.save_pretrained(out)


def save_checkpoint(
    out_dir: Path,
    step: int,
    info: DistInfo,
    export: Callable[[Path], None],
    training_state: Callable[[Path], None],
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write `checkpoint-<step>/` in the order that makes a crash harmless; prune old ones.

    Args:
        out_dir: The recipe's folder (`<run>/sft`, `<run>/rl`).
        step: The step just finished.
        info: This process (collective: every rank calls it).
        export: Writes the HF folder into the given path (main rank; the recipe gathers weights).
        training_state: Writes optimizer/scheduler/weights (or the DeepSpeed engine state) into
            `training_state/` (called on every rank: DeepSpeed saves collectively).
        trainer_state: JSON fields of `trainer_state.json` (step and world size are added).
        keep_last: Finished checkpoints to keep (0 = all).

    Returns:
        The checkpoint folder.
    """
    ckpt = checkpoint_dir(out_dir, step)
    if info.is_main:
        export(ckpt)
    training_state(ckpt / "training_state")
    rng = ckpt / "training_state" / f"rng_rank{info.rank:05d}.pt"
    rng.parent.mkdir(parents=True, exist_ok=True)
    torch.save(get_rng_state(), rng)
    barrier(info)
    if info.is_main:  # the completion marker, last
        state = {**trainer_state, "step": step, "world_size": info.world_size}
        atomic_write_json(ckpt / STATE_FILE, state)
        prune_checkpoints(out_dir, keep_last)
    barrier(info)
    return ckpt


def save_plain_state(
    folder: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, info: DistInfo
) -> None:
    """Trainable weights, optimizer and scheduler of the plain torch path (main rank writes)."""
    if not info.is_main:
        return
    folder.mkdir(parents=True, exist_ok=True)
    trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    state = {"trainable": trainable, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict()}  # fmt: skip
    torch.save(state, folder / TRAIN_STATE)


def load_plain_state(ckpt: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> None:
    """Restore what `save_plain_state` wrote, checking that the same parameters train.

    Raises:
        TrainError: The checkpoint trained other parameters (LoRA vs full, vision on/off).
    """
    saved = torch.load(ckpt / "training_state" / TRAIN_STATE, weights_only=False)
    mine = {n for n, p in model.named_parameters() if p.requires_grad}
    differ = set(saved["trainable"]) ^ mine
    if differ:
        raise TrainError(
            f"{ckpt} was trained with other trainable parameters (LoRA vs full? vision?): "
            f"{sorted(differ)[:3]}"
        )
    model.load_state_dict(saved["trainable"], strict=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])


def check_same_model(ckpt: Path, model: torch.nn.Module) -> None:
    """Refuse to resume `ckpt` into a model of another type (e.g. qwen3_vl over qwen2_5_vl).

    Raises:
        TrainError: The checkpoint's `config.json` names another `model_type` than `model`'s.
    """
    path = Path(ckpt) / "config.json"
    mine = getattr(getattr(model, "config", None), "model_type", None)
    if not path.is_file() or mine is None:
        return
    theirs = json.loads(path.read_text()).get("model_type")
    if theirs and theirs != mine:
        raise TrainError(
            f"{ckpt} holds a {theirs} model but model.path loads a {mine} model; resume with the "
            "model.path the run was started with, or start a new --run"
        )


def resume_trainer_state(
    ckpt: Path, info: DistInfo, model: torch.nn.Module | None = None
) -> dict[str, Any]:
    """The checkpoint's trainer state (same world size required) with this rank's RNG restored.

    Args:
        ckpt: The checkpoint to resume.
        info: This process.
        model: The model about to receive the checkpoint's weights (checked to be of the same
            type, so a different family is named as such, before any weight is compared).

    Raises:
        TrainError: Another world size or model type, or no RNG state for this rank.
    """
    state = read_trainer_state(ckpt, info.world_size)
    if model is not None:
        check_same_model(ckpt, model)
    path = Path(ckpt) / "training_state" / f"rng_rank{info.rank:05d}.pt"
    if not path.is_file():
        raise TrainError(
            f"{ckpt} has no RNG state for rank {info.rank}; resume with the same world size"
        )
    set_rng_state(torch.load(path, weights_only=False))
    return state


def write_manifest(
    out_dir: Path,
    stage: str,
    cfg: Any,
    info: DistInfo,
    fields: dict[str, Any],
) -> dict[str, Any]:
    """`<stage>/manifest.json`: config and hash, world size, versions, plus the recipe's fields
    (steps, counts, final checkpoint, last metrics, seconds...). Main rank writes; all return it.
    """
    manifest = {
        "stage": stage,
        "status": "done",
        "config": to_dict(cfg),
        "config_hash": config_hash(cfg),
        "world_size": info.world_size,
        **fields,
        "versions": package_versions(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if info.is_main:
        atomic_write_json(Path(out_dir) / "manifest.json", manifest)
    return manifest
