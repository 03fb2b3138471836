"""The RL learning check (slow): GRPO raises reward and held-out accuracy; inverted advantages do not."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~550 s on a quiet 2-core machine: the suite's 600 s left no margin
def test_rl_learns_and_inverted_control_does_not(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location(
        "rl_color_task", REPO / "benchmarks/rl_color_task.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.learning_check(tmp_path)
    assert res["learned"], res
    assert res["inverted_did_not_learn"], res
    assert res["met"], res
