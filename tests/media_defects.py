"""Small generated videos that reproduce each defect class real footage showed (import as
``media_defects``). Each writer encodes with PyAV at test time; nothing here is copied from a real file.

- ``packed_avi``: MPEG-4 part 2 in AVI with DivX "packed B-frames" (a P and a B picture in one chunk,
  a placeholder chunk after), the ``DivX...p`` user data and the VOL header only in packet 0.
- ``headers_in_first_packet_avi``: MPEG-4 part 2 in AVI, no B-frames, the VOL header and the encoder's
  user data only in packet 0 and no extradata: a decoder that seeks past packet 0 never sees them
  (the same class as FFmpeg's old-x264 workaround, which is switched on by an SEI in packet 0).
- ``rotated_mp4``: H.264 with a display matrix (rotation, optional mirroring).
- ``two_streams_mp4``: two default video streams, the larger one second.
- ``mpeg2_ps``: MPEG-2 in an MPEG program stream (``.mpg``), for seeks near the end.
- ``partly_decodable_mp4``: an intact index whose last frames' data is zeroed.
- ``dropped_frame_mkv``: a missing timestamp, so the declared rate ends the video where its last
  frame starts.
- ``hevc_mp4``: H.265 (decord returned shifted frames on H.265).
- ``bframe_video``: H.264/H.265 with B-frames whose frame ``i`` has any timestamp (variable rate,
  gaps, a late last frame, open GOPs), in any container.
- ``any_codec_video``: any encoder PyAV has (VP8, AV1, DivX 3, WMV, raw...) in any container.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

_VOP = b"\x00\x00\x01\xb6"


def picture(i: int, width: int, height: int, seed: int = 0) -> np.ndarray:
    """Frame ``i`` of a test clip: a moving bar and a counter-coloured block, distinct per frame.

    Smooth enough for encoders to use P/B prediction, different enough that a frame off by one
    differs by tens of grey levels.
    """
    yy, xx = np.mgrid[0:height, 0:width]
    a = np.empty((height, width, 3), np.uint8)  # [H, W, 3]
    a[..., 0] = (xx * 255 // max(1, width - 1) + 9 * i + 40 * seed) % 256
    a[..., 1] = (yy * 255 // max(1, height - 1) + 5 * i) % 256
    a[..., 2] = 60 + (seed * 50) % 150
    x0 = (3 * i) % max(1, width - width // 4)
    a[:, x0 : x0 + width // 4, 2] = 230
    a[: height // 3, : width // 3] = (12 * i) % 256
    return a


def _vop_type(data: bytes) -> str:
    at = data.find(_VOP)
    return "IPBS"[data[at + 4] >> 6]


def _mpeg4_packets(n: int, width: int, height: int, b_frames: int, gop: int) -> list[bytes]:
    """Raw MPEG-4 part 2 packets in decode order (the encoder's VOL/user data in packet 0)."""
    packets: list[bytes] = []
    cc = av.CodecContext.create("mpeg4", "w")
    cc.width, cc.height, cc.pix_fmt = width, height, "yuv420p"
    cc.time_base, cc.framerate = Fraction(1, 25), Fraction(25)
    cc.gop_size, cc.max_b_frames = gop, b_frames
    cc.options = {"sc_threshold": "1000000000"}  # no extra keyframes: a fixed GOP
    for i in range(n):
        frame = av.VideoFrame.from_ndarray(picture(i, width, height), format="rgb24")
        frame.pts = i
        packets += [bytes(p) for p in cc.encode(frame.reformat(format="yuv420p"))]
    packets += [bytes(p) for p in cc.encode(None)]
    return packets


def _write_avi(path: Path, chunks: list[tuple[bytes, bool]], width: int, height: int) -> Path:
    """Mux chunks (data, keyframe) into an AVI at 25 fps, one chunk per frame slot, no extradata."""
    with av.open(str(path), "w", format="avi") as out:
        st = out.add_stream("mpeg4", rate=25)
        st.width, st.height, st.pix_fmt = width, height, "yuv420p"
        st.codec_context.codec_tag = "DX50"
        for k, (data, key) in enumerate(chunks):
            pkt = av.Packet(data)
            pkt.pts = pkt.dts = k
            pkt.time_base = Fraction(1, 25)
            pkt.stream, pkt.is_keyframe = st, key
            out.mux(pkt)
    return path


def packed_avi(path: Path, n: int = 40, width: int = 96, height: int = 64) -> Path:
    """DivX-style AVI with packed B-frames: chunks I | P+B | B | (placeholder) | P+B | B | ...

    Returns:
        The path; a full decode gives ``n`` frames in order, with shuffled decoder timestamps.
    """
    packets = _mpeg4_packets(n, width, height, b_frames=2, gop=12)
    first, at = packets[0], packets[0].find(_VOP)
    # The user data that tells FFmpeg the stream is packed (DivX 5 build 1393, "p" = packed).
    packets[0] = first[:at] + b"\x00\x00\x01\xb2DivX503b1393p" + first[at:]
    groups: list[list[bytes]] = []
    for data in packets:
        if _vop_type(data) == "B" and groups:
            groups[-1].append(data)
        else:
            groups.append([data])
    placeholder = _VOP + b"\x50\x00\x7f"  # < 20 bytes: the decoder outputs its saved B picture
    chunks: list[tuple[bytes, bool]] = []
    for ref, *bs in groups:
        key = _vop_type(ref) == "I"
        if not bs:
            chunks.append((ref, key))
            continue
        chunks.append((ref + bs[0], key))
        chunks += [(b, False) for b in bs[1:]]
        chunks.append((placeholder, False))
    return _write_avi(path, chunks, width, height)


def headers_in_first_packet_avi(path: Path, n: int = 50, width: int = 96, height: int = 64) -> Path:
    """MPEG-4 AVI without B-frames whose stream headers exist only in packet 0 (GOP 10)."""
    packets = _mpeg4_packets(n, width, height, b_frames=0, gop=10)
    chunks = [(packets[0], True)]
    for data in packets[1:]:
        key = _vop_type(data) == "I"
        chunks.append((data[data.find(_VOP) :] if key else data, key))  # drop repeated headers
    return _write_avi(path, chunks, width, height)


def _h264(
    path: Path,
    n: int,
    width: int,
    height: int,
    rotation: int | None = None,
    hflip: bool = False,
    fmt: str | None = None,
    codec: str = "libx264",
    gop: int = 12,
    pts_of: list[int] | None = None,
) -> Path:
    with av.open(str(path), "w", format=fmt) as out:
        st = out.add_stream(codec, rate=25)
        st.width, st.height, st.pix_fmt = width, height, "yuv420p"
        st.codec_context.gop_size = gop
        if codec == "libx264":
            st.codec_context.options = {"x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        elif codec == "libx265":
            st.codec_context.options = {
                "x265-params": f"keyint={gop}:min-keyint={gop}:log-level=error"
            }
        if rotation is not None:
            st.set_display_rotation(rotation, hflip=hflip)
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(picture(i, width, height), format="rgb24")
            frame.pts = pts_of[i] if pts_of else i
            out.mux(st.encode(frame))
        out.mux(st.encode(None))
    return path


BFRAMES = "keyint=12:min-keyint=12:scenecut=0:bframes=3"


def bframe_video(
    path: Path,
    pts: list[int],
    time_base: Fraction | None = None,
    fmt: str | None = None,
    codec: str = "libx264",
    params: str = BFRAMES,
    **options: str,
) -> Path:
    """96x64 frames ``picture(i)`` (GOP 12, 3 B-frames unless ``params`` says otherwise), frame ``i``
    at ``pts[i]`` in ``time_base`` (default: the 1/25 s of the encoder); ``options`` go to the
    muxer."""
    with av.open(str(path), "w", format=fmt, options=options) as out:
        st = out.add_stream(codec, rate=25)
        st.width, st.height, st.pix_fmt = 96, 64, "yuv420p"
        if time_base:
            st.time_base = st.codec_context.time_base = time_base
        st.codec_context.options = (
            {"x264-params": params}
            if codec == "libx264"
            else {"x265-params": f"{params}:log-level=error"}
        )
        for i, t in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(picture(i, 96, 64), format="rgb24")
            frame.pts = t
            if time_base:
                frame.time_base = time_base
            out.mux(st.encode(frame))
        out.mux(st.encode(None))
    return path


def any_codec_video(
    path: Path,
    codec: str,
    fmt: str | None = None,
    n: int = 40,
    size: tuple[int, int] = (96, 64),
    pix_fmt: str = "yuv420p",
    b_frames: int = 0,
    **options: str,
) -> Path:
    """``n`` frames ``picture(i)`` at 25 fps, GOP 10, encoded by ``codec`` (encoder ``options``)."""
    with av.open(str(path), "w", format=fmt) as out:
        st = out.add_stream(codec, rate=25)
        st.width, st.height, st.pix_fmt = *size, pix_fmt
        st.codec_context.gop_size, st.codec_context.max_b_frames = 10, b_frames
        st.codec_context.options = options
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(picture(i, *size), format="rgb24")
            frame.pts = i
            out.mux(st.encode(frame))
        out.mux(st.encode(None))
    return path


def rotated_mp4(path: Path, rotation: int, hflip: bool = False, n: int = 30) -> Path:
    """H.264 stored 96x64 with a display matrix rotating by ``rotation`` degrees counter-clockwise."""
    return _h264(path, n, 96, 64, rotation=rotation, hflip=hflip)


def delayed_start_mkv(path: Path, n: int = 30) -> Path:
    """25 fps Matroska whose first frame is shown at 1.0 s."""
    return _h264(path, n, 96, 64, fmt="matroska", pts_of=list(range(25, 25 + n)))


def hevc_mp4(path: Path, n: int = 30) -> Path:
    """H.265 in MP4 (decord is not trusted on it)."""
    return _h264(path, n, 96, 64, codec="libx265")


def two_streams_mp4(path: Path, n: int = 30, busy_preview: bool = False) -> Path:
    """Stream 0: 64x36 preview (seed 1); stream 1: 96x54 main picture (seed 2); both default.

    ``reference(path, stream=1)`` is what ffmpeg shows (its rule: the largest default stream).
    With ``busy_preview`` the preview is noise, so it has the higher bitrate and FFmpeg's
    ``av_find_best_stream`` (decord's choice) picks it instead.
    """
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        small = out.add_stream("libx264", rate=25)
        small.width, small.height, small.pix_fmt = 64, 36, "yuv420p"
        big = out.add_stream("libx264", rate=25)
        big.width, big.height, big.pix_fmt = 96, 54, "yuv420p"
        for st in (small, big):  # both default (the muxer marks only stream 0 otherwise)
            st.disposition = av.stream.Disposition.default
        for i in range(n):
            for st, seed in ((small, 1), (big, 2)):
                pic = picture(i, st.width, st.height, seed)
                if busy_preview and st is small:
                    pic = rng.integers(0, 256, pic.shape, np.uint8)
                frame = av.VideoFrame.from_ndarray(pic, "rgb24")
                frame.pts = i
                out.mux(st.encode(frame))
        for st in (small, big):
            out.mux(st.encode(None))
    return path


def mpeg2_ps(path: Path, n: int = 190, gop: int = 15) -> Path:
    """MPEG-2 video in an MPEG program stream with B-frames (``.mpg``)."""
    with av.open(str(path), "w", format="mpeg") as out:
        st = out.add_stream("mpeg2video", rate=25)
        st.width, st.height, st.pix_fmt = 96, 64, "yuv420p"
        st.codec_context.gop_size, st.codec_context.max_b_frames = gop, 2
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(picture(i, 96, 64), format="rgb24")
            frame.pts = i
            out.mux(st.encode(frame))
        out.mux(st.encode(None))
    return path


def remux(src: Path, dst: Path, fmt: str | None = None, **options: str) -> Path:
    """Copy the video packets of ``src`` into another container (no re-encoding)."""
    with av.open(str(src)) as i, av.open(str(dst), "w", format=fmt, options=options) as o:
        ins = i.streams.video[0]
        out = o.add_stream_from_template(ins)
        for pkt in i.demux(ins):
            if pkt.dts is not None:
                pkt.stream = out
                o.mux(pkt)
    return dst


def zero_tail(path: Path, keep: float) -> Path:
    """Zero the file's bytes after the fraction ``keep`` (its index, at the front, stays intact)."""
    data = bytearray(path.read_bytes())
    cut = int(len(data) * keep)
    data[cut:] = bytes(len(data) - cut)
    path.write_bytes(bytes(data))
    return path


def partly_decodable_mp4(path: Path, n: int = 50, keep: float = 0.55) -> Path:
    """H.264 MP4 (index at the front) whose media data after ``keep`` of the file is zeroed."""
    tmp = _h264(path.with_name(path.stem + ".full.mp4"), n, 96, 64, gop=10)
    remux(tmp, path, movflags="+faststart")
    tmp.unlink()
    return zero_tail(path, keep)


def dropped_frame_mkv(path: Path, n: int = 30) -> Path:
    """25 fps Matroska whose second frame was dropped: timestamps 0, 2, 3, ..., n."""
    return _h264(path, n, 96, 64, fmt="matroska", pts_of=[0] + list(range(2, n + 1)))


def encode(path: Path, frames: list[np.ndarray], fps: int = 25) -> Path:
    """Encode RGB frames ([H, W, 3] uint8) as H.264 (GOP 12) at ``fps``."""
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as out:
        st = out.add_stream("libx264", rate=fps)
        st.width, st.height, st.pix_fmt = w, h, "yuv420p"
        st.codec_context.options = {"x264-params": "keyint=12:scenecut=0"}
        for i, a in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(a, format="rgb24")
            frame.pts = i
            out.mux(st.encode(frame))
        out.mux(st.encode(None))
    return path


def reference(path: Path, stream: int | None = None) -> list[np.ndarray]:
    """Every frame of a full front-to-back PyAV decode of the best (or given) video stream, upright.

    The display matrix is applied as ffmpeg's autorotate does (numpy rotations, written here
    independently of lvr.media.orientation).
    """
    out = []
    with av.open(str(path)) as c:
        st = c.streams.video[stream] if stream is not None else c.streams.best("video")
        try:
            for f in c.decode(st):
                a = f.to_ndarray(format="rgb24")
                kinds = [
                    getattr(s, "type", s).name for s in f.side_data
                ]  # items, or (PyAV 18.1.1+) types
                rot = f.rotation if "DISPLAYMATRIX" in kinds else 0
                out.append(np.ascontiguousarray(np.rot90(a, k=round(rot / 90) % 4)))
        except av.error.FFmpegError:
            pass  # a damaged file: the frames before the damage are the reference
    return out
