"""Probe a video and build its frame index (frame number -> presentation timestamp, keyframes).

Frame ``i`` is the ``i``-th frame a full decode of the file outputs (in presentation order), exactly
as ffmpeg and decord number frames; its timestamp is ``(pts_i - pts_0) * time_base`` seconds, so the
first frame is at 0.0 (``VideoInfo.start_s`` says where that is on the file's own timeline).

Which stream: the one FFmpeg's ``av_find_best_stream`` (and so ffmpeg, PyAV and decord) picks, not
blindly stream 0; cover art does not count. Orientation: the first frame is decoded once to read its
display matrix, and every frame lvr returns is turned upright with it (see ``orientation``).

The index comes from the container when it has one (MP4/MOV sample tables exposed by FFmpeg as
``index_entries``, which hold decode timestamps, plus the presentation offsets of the ``ctts`` box read
from the file's ``moov``: no packet is read). Keyframes are numbered by their presentation position
(an open GOP shows frames decoded after a keyframe before it). Otherwise, or when the timestamps are
not constant-rate, every packet header of the video stream is read once ("counting"), which costs one
pass over the file but no decoding; packets before the first keyframe (a stream cut mid-GOP) and
frames shown before it are not frames, since they do not decode. Indexes are cached per (path, size,
mtime) in this process.

Containers that store no presentation timestamps (AVI, raw elementary streams) get them guessed by
FFmpeg's parser; with B-frames, and above all with DivX/Xvid "packed B-frames" (two pictures in one
AVI chunk, a placeholder in the next), the decoder's output timestamps then do not follow the
index. Such streams, and those whose packets are only partly stamped (H.264 in MPEG program streams),
are marked ``frame_order="decoder"``: frames are counted in decoder output order from the start of
the file, never matched by timestamp.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from lvr.media.counting import from_demux, leading_frames
from lvr.media.errors import VideoDecodeError, short_reason
from lvr.media.mp4box import composition_offsets
from lvr.media.orientation import UPRIGHT, Orientation, display_matrix, from_matrix


@dataclass(frozen=True)
class VideoInfo:
    """What a video holds.

    Attributes:
        path: The file.
        duration_s: Span of the video frames, ``num_frames`` frame durations for constant-rate video;
            for variable-rate video, up to the end of the last frame.
        fps: Frames per second (average rate for variable-rate video).
        num_frames: Number of frames (exact: from the container index or by counting packets).
        width: Frame width in pixels.
        height: Frame height in pixels.
        codec: Decoder name, e.g. ``h264``.
        has_audio: Whether the file has an audio stream.
        num_keyframes: Number of keyframes (random-access points).
        keyframe_times_s: Timestamps of the keyframes, seconds from the first frame.
        index_source: ``container`` (sample table) or ``demux`` (counted packets).
        rotation: Counter-clockwise rotation of the display matrix in degrees, as ffprobe reports
            it (``-90``: stored sideways, shown turned clockwise); frames come back upright.
        coded_width: Width of the frames as stored (before rotation).
        coded_height: Height of the frames as stored.
        start_s: Time of the first frame on the file's own timeline (e.g. 1.075 for a video whose
            first frame is shown after 1.075 s); every ``timestamps_s`` is relative to it.
        stream_index: The container's index of the video stream read (the best one, as ffmpeg
            picks it; not always 0).
        video_streams: Number of video streams in the file (cover art not counted).
        pixel_aspect: Sample aspect ratio (display width of one pixel over its height; 1.0 for
            square pixels). Frames are returned as stored, not resampled.
        frame_order: ``pts`` (frames are found by timestamp, seeks allowed) or ``decoder`` (the
            container stores no usable timestamps: frames are counted from the start of the file).
        container: FFmpeg's name of the container format, e.g. ``mov,mp4,m4a,3gp,3g2,mj2``.

    ``width`` and ``height`` are the size of the frames lvr returns: upright, i.e. the display size.
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
    rotation: int = 0
    coded_width: int = 0
    coded_height: int = 0
    start_s: float = 0.0
    stream_index: int = 0
    video_streams: int = 1
    pixel_aspect: float = 1.0
    frame_order: str = "pts"
    container: str = ""


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
        orientation: How to turn decoded frames upright.
        display_matrix: The stream's display matrix (9 integers, as FFmpeg stores it) or None.
        open_gop: Some keyframe has frames after it in decode order that are shown before it;
            decoders that count frames from a keyframe (decord) then misnumber them.
    """

    info: VideoInfo
    pts: np.ndarray
    times_s: np.ndarray
    keyframes: np.ndarray
    seek_ts: np.ndarray
    time_base: Fraction
    orientation: Orientation = UPRIGHT
    display_matrix: tuple[int, ...] | None = None
    open_gop: bool = False

    @property
    def counted(self) -> bool:
        """Whether frames must be counted in decoder output order (no usable timestamps)."""
        return self.info.frame_order == "decoder"


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
        raise VideoDecodeError(path, f"not a readable media file ({short_reason(e)})") from e


def video_streams(container: av.container.InputContainer) -> list[av.video.stream.VideoStream]:
    """The real video streams of a file (cover art / attached pictures do not count)."""
    return [
        st
        for st in container.streams.video
        if not st.disposition & av.stream.Disposition.attached_pic
    ]


def video_stream(
    container: av.container.InputContainer, path: str, index: int | None = None
) -> av.video.stream.VideoStream:
    """The video stream to read: ``index`` if given, else the best one as ffmpeg picks it.

    "Best" is the ffmpeg command line's choice: a stream marked default before others, then the
    largest picture, then the lowest index. With two default streams it takes the 480x270 main
    picture where "stream 0" would read a 320x180 preview. (``av_find_best_stream``, which PyAV's
    ``streams.best`` and decord use, breaks such ties by bitrate instead; they agree on real files
    seen so far, and decord is checked per file.) Cover art is never chosen.

    Raises:
        VideoDecodeError: No video stream (e.g. an audio-only file).
    """
    real = video_streams(container)
    if index is not None:
        for st in real:
            if st.index == index:
                return st
    if not real:
        audio = len(container.streams.audio)
        raise VideoDecodeError(
            path, "no video stream (audio-only file)" if audio else "no video stream"
        )
    # A stream whose header FFmpeg could not read (a file cut inside its moov) has no codec
    # context, no size: not a candidate, and when it is all there is, a one-line reason.
    readable = [st for st in real if st.codec_context is not None]
    if not readable:
        raise VideoDecodeError(
            path,
            f"video stream {real[0].index} cannot be read: no codec parameters (truncated or "
            "damaged header, or an unknown codec)",
        )
    # ffmpeg's own rule (what users see): default streams first, then the most pixels.
    default = av.stream.Disposition.default
    return max(
        readable, key=lambda st: (bool(st.disposition & default), st.width * st.height, -st.index)
    )


def _presentation(dec_pts: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, ...] | None:
    """(pts, keyframes, seek_ts, open_gop) from decode-order pts and key flags, or None when two
    frames share a pts. A keyframe's frame number is its rank in presentation order."""
    pts = np.sort(dec_pts)
    if len(pts) > 1 and (np.diff(pts) <= 0).any():
        return None
    kf_pts = dec_pts[key.astype(bool)]
    keyframes = np.searchsorted(pts, np.sort(kf_pts)).astype(np.int64)
    return pts, keyframes, pts[keyframes], np.bool_(leading_frames(dec_pts, key.astype(bool)))


def _from_container_index(
    st: av.video.stream.VideoStream, path: str
) -> tuple[np.ndarray, ...] | None:
    """(pts, keyframes, seek_ts, open_gop) from the MP4/MOV sample table, or None if unusable.

    The table FFmpeg exposes holds decode timestamps; the presentation offsets (``ctts``) are read
    from the file, so B-frames, open GOPs and an uneven tail get their real pts and keyframes their
    presentation-order numbers. Used only for constant-rate streams without discarded samples whose
    offsets match FFmpeg's start time; anything else is counted from the packets.
    """
    if not st.container.format.name.startswith("mov"):
        return None  # only MP4/MOV sample tables store presentation times (AVI's idx1 does not)
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
    ts, key, end, discard = rows.T  # [n] each, decode order
    size = os.path.getsize(path)
    if end.max() > size:
        missing = int((end > size).sum())
        raise VideoDecodeError(
            path, f"truncated: {missing} of {n} frames lie beyond the end of the {size}-byte file"
        )
    if discard.any() or not key[0]:
        return None
    offsets = composition_offsets(path, st.id, n)  # PyAV: stream id = track_ID
    if offsets is None:
        return None  # the packets say the same, at the cost of reading them
    dec_pts = ts + offsets
    if int(dec_pts.min()) != st.start_time or int(dec_pts.argmin()) != 0:
        return None  # edit lists FFmpeg applied differently than assumed here: count instead
    table = _presentation(dec_pts, key)
    if table is None:
        return None
    steps = np.diff(table[0])
    if n > 1 and (steps != steps[0]).any():
        return None  # variable rate: counted, so decord (checked on constant rate only) is refused
    step = int(steps[0]) if n > 1 else 1
    if st.duration and abs(st.duration - n * step) > 2 * step:
        return None  # the table does not cover the declared duration (unindexed fragments?): count
    return (*table, np.int64(step))


# "The start of the file" as a seek target, in AV_TIME_BASE units (about -12.7 days): below any
# timestamp FFmpeg produces. seek(0) is not the start where timestamps are negative (MPEG-TS whose
# 33-bit clock wraps: FFmpeg unwraps the frames before the wrap to negative pts, and seek(0) lands
# on the first keyframe after it). Small enough not to overflow when rescaled to a 1/1e9 time base.
_START_TS = -(1 << 40)


def rewind(container: av.container.InputContainer) -> None:
    """Seek to the first packet of the file, also where timestamps start below 0 (see ``_START_TS``).

    A demuxer that refuses a seek before its first index entry gets ``seek(0)``, which is the start
    for it (its timestamps are not negative: a wrapped MPEG-TS clock is searched, not indexed).
    """
    try:
        container.seek(_START_TS)
    except av.error.FFmpegError:
        container.seek(0)


def _first_frame(
    container: av.container.InputContainer, st: av.video.stream.VideoStream, path: str
) -> av.VideoFrame:
    """Decode the stream from its start until the first frame comes out (for its side data).

    Raises:
        VideoDecodeError: Nothing decodes from the start of the stream.
    """
    cc = st.codec_context
    cc.thread_count, cc.thread_type = 1, "SLICE"
    fed = 0
    try:
        rewind(container)  # the start of the file, for every stream
        for pkt in container.demux(st):
            frames = pkt.decode()
            fed += 1
            if not frames and pkt.size == 0:  # end of stream: drain what the decoder holds
                frames = cc.decode(None)
            if frames:
                return frames[0]
            if fed > 300:
                break
    except av.error.FFmpegError as e:
        raise VideoDecodeError(path, f"the first frame does not decode ({short_reason(e)})") from e
    raise VideoDecodeError(path, f"no frame decodes from the first {fed} packets of the stream")


def _rate(
    pts: np.ndarray, tb: Fraction, declared: Fraction | None, last_duration: int = 0
) -> tuple[float, float]:
    """(fps, duration_s) from the frame timestamps, in exact rational arithmetic.

    Constant steps give the exact rate (240 frames at 24 fps last 10.0 s, not 9.999999999999998).
    Steps that differ by rounding only (millisecond timestamps in Matroska) give the mean rate,
    replaced by the container's declared rate when that agrees within 1%; the duration then reaches
    past the start of the last frame by at least the shortest step. Variable rate: the mean rate,
    and the video ends where its last frame does (its pts plus its own duration, ``last_duration``
    ticks, or the mean step when unknown), not after n mean frame durations, which a long gap
    stretches past the last frame.
    """
    n = len(pts)
    if n < 2 or pts[-1] == pts[0]:
        rate = Fraction(declared) if declared else Fraction(25)
        return float(rate), float(n / rate)
    span = int(pts[-1] - pts[0]) * tb  # seconds from the first to the last frame
    steps = np.diff(pts)
    if (steps == steps[0]).all():
        rate = 1 / (int(steps[0]) * tb)
        return float(rate), float(n / rate)  # n frame durations: the last frame lasts one step too
    rate = (n - 1) / span
    if declared and abs(Fraction(declared) / rate - 1) < Fraction(1, 100):
        rate = Fraction(declared)
    if int(steps.max() - steps.min()) <= max(1, int(steps.min()) // 50):  # rounding jitter only
        return float(rate), float(max(n / rate, span + int(steps.min()) * tb))
    last = last_duration * tb if last_duration > 0 else span / (n - 1)
    return float(rate), float(span + last)


def _stream_duration(st: av.video.stream.VideoStream) -> float | None:
    """The stream's own declared duration in seconds (its header field, or the ``DURATION`` tag
    that Matroska muxers write per track), or None."""
    if st.duration and st.time_base:
        return float(st.duration * st.time_base)
    tag = st.metadata.get("DURATION", "")
    try:
        h, m, sec = tag.split(":")
        return int(h) * 3600 + int(m) * 60 + float(sec)
    except ValueError:
        return None


def _check_declared_duration(
    container: av.container.InputContainer,
    st: av.video.stream.VideoStream,
    pts: np.ndarray,
    path: str,
) -> None:
    """Counted frames must fill the duration the header declares (catches truncated MKV/WebM).

    Only the stream read counts: its own declared duration where the container gives one, else
    the file's, and that only when the file holds no other stream (an audio track or a second,
    longer video may legitimately outlast it). Matroska declares the end time (from 0) where MP4
    declares the span: a video whose first frame is shown late (start offset) is checked against
    the later of the two readings.
    """
    declared = _stream_duration(st)
    if declared is None and len(container.streams) == 1 and container.duration:
        declared = container.duration / 1e6  # AV_TIME_BASE
    if declared is None or len(pts) < 2:
        return
    span = float((pts[-1] - pts[0]) * st.time_base)
    end = float(pts[-1] * st.time_base)  # the last frame's start on the file's timeline
    present = max(span, end)
    if declared > present + max(1.0, 0.05 * declared):
        raise VideoDecodeError(
            path,
            f"truncated: the header declares {declared:.2f} s but only {span:.2f} s of frames are present",
        )


def _build_index(path: str) -> VideoIndex:
    with open_container(path) as container:
        st = video_stream(container, path)
        cc = st.codec_context
        if not cc.width or not cc.height:
            raise VideoDecodeError(path, f"video stream has no frame size ({cc.width}x{cc.height})")
        table, counted = _from_container_index(st, path), False
        source = "container"
        if table is None:
            source = "demux"  # nothing consumed yet: probing packets are replayed by demux()
            table, counted = from_demux(container, st, path)
        pts, keyframes, seek_ts, open_gop, last_duration = table
        if source == "demux":
            _check_declared_duration(container, st, pts, path)
        first = _first_frame(container, st, path)
        matrix = display_matrix(first)
        orientation = from_matrix(matrix, path)
        width, height = orientation.size(first.width, first.height)
        tb = Fraction(st.time_base or Fraction(1, 1))
        times = (pts - pts[0]).astype(np.float64) * float(tb)
        fps, duration = _rate(pts, tb, st.average_rate, int(last_duration))
        sar = st.sample_aspect_ratio
        info = VideoInfo(
            path=path,
            duration_s=duration,
            fps=fps,
            num_frames=len(pts),
            width=width,
            height=height,
            codec=cc.name,
            has_audio=bool(container.streams.audio),
            num_keyframes=len(keyframes),
            keyframe_times_s=tuple(round(float(t), 6) for t in times[keyframes]),
            index_source=source,
            rotation=orientation.rotation,
            coded_width=first.width,
            coded_height=first.height,
            start_s=round(float(int(pts[0]) * tb), 6),
            stream_index=st.index,
            video_streams=len(video_streams(container)),
            pixel_aspect=float(sar) if sar else 1.0,
            frame_order="decoder" if counted else "pts",
            container=container.format.name,
        )
    return VideoIndex(
        info,
        pts,
        times,
        keyframes,
        np.asarray(seek_ts, np.int64),
        tb,
        orientation,
        matrix,
        bool(open_gop),
    )


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
    """Describe a video: duration, fps, frame count, upright size, rotation, codec, audio, keyframes,
    start offset and which of its streams is read.

    Args:
        path: A video file.

    Returns:
        The ``VideoInfo``.

    Raises:
        VideoDecodeError: The file is missing, empty, corrupt, truncated (its index points past the end
            of the file), audio-only, or not a media file.
    """
    return load_index(path).info
