"""Sharded stages: shards, completion markers, manifests and the runner every datagen stage uses.

A stage cuts its items into deterministic shards (`plan_shards`), runs a function per unfinished
shard and writes each shard's tables (`lvr.artifacts.write_parquet`, atomic) and then its marker,
the commit point (`Stage.write_shard`); `run_stage` skips finished shards, so a rerun after a
crash redoes only what was in flight, and writes the stage manifest (config + hash, input
fingerprints, versions, counts, timings). Where the files live is `lvr.layout.RunLayout`'s
business; what a table holds is `lvr.artifacts`'.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lvr.artifacts import (
    atomic_write_json,
    content_id,
    fingerprint,
    package_versions,
    read_table,
    write_parquet,
)
from lvr.config import config_hash, to_dict
from lvr.layout import STAGE_TABLES, RunLayout, shard_name


@dataclass
class Shard:
    """One unit of work: an index and the items it covers (ids or paths)."""

    index: int
    items: list[Any]

    @property
    def fingerprint(self) -> str:
        return content_id(
            "shard", *[json.dumps(_plain(i), sort_keys=True, default=str) for i in self.items]
        )

    @property
    def name(self) -> str:
        return shard_name(self.index)


def _plain(item: Any) -> Any:
    """A typed item as the dict it fingerprints as (its fields, without derived ones).

    A field with ``metadata={"fingerprint": False}`` is left out: it is a function of the others
    (a video's duration of its id), and runs written before it existed recorded fingerprints
    without it, so their finished shards stay finished.
    """
    if not is_dataclass(item) or isinstance(item, type):
        return item
    out = asdict(item)
    for f in item.__dataclass_fields__.values():
        if not f.metadata.get("fingerprint", True):
            out.pop(f.name)
    return out


def plan_shards(
    items: Iterable[Any], shard_size: int, shard: int = 0, num_shards: int = 1
) -> list[Shard]:
    """Cut items into deterministic shards; with ``num_shards > 1`` keep this machine's share.

    Items keep their given order (callers sort by id), so shard contents do not depend on the
    machine; shard ``k`` belongs to machine ``k % num_shards``, giving disjoint file names that a
    later stage merges by reading the folder.
    """
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard {shard} is not in [0, {num_shards})")
    items = list(items)
    shards = [
        Shard(k, items[i : i + shard_size]) for k, i in enumerate(range(0, len(items), shard_size))
    ]
    return [s for s in shards if s.index % num_shards == shard]


@dataclass
class StageResult:
    """What a stage run did (also written into its manifest)."""

    stage_dir: Path
    shards_total: int
    shards_run: int
    shards_skipped: int
    rows: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


ShardFn = Callable[[Shard], dict[str, pa.Table]]
# Runs shards (each written with its marker) and yields each one once it is committed.
Execute = Callable[[Sequence[Shard]], Iterable[Shard]]


class Stage:
    """A sharded stage of a run: its tables' shard files, completion markers and manifests.

    Shard files live in the run's table folders (``runs/x/clips/00000.parquet``), markers and
    manifests in the stage's own folder (``runs/x/_stages/segment/``); `RunLayout` names both and
    ``lvr.layout.STAGE_TABLES`` says which tables a stage writes.
    """

    def __init__(self, layout: RunLayout | str | Path, name: str):
        if name not in STAGE_TABLES:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGE_TABLES)}")
        self.layout = layout if isinstance(layout, RunLayout) else RunLayout(Path(layout))
        self.name = name
        self.tables = list(STAGE_TABLES[name])
        self.dir = self.layout.stage(name)  # bookkeeping: _done/, manifest*.json

    @property
    def done_dir(self) -> Path:
        return self.layout.done(self.name)

    def table_dir(self, table: str) -> Path:
        return self.layout.table(table)

    def shard_path(self, table: str, shard: Shard | int) -> Path:
        index = shard.index if isinstance(shard, Shard) else shard
        return self.layout.shard_file(table, index)

    def marker(self, shard: Shard | int) -> Path:
        index = shard.index if isinstance(shard, Shard) else shard
        return self.done_dir / f"{shard_name(index)}.json"

    def manifest(self, name: str = "manifest.json") -> Path:
        return self.layout.manifest(self.name, name)

    def is_done(self, shard: Shard) -> bool:
        marker = self.marker(shard)
        if not marker.is_file():
            return False
        info = json.loads(marker.read_text())
        same_input = info.get("fingerprint") == shard.fingerprint
        return same_input and all(self.shard_path(t, shard).is_file() for t in self.tables)

    def clear_partial(self, shard: Shard) -> None:
        """Remove temp files a killed writer left for this shard (only this machine owns it)."""
        for table in self.tables:
            for tmp in self.table_dir(table).glob(f".{shard.name}.parquet.tmp-*"):
                tmp.unlink(missing_ok=True)

    def write_shard(self, shard: Shard, outputs: dict[str, pa.Table]) -> dict[str, int]:
        """Write every table of one shard, then its marker (the marker is the commit point)."""
        self.clear_partial(shard)
        counts = {}
        for table in self.tables:
            if table not in outputs:
                raise ValueError(f"stage {self.name} shard {shard.name} did not produce '{table}'")
            write_parquet(self.shard_path(table, shard), outputs[table], table)
            counts[table] = outputs[table].num_rows
        errors = {t: _error_count(outputs[t]) for t in self.tables}
        atomic_write_json(
            self.marker(shard), {"fingerprint": shard.fingerprint, "rows": counts, "errors": errors}
        )
        return counts

    def read(self, table: str) -> pa.Table:
        return read_table(self.table_dir(table), table)


def _error_count(table: pa.Table) -> int:
    if "error" not in table.column_names:
        return 0
    return table.num_rows - table.column("error").null_count


def progress_bar(enabled: bool, console: Any = None) -> Progress:
    """The bar of a long job over counted items: description, bar, done/total, elapsed time."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), disable=not enabled, console=console)  # fmt: skip


def run_stage(
    stage: Stage,
    shards: Sequence[Shard],
    fn: ShardFn | None,
    config: Any,
    inputs: Sequence[str | Path] = (),
    description: str = "",
    progress: bool = True,
    manifest: str = "manifest.json",
    report: Callable[[], dict[str, Any]] | None = None,
    execute: Execute | None = None,
) -> StageResult:
    """Run ``fn`` on every unfinished shard, then write the stage manifest.

    Finished shards (marker present, same input fingerprint) are skipped, so rerunning after a
    crash or Ctrl-C re-does only what was in flight. Row-level failures must be rows with an
    ``error``; an exception from ``fn`` is a bug and stops the stage (its shard stays unfinished).
    When several machines share a stage folder, each passes its own ``manifest`` name
    (:func:`manifest_name`) so that none overwrites another's counts. ``report()`` returns extra
    manifest fields (e.g. model-call usage); they are refreshed after every shard, so a killed
    run's manifest still accounts for the shards it finished. ``execute`` replaces the loop that
    runs the unfinished shards here, one after the other (e.g. by Ray workers that write each
    shard and its marker themselves); it yields each shard once it is committed.
    """
    start = time.time()
    todo = [s for s in shards if not stage.is_done(s)]
    extra = report or dict
    running = _write_manifest(stage, config, inputs, shards, "running", 0.0, manifest, extra())
    if execute is None:
        if fn is None:
            raise ValueError("run_stage needs fn or execute")
        execute = partial(_run_here, stage, fn)
    try:
        with progress_bar(progress) as bar:
            task = bar.add_task(description or stage.name, total=len(todo))
            for _ in execute(todo):
                bar.advance(task)
                if report is not None:  # counts stay those of the start until "done"
                    atomic_write_json(stage.manifest(manifest), {**running, **report()})
    except BaseException as exc:  # the manifest says how the run ended, never "running"
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        why = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        _write_manifest(stage, config, inputs, shards, status, time.time() - start, manifest,
                        {**extra(), "error": why})  # fmt: skip
        raise
    seconds = time.time() - start
    info = _write_manifest(stage, config, inputs, shards, "done", seconds, manifest, extra())
    return StageResult(
        stage_dir=stage.dir,
        shards_total=len(shards),
        shards_run=len(todo),
        shards_skipped=len(shards) - len(todo),
        rows=info["rows"],
        errors=info["errors"],
        seconds=seconds,
    )


def _run_here(stage: Stage, fn: ShardFn, todo: Sequence[Shard]) -> Iterator[Shard]:
    """Run the shards in this process, in order: rows, shard files, then the marker."""
    for shard in todo:
        stage.write_shard(shard, fn(shard))
        yield shard


def _write_manifest(
    stage: Stage,
    config: Any,
    inputs: Sequence[str | Path],
    shards: Sequence[Shard],
    status: str,
    seconds: float,
    name: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    rows: dict[str, int] = dict.fromkeys(stage.tables, 0)
    errors: dict[str, int] = dict.fromkeys(stage.tables, 0)
    done = 0
    for shard in shards:
        if stage.is_done(shard):
            done += 1
            info = json.loads(stage.marker(shard).read_text())
            for t in stage.tables:
                rows[t] += info["rows"].get(t, 0)
                errors[t] += info["errors"].get(t, 0)
    manifest = {
        "stage": stage.name,
        "status": status,
        "tables": stage.tables,
        "config": to_dict(config) if config is not None else None,
        "config_hash": config_hash(config) if config is not None else None,
        "inputs": [{"path": str(p), "fingerprint": fingerprint(p)} for p in inputs],
        "items_in": sum(len(s.items) for s in shards),
        "shards": {"total": len(shards), "done": done},
        "rows": rows,
        "errors": errors,
        "seconds": round(seconds, 3),
        "versions": package_versions(),
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(extra or {}),
    }
    atomic_write_json(stage.manifest(name), manifest)
    return manifest


def manifest_name(shard: int = 0, num_shards: int = 1) -> str:
    """``manifest.json`` for a one-machine run, ``manifest.<i>-of-<n>.json`` for machine i of n."""
    return "manifest.json" if num_shards == 1 else f"manifest.{shard}-of-{num_shards}.json"
