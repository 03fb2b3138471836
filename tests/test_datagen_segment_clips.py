"""Clip files of the segment stage (stream copy) hold every frame of their range.

Sources are written at test time with PyAV; each clip file is decoded with PyAV and compared, frame
by frame and in timing, with a plain decode of the source.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import media_defects
import numpy as np
import pytest

from lvr.artifacts import clip_id
from lvr.datagen.segment import _copy_range, write_clip_files
from lvr.media import load_index


def encode(path: Path, pts: list[int], fmt: str | None, codec: str = "libx264") -> Path:
    """GOP 12 with B-frames; frame ``i`` at ``pts[i]`` ms."""
    return media_defects.bframe_video(path, pts, Fraction(1, 1000), fmt, codec)


def decode(path: Path) -> tuple[list[float], list[np.ndarray]]:
    """(seconds, rgb frames) of a front-to-back PyAV decode of the first video stream."""
    with av.open(str(path)) as c:
        st = c.streams.video[0]
        frames = [(float(f.pts * st.time_base), f.to_ndarray(format="rgb24")) for f in c.decode(st)]
    return [t for t, _ in frames], [a for _, a in frames]


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
    src = encode(tmp_path / name, pts, fmt, codec)
    index = load_index(src)
    src_t, src_frames = decode(src)
    for s, e in ((0.0, 0.6), (0.6, 1.2), (0.3, 0.5), (1.0, 2.4), (9.0, 11.0)):
        frames = [i for i, t in enumerate(index.times_s) if s - 1e-3 <= t < e - 1e-3]
        if not frames:
            continue
        dst = tmp_path / f"clip_{s}.mp4"
        _copy_range(str(src), dst, s, e)
        clip_t, clip_frames = decode(dst)
        k = int(index.keyframes[np.searchsorted(index.keyframes, frames[0], side="right") - 1])
        b = frames[-1] + 1
        assert len(clip_frames) >= b - k, (
            f"[{s}, {e}): {len(clip_frames)} frames, want {k}..{b - 1}"
        )
        wrong = [
            k + j for j in range(b - k) if not np.array_equal(clip_frames[j], src_frames[k + j])
        ]
        assert not wrong, f"[{s}, {e}): frames {wrong} missing or different in the clip"
        got = np.array(clip_t[: b - k]) - clip_t[0]
        want = np.array(src_t[k:b]) - src_t[k]
        assert np.allclose(got, want, atol=1e-3), f"[{s}, {e}): clip timing differs"


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
