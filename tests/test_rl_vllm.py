"""`lvr rl` with `rollout.engine=vllm` (opt-in: `pytest -m vllm` inside the venv made by
scripts/vllm_env.sh, or on a GPU machine with the `gpu` extra). Skipped when vLLM is absent.

After training, the engine must sample from the trained weights (full fine-tuning and LoRA), not
the starting ones; a resumed run must restart the engine from the checkpoint's weights; with two
data-parallel groups each group's leader runs its own engine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.vllm
pytest.importorskip("vllm")

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine inside pytest's process

from lvr.config import load_config  # noqa: E402
from lvr.demo.color_task import make_color_qa  # noqa: E402
from lvr.models.loading import load_vlm  # noqa: E402
from lvr.mrsp import engines  # noqa: E402
from lvr.mrsp.batch import PromptInput  # noqa: E402
from lvr.mrsp.comm import MrspError  # noqa: E402
from lvr.mrsp.rollout import HFRolloutEngine  # noqa: E402
from lvr.mrsp.synthetic import model_prompt  # noqa: E402
from lvr.train.rl import RLConfig, recipe, run_rl  # noqa: E402
from lvr.train.rl.state import RLRun  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

VLLM = [
    "rollout.engine=vllm", "rollout.vllm.dtype=float32", "rollout.vllm.max_model_len=2048",
    f"rollout.vllm.kv_cache_memory_bytes={1 << 27}",
]  # fmt: skip


@pytest.fixture(scope="module")
def qa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_color_qa(tmp_path_factory.mktemp("rlqa") / "data", 2, 0, seed=0, size=56)


@pytest.fixture(scope="module")
def qa4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_color_qa(tmp_path_factory.mktemp("rlqa4") / "data", 4, 0, seed=0, size=56)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cfg(qa: Path, reward: str, *sets: str) -> RLConfig:
    base = [
        "model.path=tiny", f"data.qa={qa}", "data.split=sft", "data.frames=4", "data.max_pixels=3136",
        "rollout.n=2", "rollout.max_new_tokens=6", "rollout_batch=2", "update_batch=1",
        "micro_batch=4", "steps=2", "optim.lr=0.01", "device=cpu", "precision=fp32",
        "progress=false", "keep_last=0", "save_every=1", *VLLM,
    ]  # fmt: skip
    cfg = load_config(RLConfig, None, base + list(sets))
    cfg.rewards = [{"fn": reward, "weight": 1.0}, {"fn": "format", "weight": 0.1}]
    return cfg


def _run(cfg: RLConfig, run: Path, resume: bool = False) -> tuple[RLRun, dict]:
    """`run_rl`, keeping the run state (policy + engine) to probe afterwards."""
    kept: dict[str, RLRun] = {}
    setup = recipe.setup

    def spy(*args: object, **kwargs: object) -> RLRun:
        kept["st"] = setup(*args, **kwargs)
        return kept["st"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(recipe, "setup", spy)
        manifest = run_rl(cfg, run, resume=resume)
    return kept["st"], manifest


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "rl/metrics.jsonl").read_text().splitlines()]


def _probe(model: torch.nn.Module) -> PromptInput:
    """A synthetic video prompt for the tiny VLM (the tower is frozen: same embeddings throughout)."""
    return model_prompt(model, frames=4, size=56, seed=1)


def _first(engine: object, prompt: PromptInput) -> tuple[int, float]:
    """Greedy first token and its log-prob."""
    out = engine.generate([prompt], n=1, temperature=0.0, top_p=1.0, max_new_tokens=1, seed=0)
    return int(out.response_ids[0][0]), float(out.logprobs[0][0])


def _assert_engine_follows_policy(st: RLRun, run: Path) -> None:
    prompt = _probe(st.model)
    st.model.eval()
    tok_v, lp_v = _first(st.sampler, prompt)
    tok_p, lp_p = _first(HFRolloutEngine(st.model, st.eos_ids, st.pad_id), prompt)
    init, _ = load_vlm(run / "models/tiny-vlm", dtype=torch.float32)
    tok_0, lp_0 = _first(HFRolloutEngine(init, st.eos_ids, st.pad_id), prompt)
    print(f"vllm {tok_v} {lp_v:.5f}  policy {tok_p} {lp_p:.5f}  initial {tok_0} {lp_0:.5f}")
    assert tok_v == tok_p and abs(lp_v - lp_p) < 1e-2  # the engine samples the trained policy
    assert tok_0 != tok_p or abs(lp_0 - lp_p) > 5e-2  # ... which moved: a stale engine would fail


def _assert_finite(rows: list[dict]) -> None:
    for r in rows:
        for k in ("reward/mean", "pg_loss", "grad_norm", "entropy", "sync_s"):
            assert torch.isfinite(torch.tensor(float(r[k]))), (k, r[k])


@pytest.mark.timeout(1800)
def test_vllm_rollouts_full_finetune_sync_and_resume(qa, tmp_path, signal_reward):
    run_a = tmp_path / "a"
    st, manifest = _run(_cfg(qa, signal_reward), run_a)
    rows = _metrics(run_a)
    assert [r["step"] for r in rows] == [1, 2] and manifest["optimizer_steps"] == 4
    _assert_finite(rows)
    assert rows[-1]["weight_syncs"] == 2.0
    _assert_engine_follows_policy(st, run_a)
    del st
    # resume from checkpoint 1 in another folder: the engine starts from its weights, so step 2
    # samples exactly what run a sampled after its first weight sync
    run_b = tmp_path / "b"
    (run_b / "rl").mkdir(parents=True)
    shutil.copytree(run_a / "rl/checkpoint-000001", run_b / "rl/checkpoint-000001")
    st_b, resumed = _run(_cfg(qa, signal_reward), run_b, resume=True)
    assert resumed["start_step"] == 1
    last_a, last_b = rows[-1], _metrics(run_b)[-1]
    for k in ("reward/mean", "response_len/mean", "pg_loss"):
        assert last_b[k] == pytest.approx(last_a[k], abs=1e-5), k
    _assert_engine_follows_policy(st_b, run_b)


@pytest.mark.timeout(1200)
def test_vllm_rollouts_lora_sync(qa, tmp_path, signal_reward):
    pytest.importorskip("peft")
    lora = ("model.lora=true", "model.lora_r=4", "model.lora_alpha=8", "optim.lr=0.05")
    st, _ = _run(_cfg(qa, signal_reward, *lora), tmp_path / "lora")
    rows = _metrics(tmp_path / "lora")
    assert [r["step"] for r in rows] == [1, 2]
    _assert_finite(rows)
    _assert_engine_follows_policy(st, tmp_path / "lora")


WORKER = """
import json, sys
from pathlib import Path


def main() -> None:  # under `if __name__`: each vLLM engine process is spawned from this file
    from lvr.config import load_config
    from lvr.mrsp.rollout import HFRolloutEngine
    from lvr.mrsp.synthetic import model_prompt
    from lvr.train.common import finish_distributed
    from lvr.train.rl import RLConfig, recipe, run_rl

    kept = {}
    setup = recipe.setup

    def spy(*args, **kwargs):
        kept["st"] = setup(*args, **kwargs)
        return kept["st"]

    recipe.setup = spy
    run = Path(sys.argv[1])
    run_rl(load_config(RLConfig, None, json.loads(sys.argv[2])), run)
    st = kept["st"]
    out = {"rank": st.info.rank, "engine": type(st.sampler).__name__ if st.sampler else None}
    if st.sampler is not None:  # greedy first token of a probe: this engine vs the policy
        prompt = model_prompt(st.model, frames=4, size=56, seed=1)
        st.model.eval()
        for name, engine in (("vllm", st.sampler),
                             ("policy", HFRolloutEngine(st.model, st.eos_ids, st.pad_id))):
            o = engine.generate([prompt], n=1, temperature=0.0, top_p=1.0, max_new_tokens=1, seed=0)
            out[name] = [int(o.response_ids[0][0]), float(o.logprobs[0][0])]
    (run / f"engine-rank{st.info.rank}.json").write_text(json.dumps(out))
    finish_distributed(st.info)


if __name__ == "__main__":
    main()
"""


@pytest.mark.timeout(1800)
def test_an_engine_per_dp_group_equals_one_process(qa4, tmp_path, signal_reward):
    """dp = 2 (2 processes, sp_size 1): each group's leader runs its own vLLM engine, samples its
    own prompts from its cached embeddings and gets the new weights after every step; the run
    equals the 1-process vLLM run (the rollout seeds follow the global prompt index)."""
    (tmp_path / "worker.py").write_text(WORKER)
    sets = [
        "model.path=tiny", f"data.qa={qa4}", "data.split=sft", "data.frames=4",
        "data.max_pixels=3136", "rollout.n=2", "rollout.max_new_tokens=6", "rollout_batch=4",
        "update_batch=2", "micro_batch=2", "steps=2", "optim.lr=0.01", "device=cpu",
        "precision=fp32", "progress=false", "keep_last=0", "save_every=1", *VLLM,
        f'rewards=[{{"fn": "{signal_reward}", "weight": 1.0}}, {{"fn": "format", "weight": 0.1}}]',
    ]  # fmt: skip
    # this checkout's lvr first (a reused vLLM venv may hold another checkout's editable install)
    path = os.pathsep.join([str(REPO), str(tmp_path), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    worker = [str(tmp_path / "worker.py")]
    one = subprocess.run([sys.executable, *worker, str(tmp_path / "one"), json.dumps(sets)],
                         env=env, capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2",
                "--master_port", str(_free_port())]  # fmt: skip
    two = subprocess.run([*torchrun, *worker, str(tmp_path / "two"), json.dumps([*sets, "sp_size=1"])],
                         env=env, capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    engines = [json.loads((tmp_path / f"two/engine-rank{r}.json").read_text()) for r in (0, 1)]
    assert [e["engine"] for e in engines] == ["VLLMRolloutEngine"] * 2  # one per DP group
    for e in engines:  # each engine samples the trained policy, not the starting weights
        assert e["vllm"][0] == e["policy"][0] and abs(e["vllm"][1] - e["policy"][1]) < 1e-2, e
    m1, m2 = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert len(m1) == len(m2) == 2 and m1[0]["reward/std"] > 0
    for r1, r2 in zip(m1, m2, strict=True):
        for key in ("reward/mean", "reward/std", "response_len/mean", "weight_syncs", "opt_steps"):
            assert r2[key] == r1[key], key  # the same rollouts from two engines as from one
        for key in ("pg_loss", "grad_norm", "entropy"):
            assert r2[key] == pytest.approx(r1[key], rel=1e-4, abs=1e-6), key


def test_unknown_vllm_argument_is_a_clear_error():
    with pytest.raises(MrspError, match="did you mean 'rollout.vllm.gpu_memory_utilization'"):
        engines.check_vllm({"gpu_memory_util": 0.3})
    with pytest.raises(MrspError, match="model is set from model.path"):
        engines.check_vllm({"model": "x"})
