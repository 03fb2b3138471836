"""The frame index of a stream without a usable container index: every packet header read once.

What ``lvr.media.probe`` falls back to when the container has no sample table (MPEG-TS, Matroska,
AVI...) or its table does not describe every frame: one pass over the file, no decoding. Packets
before the first keyframe and frames shown before it are not frames (they do not decode); packets
stamped only in part (H.264 in MPEG program streams) get times spread at the declared rate; AVI's
guessed timestamps and DivX packed B-frames mark the index "counted" (see the probe's docstring).
"""

from __future__ import annotations

from fractions import Fraction

import av
import numpy as np

from lvr.media.errors import VideoDecodeError, short_reason


def leading_frames(dec_pts: np.ndarray, key: np.ndarray) -> bool:
    """Whether a keyframe has frames after it in decode order that are shown before it (open GOP).

    Decoders that seek to a keyframe and count frames from it (decord) misnumber such files.
    """
    after_min = np.minimum.accumulate(dec_pts[::-1])[::-1]  # [n] smallest pts from here on
    d = np.flatnonzero(key[:-1])
    return bool((after_min[d + 1] < dec_pts[d]).any())


# Containers whose packets carry no stored presentation timestamp (FFmpeg's parser guesses them).
_GUESSED_PTS_FORMATS = frozenset({"avi", "h264", "hevc", "m4v", "mpegvideo", "h263", "vc1"})
_VOP = b"\x00\x00\x01\xb6"  # MPEG-4 part 2 picture (VOP) start code
_PACKED_SCAN_PACKETS = 64  # packed B-frames show in the first GOP or never


def _packed_bframes(data: bytes) -> bool:
    """Whether an MPEG-4 part 2 packet is DivX/Xvid "packed": two pictures in one chunk, or the
    ``DivX...p`` user data that tells FFmpeg the stream is packed."""
    if data.count(_VOP) > 1:
        return True
    at = data.find(b"DivX")
    if at < 0:
        return False
    vop = data.find(_VOP, at)
    tag = data[at : vop if vop > at else at + 32].rstrip(b"\x00")
    return tag.endswith(b"p")


def _read_packets(
    container: av.container.InputContainer, st: av.video.stream.VideoStream, path: str
) -> tuple[list[tuple[int | None, bool]], bool, bool]:
    """(rows of (pts or dts or None, keyframe) in decode order, reordered, packed).

    Packets before the first keyframe are left out: a stream cut mid-GOP (a capture or a split
    MPEG-TS) decodes nothing before it, and a frame that does not decode must not be numbered.
    """
    rows: list[tuple[int | None, bool, int]] = []
    guessed = container.format.name.split(",")[0] in _GUESSED_PTS_FORMATS
    reordered = packed = False
    mpeg4, seen = st.codec_context.name == "mpeg4", 0
    try:
        for pkt in container.demux(st):
            if pkt.size == 0 or pkt.is_discard:
                continue
            seen += 1
            if not rows and not pkt.is_keyframe:
                continue
            reordered = reordered or pkt.pts is None or pkt.pts != pkt.dts
            if guessed and mpeg4 and len(rows) < _PACKED_SCAN_PACKETS and not packed:
                packed = _packed_bframes(bytes(pkt))
            t = pkt.pts if pkt.pts is not None else pkt.dts
            rows.append((t, pkt.is_keyframe, pkt.duration or 0))
    except av.error.FFmpegError as e:
        raise VideoDecodeError(
            path, f"demuxing failed after {seen} packets ({short_reason(e)})"
        ) from e
    if not rows:
        raise VideoDecodeError(
            path, "video stream has no keyframe" if seen else "video stream has no frames"
        )
    return rows, guessed and reordered, guessed and packed


def _interpolated(
    rows: list[tuple[int | None, bool, int]], st: av.video.stream.VideoStream, path: str
) -> tuple[np.ndarray, ...]:
    """(pts, keyframes, seek_ts, open_gop) for a stream whose packets are only partly stamped.

    FFmpeg stamps only the first frame of each PES packet of H.264 in MPEG program streams, so the
    frames are numbered in decoder output order (the caller marks the index counted) and their
    times are spread at the stream's frame rate from the first stamp.
    """
    rate = st.average_rate or st.guessed_rate or st.base_rate
    if not rate:
        raise VideoDecodeError(path, "packets carry no timestamps and no frame rate is declared")
    step = 1 / (Fraction(rate) * Fraction(st.time_base or Fraction(1, 90000)))  # ticks per frame
    t0 = next((t for t, _, _ in rows if t is not None), 0)
    pts = np.array([t0 + round(i * step) for i in range(len(rows))], np.int64)
    keyframes = np.flatnonzero([k for _, k, _ in rows]).astype(np.int64)
    return pts, keyframes, pts[keyframes], np.bool_(False), np.int64(round(step))


def _last_duration(st: av.video.stream.VideoStream, pts: np.ndarray, packet: int) -> int:
    """How long the last frame is shown (ticks; 0 unknown): the stream's declared duration beyond
    its last frame where that is plausible (MP4's track duration), else its packet's duration. With
    B-frames a packet's duration is a decode-order step, not how long that picture is shown."""
    if st.duration and len(pts) > 1:
        beyond = int(st.duration) - int(pts[-1] - pts[0])
        if 0 < beyond <= int(np.diff(pts).max()):
            return beyond
    return int(packet)


def from_demux(
    container: av.container.InputContainer, st: av.video.stream.VideoStream, path: str
) -> tuple[tuple[np.ndarray, ...], bool]:
    """((pts, keyframes, seek_ts, open_gop), counted) by reading every packet of the stream once.

    ``counted`` is True when the decoder's output timestamps cannot be matched to this index (see
    the module docstring): a container without stored timestamps whose packets show reordering,
    missing timestamps or packed B-frames.
    """
    rows, reordered, packed = _read_packets(container, st, path)
    if any(t is None for t, _, _ in rows):
        return _interpolated(rows, st, path), True
    arr = np.array(rows, np.int64)  # [n, 3] (pts, key, duration) in decode order
    arr = arr[arr[:, 0] >= arr[0, 0]]  # leading frames of a GOP whose start is cut off: dropped
    order = np.argsort(arr[:, 0], kind="stable")
    pts, key = arr[order, 0], arr[order, 1].astype(bool)
    keyframes = np.flatnonzero(key).astype(np.int64)
    open_gop = np.bool_(leading_frames(arr[:, 0], arr[:, 1].astype(bool)))
    last_duration = _last_duration(st, pts, arr[order[-1], 2])
    return (pts, keyframes, pts[keyframes], open_gop, last_duration), reordered or packed
