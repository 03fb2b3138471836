"""The core install is datagen against an API: `pip install -e .` in a fresh venv, no torch.

Slow (it builds a virtual environment and installs the core dependencies from the package
index), so opt-in: `pytest -m slow tests/test_core_install.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from backend_server import fake_server

from lvr.artifacts import read_table
from lvr.layout import RunLayout

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_core_install_runs_datagen_against_an_api_without_torch(tmp_path: Path) -> None:
    venv = tmp_path / "core"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "-e", str(REPO)],
        capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-3000:]
    for heavy in ("torch", "transformers", "peft", "deepspeed", "matplotlib"):
        probe = subprocess.run([str(python), "-c", f"import {heavy}"], capture_output=True)
        assert probe.returncode != 0, f"the core install pulled {heavy}"
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    with fake_server() as server:
        opts = f"{{base_url: '{server.url}', concurrency: 4}}"
        # The default config's question kinds: the fake server's schema-filled answers to the
        # demo config's questions are all rejected (open answers that are a bare letter, options
        # that repeat), and a stage without one usable row fails the run.
        sets = [
            "input.synthetic.videos=3", "input.synthetic.duration_s=8", "input.synthetic.width=96",
            "input.synthetic.height=64", "input.synthetic.fps=12",
            "caption.backend=openai", "caption.model=fake-model", "caption.frames=2",
            f"caption.options={opts}", "qa.backend=openai", "qa.model=fake-model",
            f"qa.options={opts}", "qa.questions_per_video=2", "filter.min_reasoning_chars=1",
        ]  # fmt: skip
        args = [str(venv / "bin" / "lvr"), "datagen", "run", "--run", str(run), "-q"]
        for item in sets:
            args += ["--set", item]
        out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    layout = RunLayout(run)
    assert read_table(layout.captions, "captions").num_rows > 0
    assert read_table(layout.qa_raw, "qa_raw").num_rows > 0
    inspect = subprocess.run(
        [str(venv / "bin" / "lvr"), "inspect", str(run)], capture_output=True, text=True, env=env
    )
    assert inspect.returncode == 0, inspect.stderr[-2000:]
