"""Shared pytest fixtures: small real encoded videos (H.264 MP4 with sidecar JSON) and broken files."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from lvr.datagen.synthetic import VideoSpec, render_video
from lvr.demo.color_task import render_color_order_video
from lvr.testing.bad_files import write_bad_files

# 6 s, 144 frames, 160x120, a keyframe at least every 12 frames, 1.5-2.5 s scenes: several GOPs and
# cuts, rendered in ~0.1 s.
SHORT_SPEC: dict[str, Any] = {
    "duration_s": 6.0,
    "fps": 24.0,
    "width": 160,
    "height": 120,
    "gop": 12,
    "scene_len_s": (1.5, 2.5),
    "objects_per_scene": (1, 3),
    "seed": 3,
}


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide folder for rendered videos."""
    return tmp_path_factory.mktemp("videos")


@pytest.fixture(scope="session")
def make_video(video_dir: Path) -> Callable[..., Path]:
    """Factory: ``make_video(name, **VideoSpec overrides) -> mp4 path`` (rendered once per session).

    Overrides apply on top of ``SHORT_SPEC``; the sidecar is next to the mp4.
    """
    made: dict[str, Path] = {}

    def _make(name: str = "short", **overrides: Any) -> Path:
        if name not in made:
            path = video_dir / f"{name}.mp4"
            render_video(path, VideoSpec(**{**SHORT_SPEC, **overrides}))
            made[name] = path
        return made[name]

    return _make


@pytest.fixture(scope="session")
def short_video(make_video: Callable[..., Path]) -> Path:
    """The default small synthetic video (6 s, 24 fps, 160x120, GOP <= 12, several hard cuts)."""
    return make_video("short")


@pytest.fixture(scope="session")
def color_order_video(video_dir: Path) -> Path:
    """A 2 s 112x112 learning-task video showing red, then blue, then green."""
    path = video_dir / "color_order.mp4"
    render_color_order_video(path, ["red", "blue", "green"], seed=5)
    return path


@pytest.fixture(scope="session")
def bad_video_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Broken files from ``write_bad_files``: each must fail probing and sampling with VideoDecodeError."""
    return write_bad_files(tmp_path_factory.mktemp("bad_videos"))


@pytest.fixture
def varied_reward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user reward (dotted path) whose values often differ inside a group (by completion length);
    `signal_reward` always does."""
    (tmp_path / "rl_test_rewards.py").write_text(
        "def by_length(completions, **kwargs):\n"
        "    return [float(len(c) % 3) for c in completions]\n"
        "\n"
        "def alternating(completions, **kwargs):\n"
        "    return [float(len(c) % 3) + 0.5 * (i % 2) for i, c in enumerate(completions)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "rl_test_rewards:by_length"


@pytest.fixture
def signal_reward(varied_reward: str) -> str:
    """A user reward that differs inside every group of a prompt-major batch (odd rollouts get
    +0.5): no step is a no-signal step, so the optimizer and weight-sync counts are exact."""
    return varied_reward.replace(":by_length", ":alternating")
