"""Clip files of the segment stage (``segment.write_clips``): each clip's frames in a file of its own.

Stream copy wherever it keeps every frame of the range (no quality loss, little CPU): the video
packets from the keyframe at or before the clip start until every frame of the range is in, in the
container that is the usual home of the codec: MP4 for H.264, H.265, VP9, AV1, MPEG-4 part 2,
MPEG-1/2 video and Motion JPEG; WebM for VP8 (MP4 has no VP8 mapping); else Matroska (``.mkv``),
or QuickTime (``.mov``) for codecs only it carries (H.263, DNxHD, QuickTime RLE...).

A lossless re-encode, named ``<clip_id>.lossless.mp4`` (H.264 at qp 0, planar YUV) or
``.lossless.mkv`` (FFV1: gray, RGB, alpha, 12-bit, or an FFmpeg without x264; see
``lossless_encoder``), where stream copy cannot be trusted: the source has no usable frame
timestamps (``VideoIndex.counted``: AVI with B-frames or DivX packed B-frames, H.264 in MPEG
program streams), so no packet can be matched to a frame of the range; no container above takes
the codec (AVI/ASF/FLV-only codecs: WMV, Sorenson Spark...); or FFmpeg refuses the copy (raw
video). Such a file holds exactly the frames of the range, pixel for pixel the RGB frames lvr
reads from the source, with its timestamps, colours and rotation (not a near copy: a high-quality
lossy encode would break lvr's rule that frames are exact). The price is size: 10 s of 720p took
16 MB with x264 (83 MB with FFV1) against 0.5-1.5 MB stream copied. The file name says which way
a clip went, so ``clip_path`` records it.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import av
import numpy as np

from lvr.datagen.common import error_line
from lvr.media import VideoDecodeError, load_index
from lvr.media.errors import short_reason
from lvr.media.indices import TIME_EPS_S
from lvr.media.probe import VideoIndex, rewind


@dataclass(frozen=True)
class ClipFormat:
    """Where stream-copied clips of a video go."""

    muxer: str  # FFmpeg format name
    suffix: str  # file name ending after the clip id


@dataclass(frozen=True)
class LosslessEncoder:
    """An encoder that stores decoded frames exactly, and where its files go."""

    encoder: str
    muxer: str
    suffix: str
    options: dict[str, str] = field(default_factory=dict)
    exact: frozenset[str] | None = None  # pixel formats it gives back as they were (None: all)


# MP4 for the codecs it is the standard home of (checked to keep every frame by stream copy); it
# accepts more (FFV1, PNG) under private tags that few players read, so those go to Matroska.
_MP4_CODECS = frozenset(
    {"h264", "hevc", "vp9", "av1", "mpeg4", "mpeg1video", "mpeg2video", "mjpeg"}
)
_COPY_ELSEWHERE = (ClipFormat("matroska", ".mkv"), ClipFormat("mov", ".mov"))
# Best first: x264 at qp 0 is lossless for planar YUV at about a fifth of FFV1's size; it takes
# gray and NV12 too, but they decode back as yuv420p, whose RGB differs (gray by up to 19 levels).
# FFV1 is in every FFmpeg build and stores the rest (RGB, alpha, gray, 12-bit); every FFV1 frame
# is a keyframe, so any frame of such a clip is a seek point.
_PLANAR_YUV = frozenset(
    {"yuv420p", "yuv422p", "yuv444p", "yuv420p10le", "yuv422p10le", "yuv444p10le"}
    | {"yuvj420p", "yuvj422p", "yuvj444p"}  # full range (JPEG-style)
)
LOSSLESS = (
    LosslessEncoder(
        "libx264", "mp4", ".lossless.mp4", {"qp": "0", "preset": "veryfast"}, _PLANAR_YUV
    ),
    LosslessEncoder("ffv1", "matroska", ".lossless.mkv", {"level": "3", "g": "1"}),
)
RGB_PADDED = "bgr0"  # 8-bit RGB as FFV1 stores it


def copy_format(index: VideoIndex) -> ClipFormat | None:
    """Where stream-copied clips of a video go; None: they are re-encoded (see the module
    docstring for the rule)."""
    if index.counted:
        return None  # no timestamps to pick the range's packets by
    decoder = av.Codec(index.info.codec, "r")  # info.codec is the decoder's name (libdav1d: AV1)
    if decoder.canonical_name in _MP4_CODECS:
        return ClipFormat("mp4", ".mp4")
    if decoder.canonical_name == "vp8":
        return ClipFormat("webm", ".webm")
    return next((f for f in _COPY_ELSEWHERE if decoder.name in _accepted(f.muxer)), None)


def lossless_encoder(pix_fmt: str) -> tuple[LosslessEncoder, str]:
    """The first lossless encoder of this FFmpeg that stores ``pix_fmt``, and the format it gets.

    Formats no encoder stores (packed RGB, palettes, packed YUV of raw captures) go in as the RGB
    frames lvr reads from them (``rgb24``, padded to ``bgr0`` for FFV1): exact for lvr, which reads
    every frame as RGB. (Repacking packed YUV into planes keeps the samples, but FFmpeg converts
    the two layouts to RGB differently, by up to 3 levels.)

    Raises:
        ValueError: This FFmpeg has neither encoder.
    """
    for fmt in (pix_fmt, RGB_PADDED):
        for enc in LOSSLESS:
            takes = _pixel_formats(enc.encoder) if enc.encoder in av.codecs_available else set()
            if fmt in takes and (enc.exact is None or fmt in enc.exact):
                return enc, fmt
    raise ValueError(f"no lossless encoder stores pixel format {pix_fmt}")


@cache
def _accepted(muxer: str) -> frozenset[str]:
    """Names of the codecs a muxer stores natively (what PyAV lets a template stream into)."""
    with av.open(io.BytesIO(), "w", format=muxer) as out:
        return frozenset(out.supported_codecs)


@cache
def _pixel_formats(encoder: str) -> frozenset[str]:
    return frozenset(f.name for f in av.Codec(encoder, "w").video_formats or ())


def write_clip_files(path: str, rows: list[dict[str, Any]], out_dir: Path) -> None:
    """Write a file for each clip row without an error, setting ``clip_path`` or ``error``.

    Stream copy cannot start between keyframes, so a copied file starts at the keyframe at or
    before the clip start (as in the paper's release) and ends before the first frame at or after
    its end; a re-encoded file holds exactly the frames of the range. A clip whose stream copy
    FFmpeg refuses (e.g. raw video that Matroska has no tag for) is re-encoded instead. A file
    already there (same clip id) is kept: a rerun writes only what is missing.
    """
    todo = [row for row in rows if not row["error"]]  # undecodable time: no file
    if not todo:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        index = load_index(path)
        fmt = copy_format(index)
    except VideoDecodeError as exc:
        for row in todo:
            row["error"] = f"clip file not written: {error_line(exc)}"
        return
    todo = [row for row in todo if not _written_before(row, out_dir / row["clip_id"], fmt)]
    reencode = todo if fmt is None else [r for r in todo if not _copied(r, index, fmt, out_dir)]
    if reencode:
        _write_lossless(path, index, reencode, out_dir)


def _written_before(row: dict[str, Any], stem: Path, fmt: ClipFormat | None) -> bool:
    """Whether an earlier run wrote the clip's file (copied, or re-encoded after a failed copy)."""
    suffixes = [enc.suffix for enc in LOSSLESS] + ([fmt.suffix] if fmt else [])
    for suffix in suffixes:
        if (target := stem.with_name(stem.name + suffix)).is_file():
            row["clip_path"] = str(target)
            return True
    return False


def _copied(row: dict[str, Any], index: VideoIndex, fmt: ClipFormat, out_dir: Path) -> bool:
    """Stream-copy one clip; False when FFmpeg refused it (the caller re-encodes it).

    Other failures (a range without frames, a truncated file) are the row's one-line error.
    """
    target = out_dir / f"{row['clip_id']}{fmt.suffix}"
    tmp = _tmp(target)
    try:
        _copy_range(index, fmt.muxer, tmp, row)
        os.replace(tmp, target)
        row["clip_path"] = str(target)
    except av.error.FFmpegError:
        return False
    except (ValueError, OSError) as exc:
        row["error"] = f"clip file not written: {error_line(exc)}"
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _tmp(target: Path) -> Path:
    """The name a file is written under before it is complete (same folder: rename is atomic)."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def _frames_in(index: VideoIndex, start_s: float, end_s: float) -> tuple[int, int]:
    """Frames ``[a, b)`` of the clip; a range between two frames is an error, not an empty file."""
    t = index.times_s
    a = int(np.searchsorted(t, start_s - TIME_EPS_S, side="left"))
    b = int(np.searchsorted(t, end_s - TIME_EPS_S, side="left"))
    if b <= a:
        raise ValueError(f"range [{start_s:.3f}, {end_s:.3f}) s holds no frame of the video")
    return a, b


# ---------------------------------------------------------------------------------------------
# Stream copy
# ---------------------------------------------------------------------------------------------


def _copy_range(index: VideoIndex, muxer: str, dst: Path, row: dict[str, Any]) -> None:
    """Copy the video packets of every frame in the row's range, from the keyframe at or before the
    first one (what a decoder needs to show it), into ``dst``.

    Reads the stream ``lvr.media`` reads (the best one) and keeps its display matrix, so the clip
    plays upright where the source does. Packets are chosen by their presentation timestamps in
    the frame index, not by decode time: Matroska keyframes have no dts and an MPEG-TS seek may
    land after the keyframe's packet, and either lost up to a GOP. Copying stops once every frame
    of the range is in; frames after the range that come earlier in decode order (references of
    the last B-frames) come along. Timestamps are rebased so the file's decode time starts at 0.

    Raises:
        ValueError: The range holds no frame, or the stream ends before the range's frames
            (truncated file).
    """
    a, b = _frames_in(index, row["start_s"], row["end_s"])
    k = int(index.keyframes[np.searchsorted(index.keyframes, a, side="right") - 1])
    with av.open(index.info.path) as inp:
        ist = inp.streams[index.info.stream_index]
        packets = _packets_for(inp, ist, index, k, index.pts[a:b].tolist())
        _write_packets(dst, muxer, ist, index, packets)  # the template stream lives with ``inp``


def _packets_for(
    inp: Any, ist: Any, index: VideoIndex, k: int, wanted: list[int]
) -> list[av.Packet]:
    """Packets in decode order from a keyframe packet shown at or before ``wanted[0]`` (pts) until
    every pts in ``wanted`` is in.

    The start is the first packet flagged key after seeking to keyframe ``k`` (the index's key
    frames need not be the packets' key flags: HEVC in MP4 was seen to differ); if it shows after
    the range's first frame, the seek landed too late and the next earlier keyframe (finally the
    file start) is tried.
    """
    kpos = int(np.searchsorted(index.keyframes, k))
    for ts in [int(t) for t in index.seek_ts[kpos::-1][:4]] + [None]:
        if ts is None:
            rewind(inp)
        else:
            inp.seek(ts, stream=ist, backward=True)
        got = _collect(inp, ist, wanted, from_start=ts is None)
        if got is not None:
            return got
    raise AssertionError("unreachable: a read from the file start returns or raises")


def _collect(inp: Any, ist: Any, wanted: list[int], from_start: bool) -> list[av.Packet] | None:
    """One pass of ``_packets_for`` from the current position (None: landed too late).

    Packets shown before the start packet but decoded after it (an open GOP's leading pictures)
    reference the previous GOP: left out. From the file start everything is copied, as the
    reference decode of the whole file reads it (the first packet need not be flagged key).
    """
    out: list[av.Packet] = []
    needed = set(wanted)
    for pkt in inp.demux(ist):
        if pkt.pts is None or pkt.size == 0:
            continue  # a flush packet, or one that no frame of the index is
        if not out:
            if not (pkt.is_keyframe or from_start):
                continue  # mid-GOP: wait for a packet a decode can start at
            if pkt.pts > wanted[0] and not from_start:
                return None
        elif pkt.pts < out[0].pts and not from_start:
            continue
        out.append(pkt)
        needed.discard(int(pkt.pts))
        if not needed:
            return out
    if not out and not from_start:
        return None
    raise ValueError(f"stream ended before {len(needed)} frames of the range (truncated file?)")


def _write_packets(
    dst: Path, muxer: str, ist: Any, index: VideoIndex, packets: list[av.Packet]
) -> None:
    """Mux ``packets`` (decode order) into ``dst``, with decode timestamps made from their pts.

    Source dts are not used: Matroska has none on keyframes and MPEG-TS's start anywhere. The
    ``i``-th dts is the ``i``-th smallest pts, shifted back just enough to never pass a packet's
    own pts (the reorder delay), then everything moves so that the first dts is 0. The output
    stream is made from the decoder's codec (``opaque``): no encoder of the codec is needed (this
    FFmpeg decodes AV1 with libdav1d and has no AV1 encoder of that name).
    """
    pts = np.array([p.pts for p in packets], dtype=np.int64)  # [P] decode order
    dts = np.sort(pts)
    dts -= max(0, int(np.max(dts - pts)))
    base = int(dts[0])
    with av.open(str(dst), "w", format=muxer) as out:
        ost = out.add_stream_from_template(ist, opaque=True)
        if index.display_matrix is not None:
            ost.set_display_matrix(index.display_matrix)
        for pkt, p, d in zip(packets, pts.tolist(), dts.tolist(), strict=True):
            pkt.pts, pkt.dts = p - base, d - base
            pkt.stream = ost
            out.mux(pkt)


# ---------------------------------------------------------------------------------------------
# Lossless re-encode
# ---------------------------------------------------------------------------------------------


def _write_lossless(src: str, index: VideoIndex, rows: list[dict[str, Any]], out_dir: Path) -> None:
    """Re-encode the clips of one video in a single decode of it (one pass per clip would decode
    a long video once per clip)."""
    spans: list[tuple[int, int, Path, dict[str, Any]]] = []
    for row in rows:
        try:
            a, b = _frames_in(index, row["start_s"], row["end_s"])
        except ValueError as exc:
            row["error"] = f"clip file not written: {error_line(exc)}"
            continue
        spans.append((a, b, _tmp(out_dir / row["clip_id"]), row))
    try:
        done, enc, reason = _encode_ranges(src, index, [(a, b, tmp) for a, b, tmp, _ in spans])
        for _, _, tmp, row in spans:
            if tmp in done and enc is not None:
                target = out_dir / f"{row['clip_id']}{enc.suffix}"
                os.replace(tmp, target)
                row["clip_path"] = str(target)
            else:
                row["error"] = f"clip file not written: {reason}"
    finally:
        for _, _, tmp, _ in spans:
            tmp.unlink(missing_ok=True)


def _encode_ranges(
    src: str, index: VideoIndex, spans: list[tuple[int, int, Path]]
) -> tuple[set[Path], LosslessEncoder | None, str]:
    """Decode ``src`` once from the start and encode frames ``[a, b)`` of each span into its path.

    Frames are numbered in decoder output order from the file start, as ``lvr.media`` numbers a
    counted index and as a full reference decode does. Every frame is decoded (dropping
    unreferenced ones would shift the count).

    Returns:
        (paths written completely, the encoder used, why the others were not: '' when all were).
    """
    todo, active, done, n = sorted(spans), [], set(), 0
    how: tuple[LosslessEncoder, str] | None = None  # chosen on the first frame's pixel format
    try:
        with av.open(src) as inp:
            ist = inp.streams[index.info.stream_index]
            ist.thread_type = "AUTO"
            for frame in inp.decode(ist):
                how = how or lossless_encoder(frame.format.name)
                while todo and todo[0][0] == n:
                    active.append(_LosslessClip(*todo.pop(0), *how, index, ist, frame))
                for clip in active:
                    clip.add(frame, n)
                for clip in [c for c in active if c.b == n + 1]:
                    clip.close()
                    active.remove(clip)
                    done.add(clip.path)
                n += 1
                if not todo and not active:
                    return done, how[0], ""
        return done, how and how[0], f"the stream ended after {n} frames (truncated file?)"
    except (av.error.FFmpegError, ValueError, OSError) as exc:
        return done, how and how[0], f"lossless re-encode failed at frame {n}: {short_reason(exc)}"
    finally:
        for clip in active:
            clip.out.close()  # unfinished: the caller deletes the file


class _LosslessClip:
    """One clip file being written losslessly, with the source's timestamps, colour description
    and display matrix."""

    def __init__(
        self,
        a: int,
        b: int,
        path: Path,
        enc: LosslessEncoder,
        stored: str,
        index: VideoIndex,
        ist: Any,
        first: av.VideoFrame,
    ) -> None:
        self.a, self.b, self.path, self.index, self.stored = a, b, path, index, stored
        self.out = av.open(str(path), "w", format=enc.muxer)
        st = self.out.add_stream(enc.encoder, options=enc.options)
        st.width, st.height, st.pix_fmt = first.width, first.height, stored
        st.time_base = st.codec_context.time_base = index.time_base
        cc = st.codec_context
        if stored == first.format.name:  # (RGB made from YUV has no YUV matrix or range)
            cc.color_range, cc.colorspace = first.color_range, first.colorspace
            cc.color_primaries, cc.color_trc = first.color_primaries, first.color_trc
        if ist.codec_context.sample_aspect_ratio:  # non-square pixels stay so
            cc.sample_aspect_ratio = ist.codec_context.sample_aspect_ratio
        if index.display_matrix is not None:
            st.set_display_matrix(index.display_matrix)
        self.st = st

    def add(self, frame: av.VideoFrame, n: int) -> None:
        """Encode frame ``n`` of the source if it is in the range."""
        if not self.a <= n < self.b:
            return
        if frame.format.name != self.stored:  # lvr's RGB of the frame, padded (exact)
            frame = frame.reformat(format="rgb24").reformat(format=RGB_PADDED)
        pts = self.index.pts
        frame.pts = int(pts[n] - pts[self.a])
        frame.time_base = self.index.time_base
        nxt = int(pts[n + 1]) if n + 1 < len(pts) else self._end_ticks()
        frame.duration = max(1, nxt - int(pts[n]))  # so the clip ends where its last frame does
        # x264 takes the decoder's picture types as orders (a forced B or P): let it choose.
        frame.pict_type = av.video.frame.PictureType.NONE
        self.out.mux(self.st.encode(frame))

    def _end_ticks(self) -> int:
        """Where the video ends, in ticks of the stream (the last frame's end)."""
        return int(self.index.pts[0]) + round(self.index.info.duration_s / self.index.time_base)

    def close(self) -> None:
        """Flush the encoder (once the range is in) and close the file."""
        try:
            self.out.mux(self.st.encode(None))
        finally:
            self.out.close()
