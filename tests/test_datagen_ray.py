"""`lvr datagen` on Ray (real Ray, started locally): the rows of a local run, resumes across
executors, a worker killed mid-shard, and one request budget shared by concurrent workers."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from backend_server import fake_server

from lvr.artifacts import read_table
from lvr.config import load_config
from lvr.datagen import caption, qa, segment
from lvr.datagen.config import DatagenConfig
from lvr.datagen.ray_executor import RayExecutor, RayExecutorError
from lvr.datagen.runner import run_datagen_stage

ray = pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TABLES = (("videos", "video_id"), ("clips", "clip_id"), ("captions", "clip_id"),
          ("qa_raw", "qa_id"))  # fmt: skip
CHAIN = (segment.STAGE, caption.STAGE, qa.STAGE)


def lvr(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lvr.cli", *args], env=env, cwd=REPO, text=True,
                          capture_output=True)  # fmt: skip


def rows(run: Path, table: str, key: str) -> list[dict[str, Any]]:
    """A table's rows by key, with the run folder's own path (inputs, clips) made relative."""
    out = []
    for row in read_table(run / table, table).sort_by(key).to_pylist():
        out.append({k: v.replace(str(run), "<run>") if isinstance(v, str) else v
                    for k, v in row.items()})  # fmt: skip
    return out


def test_ray_run_writes_the_rows_of_a_local_run(tmp_path: Path) -> None:
    """The issue's check: the demo config on Ray into A equals the local run into B, and a local
    rerun on A finds every shard finished (the markers are the same)."""
    demo = ("--config", "configs/datagen/demo.yaml", "-q")
    on_ray = lvr("datagen", "run", *demo, "--run", str(tmp_path / "A"), "--executor", "ray")
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    local = lvr("datagen", "run", *demo, "--run", str(tmp_path / "B"))
    assert local.returncode == 0, local.stderr[-3000:]
    for table, key in (*TABLES, ("qa", "qa_id"), ("qa_rejected", "qa_id")):
        a, b = rows(tmp_path / "A", table, key), rows(tmp_path / "B", table, key)
        assert a == b, table
    assert len(rows(tmp_path / "A", "qa", "qa_id")) > 24
    manifest = json.loads((tmp_path / "A/_stages/caption/manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["executor"]["kind"] == "ray"
    again = lvr("datagen", "run", *demo, "--run", str(tmp_path / "A"))
    assert again.returncode == 0 and again.stdout.count("0 shards run") == 3, again.stdout


def test_executor_user_errors_are_one_line(tmp_path: Path) -> None:
    run = str(tmp_path / "r")
    cases = [
        (["--executor", "ray", "--shard", "0", "--num-shards", "2"], "drop --shard/--num-shards"),
        (["--executor", "spark"], "--executor must be local or ray"),
        (["--address", "auto"], "--address and --workers go with --executor ray"),
    ]
    for args, message in cases:
        out = lvr("datagen", "run", "--config", "configs/datagen/demo.yaml", "--run", run, *args)
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------------
# In-process Ray (one local cluster of 2 CPUs for the tests below)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def executor() -> Iterator[RayExecutor]:
    """A local Ray with 2 workers; its workers import `ray_faults` from this folder."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), old) if p)
    try:
        with RayExecutor(workers=2) as ex:
            yield ex
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lvr.datagen.synthetic import make_videos

    src = tmp_path_factory.mktemp("ray_videos")
    make_videos(src, 4, seed=6, duration_s=6.0, width=96, height=64, fps=12.0, encoder_threads=1)
    return src


def _cfg(videos: Path, *sets: str) -> DatagenConfig:
    base = [f"input.source={videos}", "shards.videos_per_shard=1", "segment.stride_s=2",
            "caption.backend=annotations", "caption.annotations=sidecar", "qa.backend=template",
            "qa.categories=[{name: temporal, share: 1}]", "filter.category_shares={}"]  # fmt: skip
    return load_config(DatagenConfig, None, base + list(sets))


def _chain(cfg: DatagenConfig, run: Path, stages: tuple = CHAIN, **kwargs: Any) -> list[Any]:
    return [run_datagen_stage(s, cfg, run, progress=False, **kwargs) for s in stages]


def test_worker_killed_mid_shard_is_retried_with_the_same_rows(
    executor: RayExecutor, videos: Path, tmp_path: Path
) -> None:
    cfg = _cfg(videos)
    _chain(cfg, tmp_path / "local")
    # the video of caption shard 00002: its first attempt dies halfway through
    victim = read_table(tmp_path / "local/clips/00002.parquet", "clips").column("video_id")[0]
    from ray_faults import CrashOnce

    marker = tmp_path / "crashed"
    crashing = dataclasses.replace(
        caption.STAGE, open_worker=CrashOnce(caption.make_captioner, victim.as_py(), marker)
    )
    results = _chain(cfg, tmp_path / "ray", (segment.STAGE, crashing, qa.STAGE), executor=executor)
    assert marker.is_file(), "no worker died: the retry path was not exercised"
    assert int(marker.read_text()) != os.getpid()  # a Ray worker process died, not this one
    assert [r.shards_run for r in results] == [4, 4, 4]
    for table, key in TABLES:
        assert rows(tmp_path / "ray", table, key) == rows(tmp_path / "local", table, key), table
    assert not list((tmp_path / "ray").rglob("*.tmp-*"))


def test_a_shard_that_keeps_killing_its_worker_is_reported_and_resumed(
    executor: RayExecutor, videos: Path, tmp_path: Path
) -> None:
    """With no restarts left, the shard stays unfinished (one line at the end, after the other
    shards); the next run does just that shard."""
    cfg = _cfg(videos)
    run = tmp_path / "run"
    _chain(cfg, run, CHAIN[:1], executor=executor)
    victim = read_table(run / "clips/00001.parquet", "clips").column("video_id")[0].as_py()
    from ray_faults import CrashOnce

    crashing = dataclasses.replace(
        caption.STAGE, open_worker=CrashOnce(caption.make_captioner, victim, tmp_path / "crashed")
    )
    no_retries = RayExecutor(workers=2, max_retries=0)  # the fixture's Ray is already running
    with pytest.raises(RayExecutorError, match=r"caption: shards 00001 were not finished"):
        run_datagen_stage(crashing, cfg, run, progress=False, executor=no_retries)
    assert sorted(p.name for p in (run / "_stages/caption/_done").iterdir()) == [
        "00000.json",
        "00002.json",
        "00003.json",
    ]
    again = run_datagen_stage(caption.STAGE, cfg, run, progress=False, executor=executor)
    assert (again.shards_run, again.shards_skipped) == (1, 3)


def test_slurm_shards_and_ray_resume_each_other(
    executor: RayExecutor, videos: Path, tmp_path: Path
) -> None:
    """Machine 1 of 2 runs its shards the Slurm-array way; Ray finishes exactly the others."""
    cfg = _cfg(videos)
    _chain(cfg, tmp_path / "local")
    run = tmp_path / "mixed"
    _chain(cfg, run, shard=1, num_shards=2)
    # (retry_errors off: the template writer leaves error rows, which would reopen shards)
    done = _chain(cfg, run, executor=executor, retry_errors=False)
    assert [(r.shards_run, r.shards_skipped) for r in done] == [(2, 2)] * 3
    for table, key in TABLES:
        assert rows(run, table, key) == rows(tmp_path / "local", table, key), table
    # a local rerun finds everything finished
    assert [r.shards_run for r in _chain(cfg, run, retry_errors=False)] == [0, 0, 0]


def test_concurrent_workers_share_one_request_budget(
    executor: RayExecutor, videos: Path, tmp_path: Path
) -> None:
    """Two Ray workers send the qa calls of 4 shards at once; the server sees the job's limit,
    not twice it (each worker alone would be allowed the whole limit)."""
    limit = 240  # requests per minute: one every 0.25 s
    with fake_server() as server:
        opts = f"{{base_url: '{server.url}', max_requests_per_minute: {limit}, concurrency: 8}}"
        cfg = _cfg(videos, "qa.backend=openai", "qa.model=fake-model", f"qa.options={opts}",
                   "qa.questions_per_video=8", "qa.min_captions=1")  # fmt: skip
        run = tmp_path / "budget"
        _chain(cfg, run, CHAIN[:2])
        result = run_datagen_stage(qa.STAGE, cfg, run, progress=False, executor=executor)
        arrivals = sorted(a.t for a in server.log)
    assert result.shards_run == 4 and result.rows["qa_raw"] == 32
    assert len(arrivals) == 32
    per_minute = 60 * (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    print(f"measured {per_minute:.1f} requests/min for a limit of {limit}")
    assert per_minute <= limit * 1.05
    # both workers sent calls (each wrote its own request cache)
    counts = {}
    for f in sorted((run / "cache").glob("requests-ray*.sqlite")):
        with sqlite3.connect(f) as conn:
            counts[f.name] = conn.execute("SELECT count(*) FROM responses").fetchone()[0]
    assert len(counts) == 2 and all(n > 0 for n in counts.values()) and sum(counts.values()) == 32
    manifest = json.loads((run / "_stages/qa/manifest.json").read_text())
    assert manifest["rate_limits"]["shared_by"] == "ray actor"
    assert manifest["rate_limits"]["max_requests_per_minute"] == limit
    usage = manifest["usage"]["fake-model"]
    assert (usage["sent"], usage["attempts"], usage["failures"]) == (32, 32, 0)
    # The fake answers fail our QA parser (error rows), so a rerun redoes the shards: every call
    # is a hit in one of the workers' caches, whichever worker takes which shard this time.
    again = run_datagen_stage(qa.STAGE, cfg, run, progress=False, executor=executor)
    usage = json.loads((run / "_stages/qa/manifest.json").read_text())["usage"]["fake-model"]
    assert again.shards_run == 4 and (usage["cache_hits"], usage["sent"]) == (32, 0)


@pytest.mark.slow
def test_address_joins_a_running_cluster(tmp_path: Path) -> None:
    """``--address``: a cluster started with ``ray start --head`` runs the job and stays up.

    Token authentication is Ray's own business between a cluster and its clients; this loopback
    cluster and its client both opt out of it (RAY_AUTH_MODE=disabled)."""
    import contextlib
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    ray_bin = Path(sys.executable).parent / "ray"
    head = subprocess.Popen([str(ray_bin), "start", "--head", "--port", str(port), "--num-cpus",
                             "2", "--include-dashboard", "false", "--block"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    try:
        run = tmp_path / "run"
        args = ["datagen", "run", "--config", "configs/datagen/demo.yaml", "--run", str(run),
                "-q", "--executor", "ray", "--address", f"127.0.0.1:{port}"]  # fmt: skip
        for _ in range(30):  # the head takes a few seconds to listen
            out = subprocess.run([sys.executable, "-m", "lvr.cli", *args], env=env, cwd=REPO,
                                 text=True, capture_output=True)  # fmt: skip
            if "could not start the Ray cluster" not in out.stderr:
                break
            time.sleep(2)
        assert out.returncode == 0, out.stderr[-3000:]
        assert head.poll() is None  # the cluster is left running
        manifest = json.loads((run / "_stages/qa/manifest.json").read_text())
        assert manifest["executor"]["address"] == f"127.0.0.1:{port}"
        assert read_table(run / "qa_raw", "qa_raw").num_rows == 48
    finally:  # the head and the processes it started: this session's process group only
        os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=20)
        time.sleep(3)
        with contextlib.suppress(ProcessLookupError):  # what SIGTERM left behind
            os.killpg(head.pid, signal.SIGKILL)
        # `ray start` records its cluster for later `ray.init()` calls; this one is gone
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()
