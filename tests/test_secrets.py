"""API keys never reach a file: datagen, eval and rl run folders are grepped byte for byte (manifests,
SQLite caches, Parquet, metrics) after runs against a loopback server that requires the key."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from backend_server import fake_server

from lvr.artifacts import read_table, rows_to_table, write_parquet
from lvr.backends import BackendError
from lvr.backends.openai_backend import resolve_api_key
from lvr.config import config_hash, load_config, to_dict, to_yaml
from lvr.datagen.config import DatagenConfig
from lvr.layout import RunLayout
from lvr.secrets import REDACTED, redact, scrub
from lvr.testing.fake_server import FaultConfig

REPO = Path(__file__).resolve().parents[1]
# A fresh key per session: a leftover file from another run cannot make the grep pass or fail.
KEY = f"sk-lvrtest-{secrets.token_hex(20)}"


def files_holding(root: Path, needle: str) -> list[Path]:
    """Every file under ``root`` whose bytes contain ``needle`` (also as UTF-16, as some tools
    write)."""
    raw, wide = needle.encode(), needle.encode("utf-16-le")
    hits = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if raw in data or wide in data:
            hits.append(path)
    return hits


def lvr(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("LVR_API_KEY", "OPENAI_API_KEY")}
    return subprocess.run([sys.executable, "-m", "lvr.cli", *args], cwd=REPO, text=True,
                          capture_output=True, env={**base, "HF_HUB_OFFLINE": "1", **(env or {})})  # fmt: skip


def test_redact_masks_secret_names_env_values_and_url_passwords(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    tree = {
        "caption": {"options": {"api_key": "sk-direct-123456", "max_tokens_per_minute": 9000}},
        "rewards": [
            {"fn": "judged_accuracy", "args": {"api_key": "sk-judge-123456", "model": "m"}}
        ],
        "headers": {"Authorization": "Bearer xyz123456"},
        "base_url": "https://user:hunter22@api.example.com/v1",
        "note": f"copied {KEY} by mistake",
        "max_tokens": 512,
        "token": "",  # unset stays unset
    }
    out = redact(tree)
    assert out["caption"]["options"] == {"api_key": REDACTED, "max_tokens_per_minute": 9000}
    assert out["rewards"][0]["args"] == {"api_key": REDACTED, "model": "m"}
    assert out["headers"]["Authorization"] == REDACTED
    assert out["base_url"] == "https://***@api.example.com/v1"
    assert out["note"] == f"copied {REDACTED} by mistake"
    assert (out["max_tokens"], out["token"]) == (512, "")
    assert scrub(f"HTTP 401: key {KEY} rejected") == f"HTTP 401: key {REDACTED} rejected"
    assert scrub("boom sk-own-987654", ["sk-own-987654"]) == f"boom {REDACTED}"


def test_config_dumps_and_hash_never_hold_the_key() -> None:
    sets = [f"caption.options.api_key={KEY}", f"qa.options={{api_key: {KEY}, concurrency: 4}}"]
    cfg = load_config(DatagenConfig, None, sets)
    assert cfg.caption.options["api_key"] == KEY  # the run itself still has it
    assert KEY not in str(to_dict(cfg)) and KEY not in to_yaml(cfg)
    assert to_dict(cfg)["qa"]["options"] == {"api_key": REDACTED, "concurrency": 4}
    other = load_config(DatagenConfig, None, ["caption.options.api_key=sk-other-key-000"])
    other.qa.options = {"api_key": "sk-other-key-000", "concurrency": 4}
    assert config_hash(cfg) == config_hash(other)  # rotating a key changes no fingerprint
    shown = lvr("datagen", "caption", "--show-config", "--set", f"caption.options.api_key={KEY}")
    assert shown.returncode == 0 and KEY not in shown.stdout + shown.stderr
    assert f"api_key: {REDACTED}" in shown.stdout


def test_a_redacted_key_reads_the_environment_or_fails_clearly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("LVR_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(BackendError, match=r"api_key is '<redacted>'.*LVR_API_KEY"):
        resolve_api_key(REDACTED)
    monkeypatch.setenv("LVR_API_KEY", f" {KEY}\n")  # as read by $(cat keyfile)
    assert resolve_api_key(REDACTED) == KEY == resolve_api_key(None)


@pytest.fixture(scope="module")
def small_videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lvr.datagen.synthetic import make_videos

    src = tmp_path_factory.mktemp("secret_videos")
    make_videos(src, 2, seed=9, duration_s=4.0, width=96, height=64, fps=12.0, encoder_threads=1)
    return src


def _datagen_sets(src: Path, url: str, key_in_config: bool) -> list[str]:
    key = f", api_key: {KEY}" if key_in_config else ""
    # max_retries 0 keeps the injected 500s (which quote the Authorization header) as error rows.
    opts = f"{{base_url: '{url}', max_retries: 0, concurrency: 4{key}}}"
    sets = [f"input.source={src}", "segment.stride_s=2", "caption.backend=openai",
            "caption.model=fake-model", "caption.frames=2", f"caption.options={opts}",
            "qa.backend=openai", "qa.model=fake-model", f"qa.options={opts}",
            "qa.questions_per_video=2", "qa.categories=[{name: temporal, share: 1}]",
            "filter.category_shares={}", "prices={fake-model: {prompt_per_1m: 1, completion_per_1m: 2}}"]  # fmt: skip
    return [arg for s in sets for arg in ("--set", s)]


@pytest.mark.parametrize("where", ["config", "env"])
def test_datagen_run_folder_holds_no_copy_of_the_key(
    small_videos: Path, tmp_path: Path, where: str
) -> None:
    run = tmp_path / "run"
    env = {"LVR_API_KEY": KEY} if where == "env" else {}
    faults = FaultConfig(rate=0.3, kinds=("500",), seed=3)
    with fake_server(faults=faults, api_key=KEY, echo_auth=True) as server:
        sets = _datagen_sets(small_videos, server.url, where == "config")
        out = lvr("datagen", "run", "--run", str(run), "-q", *sets, env=env)
        assert out.returncode == 0, out.stderr
        assert "filter:" in out.stdout
        echoed = [a for a in server.log if a.outcome == "500"]
        # The error rows of this first run (the rerun below may retry them all successfully).
        layout = RunLayout(run)
        errors = [r["error"] for r in read_table(layout.captions, "captions").to_pylist()]
        errors += [r["error"] for r in read_table(layout.qa_raw, "qa_raw").to_pylist()]
        rerun = lvr("datagen", "run", "--run", str(run), "-q", *sets, env=env)  # retries errors
        assert rerun.returncode == 0, rerun.stderr
        # A wrong key on a fresh caption stage (the rerun above may have left nothing to send).
        bad_run = RunLayout(tmp_path / "bad")
        for table in ("videos", "clips"):  # the segment stage: its tables and markers
            shutil.copytree(layout.table(table), bad_run.table(table))
        shutil.copytree(layout.stage("segment"), bad_run.stage("segment"))
        bad = lvr("datagen", "caption", "--run", str(bad_run.root), "-q", *sets, "--set",
                  "caption.options.api_key=sk-wrong-key-0123456789", env=env)  # fmt: skip
    # The server quoted the key in some 500s; those rows say it was there, never what it was.
    assert echoed, "no injected 500 quoted the key: the scrubbing was not exercised"
    assert any(e and REDACTED in e for e in errors)
    # A wrong key is one line naming the problem, without the key.
    assert bad.returncode != 0 and "rejected the API key" in bad.stderr
    assert "sk-wrong-key-0123456789" not in bad.stderr + bad.stdout
    assert "Traceback" not in bad.stderr
    assert layout.request_cache().is_file() and list(run.rglob("*.parquet"))
    assert files_holding(tmp_path, KEY) == []
    for proc in (out, rerun, bad):
        assert KEY not in proc.stdout + proc.stderr


def test_eval_run_folder_holds_no_copy_of_the_env_key(
    short_video: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lvr.eval.config import EvalConfig, JudgeConfig
    from lvr.eval.runner import run_eval

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    base = {"video_id": "v", "duration_s": 6.0, "category": "goal", "split": "eval",
            "generator": "g", "prompt_version": "p", "video_path": str(short_video)}  # fmt: skip
    rows = [
        {**base, "qa_id": "mc1", "format": "mc", "question": "Which?", "options": ["x", "y", "z"], "answer": "B"},
        {**base, "qa_id": "open1", "format": "open", "question": "What moves?", "options": [], "answer": "a circle"},
    ]  # fmt: skip
    write_parquet(RunLayout(tmp_path).qa / "00000.parquet", rows_to_table(rows, "qa"), "qa")
    with fake_server(api_key=KEY) as server:
        cfg = EvalConfig(model="openai:fake-model", benchmark="qa", base_url=server.url, frames=[2],
                         bootstrap=20, judge=JudgeConfig(model="fake-model", base_url=server.url))  # fmt: skip
        res = run_eval(cfg, tmp_path, progress=False)[0]
        assert len(server.log) >= 2  # the key was accepted: rows were answered
    assert res.out_dir.is_dir() and files_holding(tmp_path, KEY) == []
    # eval has no api_key setting: giving one is a one-line config error, and it is not echoed.
    bad = lvr("eval", "run", "--model", "openai:fake-model", "--set", f"api_key={KEY}",
              "--run", str(tmp_path))  # fmt: skip
    assert bad.returncode != 0 and "unknown config key 'api_key'" in bad.stderr
    assert KEY not in bad.stdout + bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_rl_judge_key_stays_out_of_manifest_and_metrics(tmp_path: Path) -> None:
    """A tiny RL run with the judged reward's key in `rewards[].args` (model build ~10 s)."""
    from lvr.demo.color_task import make_color_qa
    from lvr.train.rl import RLConfig, run_rl

    qa = make_color_qa(tmp_path / "data", 2, 0, seed=0, size=56)
    with fake_server(api_key=KEY) as server:
        sets = ["model.path=tiny", f"data.qa={qa}", "data.split=sft", "data.frames=4",
                "data.max_pixels=3136", "rollout.n=2", "rollout.max_new_tokens=4", "rollout_batch=2",
                "update_batch=2", "micro_batch=4", "steps=1", "device=cpu", "precision=fp32",
                "progress=false", "keep_last=0", "save_every=1"]  # fmt: skip
        cfg = load_config(RLConfig, None, sets)
        judge = {"model": "fake-model", "base_url": server.url, "api_key": KEY}
        cfg.rewards = [{"fn": "judged_accuracy", "weight": 1.0, "args": judge}]
        manifest = run_rl(cfg, tmp_path / "run")
    assert manifest["config"]["rewards"][0]["args"]["api_key"] == REDACTED
    assert (RunLayout(tmp_path / "run").rl / "metrics.jsonl").is_file()
    assert files_holding(tmp_path / "run", KEY) == []
