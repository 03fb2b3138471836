"""Exact and keyframe-only decoding with PyAV (the backend that runs everywhere).

Contract: the frame returned for index ``i`` is the ``i``-th frame of a full front-to-back decode of
the best video stream, turned upright; where that frame cannot be produced, ``VideoDecodeError``.

Seeking: ``container.seek(ts, stream=st, backward=True)`` takes a timestamp in the STREAM time base.
With the FFmpeg in PyAV 18, seeking an MP4 to a keyframe's presentation timestamp (pts) lands on that
keyframe, one tick earlier lands on the previous keyframe (measured, B-frames and edit lists included).
We seek to the keyframe's pts (``VideoIndex.seek_ts``) and then trust nothing: we decode forward and
compare each frame's pts with the target pts. Any attempt that does not deliver every target (the
seek landed after a target, on a non-keyframe, past the end of an MPEG program stream, or the stream
ended) is repeated from an earlier keyframe, and finally from the start of the file. Only a failure
of that last, plain front-to-back attempt raises: the file truly cannot be decoded there.

Decoder state a seek would lose: some of it is only in the first packet of a stream (x264's version
string in an SEI, which switches on FFmpeg's workarounds for old x264 bugs; DivX/Xvid user data with
their bug workarounds and the packed-B-frame flag; MPEG-4 VOL headers that AVI files carry only
in-band). Before the first seek past the first GOP, packet 0 is decoded once ("priming"); a seek
then flushes frames but keeps what the decoder learnt from it.

Streams without usable timestamps (``VideoIndex.counted``) are decoded from the start, counting
frames in output order, exactly as the reference decode numbers them.

Work per segment: frames between the keyframe and the targets must be decoded, but only those that
other frames reference. Non-target packets go to the decoder with ``skip_frame="NONREF"``, so
unreferenced B-frames are dropped unseen (bit-exact: nothing depends on them), and only targets are
converted to RGB. This is what puts this backend ahead of decord and of a plain PyAV seek loop.
"""

from __future__ import annotations

from collections.abc import Iterator

import av
import numpy as np

from lvr.media.errors import VideoDecodeError
from lvr.media.indices import Segment
from lvr.media.probe import VideoIndex, open_container, rewind, video_stream

_MAX_SEEK_RETRIES = 3
# Decoders whose skip_frame="NONREF" drops only frames no other frame needs (checked on real files).
# libdav1d (AV1) lost displayed frames with it, so everything else decodes every frame.
_SKIP_NONREF_CODECS = frozenset({"h264", "hevc", "mpeg1video", "mpeg2video", "mpeg4"})


class _Retry(Exception):
    """An attempt from one seek point failed in a way an earlier seek point can fix."""


def _configure(st: av.video.stream.VideoStream, threads: int) -> None:
    cc = st.codec_context
    cc.thread_count = threads  # 0 = FFmpeg picks (all cores)
    cc.thread_type = "SLICE" if threads == 1 else "AUTO"


def _decode_error(path: str, e: av.error.FFmpegError, what: str = "decoding") -> VideoDecodeError:
    return VideoDecodeError(
        path, f"{what} failed ({type(e).__name__}: {getattr(e, 'strerror', e)})"
    )


def _frames(
    container: av.container.InputContainer,
    st: av.video.stream.VideoStream,
    path: str,
    keep: set[int] | None = None,
) -> Iterator[av.VideoFrame]:
    """Decoded frames from the current position; FFmpeg errors become ``VideoDecodeError``.

    With ``keep`` (target pts), packets of other frames are sent with ``skip_frame="NONREF"``: the
    decoder drops them if no other frame references them (most B-frames), which cannot change any
    kept frame's pixels, and decodes them otherwise. Targets are always decoded.
    """
    cc, mode = st.codec_context, None
    if keep is None and cc.skip_frame != "DEFAULT":
        cc.skip_frame = "DEFAULT"
    try:
        for packet in container.demux(st):
            if keep is not None:
                want = "DEFAULT" if packet.pts is None or packet.pts in keep else "NONREF"
                if want != mode:
                    cc.skip_frame = mode = want
            yield from packet.decode()
    except av.error.FFmpegError as e:
        raise _decode_error(path, e) from e


def _pts(frame: av.VideoFrame, path: str) -> int:
    pts = frame.pts if frame.pts is not None else frame.dts
    if pts is None:
        raise VideoDecodeError(path, "decoded frame has no timestamp")
    return int(pts)


def _intra(frame: av.VideoFrame) -> bool:
    """Whether a decode can start at this frame (IDR/keyframe flag, or an intra picture: the
    non-IDR I-frames that Matroska and MPEG-TS index as keyframes carry no key flag)."""
    return bool(frame.key_frame) or frame.pict_type == 1  # AV_PICTURE_TYPE_I


def _rgb(frame: av.VideoFrame, index: VideoIndex) -> np.ndarray:
    return index.orientation.apply(frame.to_ndarray(format="rgb24"))  # [H, W, 3] uint8, upright


def _seek_points(index: VideoIndex, keyframe: int) -> list[int | None]:
    """Seek timestamps to try: the keyframe, up to 3 earlier keyframes, then the file start (None)."""
    kpos = int(np.searchsorted(index.keyframes, keyframe))
    return [
        int(index.seek_ts[k]) for k in range(kpos, max(kpos - 1 - _MAX_SEEK_RETRIES, -1), -1)
    ] + [None]


def _seek(
    container: av.container.InputContainer, st: av.video.stream.VideoStream, ts: int | None
) -> None:
    """Seek to the keyframe at or before ``ts`` (stream time base), or to the file start for None."""
    try:
        if ts is None:
            rewind(container)
        else:
            container.seek(ts, stream=st, backward=True)
    except av.error.FFmpegError as e:
        if ts is None:
            raise _decode_error(container.name, e, "seeking to the start") from e
        raise _Retry from e


def prime(container: av.container.InputContainer, st: av.video.stream.VideoStream) -> None:
    """Decode the stream's first packet once, so that what only it carries survives later seeks.

    FFmpeg keeps encoder identification (x264 build, DivX/Xvid versions, the packed-B-frame flag)
    and in-band headers across ``flush_buffers``; a seek that skips packet 0 never sees them, and
    e.g. an old x264 4:4:4 stream then decodes to garbage after every seek. Errors are ignored
    here: the decode that follows reports its own.
    """
    cc = st.codec_context
    try:
        rewind(container)
        for packet in container.demux(st):
            if packet.size:
                packet.decode()
                cc.decode(None)  # drain: leave no frame behind
                break
    except av.error.FFmpegError:
        pass
    cc.flush_buffers()  # leave draining mode; the next seek starts clean


def _attempt(
    container: av.container.InputContainer,
    st: av.video.stream.VideoStream,
    index: VideoIndex,
    seg: Segment,
    ts: int | None,
    out: dict[int, np.ndarray],
    skip: bool,
) -> None:
    """Decode the segment's targets after seeking to ``ts``; ``_Retry`` if another attempt may help.

    Frames before the keyframe's pts are leading frames of an open GOP (or what the seek left
    before it): skipped. The first frame at or after it must be a keyframe, or the demuxer landed
    somewhere a decode cannot start cleanly. ``skip``: drop non-reference non-target frames.
    """
    path = index.info.path
    want = index.pts[list(seg.targets)].tolist()  # ascending target pts
    floor = int(index.pts[seg.keyframe]) if ts is not None else int(index.pts[0])
    _seek(container, st, ts)
    j, started, last = 0, False, None
    retry = ts is not None or skip  # from the start without skipping is the last word
    for frame in _frames(container, st, path, set(want) if skip else None):
        pts = _pts(frame, path)
        if pts < floor and ts is not None:
            continue
        if not started:
            started = True
            if ts is not None and (pts > want[0] or not _intra(frame)):
                raise _Retry  # landed after the first target, or mid-GOP
        if last is not None and pts <= last:
            raise VideoDecodeError(
                path, f"decoder timestamps go backwards (pts {pts} after {last}): frames cannot "
                "be numbered"
            )  # fmt: skip
        last = pts
        if pts > want[j]:
            if retry:
                raise _Retry
            raise VideoDecodeError(
                path, f"frame {seg.targets[j]} (pts {want[j]}) does not decode (damaged or missing)"
            )
        if pts == want[j]:
            out[seg.targets[j]] = _rgb(frame, index)
            j += 1
            if j == len(want):
                return
    if retry:
        raise _Retry  # e.g. an MPEG-PS seek landed past the last keyframe: nothing came out
    missing = list(seg.targets[j:])
    raise VideoDecodeError(
        path, f"stream ended before frames {missing[:5]} (truncated or corrupt file)"
    )


def _decode_segment(
    container: av.container.InputContainer,
    st: av.video.stream.VideoStream,
    index: VideoIndex,
    seg: Segment,
    out: dict[int, np.ndarray],
) -> None:
    """Seek, then decode forward through the segment's targets, matching frames by pts.

    Attempts: the segment's keyframe and up to 3 earlier ones, then the file start, skipping
    non-reference frames where the decoder allows it; last, the file start decoding every frame.
    """
    skip = st.codec_context.name in _SKIP_NONREF_CODECS
    attempts = [(ts, skip) for ts in _seek_points(index, seg.keyframe)]
    if skip:
        attempts.append((None, False))
    for ts, skip_now in attempts:
        try:
            _attempt(container, st, index, seg, ts, out, skip_now)
            return
        except _Retry:
            continue
    raise AssertionError("unreachable: the last attempt returns or raises")


def _decode_counting(
    container: av.container.InputContainer,
    st: av.video.stream.VideoStream,
    index: VideoIndex,
    targets: list[int],
    out: dict[int, np.ndarray],
) -> None:
    """Decode from the start and take the targets by their position in the output order.

    Used where the decoder's timestamps cannot be matched to the index (packed B-frames in AVI);
    this is the reference decode itself, so it is exact by construction. Every frame is decoded
    (dropping non-reference frames would shift the count).
    """
    path, want, n = index.info.path, set(targets), 0
    _seek(container, st, None)
    for frame in _frames(container, st, path):
        if n in want:
            out[n] = _rgb(frame, index)
        n += 1
        if n > targets[-1]:
            return
    missing = [t for t in targets if t >= n]
    raise VideoDecodeError(
        path, f"stream ended after {n} frames, before frames {missing[:5]} (truncated or corrupt)"
    )


def decode_exact(
    index: VideoIndex, segments: list[Segment], threads: int = 1
) -> dict[int, np.ndarray]:
    """Decode the target frames of a plan.

    Args:
        index: Frame index of the video.
        segments: Decode plan from ``plan_decode`` (ignored for counted streams: one pass).
        threads: Decoder threads (0 = all cores).

    Returns:
        ``{frame number: [H, W, 3] uint8}`` (upright) for every target.

    Raises:
        VideoDecodeError: A target frame cannot be decoded even from the start of the file.
    """
    out: dict[int, np.ndarray] = {}
    path = index.info.path
    with open_container(path) as container:
        st = video_stream(container, path, index.info.stream_index)
        _configure(st, threads)
        if index.counted:
            _decode_counting(
                container, st, index, sorted(t for s in segments for t in s.targets), out
            )
            return out
        if segments and segments[0].keyframe > 0:
            prime(container, st)
        for seg in segments:
            _decode_segment(container, st, index, seg, out)
    return out


def _decode_keyframe(
    container: av.container.InputContainer,
    st: av.video.stream.VideoStream,
    index: VideoIndex,
    k: int,
) -> np.ndarray:
    """Seek to keyframe ``k``, feed the decoder that one packet, drain it, return the frame.

    Only the keyframe packet is decoded; draining (``decode(None)``) releases the frame that the
    decoder would otherwise hold back for B-frame reordering until many packets later. If a seek
    point does not deliver it, the next earlier one is tried; from the file start, the exact
    decoder takes over (it decodes forward to the keyframe).
    """
    path, want = index.info.path, int(index.pts[k])
    cc = st.codec_context
    for ts in _seek_points(index, k)[:-1]:
        try:
            _seek(container, st, ts)
            for packet in container.demux(st):
                pts = packet.pts if packet.pts is not None else packet.dts
                if packet.size == 0 or pts is None or pts < want:
                    continue
                if pts > want:
                    break  # landed after the keyframe: try an earlier seek point
                frames = list(packet.decode()) + list(cc.decode(None))
                cc.flush_buffers()  # leave draining mode for the next seek
                got = [f for f in frames if _pts(f, path) == want]
                if got:
                    return _rgb(got[0], index)
                break
        except av.error.FFmpegError:
            cc.flush_buffers()
        except _Retry:
            pass
    out: dict[int, np.ndarray] = {}
    _decode_segment(container, st, index, Segment(k, (k,)), out)
    return out[k]


def decode_keyframes(
    index: VideoIndex, positions: np.ndarray, threads: int = 1
) -> dict[int, tuple[int, np.ndarray]]:
    """Decode keyframes only (approximate sampling): one seek and one decoded packet per keyframe.

    Args:
        index: Frame index of the video (not a counted one: see ``sample_frames``).
        positions: Ascending unique positions in ``index.keyframes``.
        threads: Decoder threads.

    Returns:
        ``{position: (frame number, [H, W, 3] uint8)}``; the frame number is the keyframe's, whose
        decoded pts was checked against the index.

    Raises:
        VideoDecodeError: A keyframe cannot be decoded even from the start of the file.
    """
    path, out = index.info.path, {}
    with open_container(path) as container:
        st = video_stream(container, path, index.info.stream_index)
        _configure(st, threads)
        if len(positions) and int(index.keyframes[int(positions[0])]) > 0:
            prime(container, st)
        for p in positions.tolist():
            k = int(index.keyframes[p])
            out[p] = (k, _decode_keyframe(container, st, index, k))
    return out
