"""`lvr rl` over 2 processes (torchrun, gloo) equals the single-process run: one MR-SP group of 2
(sp 2), and two data-parallel SP groups of 1 (dp 2); plus the dp x sp config checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lvr.demo.color_task import make_color_qa

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
WORKER = """
import json, sys
from lvr.config import load_config
from lvr.train.common import finish_distributed, init_distributed
from lvr.train.rl import RLConfig, run_rl

cfg = load_config(RLConfig, None, json.loads(sys.argv[2]))
run_rl(cfg, sys.argv[1], resume=len(sys.argv) > 3)
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


def _run(
    tmp_path: Path, name: str, sets: list[str], nproc: int, resume: bool = False,
    timeout: int = 600,
) -> subprocess.CompletedProcess:  # fmt: skip
    """`run_rl` in `nproc` processes (torchrun with gloo when > 1) into `tmp_path/name`."""
    (tmp_path / "worker.py").write_text(textwrap.dedent(WORKER))
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    launch = [sys.executable]
    if nproc > 1:
        torchrun = str(Path(sys.executable).parent / "torchrun")
        launch = [torchrun, "--nproc_per_node", str(nproc), "--master_port", str(_free_port())]
    cmd = [*launch, str(tmp_path / "worker.py"), str(tmp_path / name), json.dumps(sets)]
    cmd += ["--resume"] if resume else []
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _dp_sets(qa: Path, reward: str) -> list[str]:
    # micro_batch = G: one prompt per forward in both runs, so no forward pads differently. With
    # 4 (2 prompts per forward in one process, split across the DP groups) the weights differ by
    # ~2e-5 after 4 Adam steps at lr 0.01: float noise of the padding, amplified by Adam's
    # 1/sqrt(v) on near-zero gradients (the metrics still agree to 1e-5).
    return [
        "model.path=tiny", f"data.qa={qa}", "data.split=sft", "data.frames=4",
        "data.max_pixels=3136", "rollout.n=2", "rollout.max_new_tokens=6", "rollout_batch=4",
        "update_batch=2", "micro_batch=2", "steps=2", "optim.lr=0.01", "device=cpu",
        "precision=fp32", "progress=false", "keep_last=0", "save_every=1",
        f'rewards=[{{"fn": "{reward}", "weight": 1.0}}, {{"fn": "format", "weight": 0.1}}]',
    ]  # fmt: skip


def _compare_runs(tmp_path: Path, tol: float) -> None:
    """Per-step metrics and final weights of `one/` and `two/` agree (rollouts exactly)."""
    m1 = [json.loads(x) for x in (tmp_path / "one/rl/metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two/rl/metrics.jsonl").read_text().splitlines()]
    assert len(m1) == len(m2) == 2
    assert m1[0]["reward/std"] > 0  # non-zero advantages: the update really depends on the gradient
    for r1, r2 in zip(m1, m2, strict=True):
        for key in ("groups", "encodes", "opt_steps", "reward/mean", "reward/std", "format_rate",
                    "response_len/mean", "response_len/max", "truncated_rate", "identical_groups",
                    "skipped_decode"):  # fmt: skip
            assert r2[key] == r1[key], key  # the same prompts and rollouts: exactly equal
        for key in ("pg_loss", "kl", "entropy", "clip_frac/high", "ratio/mean", "grad_norm"):
            assert r2[key] == pytest.approx(r1[key], rel=tol, abs=tol), key
    w0 = load_file(tmp_path / "one/models/tiny-vlm/model.safetensors")
    w1 = load_file(tmp_path / "one/rl/checkpoint-000002/model.safetensors")
    w2 = load_file(tmp_path / "two/rl/checkpoint-000002/model.safetensors")
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w1)
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert moved > 1e-3 and diff < tol, (moved, diff)
    s1 = json.loads((tmp_path / "one/rl/checkpoint-000002/trainer_state.json").read_text())
    s2 = json.loads((tmp_path / "two/rl/checkpoint-000002/trainer_state.json").read_text())
    assert s1["cursor"] == s2["cursor"]  # the data cursor is the global one


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed")  # fmt: skip
def test_dp2_matches_single_process(tmp_path: Path, varied_reward: str) -> None:
    """Two SP groups of one rank each (dp 2) take half the prompts of every step each; with global
    loss normalisers and world-summed gradients the run equals one process on the same batch."""
    sets = _dp_sets(make_color_qa(tmp_path / "data", 4, 0, seed=0, size=56), varied_reward)
    one = _run(tmp_path, "one", sets, 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(tmp_path, "two", [*sets, "sp_size=1"], 2)
    assert two.returncode == 0, two.stderr[-3000:]
    _compare_runs(tmp_path, 1e-5)
    # resume dp 2 from step 1: the global cursor and per-rank RNG give the same step 2
    (tmp_path / "three/rl").mkdir(parents=True)
    shutil.copytree(tmp_path / "two/rl/checkpoint-000001", tmp_path / "three/rl/checkpoint-000001")
    three = _run(tmp_path, "three", [*sets, "sp_size=1"], 2, resume=True)
    assert three.returncode == 0, three.stderr[-3000:]
    assert json.loads((tmp_path / "three/rl/manifest.json").read_text())["start_step"] == 1
    w2 = load_file(tmp_path / "two/rl/checkpoint-000002/model.safetensors")
    w3 = load_file(tmp_path / "three/rl/checkpoint-000002/model.safetensors")
    assert all(torch.equal(w2[k], w3[k]) for k in w2)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed")  # fmt: skip
def test_dp2_sp2_with_bad_video_matches_single_process(tmp_path: Path, varied_reward: str) -> None:
    """4 processes = 2 SP groups of 2: groups built with new_group, broadcasts from each group's
    leader (global rank 0 and 2), and an undecodable video that shifts which DP group owns which
    question. The SP prefill changes float order, hence the looser tolerance (as in the SP test)."""
    qa = make_color_qa(tmp_path / "data", 4, 0, seed=0, size=56, bad_videos=1)
    sets = _dp_sets(qa, varied_reward)
    one = _run(tmp_path, "one", sets, 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(tmp_path, "two", [*sets, "sp_size=2"], 4)
    assert two.returncode == 0, two.stderr[-3000:]
    rows = json.loads((tmp_path / "two/rl/metrics.jsonl").read_text().splitlines()[-1])
    assert rows["skipped_decode"] >= 1
    _compare_runs(tmp_path, 1e-3)


@pytest.mark.parametrize(
    ("sets", "world", "match"),
    [
        (["sp_size=3"], 4, "must divide the world size"),
        (["sp_size=2", "rollout_batch=6", "update_batch=3"], 4, "multiples of the data-parallel"),
        (["sp_size=1", "algo.dynamic_sampling=true"], 2, "dynamic_sampling needs one SP group"),
    ],
)
def test_dp_sp_config_errors(sets: list[str], world: int, match: str) -> None:
    from lvr.config import load_config
    from lvr.errors import LvrError
    from lvr.train.rl import RLConfig
    from lvr.train.rl.recipe import check_config

    base = ["rollout_batch=4", "update_batch=2"]
    with pytest.raises(LvrError, match=match):
        check_config(load_config(RLConfig, None, base + sets), world)
    check_config(load_config(RLConfig, None, base + ["sp_size=2"]), 4)  # dp 2 x sp 2 is fine


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed")  # fmt: skip
def test_dp2_no_signal_decision_is_global(tmp_path: Path) -> None:
    """dp 2 with one prompt per DP group: a step where one group's prompt scores flat and the
    other's does not must update on both ranks (a rank-local skip would leave the other rank
    alone in the gradient all-reduce), exactly as one process does; an all-flat run skips every
    step on both ranks and leaves the weights untouched."""
    qa = make_color_qa(tmp_path / "data", 4, 0, seed=0, size=56)
    (tmp_path / "dp_signal_rewards.py").write_text(textwrap.dedent("""
        def one_flat(completions, qa_id, **kwargs):
            # q0000000 always scores 1; the others differ inside every (contiguous) group
            return [1.0 if q == "q0000000" else float(len(c) % 3) + 0.5 * (i % 2)
                    for i, (c, q) in enumerate(zip(completions, qa_id))]

        def constant(completions, **kwargs):
            return [1.0] * len(completions)
    """))  # fmt: skip
    sets = [*_dp_sets(qa, "unused"), "rollout_batch=2", "update_batch=2", "steps=4"]
    mixed = [*sets, 'rewards=[{"fn": "dp_signal_rewards:one_flat", "weight": 1.0}]']
    one = _run(tmp_path, "one", mixed, 1)
    assert one.returncode == 0, one.stderr[-3000:]
    # ranks that disagreed would wait for each other in a collective: a hang, cut short here
    two = _run(tmp_path, "two", [*mixed, "sp_size=1"], 2, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    m1 = [json.loads(x) for x in (tmp_path / "one/rl/metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two/rl/metrics.jsonl").read_text().splitlines()]
    assert any(r["identical_groups"] == 1 for r in m1), m1  # the mixed case did occur
    for r1, r2 in zip(m1, m2, strict=True):
        for key in ("identical_groups", "opt_steps", "no_signal_steps", "no_signal_updates"):
            assert r2[key] == r1[key], key
    assert m2[-1]["opt_steps"] == 4  # every step had one informative group: every step updated

    flat = _run(tmp_path, "flat", [*sets, "sp_size=1",
                                   'rewards=[{"fn": "dp_signal_rewards:constant", "weight": 1.0}]'],
                2, timeout=180)  # fmt: skip
    assert flat.returncode == 0, flat.stderr[-3000:]
    manifest = json.loads((tmp_path / "flat/rl/manifest.json").read_text())
    assert manifest["counts"]["no_signal_steps"] == 4 and manifest["optimizer_steps"] == 0
    w0 = load_file(tmp_path / "flat/models/tiny-vlm/model.safetensors")
    w4 = load_file(tmp_path / "flat/rl/checkpoint-000004/model.safetensors")
    assert all(torch.equal(w0[k], w4[k]) for k in w0)
