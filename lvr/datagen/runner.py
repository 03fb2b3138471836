"""One runner for the sharded datagen stages: a stage declares, the runner runs (datatrove's shape).

A stage is a :class:`DatagenStage`: its name and tables, its upstream stage and the tables it reads
there, a ``plan`` that turns those tables (of upstream shard ``k``) into the typed items of its own
shard ``k``, and a worker: a callable over items that returns rows per table. Everything the stages
used to repeat lives here once::

    upstream shards of this machine -> drop orphaned shards -> plan items per shard
      -> reopen shards with error rows (stages whose errors may pass)
      -> model backends (this machine's share of the request budget) -> open the worker
      -> run_stage (skip finished shards, write each shard + marker, manifest with the model
         calls' usage, refreshed after every shard) -> close the worker and the backends

The first stage (``segment``) has no upstream: its plan lists every input and the runner cuts the
items into shards of ``shards.videos_per_shard``. Caption/qa shard ``k`` covers the clips/videos of
segment shard ``k``, so machine ``i`` of ``n`` runs the whole chain on shards ``k % n == i``.

An `Executor` (``lvr datagen run --executor ray``: `lvr.datagen.ray_executor.RayExecutor`) runs
the unfinished shards of the whole job instead: the same shards, files and markers, pulled from
one queue by its workers, with one request budget for all of them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import pyarrow as pa

from lvr.artifacts import SchemaError, read_table, rows_to_table
from lvr.datagen.common import CallReport, ModelBackends
from lvr.datagen.config import DatagenConfig
from lvr.errors import LvrError
from lvr.layout import STAGE_TABLES, RunLayout, check_layout
from lvr.stages import Shard, Stage, StageResult, manifest_name, plan_shards, run_stage

Item = TypeVar("Item")
Rows = dict[str, list[dict[str, Any]]]  # table name -> rows (dicts keyed by column)


class StageInputError(LvrError):
    """An upstream stage has not been run (or left no table) in this run folder."""


class Worker(Protocol[Item]):
    """What a stage runs on the items of one shard (it may also have a ``close()``)."""

    def __call__(self, items: list[Item]) -> Rows: ...


@dataclass(frozen=True)
class StageContext:
    """What a stage's worker may know about where it runs.

    ``models`` are the stage's model backends (stages that declare ``models``), built by the
    runner with this machine's request cache and share of the request budget; the runner reports
    their usage in the manifest and closes them.
    """

    layout: RunLayout
    shard: int
    num_shards: int
    progress: bool
    models: ModelBackends | None = None
    # False when the executor already runs one worker per CPU (Ray): no process pool of its own.
    parallel: bool = True

    @property
    def request_cache(self) -> Path:
        """This worker's model-call cache (one SQLite file per machine or worker)."""
        if self.models is not None:
            return self.models.cache_file
        return self.layout.request_cache(self.shard, self.num_shards)

    def model_backends(self, section: str, backend: str, model: str) -> ModelBackends:
        """The stage's model backends for a model-backed worker.

        Raises:
            LvrError: The section names a model backend but no model (one line: what to set).
        """
        require_model(section, backend, model)
        if self.models is None:  # a stage with model workers declares `models`
            raise LvrError(f"internal: the {section} stage declared no model backends")
        return self.models


def require_model(section: str, backend: str, model: str) -> None:
    """Stop when a section names a model backend but no model, or a local folder that is not there.

    Raises:
        LvrError: One line saying what to set.
    """
    if not model:
        raise LvrError(
            f"{section}.backend={backend} needs {section}.model (the served name, or a local "
            "folder for the hf backend)"
        )
    if backend == "hf":  # a mistyped folder fails now, not when the first shard loads the model
        from lvr.models.loading import resolve_source  # torch: only for local models

        resolve_source(model)


class Executor(Protocol):
    """Runs the unfinished shards of a whole job elsewhere (`lvr.datagen.ray_executor`)."""

    def describe(self) -> dict[str, Any]:
        """What ran the shards, for the stage manifest (``{"kind": "ray", "workers": 4}``)."""
        ...

    def model_calls(self, options: Mapping[str, Any]) -> Any:
        """The job's shared request budget and usage tally (a `CallReport` source)."""
        ...

    def execute(
        self, stage: DatagenStage[Any], cfg: DatagenConfig, layout: RunLayout, calls: Any,
        todo: Sequence[Shard],
    ) -> Iterator[Shard]:  # fmt: skip
        """Run ``todo`` (each shard written with its marker); yield each shard once committed."""
        ...


@dataclass(frozen=True)
class DatagenStage(Generic[Item]):
    """The declaration of one sharded datagen stage.

    Attributes:
        name: The stage (``caption``); its bookkeeping lives in ``_stages/<name>/``.
        tables: The tables it writes (must match ``lvr.layout.STAGE_TABLES[name]``).
        upstream: The stage it reads, or None for the first stage (it reads ``input.source``).
        reads: The upstream tables ``plan`` gets (shard ``k`` of each); the manifest's inputs.
        plan: ``(cfg, {table: upstream shard k}) -> items of shard k``; without an upstream,
            ``(cfg, {}) -> every item``, in their deterministic order.
        open_worker: ``(cfg, context) -> worker``; built once per run, after planning.
        transient_errors: Its error rows may pass on a retry (model calls), so finished shards
            holding errors are redone when asked (their successful calls are cache hits).
        prepare: Runs first (with the progress flag) and may return a changed config (segment
            renders synthetic inputs).
        models: ``cfg -> (backend kind, backend options)`` of the model calls its worker makes
            through ``StageContext.models``; None for stages that call no model.
        check: ``cfg -> None``, raising `LvrError` for a setting that would fail every item of
            the stage alike (a prompt, a model name, backend options). `check_stages` runs the
            checks of a whole chain before its first stage works, so a bad qa setting stops
            ``lvr datagen run`` at once, not after hours of segmenting and captioning.
    """

    name: str
    tables: tuple[str, ...]
    upstream: str | None
    reads: tuple[str, ...]
    plan: Callable[[DatagenConfig, dict[str, pa.Table]], list[Item]]
    open_worker: Callable[[DatagenConfig, StageContext], Worker[Item]]
    transient_errors: bool = False
    prepare: Callable[[DatagenConfig, RunLayout, bool], DatagenConfig] | None = None
    models: Callable[[DatagenConfig], tuple[str, Mapping[str, Any]]] | None = None
    check: Callable[[DatagenConfig], None] | None = None

    def __post_init__(self) -> None:
        if STAGE_TABLES.get(self.name) != self.tables:
            raise ValueError(f"stage {self.name} writes {self.tables}; the layout says "
                             f"{STAGE_TABLES.get(self.name)} (lvr.layout.STAGE_TABLES)")  # fmt: skip


def check_stages(stages: Sequence[DatagenStage[Any]], cfg: DatagenConfig) -> None:
    """Run the setting checks of every stage of a chain before any of them works.

    The config file itself is checked when it is loaded (keys, types, value ranges); these are the
    checks that need a stage's code (its prompts, its backend's options).

    Raises:
        LvrError: The first setting that would fail a stage (one line naming it).
    """
    for stage in stages:
        if stage.check is not None:
            stage.check(cfg)


def run_datagen_stage(
    stage: DatagenStage[Any],
    cfg: DatagenConfig,
    run: str | Path | RunLayout,
    shard: int = 0,
    num_shards: int = 1,
    progress: bool = True,
    retry_errors: bool = True,
    executor: Executor | None = None,
) -> StageResult:
    """Run one datagen stage on this machine's shards (resumable: finished shards are skipped).

    Args:
        stage: The stage declaration (``lvr.datagen.caption.STAGE``...).
        cfg: The datagen config.
        run: The run folder (or its layout).
        shard: This machine's index.
        num_shards: Number of machines.
        progress: Show progress bars.
        retry_errors: Redo finished shards that hold error rows, for stages whose errors may pass.
        executor: Run every unfinished shard of the job on its workers (e.g. Ray) instead of this
            machine's shards here; ``shard``/``num_shards`` must then be 0/1.

    Returns:
        The stage result (shards run/skipped, rows and errors per table).

    Raises:
        LayoutError: ``run`` was written by an older lvr (names the migration).
        StageInputError: The upstream stage has no finished shard here.
    """
    if executor is not None and num_shards != 1:
        raise LvrError("an executor (--executor ray) runs the whole job from one queue: "
                       "drop --shard/--num-shards")  # fmt: skip
    layout = run if isinstance(run, RunLayout) else check_layout(run)
    check_stages([stage], cfg)
    if stage.prepare is not None:
        cfg = stage.prepare(cfg, layout, progress)
    target = Stage(layout, stage.name)
    shards, inputs = _plan(stage, cfg, target, shard, num_shards)
    if retry_errors and stage.transient_errors:
        retry_failed_shards(target, shards)
    manifest = manifest_name(shard, num_shards)
    models, calls, report = None, None, None
    if stage.models is not None:
        kind, options = stage.models(cfg)
        if executor is not None:  # one budget for every worker, usage summed by the driver
            calls = executor.model_calls(options if kind == "openai" else {})
        else:
            models = calls = ModelBackends(kind, options, layout.request_cache(shard, num_shards),
                                           num_shards)  # fmt: skip
        report = CallReport(target.manifest(manifest), cfg.prices, calls)  # before it is replaced
    if executor is not None:
        execute = partial(executor.execute, stage, cfg, layout, calls)
        fields = partial(_executor_fields, executor, report)
        return run_stage(target, shards, None, cfg, inputs=inputs, description=stage.name,
                         progress=progress, manifest=manifest, report=fields, execute=execute)  # fmt: skip
    with ExitStack() as closing:  # the worker first, then the backends it called
        if models is not None:
            closing.callback(models.close)
        worker = stage.open_worker(cfg, StageContext(layout, shard, num_shards, progress, models))
        if hasattr(worker, "close"):
            closing.callback(worker.close)

        def tables(s: Shard) -> dict[str, pa.Table]:
            rows = worker(s.items)
            return {t: rows_to_table(rows[t], t) for t in stage.tables}

        return run_stage(target, shards, tables, cfg, inputs=inputs, description=stage.name,
                         progress=progress, manifest=manifest, report=report)  # fmt: skip


def _executor_fields(
    executor: Executor, report: Callable[[], dict[str, Any]] | None
) -> dict[str, Any]:
    """The manifest fields of a stage run by an executor: what ran it, and the model calls."""
    return {"executor": executor.describe(), **(report() if report is not None else {})}


def _plan(
    stage: DatagenStage[Any], cfg: DatagenConfig, target: Stage, shard: int, num_shards: int
) -> tuple[list[Shard], list[str | Path]]:
    """This machine's shards with their items, and the inputs the manifest names."""
    if stage.upstream is None:
        items = stage.plan(cfg, {})
        shards = shards_for(items, cfg.shards.videos_per_shard, shard, num_shards, target)
        return shards, [cfg.input.source] if Path(cfg.input.source).exists() else []
    upstream = Stage(target.layout, stage.upstream)
    ready = upstream_shards(upstream, shard, num_shards)
    drop_orphans(target, upstream)
    shards = [
        Shard(k, stage.plan(cfg, {t: read_shard(upstream, t, k) for t in stage.reads}))
        for k in ready
    ]
    return shards, [target.layout.table(t) for t in stage.reads]


# ---------------------------------------------------------------------------------------------
# Shard bookkeeping
# ---------------------------------------------------------------------------------------------


def shards_for(
    items: Sequence[Any], shard_size: int, shard: int, num_shards: int, stage: Stage
) -> list[Shard]:
    """This machine's shards of ``items``; stale files of an older, longer plan are removed.

    Args:
        items: Work items, already in their deterministic order.
        shard_size: Items per shard.
        shard: This machine's index.
        num_shards: Number of machines.
        stage: The stage whose folders may hold shard files from an earlier plan.

    Returns:
        The shards to run here.
    """
    total = math.ceil(len(items) / shard_size) if items else 0
    # Shards numbered >= total can only come from an earlier plan with more shards (more inputs
    # or a smaller shard size) and would otherwise be read back as current rows.
    _drop_shard_files(stage, lambda k: k >= total)
    return plan_shards(items, shard_size, shard, num_shards)


def drop_orphans(stage: Stage, upstream: Stage) -> None:
    """Delete this stage's shard files and markers whose upstream shard no longer exists."""
    probe_table = upstream.tables[0]
    _drop_shard_files(stage, lambda k: not upstream.shard_path(probe_table, k).is_file())


def _drop_shard_files(stage: Stage, stale: Callable[[int], bool]) -> None:
    """Delete the shard files (every table) and markers of ``stage`` whose index is ``stale``."""
    for folder in [stage.table_dir(t) for t in stage.tables] + [stage.done_dir]:
        if not folder.is_dir():
            continue
        for f in folder.iterdir():
            stem = f.name.split(".")[0]
            if stem.isdigit() and stale(int(stem)):
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


def upstream_shards(upstream: Stage, shard: int, num_shards: int) -> list[int]:
    """Indices of the finished upstream shards that belong to this machine (``k % n == shard``).

    Downstream stages follow the upstream shard numbering (caption shard k captions the clips of
    segment shard k), so every machine works only on what it produced itself and no stage has to
    wait for the others.

    Raises:
        StageInputError: No finished upstream shard at all (the upstream stage was not run).
    """
    done = upstream.done_dir
    ready = []
    for marker in sorted(done.glob("*.json")) if done.is_dir() else []:
        stem = marker.name.split(".")[0]
        if not stem.isdigit():
            continue
        k = int(stem)
        if all(upstream.shard_path(t, k).is_file() for t in upstream.tables):
            ready.append(k)
    if not ready:
        raise StageInputError(
            f"{upstream.layout.root} has no finished {upstream.name} shards; run "
            f"`lvr datagen {upstream.name}` on this run first"
        )
    return [k for k in ready if k % num_shards == shard]


def read_shard(upstream: Stage, table: str, k: int) -> pa.Table:
    """One shard file of an upstream table (validated against its schema).

    Raises:
        SchemaError: The file does not match its table; a run written by an older lvr gets the
            command that upgrades it.
    """
    try:
        return read_table(upstream.shard_path(table, k), table)
    except SchemaError as exc:
        raise SchemaError(
            f"{exc}; if {upstream.layout.root} was written by an older lvr, "
            f"`lvr datagen migrate --run {upstream.layout.root}` upgrades it"
        ) from None
