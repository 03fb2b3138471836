"""Caption stage: annotations (sidecars, files), the openai backend against the loopback fault server,
retries of failed rows only, and SIGKILL mid-stage followed by a resume."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from backend_server import fake_server

from lvr.artifacts import read_table
from lvr.config import load_config
from lvr.datagen.caption import run_caption
from lvr.datagen.config import DatagenConfig
from lvr.datagen.segment import run_segment
from lvr.datagen.synthetic import VideoSpec, read_sidecar, render_video
from lvr.layout import RunLayout
from lvr.stages import manifest_name
from lvr.testing.fake_server import FaultConfig

SPEC = {
    "duration_s": 6.0,
    "fps": 24.0,
    "width": 96,
    "height": 64,
    "gop": 24,
    "scene_len_s": (1.5, 2.5),
    "encoder_threads": 1,  # same bytes on every run: the server's seeded fault draws are then fixed
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("cap_videos")
    for i in range(2):
        render_video(d / f"v{i}.mp4", VideoSpec(**SPEC, seed=40 + i))
    return d


def segmented(videos: Path, run: Path, *sets: str) -> DatagenConfig:
    cfg = load_config(
        DatagenConfig, None, [f"input.source={videos}", "shards.videos_per_shard=1", *sets]
    )
    run_segment(cfg, run, progress=False)
    return cfg


def captions(run: Path) -> list[dict[str, Any]]:
    return read_table(run / "captions", "captions").to_pylist()


def test_annotations_from_sidecars(videos: Path, tmp_path: Path) -> None:
    cfg = segmented(videos, tmp_path, "segment.stride_s=2.5", "segment.min_clip_s=1",
                    "caption.backend=annotations", "caption.annotations=sidecar")  # fmt: skip
    result = run_caption(cfg, tmp_path, progress=False)
    rows = captions(tmp_path)
    clips = read_table(tmp_path / "clips").to_pylist()
    assert len(rows) == len(clips) == result.rows["captions"] and result.errors["captions"] == 0
    paths = {c["clip_id"]: c["video_path"] for c in clips}
    durations = {
        v["video_id"]: v["duration_s"] for v in read_table(tmp_path / "videos").to_pylist()
    }
    for r in rows:
        # a caption carries what qa needs of its video
        assert (
            r["video_path"] == paths[r["clip_id"]] and r["duration_s"] == durations[r["video_id"]]
        )
        scenes = read_sidecar(paths[r["clip_id"]])["clips"]
        want = [
            s["caption"]
            for s in scenes
            if min(s["end_s"], r["end_s"]) > max(s["start_s"], r["start_s"])
        ]
        assert r["caption"] == " ".join(want) and r["backend"] == "annotations"


def test_annotation_files_shot2story_csv_and_misses(videos: Path, tmp_path: Path) -> None:
    cfg = segmented(videos, tmp_path, "segment.stride_s=3")
    v0, v1 = sorted(videos.glob("*.mp4"))
    ann = tmp_path / "ann"
    ann.mkdir()
    # Shot2Story style: shot names carry frame ranges (24 fps: frames 0-47 = [0, 2) s); v0 is
    # annotated only up to 4 s, so its clip [3, 6) overlaps the second shot and nothing else.
    (ann / "shots.json").write_text(json.dumps([{
        "video": v0.name, "captions": ["a dog runs", "a cat sleeps"],
        "video_names": [f"{v0.stem}_0_47.mp4", f"{v0.stem}_48_95.mp4"],
    }]))  # fmt: skip
    with (ann / "other.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["video_path", "start", "end", "text"])
        w.writerow([str(v1), 0, 1, "first second"])
    cfg.caption = load_config(
        DatagenConfig, None, ["caption.backend=annotations", f"caption.annotations={ann}"]
    ).caption
    run_caption(cfg, tmp_path, progress=False)
    rows = sorted(captions(tmp_path), key=lambda r: (r["video_id"], r["start_s"]))
    by_start = {(r["start_s"], r["caption"], r["error"] is None) for r in rows}
    assert (0.0, "a dog runs a cat sleeps", True) in by_start
    assert (3.0, "a cat sleeps", True) in by_start
    assert (0.0, "first second", True) in by_start
    miss = [r for r in rows if r["error"]]
    assert len(miss) == 1 and "no annotated segment overlaps [3, 6)" in miss[0]["error"]


def test_openai_backend_with_faults_then_retry_only_failures(videos: Path, tmp_path: Path) -> None:
    # Faults are drawn from hash(seed, body, attempt): deterministic for these (deterministic)
    # videos; 35% keeps "some but not all of 12 fail" far from luck (P(none) ~ 0.6%).
    faults = FaultConfig(rate=0.35, seed=7, timeout_sleep_s=1.5)
    with fake_server(faults=faults) as server:
        cfg = segmented(videos, tmp_path, "segment.stride_s=1", "caption.backend=openai",
                        "caption.model=fake-model", "caption.frames=2",
                        f"caption.options={{base_url: '{server.url}', max_retries: 0, timeout_s: 0.5, "
                        "concurrency: 4, unreachable_after: 0}")  # fmt: skip
        first = run_caption(cfg, tmp_path, progress=False)
        rows = captions(tmp_path)
        clips = read_table(tmp_path / "clips").to_pylist()
        assert sorted(r["clip_id"] for r in rows) == sorted(c["clip_id"] for c in clips)  # 12 clips
        assert all((r["caption"] is None) != (r["error"] is None) for r in rows)
        failed = {r["clip_id"] for r in rows if r["error"]}
        assert 0 < len(failed) < len(rows), "35% faults on 12 single-attempt calls should fail some"
        assert first.errors["captions"] == len(failed)
        bodies_first = {a.body_hash for a in server.log}
        failed_bodies = {a.body_hash for a in server.log if a.body_hash not in
                         {b.body_hash for b in server.log if b.outcome == "ok"}}  # fmt: skip
        n_before = len(server.log)

        run_caption(cfg, tmp_path, progress=False)
        second = server.log[n_before:]
        assert (
            second and {a.body_hash for a in second} <= failed_bodies
        )  # only the failures were sent
        assert all(a.attempt >= 2 for a in second)
        assert {a.body_hash for a in second} <= bodies_first
        again = {r["clip_id"]: r for r in captions(tmp_path)}
        assert len(again) == len(rows)
        ok_before = {r["clip_id"]: r["caption"] for r in rows if r["error"] is None}
        assert all(
            again[c]["caption"] == text for c, text in ok_before.items()
        )  # cache hits unchanged
        assert sum(r["error"] is not None for r in again.values()) < len(failed)


def _caption_cmd(run: Path, url: str) -> list[str]:
    return [sys.executable, "-m", "lvr.cli", "datagen", "caption", "--run", str(run), "-q",
            "--set", "caption.backend=openai", "--set", "caption.model=fake-model",
            "--set", "caption.frames=2", "--set", f"caption.options.base_url={url}",
            "--set", "caption.options.concurrency=1"]  # fmt: skip


def test_sigkill_mid_caption_then_resume_matches_uninterrupted(
    videos: Path, tmp_path: Path
) -> None:
    base = tmp_path / "base"
    segmented(videos, base, "segment.stride_s=1")
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    for d in (killed, clean):
        shutil.copytree(base, d)  # the segment stage's tables and markers
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with fake_server(latency_s=0.25) as server:
        proc = subprocess.Popen(_caption_cmd(killed, server.url), env=env, stderr=subprocess.PIPE)
        deadline = time.time() + 60
        while len(server.log) < 8 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        os.kill(
            proc.pid, signal.SIGKILL
        )  # mid-stage: the first shard (6 clips) is done, the second is not
        proc.wait()
        done = sorted((killed / "_stages" / "caption" / "_done").glob("*.json"))
        assert len(done) < 2, "the kill came too late to interrupt the stage"
        n_killed = len(server.log)
        subprocess.run(_caption_cmd(killed, server.url), env=env, check=True, capture_output=True)
        resumed_calls = len(server.log) - n_killed
        subprocess.run(_caption_cmd(clean, server.url), env=env, check=True, capture_output=True)

    def content(run: Path) -> list[tuple[Any, ...]]:
        return sorted((r["clip_id"], r["video_id"], r["start_s"], r["end_s"], r["caption"], r["error"],
                       r["prompt_version"], r["frames"]) for r in captions(run))  # fmt: skip

    got, want = content(killed), content(clean)
    assert got == want and len(want) == 12
    assert len({r[0] for r in got}) == len(got)  # no duplicates
    assert resumed_calls < 12  # calls answered before the kill came from the cache


def _openai_sets(url: str, *extra: str) -> list[str]:
    return ["segment.stride_s=1", "caption.backend=openai", "caption.model=fake-model",
            "caption.frames=2", f"caption.options.base_url={url}", *extra]  # fmt: skip


def test_request_cache_survives_a_new_number_of_shards(videos: Path, tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    with fake_server() as server:
        cfg = segmented(videos, tmp_path, *_openai_sets(server.url))
        for i in range(2):  # two machines, each with its own cache file
            run_caption(cfg, tmp_path, i, 2, progress=False)
        want = sorted((r["clip_id"], r["caption"]) for r in captions(tmp_path))
        paid = len(server.log)
        assert paid == len(want) == 12
        for n in (1, 3):  # the same job again on 1, then 3 machines: every answer is a hit
            shutil.rmtree(layout.captions)  # the stage's table and bookkeeping, not the cache
            shutil.rmtree(layout.stage("caption"))
            for i in range(n):
                run_caption(cfg, tmp_path, i, n, progress=False)
            assert sorted((r["clip_id"], r["caption"]) for r in captions(tmp_path)) == want
            manifests = list(layout.stage("caption").glob("manifest*.json"))
            hits = sum(
                json.loads(m.read_text())["usage"].get("fake-model", {}).get("cache_hits", 0)
                for m in manifests
            )
            assert hits == 12
        assert len(server.log) == paid  # nothing was sent twice
    names = {p.name for p in layout.cache.glob("*.sqlite")}
    assert layout.request_cache(1, 2).name in names
    assert {"requests-0of2.sqlite", "requests-1of2.sqlite", "requests.sqlite"} <= names


def test_concurrent_shards_share_one_request_budget(videos: Path, tmp_path: Path) -> None:
    """Two machines of a 2-shard run, concurrently: together they stay within the job's RPM."""
    from concurrent.futures import ThreadPoolExecutor

    rpm = 480  # 8 requests/s for the job, 4/s per shard
    with fake_server() as server:
        sets = _openai_sets(server.url, f"caption.options.max_requests_per_minute={rpm}",
                            "segment.stride_s=0.5")  # fmt: skip
        cfg = segmented(videos, tmp_path, *sets)
        with ThreadPoolExecutor(2) as pool:
            done = [pool.submit(run_caption, cfg, tmp_path, i, 2, progress=False) for i in range(2)]
            assert [f.result().rows["captions"] for f in done] == [12, 12]
        times = sorted(a.t for a in server.log)
    assert len(times) == 24
    # The busiest 2-second window: at most 2 s x 8/s, plus one call per machine at the edge.
    busiest = max(sum(t0 <= t < t0 + 2.0 for t in times) for t0 in times)
    assert busiest <= 2 * rpm / 60 + 2, busiest
    overall = (len(times) - 1) / (times[-1] - times[0]) * 60
    assert overall <= rpm * 1.05, overall
    for i in range(2):
        manifest = RunLayout(tmp_path).manifest("caption", manifest_name(i, 2))
        limits = json.loads(manifest.read_text())["rate_limits"]
        assert limits == {"max_requests_per_minute": rpm, "max_tokens_per_minute": None, "share": 0.5,
                          "process_requests_per_minute": rpm / 2, "process_tokens_per_minute": None,
                          "num_shards": 2}  # fmt: skip


def test_manifest_and_inspect_report_usage_and_cost(videos: Path, tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from lvr.inspection import inspect_path

    faults = FaultConfig(rate=0.3, kinds=("500", "missing_fields"), seed=4)
    price = "prices={fake-model: {prompt_per_1m: 0.5, completion_per_1m: 2.0}}"
    with fake_server(faults=faults) as server:
        cfg = segmented(videos, tmp_path, *_openai_sets(server.url, price,
                        "caption.options.max_retries=1", "caption.options.concurrency=4"))  # fmt: skip
        run_caption(cfg, tmp_path, progress=False)
        first = list(server.log)
        errors = sum(r["error"] is not None for r in captions(tmp_path))
        run_caption(cfg, tmp_path, progress=False)  # redoes the shards with error rows
        second = server.log[len(first) :]
    manifest = json.loads(RunLayout(tmp_path).manifest("caption").read_text())
    now, total = manifest["usage"]["fake-model"], manifest["usage_total"]["fake-model"]
    billed = [a.usage for a in first + second if a.usage]
    assert total["attempts"] == len(first) + len(second) and total["sent"] >= 12
    assert total["prompt_tokens"] == sum(b["prompt_tokens"] for b in billed)
    assert total["completion_tokens"] == sum(b["completion_tokens"] for b in billed)
    assert now["attempts"] == len(second) and now["cache_hits"] > 0  # this invocation only
    assert total["failures"] >= errors and total["retries"] == total["attempts"] - total["sent"]
    want = (0.5 * total["prompt_tokens"] + 2.0 * total["completion_tokens"]) / 1e6
    assert total["cost"] == pytest.approx(want, abs=1e-6) and total["cost"] > 0
    out = io.StringIO()
    inspect_path(tmp_path, samples=0, console=Console(file=out, width=250))
    text = out.getvalue()
    assert "model calls" in text and "fake-model" in text and str(total["prompt_tokens"]) in text
    assert f"cost per input video: {want / 2:.6g}" in text
