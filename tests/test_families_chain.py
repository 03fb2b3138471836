"""Each model family through the whole chain on its tiny model: `lvr sft`, `lvr rl` (embedding
reuse) and `lvr eval run`, from the demo's datagen run; checkpoints keep the family's model_type.

The default suite runs `lvr rl` from `tiny:<family>` for the three structurally new families
(Qwen3-VL: DeepStack; Qwen3.5: gated delta-net layers; LLaVA-OneVision: 1-D positions, a SigLIP
tower on whole frames); the full CLI chain of every family is marked slow (about a minute each
on 2 CPU cores).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lvr.config import load_config
from lvr.demo.color_task import make_color_qa
from lvr.models.tiny import TINY_FAMILIES
from lvr.train.rl import RLConfig, run_rl

REPO = Path(__file__).resolve().parents[1]


def _model_type(folder: Path) -> str:
    return json.loads((folder / "config.json").read_text())["model_type"]


@pytest.fixture(scope="module")
def qa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_color_qa(tmp_path_factory.mktemp("famqa") / "data", 2, 0, seed=0, size=56)


@pytest.mark.parametrize("name", ["qwen3_vl", "qwen3_5", "llava_onevision"])
def test_rl_from_a_tiny_family_reuses_embeddings(
    qa: Path, tmp_path: Path, varied_reward: str, name: str
) -> None:
    sets = [
        f"model.path=tiny:{name}", f"data.qa={qa}", "data.split=sft", "data.frames=4",
        "data.max_pixels=3136", "rollout.n=2", "rollout.max_new_tokens=6", "rollout_batch=2",
        "update_batch=2", "micro_batch=4", "steps=1", "optim.lr=0.01", "device=cpu",
        "precision=fp32", "progress=false",
    ]  # fmt: skip
    cfg = load_config(RLConfig, None, sets)
    cfg.rewards = [{"fn": varied_reward, "weight": 1.0}]
    manifest = run_rl(cfg, tmp_path / "run")
    row = json.loads((tmp_path / "run/rl/metrics.jsonl").read_text().splitlines()[0])
    assert row["encodes"] == row["groups"] == 2.0  # one encode per video, reused by everything
    assert row["opt_steps"] >= 1 and row["prefill_s"] > 0
    assert _model_type(Path(manifest["final_checkpoint"])) == name
    assert _model_type(tmp_path / f"run/models/tiny-{name}") == name


def _lvr(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "lvr.cli", *args], cwd=REPO, env=env, text=True,
        capture_output=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("chain") / "R"
    _lvr("datagen", "run", "--config", "configs/datagen/demo.yaml", "--run", str(run),
         env=dict(os.environ, HF_HUB_OFFLINE="1"))  # fmt: skip
    return run


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY_FAMILIES)
def test_cli_chain_per_family(
    demo_run: Path, tmp_path: Path, varied_reward: str, name: str
) -> None:
    run = tmp_path / "R"
    shutil.copytree(demo_run / "qa", run / "qa")  # rows name the demo run's videos (absolute)
    reward_dir = str(tmp_path)  # where conftest's varied_reward wrote its module
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([reward_dir, str(REPO)]))
    _lvr("sft", "--config", "configs/sft/tiny_cpu.yaml", "--run", str(run), "--set",
         f"model.path=tiny:{name}", "--set", "progress=false", env=env)  # fmt: skip
    sft = sorted((run / "sft").glob("checkpoint-*"))[-1]
    _lvr("rl", "--config", "configs/rl/tiny_cpu.yaml", "--run", str(run), "--set", "steps=1",
         "--set", f"rewards=[{{fn: '{varied_reward}', weight: 1.0}}]", "--set", "progress=false",
         env=env)  # fmt: skip
    rl = sorted((run / "rl").glob("checkpoint-*"))[-1]
    row = json.loads((run / "rl/metrics.jsonl").read_text().splitlines()[0])
    # One encode per distinct video (the demo asks several questions about one video).
    assert 1 <= row["encodes"] <= row["groups"] and row["opt_steps"] >= 1
    out = _lvr("eval", "run", "--model", str(rl), "--benchmark", "qa", "--data", str(run / "qa"),
               "--run", str(run), "--frames", "4", "--limit", "4", "--set", "max_tokens=16",
               env=env)  # fmt: skip
    assert "4 questions" in out and "error rows 0" in out
    assert _model_type(sft) == _model_type(rl) == name
