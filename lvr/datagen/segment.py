"""Stage ``segment``: probe every input video and cut it into clips (fixed stride or shots).

Writes the tables ``videos`` (one row per input file; unreadable and non-video files are rows with
an ``error``) and ``clips`` (time ranges, optionally clip files). Work items are the inputs sorted
by ``video_id``; the runner (:mod:`lvr.datagen.runner`) cuts them into shards of
``shards.videos_per_shard`` and shard ``k`` goes to machine ``k % num_shards``.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import pyarrow as pa

from lvr.artifacts import clip_id, content_id
from lvr.artifacts import video_id as file_video_id
from lvr.datagen.clip_files import write_clip_files
from lvr.datagen.common import error_line, settings_id
from lvr.datagen.config import DatagenConfig, SegmentConfig
from lvr.datagen.runner import DatagenStage, Rows, StageContext, run_datagen_stage
from lvr.datagen.shots import ShotDetectionError, detect_shots, shots_to_clips, stride_clips
from lvr.datagen.sources import InputFile, render_synthetic, resolve_inputs
from lvr.layout import RunLayout
from lvr.media import VideoDecodeError, VideoInfo, probe


@dataclass(frozen=True)
class InputItem:
    """One input file of the stage (its fields are its shard fingerprint)."""

    video_id: str
    path: str
    kind: str  # video | other
    error: str | None  # unreadable, or a duplicate of an earlier file with the same content
    settings: str  # id of the segment settings that change rows


def _id_of(f: InputFile) -> tuple[str, str | None]:
    """(video_id, error) of one input; unreadable files get a path-based id and an error."""
    try:
        return file_video_id(f.path), None
    except OSError as exc:
        return content_id(
            "unreadable", os.path.abspath(f.path)
        ), f"cannot read file: {error_line(exc)}"


def plan_items(cfg: DatagenConfig, upstream: dict[str, pa.Table] | None = None) -> list[InputItem]:
    """Work items of the stage: one per input file, sorted by (video_id, path).

    A second file with the same content as an earlier one becomes an item with an ``error``
    naming the first (its row explains why it yields no clips), so that clip ids stay unique.
    """
    resolved = resolve_inputs(cfg.input)
    with ThreadPoolExecutor(max(1, cfg.segment.id_threads)) as pool:
        ids = list(pool.map(_id_of, resolved.files))
    settings = settings_id(_settings(cfg.segment))
    items, first = [], {}
    for f, (vid, err) in sorted(
        zip(resolved.files, ids, strict=True), key=lambda x: (x[1][0], x[0].path)
    ):
        if err is None and f.kind == "video":
            if vid in first:
                err = f"duplicate of {first[vid]} (same content, same video_id)"
            else:
                first[vid] = f.path
        items.append(InputItem(vid, f.path, f.kind, err, settings))
    return items


def _settings(seg: SegmentConfig) -> dict[str, Any]:
    """Settings that change the stage's rows (not thread counts)."""
    out = asdict(seg)
    out.pop("id_threads")
    out.pop("workers")
    return out


def video_row(item: InputItem) -> tuple[dict[str, Any], VideoInfo | None]:
    """Probe one input: (videos row, VideoInfo or None)."""
    row: dict[str, Any] = {"video_id": item.video_id, "path": item.path}
    try:
        row["size_bytes"] = os.path.getsize(item.path)
    except OSError:
        row["size_bytes"] = None
    if item.error:
        return {**row, "error": item.error}, None
    if item.kind != "video":
        ext = Path(item.path).suffix or "(none)"
        return {
            **row,
            "error": f"not a video file: extension {ext} is not in input.extensions",
        }, None
    try:
        info = probe(item.path)
    except VideoDecodeError as exc:
        return {**row, "error": error_line(exc)}, None
    row.update(duration_s=info.duration_s, fps=info.fps, num_frames=info.num_frames,
               width=info.width, height=info.height, codec=info.codec, error=None)  # fmt: skip
    return row, info


def clip_ranges(
    path: str, duration_s: float, seg: SegmentConfig
) -> tuple[list[tuple[float, float]], str, float | None, str]:
    """Time ranges of the clips of one video, the method, and where the video stops decoding.

    The ``shots`` method decodes every frame anyway; ``stride`` does too when
    ``segment.verify_decode`` is on (the default), with the same fast scan. Clips then cover only
    the time that decodes; the rest is reported (``undecodable_from_s``, reason), never hidden.

    Returns:
        (ranges, method, undecodable_from_s or None, reason or '').

    Raises:
        ShotDetectionError: Not one frame of the video decodes.
    """
    if seg.method == "stride" and not seg.verify_decode:
        return stride_clips(duration_s, seg.stride_s, seg.min_clip_s), "stride", None, ""
    result = detect_shots(path, seg.shots)
    bad = result.undecodable_from_s
    usable = duration_s if bad is None else bad
    if seg.method == "stride":
        ranges = stride_clips(usable, seg.stride_s, seg.min_clip_s)
    else:
        ranges = shots_to_clips(result.cuts_s, usable, seg.min_clip_s, seg.max_clip_s)
    return ranges, seg.method, bad, result.decode_error


def clip_rows(
    item: InputItem, duration_s: float, seg: SegmentConfig, clip_dir: Path | None
) -> list[dict[str, Any]]:
    """Clip rows of one probed video.

    One error row replaces them all when the video does not decode at all; a video that stops
    decoding part-way gets clips up to there and one error row for the rest.
    """
    vid, path = item.video_id, item.path

    def row(k: int, s: float, e: float, method: str, error: str | None) -> dict[str, Any]:
        return {"clip_id": clip_id(vid, s, e), "video_id": vid, "video_path": path,
                "clip_index": k, "start_s": s, "end_s": e, "method": method,
                "clip_path": None, "error": error}  # fmt: skip

    try:
        ranges, method, bad, reason = clip_ranges(path, duration_s, seg)
    except ShotDetectionError as exc:
        what = "shot detection" if seg.method == "shots" else "decoding"
        return [row(0, 0.0, duration_s, seg.method, f"{what} failed: {error_line(exc)}")]
    # An empty range is no clip (it came from a video that stops decoding at its start): the
    # error row below covers that time instead of a zero-length clip without an error.
    ranges = [(s, e) for s, e in ranges if e > s]
    if not ranges and bad is None:
        return [row(0, 0.0, duration_s, method, f"no clip: nothing to cut in {duration_s} s")]
    rows = [row(k, s, e, method, None) for k, (s, e) in enumerate(ranges)]
    if bad is not None:
        rows.append(row(len(rows), round(bad, 6), duration_s, method,
                        f"undecodable from {bad:.3f} s to {duration_s:.3f} s: {reason}"))  # fmt: skip
    if clip_dir is not None:
        write_clip_files(path, rows, clip_dir / vid)
    return rows


def segment_item(
    item: InputItem, seg: SegmentConfig, clip_dir: Path | None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Probe one input and cut it: (videos row, clip rows). Runs in worker processes too."""
    row, info = video_row(item)
    clips = clip_rows(item, info.duration_s, seg, clip_dir) if info is not None else []
    return row, clips


class Segmenter:
    """The stage's worker: probes and cuts the videos of a shard (in parallel when it pays)."""

    def __init__(self, cfg: DatagenConfig, ctx: StageContext):
        self.seg = cfg.segment
        self.parallel = ctx.parallel  # False under an executor that runs a worker per CPU
        self.clip_dir: Path | None = None
        if self.seg.write_clips:
            self.clip_dir = Path(self.seg.clip_dir) if self.seg.clip_dir else ctx.layout.clip_files

    @cached_property
    def pool(self) -> Executor | None:
        """A process pool when decoding work is parallel over videos (shots, decode check, clip
        files) and wanted.

        Made on the first shard that runs: a run whose shards are all finished starts no process.
        """
        workers = self.seg.workers or os.cpu_count() or 1
        decoding = self.seg.method == "shots" or self.seg.verify_decode or self.seg.write_clips
        if workers <= 1 or not decoding or not self.parallel:
            return None  # probing reads headers only: not worth a process pool
        # spawn: the parent may hold threads (progress bars, thread pools), which fork does not copy safely
        return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))

    def __call__(self, items: list[InputItem]) -> Rows:
        args = [(item, self.seg, self.clip_dir) for item in items]
        results = (
            list(self.pool.map(segment_item, *zip(*args, strict=True)))
            if self.pool and args
            else [segment_item(*a) for a in args]
        )
        return {
            "videos": [row for row, _ in results],
            "clips": [c for _, cs in results for c in cs],
        }

    def close(self) -> None:
        if "pool" in self.__dict__ and self.pool is not None:  # only a pool that was made
            self.pool.shutdown()


def with_inputs(cfg: DatagenConfig, layout: RunLayout, progress: bool = False) -> DatagenConfig:
    """The config with ``input.source`` set to the rendered synthetic videos, when asked for."""
    if cfg.input.synthetic.videos <= 0:
        return cfg
    source = render_synthetic(cfg.input, layout.inputs, progress)
    return replace(cfg, input=replace(cfg.input, source=source))


STAGE = DatagenStage(
    name="segment",
    tables=("videos", "clips"),
    upstream=None,  # reads input.source
    reads=(),
    plan=plan_items,
    open_worker=Segmenter,
    prepare=with_inputs,
)

run_segment = partial(run_datagen_stage, STAGE)
"""``run_segment(cfg, run, shard=0, num_shards=1, progress=True)``: run the segment stage."""
