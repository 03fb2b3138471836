"""The contract between stages: Parquet schemas, content ids, atomic writes, reading, and what a
manifest records of its inputs and package versions.

Every file is written under a temporary name and renamed, so a crash never leaves a half-written
file that a later stage could read. Shards, completion markers and the stage runner that build on
this are `lvr.stages`; where everything lives is `lvr.layout.RunLayout`'s business.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from lvr.errors import LvrError

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
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a full disk leaves no temp file behind (no-op once renamed)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, default=str).encode())


def write_parquet(path: Path, table: pa.Table, name: str) -> None:
    """Validate ``table`` against ``SCHEMAS[name]`` and write it atomically."""
    table = conform(table, name, source=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    meta = {**(table.schema.metadata or {}), b"lvr.table": name.encode()}
    _write_file(table.replace_schema_metadata(meta), tmp)
    os.replace(tmp, path)


def _write_file(table: pa.Table, path: Path) -> None:
    """Write one Parquet file; a table without rows gets no row group at all.

    Shards without rows are common (a shard of broken videos has no clips, a filter shard may
    keep nothing). ``pq.write_table`` gives such a file one row group of 0 rows, which Hugging
    Face ``datasets`` cannot read ("BatchSize must be greater than 0, got 0"): it scans each row
    group in batches of the group's size. A file with the schema and no row group reads as 0 rows
    in every reader (DuckDB, Polars, pyarrow, pandas, datasets).
    """
    if table.num_rows:
        pq.write_table(table, path)
        return
    with pq.ParquetWriter(path, table.schema):
        pass  # the footer alone: schema (with the lvr.table metadata), no row group


def remove_temp_files(folder: Path) -> list[Path]:
    """Remove the temporary files of `write_parquet` that killed writers left in ``folder``.

    Readers that take a whole folder and not a ``*.parquet`` glob (``pl.read_parquet(folder)``,
    DuckDB ``folder/*``) fail on such a file. Only for a folder that one writer fills at a time
    (an eval folder, the filter's tables), after it wrote: another writer's file may be in flight.
    """
    stale = sorted(folder.glob(".*.parquet.tmp-*")) if folder.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def has_empty_row_group(path: Path) -> bool:
    """Whether a Parquet file holds a row group of 0 rows (lvr wrote its empty shards so before)."""
    meta = _readable(pq.read_metadata, path)
    return any(meta.row_group(i).num_rows == 0 for i in range(meta.num_row_groups))


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
    """The lvr table name recorded in a Parquet file's metadata (or None).

    Raises:
        SchemaError: ``path`` is not a readable Parquet file.
    """
    meta = _read_schema(path).metadata or {}
    raw = meta.get(b"lvr.table")
    return raw.decode() if raw else None


def check_table_file(path: Path, name: str) -> None:
    """Check one file's schema (not its rows) against table ``name``, as :func:`read_table` does.

    Raises:
        SchemaError: Unreadable file, or a missing / mistyped column (names file and column).
    """
    if name in SCHEMAS:
        conform(_read_schema(path).empty_table(), name, source=str(path))


def _read_schema(path: Path) -> pa.Schema:
    return _readable(pq.read_schema, path)


def _read_file(path: Path) -> pa.Table:
    return _readable(pq.read_table, path)


def _readable(read: Any, path: Path) -> Any:
    """``read(path)``; a file that is not Parquet (garbage, cut short) is one line naming it."""
    try:
        return read(path)
    except (OSError, pa.ArrowException) as exc:
        raise SchemaError(
            f"{path} is not a readable Parquet file ({exc}); remove or replace it"
        ) from None


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
        t = _read_file(f)
        tables.append(conform(t, table_name, source=str(f)) if table_name in SCHEMAS else t)
    return pa.concat_tables(tables)


# ---------------------------------------------------------------------------------------------
# Manifests: input fingerprints and package versions
# ---------------------------------------------------------------------------------------------


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
