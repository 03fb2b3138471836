"""Probe a video and build its frame index (frame number -> presentation timestamp, keyframes).

Frame ``i`` is the ``i``-th frame in presentation order (sorted by pts), exactly as decord numbers
frames; its timestamp is ``(pts_i - pts_0) * time_base`` seconds, so the first frame is at 0.0.

The index comes from the container when it has one (MP4/MOV sample tables exposed by FFmpeg as
``index_entries``: free, no packet is read). Otherwise, or when the timestamps are not constant-rate,
every packet header of the video stream is read once ("counting"), which costs one pass over the file
but no decoding. Indexes are cached per (path, size, mtime) in this process.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from lvr.media.errors import VideoDecodeError


@dataclass(frozen=True)
class VideoInfo:
    """What a video holds.

    Attributes:
        path: The file.
        duration_s: Span of the video frames, ``num_frames`` frame durations for constant-rate video.
        fps: Frames per second (average rate for variable-rate video).
        num_frames: Number of frames (exact: from the container index or by counting packets).
        width: Frame width in pixels.
        height: Frame height in pixels.
        codec: Decoder name, e.g. ``h264``.
        has_audio: Whether the file has an audio stream.
        num_keyframes: Number of keyframes (random-access points).
        keyframe_times_s: Timestamps of the keyframes, seconds from the first frame.
        index_source: ``container`` (sample table) or ``demux`` (counted packets).
    """

    path: str
    duration_s: float
    fps: float
    num_frames: int
    width: int
    height: int
    codec: str
    has_audio: bool
    num_keyframes: int
    keyframe_times_s: tuple[float, ...]
    index_source: str


@dataclass(frozen=True, eq=False)
class VideoIndex:
    """Internal frame index shared by the decoders.

    Attributes:
        info: The public summary.
        pts: [num_frames] int64 presentation timestamps in stream time base, ascending.
        times_s: [num_frames] float64 seconds from the first frame.
        keyframes: [K] int64 frame numbers of the keyframes, ascending.
        seek_ts: [K] int64 timestamp to pass to ``container.seek`` to land on each keyframe.
        time_base: Stream time base.
    """

    info: VideoInfo
    pts: np.ndarray
    times_s: np.ndarray
    keyframes: np.ndarray
    seek_ts: np.ndarray
    time_base: Fraction


def open_container(path: str | os.PathLike[str]) -> av.container.InputContainer:
    """Open a media file with PyAV, turning every failure into ``VideoDecodeError``.

    Raises:
        VideoDecodeError: Missing, empty, or unreadable file.
    """
    p = Path(path)
    if not p.is_file():
        raise VideoDecodeError(path, "no such file" if not p.exists() else "not a regular file")
    if p.stat().st_size == 0:
        raise VideoDecodeError(path, "empty file (0 bytes)")
    try:
        return av.open(str(p), metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise VideoDecodeError(path, f"not a readable media file ({_short(e)})") from e


def video_stream(container: av.container.InputContainer, path: str) -> av.video.stream.VideoStream:
    """The first real video stream (cover art / attached pictures do not count).

    Raises:
        VideoDecodeError: No video stream (e.g. an audio-only file).
    """
    for st in container.streams.video:
        if not st.disposition & av.stream.Disposition.attached_pic:
            return st
    audio = len(container.streams.audio)
    raise VideoDecodeError(
        path, "no video stream (audio-only file)" if audio else "no video stream"
    )


def _short(e: BaseException) -> str:
    """FFmpeg messages repeat the path; keep the reason."""
    msg = getattr(e, "strerror", None) or str(e)
    return f"{type(e).__name__}: {msg}"


def _from_container_index(
    st: av.video.stream.VideoStream, path: str
) -> tuple[np.ndarray, ...] | None:
    """(pts, keyframes, seek_ts) from the container's sample table, or None if unusable.

    Uses the table only for constant-rate streams without discarded samples; then frame ``i`` has pts
    ``start + i * step`` and a keyframe's frame number is its decode position (closed GOPs: no frame
    after a keyframe in decode order is shown before it). The decoders check both claims against the
    decoded pts and fail loudly when they do not hold.
    """
    entries = st.index_entries
    n = len(entries)
    # Trust the table only when the container declares what it should hold (MP4: frame count and
    # duration); Matroska/WebM index keyframes only, lazily, and declare neither.
    if n == 0 or st.start_time is None or not (st.frames or st.duration):
        return None
    if st.frames and st.frames != n:
        return None
    rows = np.array(
        [(e.timestamp, e.is_keyframe, e.pos + e.size, e.is_discard) for e in entries], np.int64
    )
    ts, key, end, discard = rows.T  # [n] each
    size = os.path.getsize(path)
    if end.max() > size:
        missing = int((end > size).sum())
        raise VideoDecodeError(
            path, f"truncated: {missing} of {n} frames lie beyond the end of the {size}-byte file"
        )
    steps = np.diff(ts)
    if discard.any() or not key[0] or (n > 1 and (steps[0] <= 0 or (steps != steps[0]).any())):
        return None
    step = int(steps[0]) if n > 1 else 1
    if st.duration and abs(st.duration - n * step) > 2 * step:
        return None  # the table does not cover the declared duration (unindexed fragments?): count
    pts = st.start_time + step * np.arange(n, dtype=np.int64)
    keyframes = np.flatnonzero(key).astype(np.int64)
    return pts, keyframes, pts[keyframes]


def _from_demux(
    container: av.container.InputContainer, st: av.video.stream.VideoStream, path: str
) -> tuple[np.ndarray, ...]:
    """(pts, keyframes, seek_ts) by reading every packet header of the stream once (no decoding)."""
    rows = []
    try:
        for pkt in container.demux(st):
            if pkt.size == 0 or pkt.is_discard:
                continue
            t = pkt.pts if pkt.pts is not None else pkt.dts
            if t is None:
                raise VideoDecodeError(path, "packets carry no timestamps")
            rows.append((t, pkt.is_keyframe))
    except av.error.FFmpegError as e:
        raise VideoDecodeError(
            path, f"demuxing failed after {len(rows)} packets ({_short(e)})"
        ) from e
    if not rows:
        raise VideoDecodeError(path, "video stream has no frames")
    arr = np.array(rows, np.int64)
    order = np.argsort(arr[:, 0], kind="stable")
    pts, key = arr[order, 0], arr[order, 1].astype(bool)
    if not key.any():
        raise VideoDecodeError(path, "video stream has no keyframe")
    keyframes = np.flatnonzero(key).astype(np.int64)
    return pts, keyframes, pts[keyframes]


def _rate(pts: np.ndarray, tb: Fraction, declared: Fraction | None) -> tuple[float, float]:
    """(fps, duration_s) from the frame timestamps, in exact rational arithmetic.

    Constant steps give the exact rate (240 frames at 24 fps last 10.0 s, not 9.999999999999998).
    Uneven steps (rounded millisecond timestamps in Matroska, or variable rate) give the mean rate,
    replaced by the container's declared rate when that agrees within 1%.
    """
    n = len(pts)
    if n < 2 or pts[-1] == pts[0]:
        rate = Fraction(declared) if declared else Fraction(25)
        return float(rate), float(n / rate)
    span = int(pts[-1] - pts[0]) * tb  # seconds from the first to the last frame
    steps = np.diff(pts)
    if (steps == steps[0]).all():
        rate = 1 / (int(steps[0]) * tb)
    else:
        rate = (n - 1) / span
        if declared and abs(Fraction(declared) / rate - 1) < Fraction(1, 100):
            rate = Fraction(declared)
    return float(rate), float(n / rate)  # n frame durations: the last frame lasts one step too


def _check_declared_duration(
    container: av.container.InputContainer, pts: np.ndarray, path: str
) -> None:
    """Counted frames must fill the duration the header declares (catches truncated MKV/WebM).

    Only for files without audio: an audio track may legitimately outlast the video.
    """
    if container.streams.audio or not container.duration or len(pts) < 2:
        return
    declared = container.duration / 1e6  # AV_TIME_BASE
    present = float((pts[-1] - pts[0]) * container.streams.video[0].time_base)
    if declared > present + max(1.0, 0.05 * declared):
        raise VideoDecodeError(
            path,
            f"truncated: the header declares {declared:.2f} s but only {present:.2f} s of frames are present",
        )


def _build_index(path: str) -> VideoIndex:
    with open_container(path) as container:
        st = video_stream(container, path)
        cc = st.codec_context
        if not cc.width or not cc.height:
            raise VideoDecodeError(path, f"video stream has no frame size ({cc.width}x{cc.height})")
        table = _from_container_index(st, path)
        source = "container"
        if table is None:
            source = "demux"  # nothing consumed yet: probing packets are replayed by demux()
            table = _from_demux(container, st, path)
        pts, keyframes, seek_ts = table
        if source == "demux":
            _check_declared_duration(container, pts, path)
        tb = Fraction(st.time_base or Fraction(1, 1))
        times = (pts - pts[0]).astype(np.float64) * float(tb)
        fps, duration = _rate(pts, tb, st.average_rate)
        info = VideoInfo(
            path=path,
            duration_s=duration,
            fps=fps,
            num_frames=len(pts),
            width=cc.width,
            height=cc.height,
            codec=cc.name,
            has_audio=bool(container.streams.audio),
            num_keyframes=len(keyframes),
            keyframe_times_s=tuple(round(float(t), 6) for t in times[keyframes]),
            index_source=source,
        )
    return VideoIndex(info, pts, times, keyframes, np.asarray(seek_ts, np.int64), tb)


_CACHE: OrderedDict[tuple[str, int, int], VideoIndex] = OrderedDict()
_CACHE_SIZE = 64


def load_index(path: str | os.PathLike[str]) -> VideoIndex:
    """The frame index of a video, cached per (path, size, mtime).

    Raises:
        VideoDecodeError: The file is missing, empty, unreadable, truncated, or has no video.
    """
    p = os.fspath(path)
    try:
        stat = os.stat(p)
    except OSError as e:
        raise VideoDecodeError(p, "no such file") from e
    key = (
        p,
        stat.st_size,
        stat.st_mtime_ns,
    )  # the path as given: VideoInfo.path and errors echo it
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    index = _build_index(p)
    _CACHE[key] = index
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return index


def clear_cache() -> None:
    """Forget cached indexes (benchmarks use it to time cold calls)."""
    _CACHE.clear()


def probe(path: str | os.PathLike[str]) -> VideoInfo:
    """Describe a video: duration, fps, frame count, size, codec, audio, keyframes.

    Args:
        path: A video file.

    Returns:
        The ``VideoInfo``.

    Raises:
        VideoDecodeError: The file is missing, empty, corrupt, truncated (its index points past the end
            of the file), audio-only, or not a media file.
    """
    return load_index(path).info
