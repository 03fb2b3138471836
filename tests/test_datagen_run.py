"""`lvr datagen` end to end: the demo config through the real CLI, sharding over two "machines",
config presets, and user errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from backend_server import fake_server

from lvr.artifacts import read_table
from lvr.config import load_config
from lvr.datagen.caption import run_caption
from lvr.datagen.config import DatagenConfig
from lvr.datagen.qa import run_qa
from lvr.datagen.segment import run_segment

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "configs" / "datagen").glob("*.yaml"))


def lvr(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lvr.cli", *args], env=env, cwd=REPO, text=True,
                          capture_output=True, check=check)  # fmt: skip


def test_demo_config_end_to_end(tmp_path: Path) -> None:
    run = tmp_path / "demo"
    out = lvr("datagen", "run", "--config", "configs/datagen/demo.yaml", "--run", str(run), "-q")
    assert "filter:" in out.stdout, out.stdout + out.stderr
    videos = read_table(run / "videos", "videos")
    clips = read_table(run / "clips", "clips")
    caps = read_table(run / "captions", "captions")
    raw = read_table(run / "qa_raw", "qa_raw")
    qa = read_table(run / "qa", "qa")
    assert videos.num_rows == 6 and clips.num_rows > 12 and caps.num_rows == clips.num_rows
    assert raw.num_rows == 48 and qa.num_rows > 24
    assert set(qa.column("split").to_pylist()) <= {"sft", "rl", "eval"}
    for stage in ("segment", "caption", "qa", "filter"):
        manifest = run / "_stages" / stage / "manifest.json"
        assert json.loads(manifest.read_text())["status"] == "done"
    again = lvr("datagen", "run", "--config", "configs/datagen/demo.yaml", "--run", str(run), "-q")
    assert again.stdout.count("0 shards run") == 3  # everything resumed from markers
    exported = lvr("datagen", "export", "--run", str(run), "--split", "rl")
    records = (run / "export" / "rl.jsonl").read_text().splitlines()
    assert records and str(len(records)) in exported.stdout
    rec = json.loads(records[0])
    assert list(rec) == [
        "problem_id",
        "problem",
        "data_type",
        "problem_type",
        "reasoning",
        "videos",
        "answer",
    ]


def test_two_machines_equal_one(tmp_path: Path) -> None:
    """Shards k % 2 == i on machine i, each running the whole chain, give the single-run rows."""
    from lvr.datagen.synthetic import make_videos

    src = tmp_path / "videos"
    make_videos(src, 5, seed=4, duration_s=6.0, width=96, height=64, fps=12.0, encoder_threads=1)
    sets = [f"input.source={src}", "shards.videos_per_shard=1", "segment.stride_s=2",
            "caption.backend=annotations", "caption.annotations=sidecar", "qa.backend=template",
            "qa.categories=[{name: temporal, share: 1}]", "filter.category_shares={}"]  # fmt: skip
    cfg = load_config(DatagenConfig, None, sets)

    def chain(run: Path, i: int, n: int) -> None:
        run_segment(cfg, run, i, n, progress=False)
        run_caption(cfg, run, i, n, progress=False)
        run_qa(cfg, run, i, n, progress=False)

    chain(tmp_path / "one", 0, 1)
    shared = tmp_path / "two"
    chain(shared, 1, 2)  # machine 1 first: it must not need machine 0's outputs
    assert sorted(p.name for p in (shared / "qa_raw").glob("*.parquet")) == [
        "00001.parquet",
        "00003.parquet",
    ]
    chain(shared, 0, 2)
    for table, key in (("videos", "video_id"), ("clips", "clip_id"), ("captions", "clip_id"),
                       ("qa_raw", "qa_id")):  # fmt: skip
        a = read_table(tmp_path / "one" / table, table).sort_by(key).to_pylist()
        b = read_table(shared / table, table).sort_by(key).to_pylist()
        assert a == b, table
        assert len({r[key] for r in b}) == len(b)


_NO_TORCH = """
import sys
from lvr.cli import app
try:
    app(sys.argv[1:])
except SystemExit as exc:
    if exc.code:
        raise
heavy = [m for m in ("torch", "transformers") if m in sys.modules]
sys.exit(f"imported {heavy}" if heavy else 0)
"""


def test_api_backends_chain_imports_no_torch(tmp_path: Path) -> None:
    """The core install's path: segment -> caption/qa over an OpenAI-compatible server -> filter
    runs end to end without importing torch or transformers."""
    from lvr.datagen.synthetic import make_videos

    src = tmp_path / "videos"
    make_videos(src, 2, seed=3, duration_s=4.0, width=96, height=64, fps=12.0, encoder_threads=1)
    with fake_server() as server:
        opts = f"{{base_url: '{server.url}'}}"
        sets = [f"input.source={src}", "segment.stride_s=2", "caption.backend=openai",
                "caption.model=fake-model", "caption.frames=2", f"caption.options={opts}",
                "qa.backend=openai", "qa.model=fake-model", "qa.questions_per_video=2",
                f"qa.options={opts}", "filter.min_reasoning_chars=1"]  # fmt: skip
        args = ["datagen", "run", "--run", str(tmp_path / "run"), "-q"]
        res = subprocess.run([sys.executable, "-c", _NO_TORCH, *args, *[a for s in sets for a in ("--set", s)]],
                             cwd=REPO, text=True, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    assert "captions 4 rows (0 errors)" in res.stdout and "filter:" in res.stdout, res.stdout


def test_show_config_and_user_errors(tmp_path: Path) -> None:
    shown = lvr("datagen", "segment", "--config", "configs/datagen/demo.yaml", "--show-config")
    assert "method: shots" in shown.stdout and "backend: template" in shown.stdout
    bad = lvr("datagen", "segment", "--set", "segment.stide_s=3", check=False)
    assert bad.returncode == 2 and "segment.stride_s" in bad.stderr
    missing = lvr("datagen", "caption", "--run", str(tmp_path / "nothing"), "--set", "caption.model=m",
                  check=False)  # fmt: skip
    assert missing.returncode == 2 and "lvr datagen segment" in missing.stderr
    shard = lvr(
        "datagen",
        "segment",
        "--set",
        f"input.source={tmp_path}",
        "--shard",
        "2",
        "--num-shards",
        "2",
        check=False,
    )
    assert shard.returncode == 2 and "--shard" in shard.stderr
    cats = lvr("datagen", "qa", "--set", "qa.categories=[{name: cooking, share: 1}]", check=False)
    assert cats.returncode == 2 and "filter.category_shares" in cats.stderr


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_load_and_open_with_their_command(preset: Path) -> None:
    first = preset.read_text().splitlines()[0]
    assert first.startswith("# lvr datagen ") and f"configs/datagen/{preset.name}" in first
    cfg = load_config(DatagenConfig, preset)
    assert cfg.qa.categories and cfg.segment.max_clip_s > 0
    from lvr.datagen import caption, qa
    from lvr.datagen.runner import check_stages

    # prompts, options, models: what `lvr datagen run` checks before any work
    check_stages([caption.STAGE, qa.STAGE], cfg)


def test_presets_cover_the_domains() -> None:
    assert {p.stem for p in PRESETS} >= {"demo", "general", "sports", "games", "vlogs"}


def test_ctrl_c_says_how_to_resume(tmp_path: Path) -> None:
    """Ctrl-C inside a command: Typer exits 130 without a word; lvr names the way back."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    args = ["datagen", "run", "--config", str(REPO / "configs/datagen/demo.yaml"),
            "--run", str(tmp_path / "run"), "--set", "input.synthetic.videos=400"]  # fmt: skip
    # A test run started in the background by a script (`make test &`) inherits an ignored SIGINT,
    # which Python then keeps ignoring; a terminal's Ctrl-C reaches a process that has the default.
    proc = subprocess.Popen([sys.executable, "-m", "lvr.cli", *args], env=env, cwd=REPO, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    inputs = tmp_path / "run" / "inputs"
    while proc.poll() is None and not list(inputs.glob("*.mp4")):  # until inside the command
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert stderr.strip().splitlines()[-1] == (
        "interrupted: finished shards are kept; rerun the same command to resume"
    )
