"""lvr.media on generated files with irregular timestamps: a wrapped MPEG-TS clock, variable rate.

Each file is written at test time with PyAV; the reference is a plain front-to-back PyAV decode.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import media_defects
import numpy as np
import pytest

from lvr.media import probe, sample_frames
from lvr.media.decord_backend import available as decord_available

needs_decord = pytest.mark.skipif(not decord_available(), reason="decord not installed")
BACKENDS = ["pyav", pytest.param("decord", marks=needs_decord)]


def h264(
    path: Path, pts: list[int], time_base: Fraction, fmt: str | None = None, **opts: str
) -> Path:
    """H.264 (GOP 12, 3 B-frames) whose frame ``i`` has timestamp ``pts[i]`` in ``time_base``."""
    return media_defects.bframe_video(path, pts, time_base, fmt, **opts)


@pytest.fixture(scope="module")
def wrapped_ts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """75 frames at 25 fps in MPEG-TS whose 33-bit clock wraps 1 s in (FFmpeg unwraps the first
    second to negative timestamps)."""
    wrap = 2**33
    pts = [wrap - 90000 + 3600 * i for i in range(75)]
    path = tmp_path_factory.mktemp("wrap") / "wrap.ts"
    return h264(path, pts, Fraction(1, 90000), "mpegts", mpegts_copyts="1")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", ["auto", "seek"])
def test_wrapped_ts_frames_before_the_wrap_decode(
    wrapped_ts: Path, backend: str, strategy: str
) -> None:
    info = probe(wrapped_ts)
    assert (info.num_frames, round(info.start_s, 3)) == (75, -1.0)
    ref = media_defects.reference(wrapped_ts)
    assert len(ref) == 75
    asks = (
        {"indices": [0]},
        {"indices": [0, 30, 74]},
        {"num_frames": 8},
        {"num_frames": 8, "approx": True},
    )
    for kw in asks:
        got = sample_frames(wrapped_ts, strategy=strategy, backend=backend, **kw)
        for i, a in zip(got.indices.tolist(), got.frames, strict=True):
            assert np.array_equal(a, ref[i]), f"{kw}: frame {i} differs from a full decode"


@pytest.fixture(scope="module")
def two_speed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1 s at 60 fps, then 10 frames at 1 fps (frame 60 starts at 1.0 s, frame 69 at 10.0 s)."""
    pts = [round(1000 * i / 60) for i in range(60)] + [1000 + 1000 * k for k in range(10)]
    return h264(tmp_path_factory.mktemp("vfr") / "two_speed.mp4", pts, Fraction(1, 1000))


@pytest.mark.parametrize(
    ("fps", "start_s", "end_s", "want"),
    [
        (2, 0, 1, [15, 45]),  # the frames shown at 0.25 s and 0.75 s, not 17 frames
        (2, 1, 5, [60, 61, 62, 63]),  # at most the 4 frames of the slow part, one per second
        (1, 0.5, 3.5, [60, 61, 62]),  # parts centred at 1.0, 2.0, 3.0 s
        (4, 0, 1, [7, 22, 37, 52]),
    ],
)
def test_fps_mode_on_variable_rate_uses_frame_times(
    two_speed: Path, fps: float, start_s: float, end_s: float, want: list[int]
) -> None:
    got = sample_frames(two_speed, fps=fps, start_s=start_s, end_s=end_s)
    assert got.indices.tolist() == want
    ref = media_defects.reference(two_speed)
    assert all(np.array_equal(a, ref[i]) for i, a in zip(want, got.frames, strict=True))
