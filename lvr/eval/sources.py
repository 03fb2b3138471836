"""Where benchmark rows and videos come from: local JSON/JSONL/Parquet files or `datasets` names.

Shared by every adapter in ``lvr.eval.benchmarks``: reading raw records, finding a video on disk
(never substituting another one), and generic duration buckets.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lvr.errors import LvrError

VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov")


class BenchmarkError(LvrError):
    """A benchmark source that cannot be read at all (missing path, unknown format)."""


@dataclass
class Source:
    """Where a benchmark's rows and videos are, plus options that change the questions."""

    benchmark: str
    data: str
    video_dir: Path | None = None
    split: str | None = None
    subtitles: bool = False
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Reading raw records (local files or `datasets`)
# ---------------------------------------------------------------------------------------------


def read_records(data: str, split: str | None = None) -> list[dict[str, Any]]:
    """Read raw records from a JSON/JSONL/Parquet file, a folder of them, or a `datasets` name.

    Each record gets ``__file__`` (the file stem it came from, or the dataset name).

    Args:
        data: Local path, or a hub dataset name (``org/name`` or ``org/name@split``).
        split: Dataset split for hub names (default: the ``@split`` suffix, else ``test``).

    Returns:
        Records in file order.

    Raises:
        BenchmarkError: Unreadable file, empty folder, or a dataset that cannot be loaded.
    """
    path = Path(data).expanduser()
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in {".json", ".jsonl", ".parquet"})
        if not files:
            raise BenchmarkError(f"{path} holds no .json, .jsonl or .parquet files")
        return [r for f in files for r in _read_file(f)]
    if "/" in data and not data.startswith((".", "/", "~")):
        return _read_hub(data, split)
    raise BenchmarkError(f"benchmark data {data!r} is neither a file, a folder nor a dataset name")


def _read_file(path: Path) -> list[dict[str, Any]]:
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows = pq.read_table(path).to_pylist()
        elif path.suffix == ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            rows = [json.loads(line) for line in lines if line.strip()]
        else:
            obj = json.loads(path.read_text(encoding="utf-8"))
            rows = obj if isinstance(obj, list) else _list_in(obj, path)
    except (OSError, ValueError) as exc:
        raise BenchmarkError(f"cannot read {path}: {exc}") from None
    return [{**r, "__file__": path.stem} if isinstance(r, dict) else {"__raw__": r} for r in rows]


def _list_in(obj: Any, path: Path) -> list[Any]:
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
    raise BenchmarkError(f"{path}: expected a JSON list of records")


def _read_hub(name: str, split: str | None) -> list[dict[str, Any]]:
    repo, _, at_split = name.partition("@")
    split = split or at_split or "test"
    try:
        import datasets

        ds = datasets.load_dataset(repo, split=split)
    except Exception as exc:  # datasets raises many types (network, missing split, auth)
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BenchmarkError(f"cannot load dataset {repo!r} split {split!r}: {msg}") from None
    return [{**r, "__file__": repo} for r in ds]


# ---------------------------------------------------------------------------------------------
# Helpers shared by adapters
# ---------------------------------------------------------------------------------------------


def resolve_video(
    video_dir: Path | None, name: str | None, subdirs: Iterable[str] = ()
) -> tuple[str, str | None]:
    """Find a benchmark video on disk.

    Tries ``name`` as given, then under ``video_dir`` and ``video_dir/<subdir>`` for each subdir,
    also with the usual extensions when ``name`` has none (Video-MME ids).

    Args:
        video_dir: Folder the benchmark's videos were extracted to.
        name: The record's video field (relative path, file name, or id).
        subdirs: Benchmark-specific subfolders to try.

    Returns:
        ``(path, error)``: the found path and None, or the first candidate and a reason.
    """
    if not name:
        return "", "record has no video field"
    rel = Path(str(name))
    names = [rel] if rel.suffix else [rel.with_suffix(ext) for ext in VIDEO_EXTS]
    bases = [Path()] if video_dir is None else [video_dir, *(video_dir / s for s in subdirs)]
    candidates = [n if n.is_absolute() else b / n for b in bases for n in names]
    if video_dir is not None:  # datasets sometimes keep a folder prefix the archive lacks
        candidates += [b / n.name for b in bases for n in names if n.name != str(n)]
    for cand in candidates:
        if cand.is_file():
            return str(cand), None
    where = str(video_dir) if video_dir else "the working directory (pass --video-dir)"
    return str(candidates[0]), f"video not found: {name} (looked under {where})"


def duration_bucket_from_seconds(seconds: float | None) -> str | None:
    """Generic duration buckets for sources that only give seconds.

    >>> duration_bucket_from_seconds(90.0), duration_bucket_from_seconds(3600.0)
    ('0-2min', '15min+')
    """
    if seconds is None or seconds != seconds:  # None or NaN
        return None
    if seconds < 120:
        return "0-2min"
    return "2-15min" if seconds < 900 else "15min+"


def as_list(value: Any) -> list[Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            return None
        return parsed if isinstance(parsed, list) else None
    try:
        return list(value)
    except TypeError:
        return None
