"""Clip files of the segment stage hold every frame of their range, whatever the source's codec.

Sources are written at test time with PyAV; each clip file is decoded with PyAV and compared, frame
by frame and in timing, with a plain decode of the source. Stream-copied files start at the keyframe
at or before the range; re-encoded ones (``.lossless.mp4``/``.mkv``) hold exactly the range.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import media_defects
import numpy as np
import pytest

from lvr.artifacts import clip_id
from lvr.datagen.clip_files import write_clip_files
from lvr.media import load_index

RANGES = ((0.0, 0.6), (0.6, 1.2), (0.3, 0.5), (1.0, 2.4), (9.0, 11.0))


def encode(path: Path, pts: list[int], fmt: str | None, codec: str = "libx264") -> Path:
    """GOP 12 with B-frames; frame ``i`` at ``pts[i]`` ms."""
    return media_defects.bframe_video(path, pts, Fraction(1, 1000), fmt, codec)


def decode(path: Path) -> tuple[list[float], list[np.ndarray]]:
    """(seconds, rgb frames) of a front-to-back PyAV decode of the first video stream."""
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        frames = [(float(f.pts * st.time_base), f.to_ndarray(format="rgb24")) for f in c.decode(st)]
    return [t for t, _ in frames], [a for _, a in frames]


def frames_of(path: Path) -> list[np.ndarray]:
    """Every frame of a plain PyAV decode (no timestamps: some sources have none usable)."""
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])]


def clip_file(src: Path, s: float, e: float, out: Path) -> Path:
    """The clip file the stage writes for ``[s, e)`` of ``src``."""
    row = {"clip_id": clip_id("v", s, e), "start_s": s, "end_s": e, "error": None,
           "clip_path": None}  # fmt: skip
    write_clip_files(str(src), [row], out)
    assert row["error"] is None and row["clip_path"], row["error"]
    return Path(row["clip_path"])


def assert_holds(clip: Path, src: Path, first: int, b: int, what: str, exact: bool) -> None:
    """The clip's first ``b - first`` frames (``exact``: all its frames) are source frames
    ``first..b-1``, spaced as in a decode of the source (for re-encoded clips, whose sources have
    no usable timestamps, as in the index the clip rows are cut on)."""
    clip_t, clip_frames = decode(clip)
    src_frames = frames_of(src)
    assert len(clip_frames) == b - first if exact else len(clip_frames) >= b - first, (
        f"{what}: {len(clip_frames)} frames, want {first}..{b - 1}"
    )
    wrong = [first + j for j in range(b - first)
             if not np.array_equal(clip_frames[j], src_frames[first + j])]  # fmt: skip
    assert not wrong, f"{what}: frames {wrong} missing or different in the clip"
    got = np.array(clip_t[: b - first]) - clip_t[0]
    src_t = load_index(src).times_s if exact else np.array(decode(src)[0])
    want = src_t[first:b] - src_t[first]
    assert np.allclose(got, want, atol=1e-3), f"{what}: clip timing differs"


def check_ranges(src: Path, out: Path, suffix: str) -> None:
    """Every range of ``RANGES`` that holds frames: a clip file named ``*suffix`` that holds them
    (from the keyframe before them when stream copied)."""
    index = load_index(src)
    for s, e in RANGES:
        frames = [i for i, t in enumerate(index.times_s) if s - 1e-3 <= t < e - 1e-3]
        if not frames:
            continue
        clip = clip_file(src, s, e, out)
        lossless = ".lossless." in suffix
        assert clip.name.endswith(suffix) and (lossless or ".lossless." not in clip.name)
        first = frames[0]
        if not lossless:  # stream copy starts at the keyframe at or before the range
            first = int(index.keyframes[np.searchsorted(index.keyframes, first, side="right") - 1])
        assert_holds(clip, src, first, frames[-1] + 1, f"[{s}, {e})", exact=lossless)


CFR = [40 * i for i in range(60)]
GAP = [40 * i for i in range(10)] + [40 * i for i in range(260, 290)]  # 10 s without a frame
CASES = {
    "h264.mkv": (CFR, "matroska", "libx264"),
    "h264.ts": (CFR, "mpegts", "libx264"),
    "h264.mp4": (CFR, None, "libx264"),
    "hevc.mkv": (CFR, "matroska", "libx265"),
    "gap.mkv": (GAP, "matroska", "libx264"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_clip_files_hold_every_frame_of_their_range(name: str, tmp_path: Path) -> None:
    pts, fmt, codec = CASES[name]
    check_ranges(encode(tmp_path / name, pts, fmt, codec), tmp_path / "clips", ".mp4")


def _av1(path: Path) -> Path:
    if "libsvtav1" not in av.codecs_available:
        pytest.skip("this PyAV has no AV1 encoder (libsvtav1)")
    return media_defects.any_codec_video(path, "libsvtav1", "matroska", preset="12")


# Sources MP4 cannot take or stream copy cannot cut: (writer, file name ending of their clips).
Writer = Callable[[Path], Path]
OTHER_CODECS: dict[str, tuple[Writer, str]] = {
    "vp8.webm": (lambda p: media_defects.any_codec_video(p, "libvpx", "webm"), ".webm"),
    "av1.mkv": (_av1, ".mp4"),  # seen failing: no encoder named after the AV1 decoder
    "divx3.avi": (lambda p: media_defects.any_codec_video(p, "msmpeg4", "avi"), ".mkv"),
    "h263.3gp": (
        lambda p: media_defects.any_codec_video(p, "h263", "3gp", size=(128, 96)),
        ".mov",
    ),
    # No container but AVI/ASF takes WMV, and Matroska refuses raw video when writing: re-encoded.
    "wmv2.asf": (lambda p: media_defects.any_codec_video(p, "wmv2", "asf"), ".lossless.mp4"),
    "raw.avi": (lambda p: media_defects.any_codec_video(p, "rawvideo", "avi"), ".lossless.mp4"),
    # Raw captures in layouts neither x264 nor FFV1 stores: lvr's RGB frames in FFV1.
    "yuyv.avi": (
        lambda p: media_defects.any_codec_video(p, "rawvideo", "avi", pix_fmt="yuyv422"),
        ".lossless.mkv",
    ),
    "bgr24.avi": (
        lambda p: media_defects.any_codec_video(p, "rawvideo", "avi", pix_fmt="bgr24"),
        ".lossless.mkv",
    ),
    # Gray: x264 takes it but gives it back as yuv420p, whose RGB differs: FFV1.
    "gray.avi": (
        lambda p: media_defects.any_codec_video(p, "rawvideo", "avi", pix_fmt="gray"),
        ".lossless.mkv",
    ),
    # No usable timestamps (counted index): re-encoded.
    "packed.avi": (lambda p: media_defects.packed_avi(p, n=40), ".lossless.mp4"),
    "mpeg4_bframes.avi": (
        lambda p: media_defects.any_codec_video(p, "mpeg4", "avi", b_frames=2),
        ".lossless.mp4",
    ),
    "h264.mpg": (
        lambda p: media_defects.bframe_video(p, list(range(40)), None, "mpeg"),
        ".lossless.mp4",
    ),
}


@pytest.mark.parametrize("name", sorted(OTHER_CODECS))
def test_clip_files_of_other_codecs_hold_every_frame(name: str, tmp_path: Path) -> None:
    write, suffix = OTHER_CODECS[name]
    check_ranges(write(tmp_path / name), tmp_path / "clips", suffix)


def test_reencoded_clip_files_are_kept_on_rerun(tmp_path: Path) -> None:
    """A rerun keeps a file written earlier, also one re-encoded after its stream copy failed."""
    src = media_defects.any_codec_video(tmp_path / "raw.avi", "rawvideo", "avi")
    first = clip_file(src, 0.0, 0.6, tmp_path / "clips")
    stamp = first.stat().st_mtime_ns
    assert clip_file(src, 0.0, 0.6, tmp_path / "clips") == first
    assert first.stat().st_mtime_ns == stamp and len(list(first.parent.iterdir())) == 1


def test_range_without_frames_is_an_error_row(tmp_path: Path) -> None:
    src = encode(tmp_path / "gap.mkv", GAP, "matroska")
    out = tmp_path / "clips"
    rows = [{"clip_id": clip_id("v", s, e), "start_s": s, "end_s": e, "error": None,
             "clip_path": None} for s, e in ((0.0, 0.4), (2.0, 7.0))]  # fmt: skip
    write_clip_files(str(src), rows, out)
    assert rows[0]["error"] is None and Path(rows[0]["clip_path"]).is_file()
    assert rows[1]["clip_path"] is None
    assert (
        rows[1]["error"]
        == "clip file not written: range [2.000, 7.000) s holds no frame of the video"
    )
    assert sorted(p.name for p in out.iterdir()) == [Path(rows[0]["clip_path"]).name]


def test_segment_stage_writes_clip_files_for_every_codec(tmp_path: Path) -> None:
    """Through the stage: every clip row of a VP8, a packed-B-frame AVI and an MPEG-PS H.264 source
    names a file of the right kind, and none has an error."""
    from lvr.artifacts import read_table
    from lvr.config import load_config
    from lvr.datagen.config import DatagenConfig
    from lvr.datagen.segment import run_segment
    from lvr.layout import RunLayout

    src = tmp_path / "in"
    src.mkdir()
    want = {"vp8.webm": ".webm", "packed.avi": ".lossless.mp4", "h264.mpg": ".lossless.mp4"}
    for name in want:
        OTHER_CODECS[name][0](src / name)
    sets = [f"input.source={src}", "segment.stride_s=0.5", "segment.write_clips=true"]
    run_segment(load_config(DatagenConfig, None, sets), tmp_path / "run", progress=False)
    clips = read_table(RunLayout(tmp_path / "run").clips).to_pylist()
    assert {Path(c["video_path"]).name for c in clips} == set(want)
    for c in clips:
        assert c["error"] is None, c["error"]
        assert c["clip_path"].endswith(want[Path(c["video_path"]).name]), c["clip_path"]
        assert Path(c["clip_path"]).is_file()
