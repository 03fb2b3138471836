"""A step (or mini-batch) without a learning signal does not touch the policy (issue: the demo's
RL undid its SFT on a machine where the KL term's 1e-7 gradient noise became full Adam steps)."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lvr.config import load_config  # noqa: E402
from lvr.demo.color_task import make_color_qa  # noqa: E402
from lvr.train.rl import RLConfig, run_rl  # noqa: E402


@pytest.fixture(scope="module")
def qa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_color_qa(tmp_path_factory.mktemp("nosignal") / "data", 4, 0, seed=0, size=56)


@pytest.fixture
def reward_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "rl_signal_rewards.py").write_text(
        textwrap.dedent(
            """
            def constant(completions, **kwargs):
                return [1.0] * len(completions)

            def flat_for_first(completions, qa_id, **kwargs):
                # the alphabetically first question always scores 1; the others vary by length
                first = min(qa_id)
                return [1.0 if q == first else float(len(c) % 3) for c, q in zip(completions, qa_id)]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    return "rl_signal_rewards"


def _cfg(qa: Path, reward: str, *sets: str) -> RLConfig:
    base = [
        "model.path=tiny", f"data.qa={qa}", "data.split=sft", "data.frames=4",
        "data.max_pixels=3136", "rollout.n=4", "rollout.max_new_tokens=6", "micro_batch=8",
        # a high lr, weight decay and the KL term: any stray step would show
        "optim.lr=0.05", "optim.weight_decay=0.1", "algo.kl=low_var_kl", "algo.kl_coef=0.5",
        "device=cpu", "precision=fp32", "progress=false", "keep_last=0",
    ]  # fmt: skip
    cfg = load_config(RLConfig, None, base + list(sets))
    cfg.rewards = [{"fn": reward, "weight": 1.0}]
    return cfg


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "rl/metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [False, True])
def test_constant_reward_leaves_every_weight_bit_identical(qa, tmp_path, reward_module, lora):
    sets = ["steps=3", "rollout_batch=2", "update_batch=1"]
    if lora:
        sets += ["model.lora=true", "model.lora_r=4", "model.lora_alpha=8"]
    run = tmp_path / "run"
    manifest = run_rl(_cfg(qa, f"{reward_module}:constant", *sets), run)
    assert manifest["optimizer_steps"] == 0
    assert manifest["counts"]["no_signal_steps"] == 3
    rows = _metrics(run)
    assert [r["no_signal"] for r in rows] == [1.0, 1.0, 1.0]
    assert all(r["opt_steps"] == 0 and "grad_norm" not in r for r in rows)
    assert len({r["lr"] for r in rows}) == 1  # the schedule did not tick
    start = load_file(run / "models/tiny-vlm/model.safetensors")
    end = load_file(Path(manifest["final_checkpoint"]) / "model.safetensors")
    assert start.keys() == end.keys()
    for name, weight in start.items():
        assert torch.equal(weight, end[name]), name  # bit-identical, not merely close
    state = torch.load(
        Path(manifest["final_checkpoint"]) / "training_state/train.pt", weights_only=False
    )
    assert state["optimizer"]["state"] == {}  # Adam never stepped: no moments


def test_flat_mini_batches_are_skipped_and_the_others_still_update(qa, tmp_path, reward_module):
    run = tmp_path / "run"
    cfg = _cfg(
        qa, f"{reward_module}:flat_for_first", "steps=2", "rollout_batch=4", "update_batch=1"
    )
    manifest = run_rl(cfg, run)
    rows = _metrics(run)
    skipped = manifest["counts"]["no_signal_updates"]
    assert skipped >= 1  # the always-1 question's mini-batch, whenever it was drawn
    flat = sum(r["identical_groups"] for r in rows)
    assert skipped == flat  # one mini-batch per prompt: exactly the flat groups were skipped
    assert manifest["optimizer_steps"] == 2 * 4 - skipped
    start = load_file(run / "models/tiny-vlm/model.safetensors")
    end = load_file(Path(manifest["final_checkpoint"]) / "model.safetensors")
    name = next(k for k in end if "layers.0.self_attn.q_proj.weight" in k)
    assert not torch.equal(start[name], end[name])  # a normal step still updates
