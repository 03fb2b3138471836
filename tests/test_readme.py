"""The README cannot rot: every `lvr ...` line of its ```bash blocks runs here, in order.

Lines in ```text blocks need GPUs, model servers or real benchmark data and are not run.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _bash_lines() -> list[str]:
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.split("  #")[0].strip() for b in blocks for line in b.splitlines() if line.strip()]


def test_readme_opens_with_the_two_setup_commands_and_ci_runs_the_test_one() -> None:
    lines = _bash_lines()
    assert lines[:2] == ["make demo", "make test"]
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert "make test" in ci


def test_every_cpu_command_of_the_readme_runs(tmp_path: Path) -> None:
    (tmp_path / "configs").symlink_to(REPO / "configs")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "160"}
    commands = [line for line in _bash_lines() if line.startswith("lvr ")]
    assert len(commands) >= 8
    for line in commands:
        args = [sys.executable, "-m", "lvr.cli", *shlex.split(line)[1:]]
        res = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert res.returncode == 0, f"README command failed: {line}\n{res.stderr[-2000:]}"
    assert (tmp_path / "runs/tour/export/rl.jsonl").stat().st_size > 0
    assert (tmp_path / "runs/tour/eval/report.md").is_file()
