"""`lvr rl` end to end on the tiny VLM: metrics, embedding reuse, checkpoints, exact resume, errors."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lvr.config import load_config  # noqa: E402
from lvr.demo.color_task import make_color_qa
from lvr.train.rewards import RewardError  # noqa: E402
from lvr.train.rl import RLConfig, run_rl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def qa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("rlqa")
    return make_color_qa(tmp / "data", 3, 0, seed=0, size=56, bad_videos=1)


def _cfg(qa: Path, *sets: str) -> RLConfig:
    base = [
        "model.path=tiny", f"data.qa={qa}", "data.split=sft", "data.frames=4", "data.max_pixels=3136",
        "rollout.n=2", "rollout.max_new_tokens=6", "rollout_batch=2", "update_batch=1",
        "micro_batch=4", "steps=2", "optim.lr=0.01", "device=cpu", "precision=fp32",
        "progress=false", "keep_last=0", "save_every=1",
    ]  # fmt: skip
    return load_config(RLConfig, None, base + list(sets))


def _with_reward(cfg: RLConfig, fn: str) -> RLConfig:
    cfg.rewards = [{"fn": fn, "weight": 1.0}, {"fn": "format", "weight": 0.1}]
    return cfg


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "rl/metrics.jsonl").read_text().splitlines()]


def test_tiny_run_trains_reuses_embeddings_and_resumes_exactly(qa, tmp_path, varied_reward):
    run_a = tmp_path / "a"
    manifest = run_rl(_with_reward(_cfg(qa), varied_reward), run_a)
    rows = _metrics(run_a)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        # one vision encode per prompt per step, shared by G rollouts + old/ref/policy prefills
        assert r["encodes"] == r["groups"] == 2.0
        for key in ("reward/mean", "reward/by_length/mean", "format_rate", "kl", "entropy",
                    "clip_frac/high", "response_len/mean", "encode_s", "rollout_s", "prefill_s",
                    "update_s"):  # fmt: skip
            assert key in r, key
    # 2 steps x 2 mini-batches of 1 prompt, minus those whose group scored all the same
    flat = manifest["counts"]["no_signal_updates"]
    assert manifest["optimizer_steps"] == 4 - flat and flat < 4
    # the bad video was reported, never replaced
    assert manifest["counts"]["skipped_decode"] >= 1
    skipped = (run_a / "rl/skipped.jsonl").read_text()
    assert "bad_0.mp4" in skipped
    # weights changed, and the checkpoint is an HF folder
    ck1, ck2 = run_a / "rl/checkpoint-000001", run_a / "rl/checkpoint-000002"
    w0 = load_file(run_a / "models/tiny-vlm/model.safetensors")
    w2 = load_file(ck2 / "model.safetensors")
    name = next(k for k in w2 if "layers.0.self_attn.q_proj.weight" in k)
    assert not torch.equal(w0[name], w2[name])
    vision = next(k for k in w2 if "visual" in k and k.endswith("weight"))
    assert torch.equal(w0[vision], w2[vision])  # frozen tower (cached embeddings stay valid)
    # exact resume: continue a copy of checkpoint 1 in another run folder
    run_b = tmp_path / "b"
    (run_b / "rl").mkdir(parents=True)
    shutil.copytree(ck1, run_b / "rl" / ck1.name)
    resumed = run_rl(_with_reward(_cfg(qa), varied_reward), run_b, resume=True)
    assert resumed["start_step"] == 1
    wb = load_file(run_b / "rl/checkpoint-000002/model.safetensors")
    for k in w2:
        assert torch.allclose(w2[k], wb[k], atol=1e-6), k
    assert _metrics(run_b)[-1]["reward/mean"] == rows[-1]["reward/mean"]
    # a crash after step 2's skip, before its checkpoint: the rerun logs that skip once
    assert rows[1]["skipped_decode"] > rows[0]["skipped_decode"]  # the bad video is in step 2
    skips = (run_a / "rl/skipped.jsonl").read_text()
    shutil.rmtree(ck2)
    again = run_rl(_with_reward(_cfg(qa), varied_reward), run_a, resume=True)
    assert (run_a / "rl/skipped.jsonl").read_text() == skips
    assert again["skipped"] == manifest["skipped"] and again["counts"] == manifest["counts"]


def test_bad_reward_path_fails_before_loading(qa, tmp_path):
    cfg = _with_reward(_cfg(qa), "no_such_pkg_for_rl.rewards:f")
    with pytest.raises(RewardError, match="cannot import module"):
        run_rl(cfg, tmp_path / "r")
    assert not (tmp_path / "r/models").exists()


def test_cli_show_config_and_invalid_settings(qa, tmp_path):
    from typer import Typer
    from typer.testing import CliRunner

    from lvr.train.cli import rl

    app = Typer()
    app.command()(rl)
    app.command("noop")(lambda: None)  # a second command keeps `rl` a sub-command
    res = CliRunner().invoke(app, ["rl", "--show-config", "--set", "algo.advantage=rloo"])
    assert res.exit_code == 0, res.output
    assert "advantage: rloo" in res.output and "kl_coef: 0.01" in res.output
    bad = CliRunner().invoke(app, ["rl", "--show-config", "--set", "algo.advantage=ppo"])
    assert bad.exit_code != 0
    assert "grpo" in str(bad.exception) or "grpo" in bad.output


def test_lora_reference_is_the_adapter_free_base(qa, tmp_path, varied_reward):
    cfg = _with_reward(_cfg(qa, "model.lora=true", "model.lora_r=4", "model.lora_alpha=8",
                            "steps=1", "update_batch=2"), varied_reward)  # fmt: skip
    manifest = run_rl(cfg, tmp_path / "lora")
    row = _metrics(tmp_path / "lora")[0]
    # Step 1: policy == base (LoRA B starts at 0), so the KL to the adapter-free reference is 0.
    assert row["kl"] == pytest.approx(0.0, abs=1e-7)
    ck = Path(manifest["final_checkpoint"])
    w = load_file(ck / "model.safetensors")
    assert not any("lora_" in k for k in w)  # merged export, loadable without PEFT
    w0 = load_file(tmp_path / "lora/models/tiny-vlm/model.safetensors")
    name = next(k for k in w if "layers.0.self_attn.q_proj.weight" in k)
    assert not torch.equal(w0[name], w[name])  # the merged adapter moved the weights


def test_dapo_dynamic_sampling_drops_flat_groups_and_refills(qa, tmp_path, monkeypatch):
    (tmp_path / "rl_flat_rewards.py").write_text(
        textwrap.dedent(
            """
            def half_flat(completions, qa_id, **kwargs):
                # questions q..0 and q..2 always score 1 (a flat group), the others vary
                return [1.0 if q[-1] in "02" else float(len(c) % 3) for c, q in zip(completions, qa_id)]
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = _cfg(qa, "algo.advantage=dapo", "algo.kl=none", "algo.kl_coef=0.0",
               "algo.clip_high=0.28", "algo.dynamic_sampling=true", "algo.max_gen_batches=3",
               "steps=1", "update_batch=2")  # fmt: skip
    cfg.rewards = [{"fn": "rl_flat_rewards:half_flat", "weight": 1.0}]
    run_rl(cfg, tmp_path / "dapo")
    row = _metrics(tmp_path / "dapo")[0]
    assert row["groups_dropped"] >= 1 and row["gen_rounds"] >= 2  # refilled from more prompts
    assert row["groups"] <= 2 and row["identical_groups"] == 0  # only groups with signal train
    assert "kl" not in row  # no reference model with kl=none


def test_vllm_engine_without_vllm_is_one_clear_error(qa, tmp_path):
    import importlib.util

    from lvr.errors import LvrError

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here (tests/test_rl_vllm.py covers the engine)")
    with pytest.raises(LvrError, match="vLLM is not installed"):
        run_rl(_cfg(qa, "rollout.engine=vllm"), tmp_path / "v")
    assert not (tmp_path / "v/models").exists()  # failed before building/loading any model
