"""Exact and keyframe-only decoding with PyAV (the backend that runs everywhere).

Seeking: ``container.seek(ts, stream=st, backward=True)`` takes a timestamp in the STREAM time base.
With the FFmpeg in PyAV 18, seeking an MP4 to a keyframe's presentation timestamp (pts) lands on that
keyframe, one tick earlier lands on the previous keyframe (measured, B-frames and edit lists included).
We seek to the keyframe's pts (``VideoIndex.seek_ts``) and then trust nothing: we decode forward and
compare each frame's pts with the target pts. If the first frame comes after the target (a demuxer that
seeks by dts or a coarse index), we retry from the previous keyframe; landing earlier only costs time.

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
from lvr.media.probe import VideoIndex, open_container, video_stream

_MAX_SEEK_RETRIES = 3


def _configure(st: av.video.stream.VideoStream, threads: int) -> None:
    cc = st.codec_context
    cc.thread_count = threads  # 0 = FFmpeg picks (all cores)
    cc.thread_type = "SLICE" if threads == 1 else "AUTO"


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
    try:
        for packet in container.demux(st):
            if keep is not None:
                want = "DEFAULT" if packet.pts is None or packet.pts in keep else "NONREF"
                if want != mode:
                    cc.skip_frame = mode = want
            yield from packet.decode()
    except av.error.FFmpegError as e:
        raise VideoDecodeError(
            path, f"decoding failed ({type(e).__name__}: {getattr(e, 'strerror', e)})"
        ) from e


def _pts(frame: av.VideoFrame, path: str) -> int:
    pts = frame.pts if frame.pts is not None else frame.dts
    if pts is None:
        raise VideoDecodeError(path, "decoded frame has no timestamp")
    return int(pts)


def _rgb(frame: av.VideoFrame) -> np.ndarray:
    return frame.to_ndarray(format="rgb24")  # [H, W, 3] uint8


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
    if ts is None:
        container.seek(0)  # AV_TIME_BASE units: at or before the first frame of any stream
    else:
        container.seek(ts, stream=st, backward=True)


def _decode_segment(
    container: av.container.InputContainer,
    st: av.video.stream.VideoStream,
    index: VideoIndex,
    seg: Segment,
    out: dict[int, np.ndarray],
) -> None:
    """Seek, then decode forward through the segment's targets, matching frames by pts."""
    path = index.info.path
    want = index.pts[list(seg.targets)].tolist()  # ascending target pts
    keep = set(want)
    for ts in _seek_points(index, seg.keyframe):
        _seek(container, st, ts)
        j, first = 0, True
        for frame in _frames(container, st, path, keep):
            pts = _pts(frame, path)
            if first and pts > want[0] and ts is not None:
                break  # landed after the first target (e.g. MPEG-TS seeks late): try earlier
            first = False
            if pts > want[j]:
                raise VideoDecodeError(
                    path, f"frame {seg.targets[j]} (pts {want[j]}) missing from the stream"
                )
            if pts == want[j]:
                out[seg.targets[j]] = _rgb(frame)
                j += 1
                if j == len(want):
                    return
        else:
            missing = list(seg.targets[j:])
            raise VideoDecodeError(
                path, f"stream ended before frames {missing[:5]} (truncated or corrupt file)"
            )
    raise AssertionError("unreachable: the file-start attempt returns or raises")


def decode_exact(
    index: VideoIndex, segments: list[Segment], threads: int = 1
) -> dict[int, np.ndarray]:
    """Decode the target frames of a plan.

    Args:
        index: Frame index of the video.
        segments: Decode plan from ``plan_decode``.
        threads: Decoder threads (0 = all cores).

    Returns:
        ``{frame number: [H, W, 3] uint8}`` for every target.

    Raises:
        VideoDecodeError: Decoding fails or a target frame never appears.
    """
    out: dict[int, np.ndarray] = {}
    with open_container(index.info.path) as container:
        st = video_stream(container, index.info.path)
        _configure(st, threads)
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
    decoder would otherwise hold back for B-frame reordering until many packets later.
    """
    path, want = index.info.path, int(index.pts[k])
    cc = st.codec_context
    for ts in _seek_points(index, k):
        _seek(container, st, ts)
        try:
            for packet in container.demux(st):
                pts = packet.pts if packet.pts is not None else packet.dts
                if packet.size == 0 or pts is None or pts < want:
                    continue
                if pts > want:
                    break  # landed after the keyframe: try an earlier seek point
                frames = list(packet.decode()) + list(cc.decode(None))
                cc.flush_buffers()  # leave draining mode for the next seek
                got = [f for f in frames if _pts(f, path) == want]
                if not got:
                    raise VideoDecodeError(
                        path, f"keyframe {k} (pts {want}) did not decode on its own"
                    )
                return _rgb(got[0])
            else:
                raise VideoDecodeError(
                    path, f"keyframe {k} (pts {want}) missing (truncated or corrupt file)"
                )
        except av.error.FFmpegError as e:
            raise VideoDecodeError(
                path,
                f"decoding keyframe {k} failed ({type(e).__name__}: {getattr(e, 'strerror', e)})",
            ) from e
    raise VideoDecodeError(path, f"cannot seek to keyframe {k}")


def decode_keyframes(
    index: VideoIndex, positions: np.ndarray, threads: int = 1
) -> dict[int, tuple[int, np.ndarray]]:
    """Decode keyframes only (approximate sampling): one seek and one decoded packet per keyframe.

    Args:
        index: Frame index of the video.
        positions: Ascending unique positions in ``index.keyframes``.
        threads: Decoder threads.

    Returns:
        ``{position: (frame number, [H, W, 3] uint8)}``; the frame number is the keyframe's, whose
        decoded pts was checked against the index.

    Raises:
        VideoDecodeError: Decoding fails or a keyframe does not come out with its indexed pts.
    """
    path, out = index.info.path, {}
    with open_container(path) as container:
        st = video_stream(container, path)
        _configure(st, threads)
        for p in positions.tolist():
            k = int(index.keyframes[p])
            out[p] = (k, _decode_keyframe(container, st, index, k))
    return out
