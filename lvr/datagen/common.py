"""Small helpers every datagen stage shares: shard planning with stale-file cleanup, upstream reads,
and the model-call side of a stage (this shard's share of the request budget, usage in manifests)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from lvr.artifacts import Shard, Stage, content_id, plan_shards, read_table
from lvr.errors import LvrError


class StageInputError(LvrError):
    """An upstream stage has not been run (or left no table) in this run folder."""


def settings_id(settings: dict[str, Any]) -> str:
    """Id of the settings that change a stage's rows; it joins every shard item's fingerprint.

    Changing them (e.g. the clip stride) makes a rerun recompute the shards instead of trusting
    markers written under other settings; settings that only change speed are left out.
    """
    return content_id("settings", json.dumps(settings, sort_keys=True, default=str))


def shards_for(
    items: Sequence[Any], shard_size: int, shard: int, num_shards: int, stage: Stage
) -> list[Shard]:
    """This machine's shards of ``items``; stale files of an older, longer plan are removed.

    Args:
        items: Work items, already in their deterministic order.
        shard_size: Items per shard.
        shard: This machine's index.
        num_shards: Number of machines.
        stage: The stage whose folder may hold shard files from an earlier plan.

    Returns:
        The shards to run here.
    """
    total = math.ceil(len(items) / shard_size) if items else 0
    _drop_beyond(stage, total)
    return plan_shards(items, shard_size, shard, num_shards)


def _drop_beyond(stage: Stage, total: int) -> None:
    """Delete shard files and markers whose index is >= the current number of shards.

    They can only come from an earlier plan with more shards (more inputs or a smaller shard size)
    and would otherwise be read back as current rows.
    """
    folders = [stage.dir / t for t in stage.tables] + [stage.dir / "_done"]
    for folder in folders:
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            stem = f.name.split(".")[0]
            if stem.isdigit() and int(stem) >= total:
                f.unlink(missing_ok=True)


def retry_failed_shards(stage: Stage, shards: Sequence[Shard]) -> int:
    """Forget the completion markers of ``shards`` that hold error rows, so they run again.

    Used by stages whose errors may be transient (model calls): with the request cache, the redo
    pays only for the failed rows. Returns the number of shards reopened.
    """
    reopened = 0
    for shard in shards:
        marker = stage.marker(shard)
        if not marker.is_file():
            continue
        try:
            errors = json.loads(marker.read_text()).get("errors", {})
        except (OSError, json.JSONDecodeError):
            errors = {"?": 1}  # an unreadable marker proves nothing: redo the shard
        if any(int(v) > 0 for v in errors.values()):
            marker.unlink(missing_ok=True)
            reopened += 1
    return reopened


def upstream_shards(upstream: Stage, shard: int, num_shards: int, command: str) -> list[int]:
    """Indices of the finished upstream shards that belong to this machine (``k % n == shard``).

    Downstream stages follow the upstream shard numbering (caption shard k captions the clips of
    segment shard k), so every machine works only on what it produced itself and no stage has to
    wait for the others.

    Raises:
        StageInputError: No finished upstream shard at all (the upstream stage was not run).
    """
    done = upstream.dir / "_done"
    ready = []
    for marker in sorted(done.glob("*.json")) if done.is_dir() else []:
        stem = marker.name.split(".")[0]
        if not stem.isdigit():
            continue
        k = int(stem)
        if all((upstream.dir / t / f"{stem}.parquet").is_file() for t in upstream.tables):
            ready.append(k)
    if not ready:
        raise StageInputError(
            f"{upstream.dir} has no finished shards; run `lvr datagen {command}` on this run first"
        )
    return [k for k in ready if k % num_shards == shard]


def read_shard(upstream: Stage, table: str, k: int) -> pa.Table:
    """One shard file of an upstream table (validated against its schema)."""
    return read_table(upstream.dir / table / f"{k:05d}.parquet", table)


def drop_orphans(stage: Stage, upstream: Stage) -> None:
    """Delete this stage's shard files and markers whose upstream shard no longer exists."""
    probe_table = upstream.tables[0]
    for folder in [stage.dir / t for t in stage.tables] + [stage.dir / "_done"]:
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            stem = f.name.split(".")[0]
            if stem.isdigit() and not (upstream.dir / probe_table / f"{stem}.parquet").is_file():
                f.unlink(missing_ok=True)


def error_line(exc: BaseException, limit: int = 300) -> str:
    """One line naming the error type and message, for ``error`` columns."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------------
# Model calls: request budget and usage
# ---------------------------------------------------------------------------------------------


def shard_limiter(backend: str, options: Mapping[str, Any], num_shards: int) -> Any:
    """This process's request budget: ``1 / num_shards`` of the job's limits in ``options``.

    Shards of a Slurm-array style run cannot talk to each other, so each spends an equal share of
    ``max_requests_per_minute`` / ``max_tokens_per_minute`` (the limits of the whole job).

    Args:
        backend: The stage's backend kind; only ``openai`` has rate limits.
        options: The stage's backend options.
        num_shards: Number of machines sharing the job.

    Returns:
        A `lvr.backends.RateLimiter`, or None for backends without rate limits.
    """
    if backend != "openai":
        return None
    from lvr.backends.limits import RateLimiter

    return RateLimiter.for_share(
        options.get("max_requests_per_minute"),
        options.get("max_tokens_per_minute"),
        share=1.0 / num_shards,
    )


class CallReport:
    """The model-call fields of a stage manifest: usage per model, cost, and the rate limits.

    ``usage`` counts this invocation; ``usage_total`` adds it to the ``usage_total`` of the
    manifest this invocation replaces (same stage, same machine name), so reruns and resumes add
    up to what the run folder cost. Cost comes from the config's ``prices`` at writing time.

    Args:
        manifest: Path of the manifest this stage run will write.
        prices: model -> {prompt_per_1m, completion_per_1m}.
        backends: Returns the stage's backends built so far (each with ``model`` and ``usage``).
        limiter: This process's request budget (None: no rate limits).
        num_shards: Number of machines sharing the job's budget.
    """

    def __init__(
        self,
        manifest: Path,
        prices: Mapping[str, Mapping[str, float]],
        backends: Callable[[], Iterable[Any]],
        limiter: Any = None,
        num_shards: int = 1,
    ):
        from lvr.backends.usage import Usage

        self.prices, self.backends = prices, backends
        self.limits = None
        if limiter is not None:
            self.limits = {**limiter.describe(), "num_shards": num_shards}
        self.before: dict[str, Usage] = {}
        try:
            old = json.loads(manifest.read_text()).get("usage_total") or {}
            self.before = {m: Usage.from_dict(u) for m, u in old.items()}
        except (OSError, json.JSONDecodeError, AttributeError, TypeError, ValueError):
            pass  # no earlier manifest (or not one of ours): start from zero

    def __call__(self) -> dict[str, Any]:
        from lvr.backends.usage import Usage, usage_table

        now: dict[str, Usage] = {}
        for backend in self.backends():
            usage = getattr(backend, "usage", None)
            if usage is not None:
                now[backend.model] = now.get(backend.model, Usage()) + usage
        total = dict(self.before)
        for model, usage in now.items():
            total[model] = total.get(model, Usage()) + usage
        out: dict[str, Any] = {
            "usage": usage_table(now, self.prices),
            "usage_total": usage_table(total, self.prices),
        }
        if self.limits is not None:
            out["rate_limits"] = self.limits
        return out
