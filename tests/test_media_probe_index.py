"""The frame index on files whose decode order, timestamps or headers mislead a naive probe.

Each file is written here with PyAV (H.264 by libx264); the reference is a plain front-to-back
PyAV decode (``media_defects.reference``), which numbers frames as ffmpeg and lvr do.
"""

from __future__ import annotations

import struct
from fractions import Fraction
from pathlib import Path

import av
import media_defects
import numpy as np
import pytest

from lvr.datagen import segment
from lvr.datagen.config import SegmentConfig
from lvr.media import VideoDecodeError, load_index, probe, sample_frames
from lvr.media.decord_backend import available as decord_available

BACKENDS = [
    "pyav",
    pytest.param("decord", marks=pytest.mark.skipif(not decord_available(), reason="no decord")),
]
X264 = media_defects.BFRAMES


def h264(
    path: Path, pts: list[int], fmt: str | None = None, x264: str = X264, tb: Fraction | None = None
) -> Path:
    """H.264 frames ``picture(i)`` with the given pts (in ``tb``, default 1/25 s), 96x64."""
    return media_defects.bframe_video(path, pts, tb, fmt, params=x264)


def decoded(path: Path) -> tuple[list[float], list[int]]:
    """(seconds from the first frame, positions of intra frames) of a full decode."""
    with av.open(str(path)) as c:
        frames = list(c.decode(video=0))
    t0 = frames[0].time
    intra = [i for i, f in enumerate(frames) if f.key_frame or int(f.pict_type) == 1]
    return [round(f.time - t0, 6) for f in frames], intra


def assert_frames(path: Path, indices: list[int], backend: str = "pyav") -> None:
    ref = media_defects.reference(path)
    fr = sample_frames(path, indices=indices, backend=backend)
    for i, a in zip(indices, fr.frames, strict=True):
        assert np.array_equal(a, ref[i]), f"frame {i} of {path.name} ({fr.backend})"


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_gop_mp4_numbers_keyframes_in_presentation_order(tmp_path: Path, backend: str) -> None:
    """Open GOP: B-frames after an I-frame in decode order are shown before it; the keyframe's
    number is its presentation position, and decord (which counts from the keyframe) is refused."""
    path = h264(tmp_path / "open.mp4", list(range(60)), x264=X264 + ":open-gop=1")
    times, intra = decoded(path)
    info, index = probe(path), load_index(path)
    assert info.index_source == "container" and index.open_gop
    assert index.keyframes.tolist() == intra and list(info.keyframe_times_s) == [
        times[i] for i in intra
    ]
    assert_frames(path, [9, 30, 35, 45], backend)
    if backend == "decord":
        assert "open-GOP" in sample_frames(path, indices=[35], backend="decord").backend_note


def test_closed_gop_mp4_keeps_the_free_index(tmp_path: Path) -> None:
    path = h264(tmp_path / "closed.mp4", list(range(40)))
    assert probe(path).index_source == "container" and not load_index(path).open_gop
    assert load_index(path).times_s.round(6).tolist() == decoded(path)[0]


@pytest.mark.parametrize(
    ("name", "pts", "tb", "duration"),
    [
        ("taildrop.mp4", [*range(38), 39, 40], None, 1.64),
        ("taillate.mp4", [*range(39), 45], None, 1.84),
        ("sparse.mp4", [0, 40, 80, 30000], Fraction(1, 1000), 30.04),
    ],
)
def test_mp4_presentation_times_are_read_not_assumed(
    tmp_path: Path, name: str, pts: list[int], tb: Fraction | None, duration: float
) -> None:
    """Constant decode steps do not make constant presentation times (B-frames, uneven tail)."""
    path = h264(tmp_path / name, pts, tb=tb)
    index = load_index(path)
    assert index.times_s.round(6).tolist() == decoded(path)[0]
    assert index.info.duration_s == pytest.approx(duration, abs=1e-6)
    assert_frames(path, list(range(len(pts))))


def test_vfr_duration_ends_with_the_last_frame(tmp_path: Path) -> None:
    """A 10 s gap: the video ends 40 ms after its last frame starts, not n mean steps after 0."""
    gap = [*range(10), *range(260, 290)]
    path = h264(tmp_path / "gap.mp4", [40 * g for g in gap], tb=Fraction(1, 1000))
    info = probe(path)
    assert info.duration_s == pytest.approx(11.60, abs=1e-6)
    fr = sample_frames(path, fps=1, start_s=1, end_s=11.6)
    assert fr.timestamps_s[-1] <= 11.56 + 1e-6


def test_truncated_mov_header_raises_typed_error(tmp_path: Path) -> None:
    """A file cut anywhere inside its header reads or fails with a one-line VideoDecodeError,
    and the segment stage turns it into an error row."""
    data = h264(tmp_path / "whole.mov", list(range(100)), fmt="mov").read_bytes()
    moov = data.find(b"moov") - 4
    assert moov > len(data) // 2  # the header is written last: the cuts below land inside it
    for k in range(moov, len(data), max(1, (len(data) - moov) // 60)):
        cut = tmp_path / f"cut{k}.mov"
        cut.write_bytes(data[:k])
        try:
            probe(cut)
        except VideoDecodeError as e:
            assert "\n" not in str(e)
        item = segment.InputItem("v", str(cut), "video", None, "s")
        row, info = segment.video_row(item)
        assert (row["error"] is None) == (info is not None)


def test_ts_cut_mid_gop_numbers_only_frames_that_decode(tmp_path: Path) -> None:
    """An MPEG-TS starting mid-GOP: packets before the first keyframe (and B-frames that lean on
    the missing GOP) do not decode and are not frames."""
    x264 = "keyint=24:min-keyint=24:scenecut=0:bframes=3"
    data = h264(tmp_path / "long.ts", list(range(120)), fmt="mpegts", x264=x264).read_bytes()
    path = tmp_path / "headcut.ts"
    path.write_bytes(data[(len(data) // 10 // 188) * 188 :])
    ref = media_defects.reference(path)
    with av.open(str(path)) as c:
        first = next(iter(c.decode(video=0))).time
    info = probe(path)
    assert info.num_frames == len(ref) and info.start_s == pytest.approx(first)
    assert_frames(path, [0, 1, 30, len(ref) - 1])
    approx = sample_frames(path, num_frames=4, approx=True)
    for i, a in zip(approx.indices.tolist(), approx.frames, strict=True):
        assert np.array_equal(a, ref[i])


def test_segment_never_writes_a_zero_length_clip(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A video that stops decoding at 0 s: one error row for all of it, no [0, 0) clip."""
    monkeypatch.setattr(segment, "clip_ranges", lambda *a: ([(0.0, 0.0)], "stride", 0.0, "broken"))
    item = segment.InputItem("v", str(tmp_path / "x.mp4"), "video", None, "s")
    rows = segment.clip_rows(item, 4.0, SegmentConfig(), None)
    assert [(r["start_s"], r["end_s"], bool(r["error"])) for r in rows] == [(0.0, 4.0, True)]


def _longer_header_mkv(tmp_path: Path) -> Path:
    """A complete Matroska file whose Segment Duration claims 1.3 times the real length."""
    data = bytearray(h264(tmp_path / "plain.mkv", list(range(100)), fmt="matroska").read_bytes())
    at = data.find(b"\x44\x89\x88") + 3  # Duration element, 8-byte float
    data[at : at + 8] = struct.pack(">d", struct.unpack(">d", data[at : at + 8])[0] * 1.3)
    path = tmp_path / "durlie.mkv"
    path.write_bytes(bytes(data))
    return path


def _longer_other_stream_mkv(tmp_path: Path) -> Path:
    """Two video streams: the one read (larger) has 50 frames, the other 150."""
    path = tmp_path / "two.mkv"
    with av.open(str(path), "w", format="matroska") as out:
        a = out.add_stream("libx264", rate=25)
        b = out.add_stream("libx264", rate=25)
        a.width, a.height, b.width, b.height = 64, 36, 96, 54
        a.pix_fmt = b.pix_fmt = "yuv420p"
        for i in range(150):
            for st, n in ((a, 150), (b, 50)):
                if i < n:
                    pic = media_defects.picture(i, st.width, st.height)
                    f = av.VideoFrame.from_ndarray(pic, format="rgb24")
                    f.pts = i
                    out.mux(st.encode(f))
        for st in (a, b):
            out.mux(st.encode(None))
    return path


@pytest.mark.parametrize("make", [_longer_header_mkv, _longer_other_stream_mkv])
def test_matroska_longer_header_duration_is_not_truncation(tmp_path: Path, make) -> None:
    path = make(tmp_path)
    info = probe(path)
    assert info.num_frames == len(media_defects.reference(path, info.stream_index))


def test_h264_program_stream_with_partly_stamped_packets(tmp_path: Path) -> None:
    """H.264 in MPEG-PS: FFmpeg stamps only the first frame of each PES packet."""
    path = h264(tmp_path / "h264.mpg", list(range(100)), fmt="mpeg")
    info = probe(path)
    assert info.num_frames == 100 == len(media_defects.reference(path))
    assert info.duration_s == pytest.approx(4.0, abs=0.05)
    assert_frames(path, [0, 13, 50, 99])
