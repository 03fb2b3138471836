"""Throughput of the `openai` backend on caption- and QA-shaped requests against the loopback server.

    .venv/bin/python benchmarks/api_stage.py [--requests 2000] [--latency 0.2] [--concurrency 64]

The fake OpenAI-compatible server runs in its own process (asyncio, fixed latency per request), so the
ideal throughput is concurrency / latency (64 / 0.2 s = 320 req/s). Measured side by side in one run:

- ours: `OpenAIBackend` (aiohttp transport, retries, RPM/TPM limiter off, JSON parse + schema
  validation of every output, per-row usage accounting), default options except concurrency;
- baseline: the idiomatic script people write: `asyncio.gather` over all rows with an
  `asyncio.Semaphore(concurrency)` around `AsyncOpenAI.chat.completions.create` (typed response,
  the client's own retries, no validation), then `json.loads` of each content;
- info only: ours behind the persistent request cache (one SQLite commit per answer, as in the
  caption and qa stages), a sequential loop with retries (the other common script) on a small
  subset, and ours at 5% injected faults (all fault kinds) to show that no row is lost;
- the Ray executor (``--ray-workers 2``, 0 skips it): the real qa stage (`run_datagen_stage` with a
  `RayExecutor`) over a run whose captions give the same number of requests, `--ray-workers`
  workers of ``concurrency / workers`` calls each (the same c in flight in all), the request
  cache and the shard files written as in a real run. Two rates: the whole stage (planning,
  worker start, every shard written, manifest: what a user waits for) and the steady state
  (first to last answer stored in the workers' request caches: what the executor sustains once
  its workers are up). The local Ray is started before the clock starts (once per job).

Target: ours >= 90% of the bound with 0 rows lost, and the Ray executor's steady state >= 90% of
the bound with every call answered. Note: 2 cores shared by server and client (and by whatever else
runs on the machine), so the CPU time per request of the client and of the server process are
reported too (they do not depend on the load the way wall time does). With Ray the same 2 cores
also run the Ray processes (GCS, raylet) and the driver.
The last line is the JSON summary (``ray``: the Ray executor's numbers).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lvr.backends import Request, make_backend

CAPTION = {
    "type": "object",
    "required": ["caption"],
    "properties": {"caption": {"type": "string", "maxLength": 400}},
}
QA = {
    "type": "object",
    "required": ["question", "options", "answer", "reasoning", "evidence"],
    "properties": {
        "question": {"type": "string"},
        "options": {"type": "array", "items": {"type": "string"}, "minItems": 4, "maxItems": 4},
        "answer": {"type": "string", "enum": ["A", "B", "C", "D"]},
        "reasoning": {"type": "string"},
        "evidence": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["start_s", "end_s"],
                "properties": {"start_s": {"type": "number"}, "end_s": {"type": "number"}},
            },
        },
    },
}


def make_requests(n: int) -> list[Request]:
    """Half caption-shaped, half QA-shaped requests (QA prompts carry 6 timestamped captions)."""
    reqs = []
    for i in range(n):
        if i % 2:
            text = (
                f"Elaborate on the visual and narrative elements of clip {i} in detail. "
                f"From {i} to {i + 10}, a person walks a dog past a red car."
            )
            reqs.append(
                Request(f"clip-{i}", [{"role": "user", "content": text}], json_schema=CAPTION)
            )
        else:
            lines = "\n".join(
                f"From {10 * k} to {10 * k + 10}, event {k} of video {i} happens" for k in range(6)
            )
            text = f"Category: temporal.\n{lines}\nWrite one hard multiple-choice question."
            reqs.append(Request(f"video-{i}", [{"role": "user", "content": text}], json_schema=QA))
    return reqs


def start_server(latency: float, fault_rate: float = 0.0) -> tuple[subprocess.Popen, str]:
    cmd = [
        sys.executable,
        "-m",
        "lvr.testing.fake_server",
        "--latency",
        str(latency),
        "--fault-rate",
        str(fault_rate),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    if not line.startswith("URL "):
        proc.kill()
        raise RuntimeError(f"fake server did not start: {line!r}")
    return proc, line.split()[1]


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def process_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of another process so far (Linux /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def runqueue_wait_s(pid: int | str = "self") -> float:
    """Seconds the process's main thread spent runnable but waiting for a CPU (Linux schedstat).

    On a machine shared with other work this shows how much of a shortfall is CPU starvation.
    """
    try:
        with open(f"/proc/{pid}/schedstat") as fh:
            return int(fh.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


def run_ours(
    url: str, reqs: list[Request], concurrency: int, cache: Path | None = None, **opts: Any
) -> dict[str, Any]:
    backend = make_backend(
        "openai", "fake-model", cache, base_url=url, concurrency=concurrency, **opts
    )
    c0, w0, t0 = cpu_s(), runqueue_wait_s(), time.perf_counter()
    res = backend.run(reqs, progress=False)
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    return {
        "cpu_wait_s": runqueue_wait_s() - w0,
        "req_s": len(reqs) / wall,
        "wall_s": wall,
        "ok": sum(r.ok for r in res),
        "rows": len(res),
        "errors": sum(not r.ok for r in res),
        "attempts": sum(r.attempts for r in res),
        "cpu_ms_per_req": 1000 * cpu / len(reqs),
        "ids_match": [r.item_id for r in res] == [q.item_id for q in reqs],
    }


def _kwargs(req: Request) -> dict[str, Any]:
    fmt = {"type": "json_schema", "json_schema": {"name": "output", "schema": req.json_schema}}
    return {
        "model": "fake-model",
        "messages": req.messages,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "response_format": fmt,
    }


async def _gather(url: str, reqs: list[Request], concurrency: int) -> list[Any]:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="EMPTY")
    sem = asyncio.Semaphore(concurrency)

    async def one(req: Request) -> Any:
        async with sem:
            try:
                out = await client.chat.completions.create(**_kwargs(req))
                return json.loads(out.choices[0].message.content)
            except Exception as exc:  # the naive script just records the exception
                return exc

    try:
        return await asyncio.gather(*(one(r) for r in reqs))
    finally:
        await client.close()


def run_gather(url: str, reqs: list[Request], concurrency: int) -> dict[str, Any]:
    c0, t0 = cpu_s(), time.perf_counter()
    out = asyncio.run(_gather(url, reqs, concurrency))
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    ok = sum(not isinstance(o, Exception) for o in out)
    return {
        "req_s": len(reqs) / wall,
        "wall_s": wall,
        "ok": ok,
        "rows": len(out),
        "cpu_ms_per_req": 1000 * cpu / len(reqs),
    }


def run_sequential(url: str, reqs: list[Request]) -> dict[str, Any]:
    import openai

    client = openai.OpenAI(base_url=url, api_key="EMPTY", max_retries=3)
    t0, ok = time.perf_counter(), 0
    for req in reqs:
        out = client.chat.completions.create(**_kwargs(req))
        ok += bool(json.loads(out.choices[0].message.content))
    wall = time.perf_counter() - t0
    return {"req_s": len(reqs) / wall, "wall_s": wall, "ok": ok, "rows": len(reqs)}


QUESTIONS_PER_VIDEO = 8  # qa calls per video in the Ray measurement


def write_captions(run: Path, videos: int, shards: int) -> None:
    """A finished caption stage: ``videos`` videos of 6 captions each, in ``shards`` shards."""
    from lvr.artifacts import rows_to_table
    from lvr.stages import Shard, Stage

    stage = Stage(run, "caption")
    per = -(-videos // shards)
    for k in range(shards):
        rows = [
            {"clip_id": f"c{v}-{j}", "video_id": f"v{v:05d}", "video_path": f"/videos/v{v}.mp4",
             "duration_s": 60.0, "start_s": 10.0 * j, "end_s": 10.0 * j + 10, "backend": "openai",
             "caption": f"In scene {j} of video {v} a person walks a dog past a red car.",
             "model": "m", "prompt_version": "p", "frames": 8, "attempts": 1, "latency_s": 0.2,
             "error": None}
            for v in range(k * per, min((k + 1) * per, videos)) for j in range(6)
        ]  # fmt: skip
        stage.write_shard(Shard(k, [k]), {"captions": rows_to_table(rows, "captions")})


def cache_window_s(cache_dir: Path) -> tuple[int, float]:
    """(answers stored, seconds from the first to the last) over every request cache of a run."""
    stamps: list[float] = []
    for f in cache_dir.glob("requests*.sqlite"):
        with sqlite3.connect(f) as conn:
            stamps += [t for (t,) in conn.execute("SELECT created_at FROM responses")]
    return len(stamps), (max(stamps) - min(stamps)) if stamps else float("nan")


def run_ray(url: str, requests: int, concurrency: int, workers: int) -> dict[str, Any]:
    """The qa stage on the Ray executor: ``requests`` calls, ``concurrency`` in flight in all."""
    from lvr.config import load_config
    from lvr.datagen import qa
    from lvr.datagen.config import DatagenConfig
    from lvr.datagen.ray_executor import RayExecutor
    from lvr.datagen.runner import run_datagen_stage

    videos = requests // QUESTIONS_PER_VIDEO
    opts = f"{{base_url: '{url}', concurrency: {concurrency // workers}}}"
    sets = ["qa.backend=openai", "qa.model=fake-model", f"qa.options={opts}",
            f"qa.questions_per_video={QUESTIONS_PER_VIDEO}", "qa.min_captions=1",
            "qa.categories=[{name: temporal, share: 1}]"]  # fmt: skip
    cfg = load_config(DatagenConfig, None, sets)
    with tempfile.TemporaryDirectory() as tmp, RayExecutor(workers=workers) as executor:
        run = Path(tmp) / "run"
        write_captions(run, videos, shards=4 * workers)  # a few shards per worker: a queue
        t0 = time.perf_counter()
        result = run_datagen_stage(qa.STAGE, cfg, run, progress=False, executor=executor)
        wall = time.perf_counter() - t0
        stored, window = cache_window_s(run / "cache")
        manifest = json.loads((run / "_stages/qa/manifest.json").read_text())
    usage = manifest["usage"]["fake-model"]
    n = videos * QUESTIONS_PER_VIDEO
    return {
        "req_s": n / wall,
        "steady_req_s": (stored - 1) / window,
        "wall_s": wall,
        "rows": result.rows["qa_raw"],
        "sent": usage["sent"],
        "failures": usage["failures"],
        "attempts": usage["attempts"],
        "workers": workers,
        "shards": result.shards_run,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="openai backend throughput vs the loopback server")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--sequential", type=int, default=25, help="rows for the sequential loop")
    ap.add_argument("--ray-workers", type=int, default=2, help="Ray executor workers (0: skip)")
    args = ap.parse_args()
    bound = args.concurrency / args.latency
    reqs = make_requests(args.requests)
    proc, url = start_server(args.latency)
    try:
        run_ours(url, reqs[:128], args.concurrency)  # warm-up: imports, connections
        server_wait, server_cpu = runqueue_wait_s(proc.pid), process_cpu_s(proc.pid)
        ours = run_ours(url, reqs, args.concurrency)
        ours["server_cpu_wait_s"] = runqueue_wait_s(proc.pid) - server_wait
        ours["server_cpu_ms_per_req"] = 1000 * (process_cpu_s(proc.pid) - server_cpu) / len(reqs)
        with tempfile.TemporaryDirectory() as tmp:
            cached = run_ours(url, reqs, args.concurrency, cache=Path(tmp) / "requests.sqlite")
        base = run_gather(url, reqs, args.concurrency)
        seq = run_sequential(url, reqs[: args.sequential])
        on_ray = (
            run_ray(url, args.requests, args.concurrency, args.ray_workers)
            if args.ray_workers
            else None
        )
    finally:
        proc.terminate()
        proc.wait()
    proc, url = start_server(args.latency, fault_rate=0.05)
    try:  # timeouts: the server stalls 5 s, the client gives up after 2 s and retries
        faulty = run_ours(url, reqs, args.concurrency, timeout_s=2.0, backoff_base_s=0.1)
    finally:
        proc.terminate()
        proc.wait()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"bound (concurrency / latency): {bound:.0f} req/s, {args.requests} requests; "
        f"machine load average (1/5/15 min) at the end: {load} on {os.cpu_count()} cores"
    )
    for name, r in [
        ("ours", ours),
        ("ours + request cache", cached),
        ("baseline gather+semaphore", base),
        ("sequential loop (subset)", seq),
        ("ours, 5% faults", faulty),
        *([("Ray executor (qa stage)", on_ray)] if on_ray else []),
    ]:
        print(
            f"{name:28s} "
            + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()})
        )
    lost = args.requests - ours["rows"] + args.requests - faulty["rows"]
    lost += (not ours["ids_match"]) + (not faulty["ids_match"])
    met = ours["req_s"] >= 0.9 * bound and lost == 0 and ours["ok"] == args.requests
    summary: dict[str, Any] = {
        "benchmark": "api_stage",
        "metric": f"requests/s ({args.concurrency} concurrent, {1000 * args.latency:.0f} ms)",
        "ours": round(ours["req_s"], 1),
        "baseline": round(base["req_s"], 1),
        "ratio": round(ours["req_s"] / base["req_s"], 3),
        "target": f">= {0.9 * bound:.0f} req/s (90% of bound), 0 rows lost; Ray executor: "
        "steady state >= 90% of bound, every call answered",
        "met": bool(met),
    }
    if on_ray:
        ray_met = on_ray["steady_req_s"] >= 0.9 * bound and on_ray["failures"] == 0
        ray_met = ray_met and on_ray["sent"] == on_ray["rows"] == on_ray["attempts"]
        summary["met"] = bool(met and ray_met)
        summary["ray"] = {"stage_req_s": round(on_ray["req_s"], 1),
                          "steady_req_s": round(on_ray["steady_req_s"], 1),
                          "steady_of_bound": round(on_ray["steady_req_s"] / bound, 3),
                          "workers": on_ray["workers"], "met": bool(ray_met)}  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
