"""`lvr rl` with an MR-SP group of 2 processes (torchrun, gloo) equals the single-process run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file

from lvr.datagen.color_task import make_color_qa

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
WORKER = """
import json, sys
from lvr.config import load_config
from lvr.train.common import finish_distributed, init_distributed
from lvr.train.rl import RLConfig, run_rl

cfg = load_config(RLConfig, None, json.loads(sys.argv[2]))
run_rl(cfg, sys.argv[1])
finish_distributed(init_distributed("cpu"))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed")  # fmt: skip
def test_sp2_step_matches_single_process(tmp_path: Path) -> None:
    qa = make_color_qa(tmp_path / "data", 2, 0, seed=0, size=56)
    (tmp_path / "sp_rewards.py").write_text(
        "def by_length(completions, **kw):\n    return [float(len(c) % 3) for c in completions]\n"
    )
    sets = [
        "model.path=tiny", f"data.qa={qa}", "data.split=sft", "data.frames=4",
        "data.max_pixels=3136", "rollout.n=2", "rollout.max_new_tokens=6", "rollout_batch=2",
        "update_batch=2", "micro_batch=4", "steps=1", "optim.lr=0.01", "device=cpu",
        "precision=fp32", "progress=false",
        'rewards=[{"fn": "sp_rewards:by_length", "weight": 1.0}]',
    ]  # fmt: skip
    (tmp_path / "worker.py").write_text(textwrap.dedent(WORKER))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    bin_dir = Path(sys.executable).parent
    base = [str(tmp_path / "worker.py")]
    one = subprocess.run([sys.executable, *base, str(tmp_path / "one"), json.dumps(sets)], env=env,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()),
         *base, str(tmp_path / "two"), json.dumps(sets)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    m1 = json.loads((tmp_path / "one/rl/metrics.jsonl").read_text().splitlines()[0])
    m2 = json.loads((tmp_path / "two/rl/metrics.jsonl").read_text().splitlines()[0])
    assert m1["reward/std"] > 0  # non-zero advantages: the update really depends on the gradient
    for key in ("reward/mean", "grad_norm", "entropy", "encodes", "groups"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4), key
    w0 = load_file(tmp_path / "one/models/tiny-vlm/model.safetensors")
    w1 = load_file(tmp_path / "one/rl/checkpoint-000001/model.safetensors")
    w2 = load_file(tmp_path / "two/rl/checkpoint-000001/model.safetensors")
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w1)
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert moved > 1e-3 and diff < moved * 1e-2, (moved, diff)
