"""The contract between stages: Parquet schemas, ids, atomic shards, markers, manifests.

Where everything lives is `lvr.layout.RunLayout`'s business: a sharded stage writes its tables
as ``runs/<run>/<table>/00000.parquet`` and its bookkeeping (``_done/00000.json`` completion
markers, ``manifest.json``: config + hash, inputs, versions, counts, timings) under
``runs/<run>/_stages/<stage>/``.

A shard is finished when its marker exists and names the same input fingerprint; every file is
written under a temporary name and renamed, so a crash costs at most the shard in flight and never
leaves a half-written file that a later stage could read.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lvr.config import config_hash, to_dict
from lvr.errors import LvrError
from lvr.layout import STAGE_TABLES, RunLayout, shard_name

# ---------------------------------------------------------------------------------------------
# Schemas. Every table has an `error` column: failures are rows, not exceptions.
# ---------------------------------------------------------------------------------------------

_EVIDENCE = pa.list_(pa.struct([("start_s", pa.float64()), ("end_s", pa.float64())]))

_QA_FIELDS = [
    ("qa_id", pa.string()),
    ("video_id", pa.string()),
    ("video_path", pa.string()),
    ("duration_s", pa.float64()),
    ("category", pa.string()),  # temporal | goal | plot | spatial | <domain-defined>
    ("format", pa.string()),  # mc (multiple choice) | open
    ("question", pa.string()),
    ("options", pa.list_(pa.string())),  # option texts without "A. " prefixes; empty for open
    ("answer", pa.string()),  # gold letter for mc, gold text for open
    ("reasoning", pa.string()),  # chain of thought (natural language)
    ("evidence", _EVIDENCE),  # time ranges that support the answer
    ("generator", pa.string()),  # backend:model that wrote it
    ("prompt_version", pa.string()),
    ("raw", pa.string()),  # raw model output, for audits
    ("error", pa.string()),
]

SCHEMAS: dict[str, pa.Schema] = {
    "videos": pa.schema(
        [
            ("video_id", pa.string()),
            ("path", pa.string()),
            ("size_bytes", pa.int64()),
            ("duration_s", pa.float64()),
            ("fps", pa.float64()),
            ("num_frames", pa.int64()),
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("codec", pa.string()),
            ("error", pa.string()),
        ]
    ),
    "clips": pa.schema(
        [
            ("clip_id", pa.string()),
            ("video_id", pa.string()),
            ("video_path", pa.string()),
            ("clip_index", pa.int32()),
            ("start_s", pa.float64()),
            ("end_s", pa.float64()),
            ("method", pa.string()),  # stride | shots
            ("clip_path", pa.string()),  # only when clip files were written
            ("error", pa.string()),
        ]
    ),
    "captions": pa.schema(
        [
            ("clip_id", pa.string()),
            ("video_id", pa.string()),
            ("video_path", pa.string()),  # what qa needs of the video travels with its captions
            ("duration_s", pa.float64()),  # of the video
            ("start_s", pa.float64()),
            ("end_s", pa.float64()),
            ("caption", pa.string()),
            ("backend", pa.string()),
            ("model", pa.string()),
            ("prompt_version", pa.string()),
            ("frames", pa.int32()),
            ("attempts", pa.int32()),
            ("latency_s", pa.float64()),
            ("error", pa.string()),
        ]
    ),
    "qa_raw": pa.schema(_QA_FIELDS),
    "qa": pa.schema([*_QA_FIELDS, ("split", pa.string()), ("pass_rate", pa.float64())]),
    "qa_rejected": pa.schema(
        [*_QA_FIELDS, ("pass_rate", pa.float64()), ("rule", pa.string()), ("reason", pa.string())]
    ),
    # One benchmark question, the internal form every eval adapter maps to.
    "questions": pa.schema(
        [
            ("qa_id", pa.string()),
            ("benchmark", pa.string()),
            ("video_path", pa.string()),
            ("question", pa.string()),
            ("options", pa.list_(pa.string())),
            ("answer", pa.string()),
            ("format", pa.string()),
            ("category", pa.string()),
            ("duration_bucket", pa.string()),
            ("extra", pa.string()),  # JSON of benchmark-specific fields (task_type, subtitles, ...)
            ("error", pa.string()),
        ]
    ),
    "predictions": pa.schema(
        [
            ("qa_id", pa.string()),
            ("benchmark", pa.string()),
            ("model", pa.string()),
            ("pass_index", pa.int32()),
            ("category", pa.string()),
            ("duration_bucket", pa.string()),
            ("format", pa.string()),
            ("options", pa.list_(pa.string())),
            ("answer", pa.string()),
            ("response", pa.string()),
            ("extracted", pa.string()),
            ("correct", pa.bool_()),
            ("strict_correct", pa.bool_()),
            ("format_ok", pa.bool_()),
            ("frames", pa.int32()),
            ("latency_s", pa.float64()),
            ("settings", pa.string()),  # JSON: frames, fps, max_pixels, temperature, prompt, parser
            ("error", pa.string()),
        ]
    ),
    # Per-question pass rate over K sampled answers (from `lvr eval --passes K`), read by filter.
    "pass_rates": pa.schema(
        [
            ("qa_id", pa.string()),
            ("model", pa.string()),
            ("passes", pa.int32()),
            ("correct", pa.int32()),
            ("pass_rate", pa.float64()),
        ]
    ),
    "scores": pa.schema(
        [
            ("benchmark", pa.string()),
            ("model", pa.string()),
            ("metric", pa.string()),  # robust | strict | format
            ("group_by", pa.string()),  # overall | category | duration_bucket | macro
            ("group", pa.string()),
            ("n", pa.int64()),
            ("accuracy", pa.float64()),
            ("ci_low", pa.float64()),
            ("ci_high", pa.float64()),
            ("floor", pa.float64()),  # always-the-most-common-letter accuracy
            ("errors", pa.int64()),
            ("settings", pa.string()),
        ]
    ),
}


class SchemaError(LvrError, ValueError):
    """A Parquet file that does not match its table's schema (names file and column)."""


# ---------------------------------------------------------------------------------------------
# Content-based ids
# ---------------------------------------------------------------------------------------------


def content_id(*parts: Any) -> str:
    """16-hex-digit id from the given parts (stable across runs and machines).

    >>> content_id("v", 0.0, 10.0) == content_id("v", 0.0, 10.0)
    True
    >>> len(content_id("x"))
    16
    """
    blob = "\x1f".join(_canon(p) for p in parts).encode()
    return hashlib.blake2b(blob, digest_size=8).hexdigest()


def _canon(part: Any) -> str:
    if isinstance(part, float):
        return f"{part:.3f}"  # millisecond precision: 10.0 and 10.0000001 are the same clip
    return str(part)


def video_id(path: str | Path) -> str:
    """Id of a video from its content: size plus the first and last MiB.

    Hashing whole multi-GB files would dominate the segment stage; size + head + tail identifies
    a video in practice, survives moving the file, and makes two copies the same video.
    """
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=8)
    digest.update(str(size).encode())
    with path.open("rb") as fh:
        digest.update(fh.read(1 << 20))
        if size > 2 << 20:
            fh.seek(-(1 << 20), os.SEEK_END)
            digest.update(fh.read(1 << 20))
    return digest.hexdigest()


def clip_id(vid: str, start_s: float, end_s: float) -> str:
    """Id of a clip: its video and time range."""
    return content_id("clip", vid, float(start_s), float(end_s))


def qa_id(source_id: str, generator: str, prompt_version: str, k: int | str) -> str:
    """Id of a generated question: source (video/clip), generator, prompt version, index."""
    return content_id("qa", source_id, generator, prompt_version, k)


# ---------------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------------


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file + rename (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=str).encode())


def write_parquet(path: Path, table: pa.Table, name: str) -> None:
    """Validate ``table`` against ``SCHEMAS[name]`` and write it atomically."""
    table = conform(table, name, source=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    meta = {**(table.schema.metadata or {}), b"lvr.table": name.encode()}
    pq.write_table(table.replace_schema_metadata(meta), tmp)
    os.replace(tmp, path)


def conform(table: pa.Table, name: str, source: str = "<table>") -> pa.Table:
    """Return ``table`` with exactly the schema of ``name`` (column order, types).

    Missing nullable columns are never invented: every column must be present. Lossless casts
    (e.g. int32 -> int64, null -> string) are applied; anything else raises :class:`SchemaError`.
    """
    schema = SCHEMAS[name]
    columns = []
    for fld in schema:
        if fld.name not in table.column_names:
            raise SchemaError(f"{source}: missing column '{fld.name}' for table '{name}'")
        col = table.column(fld.name)
        if not col.type.equals(fld.type):
            try:
                col = col.cast(fld.type, safe=True)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise SchemaError(
                    f"{source}: column '{fld.name}' has type {col.type}, expected {fld.type}"
                ) from None
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=schema)


def rows_to_table(rows: Sequence[dict[str, Any]], name: str) -> pa.Table:
    """Build a table of schema ``name`` from dict rows (absent keys become null)."""
    schema = SCHEMAS[name]
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def table_files(path: str | Path, name: str | None = None) -> list[Path]:
    """Parquet files of a table folder, a folder holding it (with ``name``) or a single file."""
    path = Path(path)
    if path.is_file():
        return [path]
    folder = path / name if name and (path / name).is_dir() else path
    files = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith("."))
    if not files and not folder.is_dir():
        raise FileNotFoundError(f"{path} is neither a Parquet file nor a table folder")
    return files


def table_name_of(path: Path) -> str | None:
    """The lvr table name recorded in a Parquet file's metadata (or None)."""
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(b"lvr.table")
    return raw.decode() if raw else None


def read_table(path: str | Path, name: str | None = None) -> pa.Table:
    """Read all shards of a table and validate each against its schema.

    Args:
        path: A table folder (``runs/x/clips``), a run folder plus ``name``, or a file.
        name: Table name; inferred from the files' metadata when omitted.

    Raises:
        SchemaError: Naming the file and column that do not match.
        FileNotFoundError: When the path holds no table.
    """
    files = table_files(path, name)
    if not files:
        return SCHEMAS[name].empty_table() if name else pa.table({})
    tables = []
    for f in files:
        table_name = name or table_name_of(f)
        t = pq.read_table(f)
        tables.append(conform(t, table_name, source=str(f)) if table_name in SCHEMAS else t)
    return pa.concat_tables(tables)


# ---------------------------------------------------------------------------------------------
# Stages: shards, markers, manifest, runner
# ---------------------------------------------------------------------------------------------


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
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not progress,
    ) as bar:
        task = bar.add_task(description or stage.name, total=len(todo))
        for _ in execute(todo):
            bar.advance(task)
            if report is not None:  # counts stay those of the start until "done"
                atomic_write_json(stage.manifest(manifest), {**running, **report()})
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


def fingerprint(path: str | Path) -> str:
    """Cheap fingerprint of an input file or folder: names, sizes and mtimes."""
    path = Path(path)
    if not path.exists():
        return "missing"
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    parts = [
        f"{p.relative_to(path.parent)}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in files
    ]
    return content_id("fp", *parts)


def package_versions() -> dict[str, str]:
    """Versions of the packages that change results, for the manifest."""
    out = {"python": platform.python_version()}
    for pkg in ("lvr", "torch", "transformers", "av", "decord", "duckdb", "pyarrow", "deepspeed"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out
