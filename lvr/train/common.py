"""Pieces both training recipes share: processes, seeds, the schedule, DeepSpeed, metrics.

Nothing here is a trainer: recipes call these functions from their own top-to-bottom loop
(checkpoints: lvr/train/checkpoint.py; the policy and its optimizer: lvr/train/policy.py).

- `init_distributed` / `finish_distributed`: one process or many (torchrun / the deepspeed launcher set
  RANK, WORLD_SIZE, LOCAL_RANK); gloo on CPU, NCCL on GPU.
- `lr_factor` / `build_scheduler`: cosine or linear decay after a linear warm-up.
- `deepspeed_config`: a ZeRO-2/3 JSON file completed with the recipe's batch, clipping and precision.
- `MetricsLogger`: one JSON line per step, a Parquet table at the end, optional TensorBoard / W&B.
- `Stopwatch`: seconds per named phase of a step.
"""

from __future__ import annotations

import json
import math
import os
import random
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from lvr.artifacts import atomic_write_bytes
from lvr.errors import LvrError
from lvr.reasons import summarize_errors


class TrainError(LvrError):
    """A training setup the user must fix (bad checkpoint, missing DeepSpeed config, ...)."""


# ---------------------------------------------------------------------------------------------
# Skipped samples (both recipes append them to <stage>/skipped.jsonl)
# ---------------------------------------------------------------------------------------------

SKIPPED_FILE = "skipped.jsonl"


def nothing_trained(stage: str, out_dir: Path, reasons: list[str]) -> TrainError:
    """The error of a run whose every sample was skipped: the reasons grouped and counted.

    Raised before a checkpoint of the untrained model is written.

    >>> str(nothing_trained("sft", Path("r/sft"), ["decode: video not found: /a.mp4"] * 2))
    'sft: every sample was skipped (2 x decode: video not found: …), nothing trained and no checkpoint written; one line per sample in r/sft/skipped.jsonl'
    """
    return TrainError(
        f"{stage}: every sample was skipped ({summarize_errors(reasons)}), nothing trained and "
        f"no checkpoint written; one line per sample in {Path(out_dir) / SKIPPED_FILE}"
    )


def skipped_summary(out_dir: Path) -> dict[str, Any]:
    """What `<stage>/skipped.jsonl` holds: the number of skipped samples and their reasons.

    Returns:
        ``{"samples": n, "reasons": "3 x ...; 1 x ..."}`` (``{"samples": 0, ...}`` without skips).
    """
    path = Path(out_dir) / SKIPPED_FILE
    reasons = [row.get("reason") for row in read_jsonl(path)] if path.is_file() else []
    return {"samples": len(reasons), "reasons": summarize_errors(reasons) if reasons else ""}


def skips_in(counts: dict[str, Any]) -> int:
    """How many lines `<stage>/skipped.jsonl` held when a checkpoint saved these counters.

    Both recipes write one line per skipped sample and count it as ``skipped_decode`` or
    ``skipped_too_long`` (summed over ranks), so a checkpoint's counters say how long the file
    was at that step, even in checkpoints written before this function existed.

    >>> skips_in({"skipped_decode": 2.0, "skipped_too_long": 1, "truncated": 5})
    3
    """
    return int(counts.get("skipped_decode", 0)) + int(counts.get("skipped_too_long", 0))


def truncate_skipped(out_dir: Path, keep: int) -> None:
    """On resume, keep the first `keep` lines of `<stage>/skipped.jsonl` (those of the steps the
    checkpoint holds).

    The steps after the checkpoint run again and append their skips again; without this a
    resumed run's file, manifest and summary line would count them twice. A line cut short by
    a kill lies past `keep` (the checkpoint was finished after it) and goes too. The file is
    replaced atomically, so a kill here loses nothing.
    """
    path = Path(out_dir) / SKIPPED_FILE
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    if len(lines) > keep:
        atomic_write_bytes(path, "".join(lines[:keep]).encode())


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    """Where this process sits: rank, world size and the device it computes on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the one that writes files)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group with more than one rank is running."""
        return self.world_size > 1


def pick_device(device: str = "auto") -> torch.device:
    """Return the device to train on ("auto": CUDA when available, else CPU).

    Raises:
        TrainError: A CUDA device was asked for but none is usable (one line, no torch trace).
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(
                f"device={device} but no CUDA GPU is usable here (torch.cuda.is_available() is "
                "False); use device=cpu or device=auto"
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise TrainError(f"device={device} but only {count} CUDA GPU(s) are visible")
    return dev


def uses_bf16(precision: str, device: torch.device) -> bool:
    """bf16 compute for `precision` ("auto": on CUDA only; CPU trains in fp32)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group when launched by torchrun/deepspeed, else run as a single process.

    Args:
        device: "auto", "cpu" or "cuda"; with CUDA each rank takes GPU `LOCAL_RANK`.

    Returns:
        This process's `DistInfo`. A group is initialized only when WORLD_SIZE > 1 (gloo on CPU,
        NCCL on CUDA), so single-process runs need no rendezvous.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def init_deepspeed_distributed(info: DistInfo) -> None:
    """Start DeepSpeed's process group; for a single process, a local one-rank gloo/NCCL group.

    DeepSpeed needs a process group even without a launcher, so the usual launcher variables
    are filled in (free local port) when they are missing.
    """
    import deepspeed

    if not info.distributed:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    backend = "nccl" if info.device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def all_reduce_sum(value: float, info: DistInfo) -> float:
    """Sum a float over all ranks (identity in a single process)."""
    if not info.distributed:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device(info))
    dist.all_reduce(t)
    return float(t.item())


def _collective_device(info: DistInfo) -> torch.device:
    return info.device if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in a single process)."""
    if info.distributed and dist.is_initialized():
        dist.barrier()


def finish_distributed(info: DistInfo, hard_exit: bool = False) -> None:
    """Leave the process group cleanly.

    Args:
        info: This process.
        hard_exit: End the process with `os._exit(0)` after a barrier. ZeRO-3 with several
            processes sometimes aborts in interpreter teardown ("terminate called without an active
            exception"); a barrier then `os._exit(0)` avoids it (environment.md). Only for
            command-line runs: it skips atexit handlers, so flush files before.
    """
    if info.distributed and dist.is_initialized():
        dist.barrier()
        if hard_exit:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Seeds and RNG state
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Capture every RNG this process uses, for exact resume."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore RNG state captured by `get_rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# Schedule
# ---------------------------------------------------------------------------------------------

ScheduleKind = Literal["cosine", "linear", "constant"]


def lr_factor(
    step: int, kind: ScheduleKind, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based).

    Linear warm-up from 1/(warmup+1) to 1 over `warmup_steps`, then cosine/linear decay to
    `min_lr_ratio` at `total_steps`, or constant.

    >>> lr_factor(0, "cosine", 0, 10)
    1.0
    >>> round(lr_factor(5, "linear", 0, 10), 3)
    0.5
    >>> round(lr_factor(0, "cosine", 4, 10), 3)
    0.2
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if kind == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    kind: ScheduleKind,
    warmup_steps: int,
    total_steps: int,
    min_lr_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` following `lr_factor` (stepped once per optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, kind, warmup_steps, total_steps, min_lr_ratio)
    )


# ---------------------------------------------------------------------------------------------
# DeepSpeed
# ---------------------------------------------------------------------------------------------

# The config files shipped with lvr (configs/deepspeed/) are found relative to the repo root or
# the working directory; any other JSON path works too.
_REPO_ROOT = Path(__file__).resolve().parents[2]


def deepspeed_config(
    path: str | Path,
    micro_batch: int,
    grad_accum: int,
    world_size: int,
    grad_clip: float,
    bf16: bool,
) -> dict[str, Any]:
    """Read a DeepSpeed JSON and fill in what the recipe owns (batch sizes, clipping, precision).

    Args:
        path: JSON file, e.g. `configs/deepspeed/zero2.json`.
        micro_batch: Samples per rank per forward.
        grad_accum: Micro-batches per optimizer step.
        world_size: Number of ranks.
        grad_clip: Max global grad norm (0 disables).
        bf16: Train in bf16 (GPU); fp32 otherwise.

    Returns:
        The config dict for `deepspeed.initialize`.

    Raises:
        TrainError: The file does not exist or is not JSON.
    """
    p = Path(path)
    if not p.is_file() and (_REPO_ROOT / p).is_file():
        p = _REPO_ROOT / p
    if not p.is_file():
        raise TrainError(f"DeepSpeed config {path} not found (see configs/deepspeed/zero2.json)")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise TrainError(f"DeepSpeed config {p} is not valid JSON: {exc}") from None
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = grad_accum
    cfg["train_batch_size"] = micro_batch * grad_accum * world_size
    cfg["gradient_clipping"] = grad_clip
    cfg["bf16"] = {"enabled": bool(bf16)}
    cfg.pop("fp16", None)
    cfg.setdefault("steps_per_print", 10**9)  # our logger reports; keep DeepSpeed quiet
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


class MetricsLogger:
    """Per-step metrics to `metrics.jsonl` (appended, survives crashes), Parquet at the end.

    Optional sinks: TensorBoard (`tensorboard` package) and Weights & Biases (`wandb`); both are
    imported only when asked for. Only the main rank writes.
    """

    def __init__(
        self,
        out_dir: Path,
        enabled: bool = True,
        tensorboard: bool = False,
        wandb_project: str | None = None,
        run_name: str = "lvr",
        config: dict[str, Any] | None = None,
        start_step: int = 0,
    ) -> None:
        self.dir = Path(out_dir)
        self.enabled = enabled
        self.path = self.dir / "metrics.jsonl"
        self._tb: Any = None
        self._wandb: Any = None
        if not enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        if tensorboard:
            self._tb = _tensorboard_writer(self.dir / "tensorboard")
        if wandb_project:
            self._wandb = _wandb_run(wandb_project, run_name, config or {})

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint (they will be recomputed).

        Replaced atomically: a kill while this rewrites the file loses no earlier step.
        """
        if not self.path.is_file():
            return
        keep = [r for r in self.rows() if r.get("step", 0) <= step]
        atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in keep).encode())

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record one step's metrics."""
        if not self.enabled:
            return
        row = {"step": step, **metrics}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, int | float):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def rows(self) -> list[dict[str, Any]]:
        """All rows logged so far (from the JSONL file), without a last line cut short."""
        if not self.path.is_file():
            return []
        return read_jsonl(self.path)

    def close(self) -> None:
        """Write `metrics.parquet` and close the optional sinks."""
        if not self.enabled:
            return
        rows = self.rows()
        if rows:
            tmp = self.dir / ".metrics.parquet.tmp"
            pq.write_table(metrics_table(rows), tmp)
            os.replace(tmp, self.dir / "metrics.parquet")
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines log that is appended to, skipping a line that does not parse.

    A full disk (or a kill inside a large write) leaves the last line cut short; the step it
    belonged to is redone on resume, so the rest of the log stays readable rather than the
    resume failing on it.
    """
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def metrics_table(rows: list[dict[str, Any]]) -> pa.Table:
    """One column per metric any row logged (first-seen order), null in rows that lack it.

    Steps log different keys: RL adds ``no_signal`` only on steps without a learning signal.
    ``pa.Table.from_pylist`` takes its columns from the first row alone and would drop such a
    metric from ``metrics.parquet`` without a word.

    >>> metrics_table([{"step": 1, "loss": 0.5}, {"step": 2, "no_signal": 1.0}]).to_pydict()
    {'step': [1, 2], 'loss': [0.5, None], 'no_signal': [None, 1.0]}
    """
    names = list(dict.fromkeys(k for row in rows for k in row))
    return pa.Table.from_pydict({k: [row.get(k) for row in rows] for k in names})


def _tensorboard_writer(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainError("tensorboard logging needs `pip install tensorboard`") from None
    return SummaryWriter(str(path))


def _wandb_run(project: str, name: str, config: dict[str, Any]) -> Any:
    try:
        import wandb
    except ImportError:
        raise TrainError("W&B logging needs `pip install wandb` (or unset wandb_project)") from None
    return wandb.init(project=project, name=name, config=config)


@dataclass
class Stopwatch:
    """Seconds spent per named phase of a step: ``with watch("encode_s"): ...``."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
