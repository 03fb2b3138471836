"""The times a model is told are the times of the frames actually sampled.

Real encoded videos (PyAV at test time): a constant-rate one sampled four ways (N uniform, a frame
cap that lowers the effective rate, fps sampling, a clip's [start, end) window) and a
variable-frame-rate one. For each, what reaches the model is checked against the frames' own
timestamps: Qwen3-VL's `<t seconds>` texts (the training sample path and the `hf` eval/captioning
backend), Qwen2.5-VL's `second_per_grid_ts` (the mean spacing: all it can express).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import re
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import media_defects
import numpy as np
import pytest

from lvr.backends import Request
from lvr.backends.hf import HFBackend
from lvr.media.sample import Frames, sample_frames
from lvr.models.inputs import frames_sample
from lvr.models.tiny import build_tiny_vlm, tiny_vlm

WAYS: dict[str, dict[str, Any]] = {
    "uniform": {"num_frames": 8},
    "cap": {"fps": 4.0, "max_frames": 6},  # 24 frames wanted, 6 kept: 1 fps effective
    "fps": {"fps": 2.0},
    "window": {"num_frames": 6, "start_s": 2.0, "end_s": 4.5},
}


@pytest.fixture(scope="module")
def vfr_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """25 frames at 25 fps, then 10 frames 0.2 s apart (a variable frame rate), Matroska."""
    pts = list(range(25)) + [25 + 5 * k for k in range(10)]
    path = tmp_path_factory.mktemp("vfr") / "vfr.mkv"
    return media_defects._h264(path, len(pts), 96, 64, fmt="matroska", pts_of=pts)


@cache
def _processor(name: str) -> Any:
    return tiny_vlm(name)[1]


def _told_times(processor: Any, input_ids: Any) -> list[float]:
    text = processor.tokenizer.decode(input_ids[0])
    return [float(t) for t in re.findall(r"<(\d+\.\d) seconds>", text)]


def _patch_times(ts: np.ndarray) -> list[float]:
    """What Qwen3-VL must be told: the mean time of each temporal patch (2 frames; an odd last
    frame is doubled, as the processor pads it), written with one decimal."""
    ts = list(ts) + ([ts[-1]] if len(ts) % 2 else [])
    return [float(f"{(a + b) / 2:.1f}") for a, b in zip(ts[::2], ts[1::2], strict=True)]


def _sample(path: Path, way: str) -> Frames:
    return sample_frames(path, max_pixels=112 * 112, **WAYS[way])


@pytest.mark.parametrize("way", sorted(WAYS))
def test_sampling_ways_give_the_times_they_promise(short_video: Path, way: str) -> None:
    frames = _sample(short_video, way)
    ts = frames.timestamps_s
    assert np.allclose(ts, frames.indices / 24.0, atol=1e-9)  # the decoded frames' true times
    if way == "cap":
        assert len(ts) == 6 and np.allclose(np.diff(ts), 1.0, atol=0.05)
    if way == "window":
        assert ts[0] >= 2.0 and ts[-1] < 4.5


@pytest.mark.parametrize("name", ["qwen3_vl", "qwen3_5"])
@pytest.mark.parametrize("way", sorted(WAYS))
def test_timestamp_text_is_the_frames_times(short_video: Path, name: str, way: str) -> None:
    frames = _sample(short_video, way)
    proc = _processor(name)
    sample = frames_sample(proc, "What happens?", ["a", "b"], frames)
    assert _told_times(proc, sample["input_ids"]) == _patch_times(frames.timestamps_s)
    assert int(sample["video_grid_thw"][0, 0]) == len(_patch_times(frames.timestamps_s))


def test_timestamp_text_on_variable_frame_rate(vfr_video: Path) -> None:
    frames = sample_frames(vfr_video, num_frames=8)
    gaps = np.diff(frames.timestamps_s)
    assert gaps.max() > 2 * gaps.min()  # really variable: uniform times would be wrong here
    proc = _processor("qwen3_vl")
    sample = frames_sample(proc, "What happens?", None, frames)
    assert _told_times(proc, sample["input_ids"]) == _patch_times(frames.timestamps_s)


@pytest.mark.parametrize("way", sorted(WAYS))
def test_second_per_grid_is_the_mean_spacing(short_video: Path, way: str) -> None:
    frames = _sample(short_video, way)
    ts = frames.timestamps_s
    sample = frames_sample(_processor("qwen2_5_vl"), "What happens?", ["a", "b"], frames)
    spacing = (ts[-1] - ts[0]) / (len(ts) - 1)
    assert float(sample["second_per_grid_ts"][0]) == pytest.approx(2 * spacing, rel=1e-6)


def test_a_clip_shorter_than_the_frames_asked_keeps_true_repeated_times(
    short_video: Path, qwen3_backend: HFBackend
) -> None:
    # 8 frames asked of a 0.1 s window (3 frames): lvr.media repeats frames so that a sample has
    # all 8, each with its own (repeated) time; every family takes them, none is told a lie.
    frames = sample_frames(short_video, num_frames=8, start_s=2.0, end_s=2.1)
    ts = frames.timestamps_s
    assert len(ts) == 8 and len(set(ts.tolist())) == 3 and np.all(np.diff(ts) >= 0)
    q3 = frames_sample(_processor("qwen3_vl"), "What happens?", ["a", "b"], frames)
    assert _told_times(_processor("qwen3_vl"), q3["input_ids"]) == _patch_times(ts)
    q25 = frames_sample(_processor("qwen2_5_vl"), "What happens?", ["a", "b"], frames)
    spacing = (ts[-1] - ts[0]) / (len(ts) - 1)
    assert float(q25["second_per_grid_ts"][0]) == pytest.approx(2 * spacing, rel=1e-6)
    ov = frames_sample(_processor("llava_onevision"), "What happens?", ["a", "b"], frames)
    assert ov["pixel_values_videos"].shape[1] == 8
    req = Request("q", [{"role": "user", "content": "x"}], images=list(frames.frames), fps=1.0,
                  timestamps=ts.tolist(), max_tokens=2)  # fmt: skip
    assert qwen3_backend.run([req], progress=False)[0].error is None


@pytest.mark.parametrize("way", sorted(WAYS))
def test_order_families_get_every_sampled_frame_in_order(short_video: Path, way: str) -> None:
    # Qwen2-VL and LLaVA-OneVision are told only the frames' order: the processor must keep
    # every decoded frame (no resampling from a guessed rate), whatever their spacing.
    frames = _sample(short_video, way)
    ov = frames_sample(_processor("llava_onevision"), "What happens?", ["a", "b"], frames)
    assert ov["pixel_values_videos"].shape[1] == len(frames.timestamps_s)
    q2 = frames_sample(_processor("qwen2_vl"), "What happens?", ["a", "b"], frames)
    assert int(q2["video_grid_thw"][0, 0]) == -(-len(frames.timestamps_s) // 2)
    assert "second_per_grid_ts" not in q2


@pytest.fixture(scope="module")
def qwen3_backend(tmp_path_factory: pytest.TempPathFactory) -> HFBackend:
    folder = build_tiny_vlm(tmp_path_factory.mktemp("m") / "q3", family="qwen3_vl")
    backend = HFBackend(folder)
    backend.load()
    return backend


@pytest.mark.parametrize("way", ["window", "cap"])
def test_hf_backend_tells_the_true_times(
    short_video: Path, qwen3_backend: HFBackend, way: str
) -> None:
    # The eval / captioning path: frames travel as a Request with their timestamps.
    frames = _sample(short_video, way)
    req = Request("q", [{"role": "user", "content": "What happens?"}],
                  images=list(frames.frames), fps=2.0,
                  timestamps=[float(t) for t in frames.timestamps_s])  # fmt: skip
    enc = qwen3_backend.encode([req])
    assert _told_times(qwen3_backend._proc, enc["input_ids"]) == _patch_times(frames.timestamps_s)


def test_eval_requests_carry_the_frames_times(short_video: Path) -> None:
    from lvr.eval.config import EvalConfig
    from lvr.eval.prompting import build_request

    frames = _sample(short_video, "window")
    q = {"qa_id": "q", "question": "What happens?", "options": ["a", "b"], "extra": None}
    req = build_request(q, frames, EvalConfig(model="m", benchmark="qa"), [0])
    assert req.timestamps == [float(t) for t in frames.timestamps_s]


def test_bad_timestamps_are_a_one_line_error_row(qwen3_backend: HFBackend) -> None:
    frame = np.zeros((64, 64, 3), np.uint8)
    req: Callable[..., Request] = lambda ts: Request(  # noqa: E731
        "q", [{"role": "user", "content": "x"}], images=[frame, frame], fps=1.0, timestamps=ts
    )
    got = qwen3_backend.run([req([1.0]), req([2.0, 1.0])], progress=False)
    assert got[0].error == "bad request: 1 timestamps for 2 images"
    assert got[1].error == "bad request: timestamps must not decrease"
