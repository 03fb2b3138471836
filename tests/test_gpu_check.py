"""scripts/gpu_check.py (issue 17): the prepared GPU check must not rot between GPU sessions.

The dry run executes every measurement at tiny sizes on the CPU in a subprocess where the packages
the GPU machine lacks (av, duckdb, polars, deepspeed, vLLM, flash-attn, ...) cannot be imported;
the real-size architecture dicts are checked against the published parameter counts on the meta
device (no memory, no download).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import gpu_check  # noqa: E402
import gpu_check_capacity as gc  # noqa: E402
import gpu_check_measure as gmeasure  # noqa: E402
import gpu_check_models as gm  # noqa: E402
import gpu_check_steps as gs  # noqa: E402

# Not on the GPU machine (/work/.library/device/KINDS.md); `sys.modules[name] = None` makes an
# import fail and `importlib.util.find_spec` answer None, as for an absent package.
ABSENT_ON_GPU_MACHINE = ("av", "decord", "duckdb", "polars", "deepspeed", "vllm", "flash_attn",
                         "datasets", "openai", "trl", "scenedetect", "ray", "gguf", "torchcodec")  # fmt: skip


def _blocked_env(tmp_path: Path) -> dict[str, str]:
    site = tmp_path / "absent"
    site.mkdir()
    names = ", ".join(repr(n) for n in ABSENT_ON_GPU_MACHINE)
    (site / "sitecustomize.py").write_text(
        f"import sys\nfor _name in ({names},):\n    sys.modules[_name] = None\n"
    )
    return {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO}", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def dry_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The JSON of one `--cpu-dry-run` with the GPU machine's missing packages unimportable."""
    tmp = tmp_path_factory.mktemp("gpu_check")
    env = _blocked_env(tmp)
    probe = subprocess.run([sys.executable, "-c", "import av"], env=env, capture_output=True)
    assert probe.returncode != 0, "the blocker must make av unimportable"
    out = tmp / "gpu_check.json"
    cmd = [sys.executable, str(REPO / "scripts/gpu_check.py"), "--cpu-dry-run", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_dry_run_every_measurement_ok(dry_report: dict) -> None:
    failed = {
        n: e.get("error") or e.get("reason")
        for n, e in dry_report["results"].items()
        if e["status"] != "ok"
    }
    assert not failed
    assert list(dry_report["results"]) == list(gpu_check.STEPS)
    assert dry_report["mode"] == "cpu-dry-run"
    assert set(dry_report["summary"]["status"]) == set(gpu_check.STEPS)


def test_dry_run_encode_tokens_match_the_grid(dry_report: dict) -> None:
    for rows in (dry_report["results"]["encode_7b"]["data"]["rows"],
                 dry_report["results"]["qwen3_vl_8b"]["data"]["encode"]["rows"]):  # fmt: skip
        assert [r["frames"] for r in rows] == [4, 8, 16]
        for r in rows:
            t, h, w = r["grid_thw"]
            assert r["visual_tokens"] == r["expected_tokens"] == t * h * w // 4


def test_dry_run_rl_step_encodes_once_with_reuse(dry_report: dict) -> None:
    rl = dry_report["results"]["rl_step_7b"]["data"]
    g = rl["G"]
    assert rl["reuse_on"]["encodes"] == rl["reuse_on_again"]["encodes"] == 1
    assert rl["reuse_off"]["encodes"] == 4 * g  # every rollout and every prefill row
    for run in ("reuse_on", "reuse_off"):
        assert len(rl[run]["response_tokens"]) == g
        assert all(rl[run][k] > 0 for k in ("encode_s", "rollout_s", "prefill_s", "update_s"))
    assert rl["speedup_reuse"] > 0 and rl["gradient_checkpointing"] is False


def test_dry_run_sft_rows_and_memory_model(dry_report: dict) -> None:
    for name in ("sft_lora_7b", "sft_full_3b"):
        data = dry_report["results"][name]["data"]
        assert [r["frames"] for r in data["rows"]] == [4, 8]
        for r in data["rows"]:
            assert r["tokens_per_s"] > 0 and r["model_tflop_per_step"] >= 0
            assert r["predicted_peak_gib"] > 0
        mem = data["memory_model"]
        assert mem["act_per_token"] > 0 and mem["layer_per_token"] > 0  # checkpointing on
        assert 0 < mem["trainable"] * 4 < mem["weights"] * 4
    lora, full = (
        dry_report["results"][n]["data"]["memory_model"] for n in ("sft_lora_7b", "sft_full_3b")
    )
    assert lora["trainable"] < full["trainable"]


def test_dry_run_searches_bracket_the_emulated_cap(dry_report: dict) -> None:
    cap = dry_report["plan"]["token_cap"]
    for name in ("max_frames_sft_7b", "max_frames_rl_7b"):
        d = dry_report["results"][name]["data"]
        assert d["stopped_by"] == "resolution"
        assert d["min_oom_frames"] - d["max_fit_frames"] == d["resolution_frames"]
        for p in d["probes"]:
            assert p["fits"] == (p["tokens"] <= cap), p
            assert p["fits"] or p["error"].startswith("EmulatedOOM")
        fitted = [p["frames"] for p in d["probes"] if p["fits"]]
        assert max(fitted, default=0) <= d["max_fit_frames"]


def test_dry_run_numerics_bf16_close_to_fp32(dry_report: dict) -> None:
    num = dry_report["results"]["numerics"]["data"]
    for name in ("autocast_bf16", "bf16_weights"):
        assert num[name]["finite"]
        assert 0 < num[name]["max_abs"] < 0.05  # bf16 rounding moves log-probs, a little


def test_layer_bytes_lora_dropout_saves_more(dry_report: dict) -> None:
    lb = dry_report["results"]["layer_bytes"]["data"]
    big = "qwen2.5-vl-7b"
    assert (lb[f"{big}/frozen_base"]["bytes_per_token"] < lb[f"{big}/lora_rl"]["bytes_per_token"]
            < lb[f"{big}/lora_sft"]["bytes_per_token"])  # fmt: skip


@pytest.mark.parametrize("name", list(gm.ARCHS))
def test_real_configs_have_the_published_sizes(name: str) -> None:
    arch = gm.ARCHS[name]
    model = gm.build_model(arch, "meta", torch.bfloat16)
    assert gm.count_params(model) == pytest.approx(arch["published_params"], rel=0.01)
    text = arch["text"]
    d, f = text["hidden_size"], text["intermediate_size"]
    hd = text.get("head_dim", d // text["num_attention_heads"])
    q, kv = text["num_attention_heads"] * hd, text["num_key_value_heads"] * hd
    per_layer = 2 * d * q + 2 * d * kv + 3 * d * f  # q, o, k, v, gate/up/down
    lm = gm.inner(model).language_model
    assert gm._linear_weights(lm) == per_layer * text["num_hidden_layers"]


def test_visual_token_counts_of_448_frames() -> None:
    q25, q3 = gm.ARCHS["qwen2.5-vl-7b"], gm.ARCHS["qwen3-vl-8b"]
    assert [gm.video_tokens(q25, f, 448) for f in (64, 256, 1024)] == [8192, 32768, 131072]
    assert gm.video_tokens(q25, 256, 224) == 8192
    assert gm.video_tokens(q3, 64, 448) == 32 * 14 * 14
    with pytest.raises(ValueError, match="multiple"):
        gm.video_grid(q25, 63, 448)


def test_runner_records_failures_and_budget_skips(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    runner = gpu_check.Runner(out, 1e9, {"env": {"device": "cpu"}})
    assert runner.run("good", lambda: {"x": 1}) == {"x": 1}
    assert runner.run("bad", lambda: 1 / 0) is None
    runner.budget_s = 0.0
    assert runner.run("late", lambda: {"x": 2}, need_s=5.0) is None
    res = json.loads(out.read_text())["results"]
    assert res["good"]["status"] == "ok"
    assert res["bad"]["status"] == "failed" and res["bad"]["error"].startswith("ZeroDivisionError")
    assert "1 / 0" in res["bad"]["traceback"]
    assert res["late"] == {"status": "skipped", "reason": res["late"]["reason"]}
    assert "budget" in res["late"]["reason"]


def test_search_max_finds_the_largest_fitting_multiple() -> None:
    def fits_below(limit: int):
        return lambda f: {"fits": f <= limit}

    for limit, guess in ((100, 64), (100, 400), (31, 32), (257, 8)):
        res = gs.search_max(fits_below(limit), guess, 8, 40, float("inf"))
        assert res["max_fit_frames"] == (limit // 8 * 8 or None)
        assert res["min_oom_frames"] == limit // 8 * 8 + 8
    short = gs.search_max(fits_below(1000), 8, 8, 3, float("inf"))
    assert short["stopped_by"] == "probe budget" and short["min_oom_frames"] is None


def test_capacity_model_scales_with_sequence_parallelism() -> None:
    mem = gc.MemoryPlan(weights=16e9, trainable=1e8, trainable_bytes=4, act_per_token=2e5,
                        layer_per_token=4e5, vocab=152064, vision_per_patch=2e4)  # fmt: skip
    one, two = mem.peak(64_000, 256_000, 256), mem.peak(64_000, 256_000, 256, sp=2)
    assert one["static"] == two["static"] == 16e9 + 1e8 * 12
    assert two["activations"] == pytest.approx(one["activations"] / 2)
    assert two["transient"] == pytest.approx(one["transient"] / 2)
    cap = 80 * 1024**3
    t1, t2 = mem.max_tokens(cap, 0.25, 256), mem.max_tokens(cap, 0.25, 256, sp=2)
    assert mem.peak(t1, 4 * t1, 256)["total"] <= cap < mem.peak(t1 + 1, 4 * t1 + 4, 256)["total"]
    assert t2 == pytest.approx(2 * t1, rel=0.01)


@pytest.fixture
def one_thread():
    """Tiny ops on a shared CPU: one thread (as the dry run), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_rl_step_falls_back_to_checkpointing_on_oom(
    monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    plan = gmeasure.Plan.dry()
    real = gmeasure._rl_runs
    calls = []

    def first_oom(s, plan_, opt):
        calls.append(bool(getattr(gm.inner(s.policy).language_model.layers[0],
                                  "gradient_checkpointing", False)))  # fmt: skip
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(s, plan_, opt)

    monkeypatch.setattr(gmeasure, "_rl_runs", first_oom)
    out = gmeasure.rl_step(gmeasure.Models(plan, torch.device("cpu"), True), plan)
    assert calls == [False, True]
    assert out["gradient_checkpointing"] is True
    assert out["no_checkpointing_error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert out["reuse_on"]["encodes"] == 1 and out["reuse_off"]["encodes"] == 4 * plan.rl_group


def test_cli_rejects_unknown_measurement(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "rl_stepp"])
    assert "unknown measurement(s) ['rl_stepp']" in capsys.readouterr().err
