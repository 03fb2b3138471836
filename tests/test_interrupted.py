"""Long commands killed by real signals, then run again: the result equals an uninterrupted run's.

Each test starts the real `lvr` command in its own process group, waits until it is inside the
work (a shard marker, a metrics line), sends the signal the way a user or a scheduler does (Slurm
preemption: SIGTERM to the whole job; OOM: SIGKILL) and reruns it. Compared with an uninterrupted
run: the rows, the skipped-sample log and counts, the checkpoint weights, and what was printed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
DATAGEN = ["datagen", "run", "--config", str(REPO / "configs/datagen/demo.yaml"), "-q",
           "--set", "shards.videos_per_shard=1"]  # fmt: skip


def lvr(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lvr.cli", *map(str, args)], env=ENV, cwd=REPO,
                          text=True, capture_output=True)  # fmt: skip


def interrupt(args: list[object], ready: Callable[[], bool], sig: int) -> tuple[int, str]:
    """Start `lvr *args`, send `sig` to its whole process group once `ready()`; (code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "lvr.cli", *map(str, args)], env=ENV, cwd=REPO,
                            text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # fmt: skip
    while proc.poll() is None and not ready():
        time.sleep(0.05)
    assert proc.poll() is None, "the command finished before it could be interrupted"
    os.killpg(proc.pid, sig)
    _, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr


def table_rows(run: Path, table: str) -> list[str]:
    """A table's rows as sorted JSON lines, the run folder's own path written as RUN."""
    import pyarrow.parquet as pq

    rows = [
        r for f in sorted((run / table).glob("*.parquet")) for r in pq.read_table(f).to_pylist()
    ]
    return sorted(json.dumps(r, sort_keys=True, default=str).replace(str(run), "RUN") for r in rows)


def test_sigterm_mid_stage_is_an_interruption_and_the_rerun_completes_it(tmp_path: Path) -> None:
    """SIGTERM (Slurm preemption) used to kill the process on the spot: the stage manifest kept
    saying "running" and nothing said how to resume. Now it ends as Ctrl-C does."""
    run, full = tmp_path / "run", tmp_path / "full"
    markers = run / "_stages/segment/_done"
    code, stderr = interrupt([*DATAGEN, "--run", run],
                             lambda: len(list(markers.glob("*.json"))) >= 1, signal.SIGTERM)  # fmt: skip
    assert code == 128 + signal.SIGTERM, stderr
    assert stderr.strip().splitlines()[-1] == (
        "interrupted: finished shards are kept; rerun the same command to resume"
    )
    manifest = json.loads((run / "_stages/segment/manifest.json").read_text())
    assert manifest["status"] == "interrupted"
    done = len(list(markers.glob("*.json")))
    again = lvr(*DATAGEN, "--run", run)
    assert again.returncode == 0, again.stderr
    assert f"segment: {6 - done} shards run, {done} skipped" in again.stdout, again.stdout
    assert lvr(*DATAGEN, "--run", full).returncode == 0
    for table in ("videos", "clips", "captions", "qa_raw", "qa", "qa_rejected"):
        assert table_rows(run, table) == table_rows(full, table), table
    for stage in ("segment", "caption", "qa", "filter"):
        ours, theirs = (json.loads((r / f"_stages/{stage}/manifest.json").read_text())
                        for r in (run, full))  # fmt: skip
        assert ours["status"] == "done" and ours["rows"] == theirs["rows"], stage


# --- training: killed between checkpoints, resumed -----------------------------------------------


@pytest.fixture(scope="module")
def qa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four decodable sft rows and one video that does not decode (a skipped sample)."""
    from lvr.demo.color_task import make_color_qa

    return make_color_qa(tmp_path_factory.mktemp("qa") / "data", 4, 0, size=56, bad_videos=1)


def _metric_steps(run: Path, stage: str) -> list[int]:
    path = run / stage / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}")]


def _outcome(run: Path, stage: str) -> dict:
    """What a finished run left: skipped log, manifest counts and skips, metrics, final weights."""
    from safetensors.torch import load_file

    manifest = json.loads((run / stage / "manifest.json").read_text())
    metrics = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]
    drop = ("_s", "tokens_per_s")  # timings differ between any two runs
    return {
        "skipped_log": (run / stage / "skipped.jsonl").read_text().replace(str(run), "RUN"),
        "skipped": manifest["skipped"],
        "counts": manifest["counts"],
        "metrics": [{k: v for k, v in m.items() if not k.endswith(drop)} for m in metrics],
        "weights": load_file(Path(manifest["final_checkpoint"]) / "model.safetensors"),
    }


def _same(resumed: dict, full: dict) -> None:
    import torch

    for key in ("skipped_log", "skipped", "counts"):
        assert resumed[key] == full[key], key
    assert len(resumed["metrics"]) == len(full["metrics"])
    for ours, theirs in zip(resumed["metrics"], full["metrics"], strict=True):
        assert ours.keys() == theirs.keys()
        for k, v in theirs.items():
            assert ours[k] == pytest.approx(v, abs=1e-6), (ours["step"], k)
    for name, w in full["weights"].items():
        assert torch.allclose(resumed["weights"][name], w, atol=1e-6), name


@pytest.mark.slow
def test_sft_sigterm_between_checkpoints_resumes_to_the_uninterrupted_result(
    qa: Path, tmp_path: Path
) -> None:
    """The bad video is skipped in step 5; killed after step 6, resumed from checkpoint 4:
    step 5 runs again and its skip used to be logged and counted twice."""
    run, full = tmp_path / "run", tmp_path / "full"
    args = ["sft", "-c", REPO / "configs/sft/tiny_cpu.yaml", "--set", f"data.qa={qa}",
            "--set", "max_steps=8", "--set", "save_every=4", "--set", "micro_batch=1",
            "--set", "keep_last=0", "--set", "progress=false", "--set", "data.num_workers=1"]  # fmt: skip
    code, stderr = interrupt([*args, "-r", run], lambda: 6 in _metric_steps(run, "sft"),
                             signal.SIGTERM)  # fmt: skip
    assert code == 128 + signal.SIGTERM, stderr
    assert "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (
        "interrupted: finished checkpoints are kept; rerun with --resume to continue from the "
        "latest one"
    )
    assert [p.name for p in (run / "sft").glob("checkpoint-*")] == ["checkpoint-000004"]
    resumed = lvr(*args, "-r", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert lvr(*args, "-r", full).returncode == 0
    summary = [line for line in resumed.stdout.splitlines() if line.startswith("sft done:")]
    assert summary and "; 1 samples skipped (1 x decode" in summary[0], resumed.stdout
    assert summary[0].startswith("sft done: 8 steps, resumed from checkpoint-000004 at step 4,")
    _same(_outcome(run, "sft"), _outcome(full, "sft"))


@pytest.mark.slow
def test_rl_sigkill_between_checkpoints_resumes_to_the_uninterrupted_result(
    qa: Path, tmp_path: Path
) -> None:
    """OOM-killed (SIGKILL) after step 4, whose questions included the bad video, resumed from
    checkpoint 3: step 4's skip is logged and counted once."""
    run, full = tmp_path / "run", tmp_path / "full"
    small = ["data.frames=4", "data.max_pixels=3136", "rollout.n=2", "rollout.max_new_tokens=6",
             "rollout_batch=2", "update_batch=1", "micro_batch=4", "progress=false", "steps=6",
             "save_every=3", "keep_last=0", f"data.qa={qa}", "data.split=sft", "model.path=tiny"]  # fmt: skip
    args = [
        "rl",
        "-c",
        REPO / "configs/rl/tiny_cpu.yaml",
        *[x for s in small for x in ("--set", s)],
    ]
    code, _ = interrupt([*args, "-r", run], lambda: 4 in _metric_steps(run, "rl"), signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert [p.name for p in (run / "rl").glob("checkpoint-*")] == ["checkpoint-000003"]
    resumed = lvr(*args, "-r", run, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert lvr(*args, "-r", full).returncode == 0
    assert "optimizer steps), resumed from checkpoint-000003 at step 3, reward" in resumed.stdout
    ours, theirs = _outcome(run, "rl"), _outcome(full, "rl")
    assert theirs["counts"]["skipped_decode"] >= 2  # steps 2 and 4 drew the bad video
    _same(ours, theirs)
