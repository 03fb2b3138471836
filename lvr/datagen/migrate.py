"""``lvr datagen migrate``: bring a run written by an older lvr to the current layout and tables.

Three steps, all idempotent: `lvr.layout.migrate` moves the stage folders of the older layout to
one folder per table, then the ``captions`` shards written before captions carried their video's
path and duration get those two columns (from the ``clips`` and ``videos`` shards of the same
index), then shards without rows that an older lvr wrote with one empty row group (which Hugging
Face ``datasets`` cannot read) are rewritten without one (`lvr.artifacts.write_parquet`). Rows,
ids, markers and manifests are otherwise untouched, so every finished shard stays finished: a
rerun of ``lvr datagen run`` recomputes nothing that was done.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lvr.artifacts import SCHEMAS, has_empty_row_group, read_table, table_name_of, write_parquet
from lvr.errors import LvrError
from lvr.layout import RunLayout, migrate

_CAPTION_VIDEO_COLUMNS = ("video_path", "duration_s")


def migrate_run(run: str | Path) -> list[str]:
    """Migrate ``run`` in place; returns one line per move or upgrade made (none: it was current).

    Raises:
        LvrError: ``run`` is not a folder.
        LayoutError: A destination of a move exists already (a run partly moved by hand).
    """
    layout = RunLayout(Path(run))
    if not layout.root.exists():
        raise LvrError(f"{layout.root} does not exist: nothing to migrate (check --run)")
    if not layout.root.is_dir():
        raise LvrError(f"{layout.root} is a file, not a run folder")
    lines = [f"moved {src} -> {dst}" for src, dst in migrate(layout.root)]
    for path in upgrade_captions(layout):
        lines.append(f"upgraded {path}: added {', '.join(_CAPTION_VIDEO_COLUMNS)}")
    for path in rewrite_empty_shards(layout):
        lines.append(f"rewrote {path}: no rows, now without an empty row group")
    return lines


def upgrade_captions(layout: RunLayout) -> list[Path]:
    """Add ``video_path``/``duration_s`` to caption shards that lack them; returns those rewritten.

    A shard whose segment shard is gone is left alone: the next caption run removes it (orphan).
    """
    upgraded = []
    for path in sorted(layout.captions.glob("*.parquet")) if layout.captions.is_dir() else []:
        if path.name.startswith(".") or not path.stem.isdigit():
            continue
        have = pq.read_schema(path).names
        if all(c in have for c in _CAPTION_VIDEO_COLUMNS):
            continue
        k = int(path.stem)
        clips, videos = layout.shard_file("clips", k), layout.shard_file("videos", k)
        if not (clips.is_file() and videos.is_file()):
            continue
        write_parquet(path, _with_video_columns(pq.read_table(path), clips, videos), "captions")
        upgraded.append(path)
    return upgraded


def _with_video_columns(captions: pa.Table, clips: Path, videos: Path) -> pa.Table:
    """``captions`` plus the path (by clip) and duration (by video) the segment stage recorded."""
    clip_cols = read_table(clips, "clips").select(["clip_id", "video_path"]).to_pydict()
    video_cols = read_table(videos, "videos").select(["video_id", "duration_s"]).to_pydict()
    path_of = dict(zip(clip_cols["clip_id"], clip_cols["video_path"], strict=True))
    duration_of = dict(zip(video_cols["video_id"], video_cols["duration_s"], strict=True))
    captions = captions.drop_columns(
        [c for c in _CAPTION_VIDEO_COLUMNS if c in captions.column_names]
    )
    paths = [path_of.get(c) for c in captions.column("clip_id").to_pylist()]
    durations = [duration_of.get(v) for v in captions.column("video_id").to_pylist()]
    captions = captions.append_column("video_path", pa.array(paths, pa.string()))
    return captions.append_column("duration_s", pa.array(durations, pa.float64()))


def rewrite_empty_shards(layout: RunLayout) -> list[Path]:
    """Rewrite lvr's shards of 0 rows that hold an empty row group; returns those rewritten.

    Looks in the run's table folders (``<run>/<table>/``, ``<run>/eval/<name>/<table>/``), not
    in inputs or clip files, and rewrites only files whose ``lvr.table`` metadata names a table
    of `SCHEMAS`. The rewritten file has the same schema and (no) rows.
    """
    folders = [layout.table(name) for name in SCHEMAS]
    folders += [run / name for run in sorted(layout.eval.glob("*/")) for name in SCHEMAS]
    rewritten = []
    for path in (p for f in folders if f.is_dir() for p in sorted(f.glob("*.parquet"))):
        if path.name.startswith(".") or not has_empty_row_group(path):
            continue
        name = table_name_of(path)
        if name not in SCHEMAS or pq.read_metadata(path).num_rows:
            continue
        write_parquet(path, read_table(path, name), name)
        rewritten.append(path)
    return rewritten
