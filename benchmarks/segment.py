"""Benchmark: shot detection throughput and boundary F1, ours vs PySceneDetect's ContentDetector.

Run:  .venv/bin/python benchmarks/segment.py [--videos 6] [--minutes 5] [--repeats 3] [--cache DIR]

Both detectors run on the same synthetic H.264 videos (default 6 x 5 min, 320x240, 24 fps: 30 min
of video with hard cuts every 2-6 s, moving shapes, panning texture and noise), rendered once into
``$LVR_CACHE/bench/segment`` (default ``~/.cache/lvr/bench/segment``) and reused. Ground truth is
``cuts_s`` of each sidecar.

- ours: ``lvr.datagen.shots.detect_shots`` with default settings;
- baseline: ``scenedetect.detect(path, ContentDetector())``, PySceneDetect's default settings
  (OpenCV backend, threshold 27, min scene length 15 frames, automatic downscaling).

Throughput = seconds of video per second of wall time, the best of ``--repeats`` runs per video (the
machine is shared: the minimum is the least disturbed run), summed over videos. F1 is pooled over
all cuts with a +-0.5 s tolerance (one-to-one matching). CPU seconds (all threads) are reported
too: on a shared machine they are the steadier comparison (both detectors decode with one thread
by default). Last line: one JSON object; target: ours >= 3x the baseline throughput (wall) with
F1 >= 0.95.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lvr.datagen.shots import count_matches, detect_shots, f1_from_counts
from lvr.datagen.synthetic import make_videos, read_sidecar

TARGET_RATIO = 3.0
TARGET_F1 = 0.95


def ours(path: Path) -> list[float]:
    return detect_shots(path).cuts_s


def pyscenedetect(path: Path) -> list[float]:
    from scenedetect import ContentDetector, detect

    scenes = detect(str(path), ContentDetector())
    return [start.seconds for start, _ in scenes[1:]]


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads included."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def best_time(
    fn: Callable[[Path], list[float]], path: Path, repeats: int
) -> tuple[float, float, list[float]]:
    """(fastest wall time, fastest CPU time over ``repeats`` runs, cuts of the last run)."""
    walls, cpus, cuts = [], [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), cpu_seconds()
        cuts = fn(path)
        walls.append(time.perf_counter() - t)
        cpus.append(cpu_seconds() - c)
    return min(walls), min(cpus), cuts


METHODS: dict[str, Callable[[Path], list[float]]] = {"ours": ours, "pyscenedetect": pyscenedetect}


@dataclass
class Totals:
    """Sums over videos per method: wall and CPU seconds, matched/predicted/true cut counts."""

    wall: dict[str, float] = field(default_factory=lambda: dict.fromkeys(METHODS, 0.0))
    cpu: dict[str, float] = field(default_factory=lambda: dict.fromkeys(METHODS, 0.0))
    counts: dict[str, list[int]] = field(default_factory=lambda: {k: [0, 0, 0] for k in METHODS})
    video_s: float = 0.0


def measure_video(path: Path, index: int, repeats: int, tot: Totals) -> str:
    """Run both methods on one video, add to the totals, return a one-line summary."""
    side = read_sidecar(path)
    truth, duration = side["cuts_s"], float(side["duration_s"])
    tot.video_s += duration
    line = [f"{path.name}: {duration:.0f} s, {len(truth)} cuts"]
    # Alternate the order per video so neither method always runs on a warm page cache.
    order = list(METHODS.items())[:: -1 if index % 2 else 1]
    for name, fn in order:
        seconds, cpu, cuts = best_time(fn, path, repeats)
        tp = count_matches(cuts, truth, 0.5)
        for i, v in enumerate((tp, len(cuts), len(truth))):
            tot.counts[name][i] += v
        tot.wall[name] += seconds
        tot.cpu[name] += cpu
        f1 = f1_from_counts(tp, len(cuts), len(truth))[2]
        line.append(f"{name} {seconds:.2f} s wall, {cpu:.2f} s CPU "
                    f"({duration / seconds:.0f}x realtime, F1 {f1:.3f})")  # fmt: skip
    return "; ".join(line)


def summary(tot: Totals) -> dict[str, object]:
    """Print per-method totals; return the result object of the last line."""
    f1 = {k: f1_from_counts(*v) for k, v in tot.counts.items()}
    speed = {k: tot.video_s / v for k, v in tot.wall.items()}
    ratio = speed["ours"] / speed["pyscenedetect"]
    for k in METHODS:
        p, r, f = f1[k]
        print(f"{k}: {tot.wall[k]:.1f} s wall ({tot.cpu[k]:.1f} s CPU) for {tot.video_s / 60:.0f} min "
              f"of video = {speed[k]:.0f} video-s/s; precision {p:.4f} recall {r:.4f} F1 {f:.4f}")  # fmt: skip
    return {
        "benchmark": "segment_shot_detection",
        "metric": "video seconds processed per wall second (best of repeats, summed over videos)",
        "ours": round(speed["ours"], 1),
        "baseline": round(speed["pyscenedetect"], 1),
        "ratio": round(ratio, 2),
        "target": f"ratio >= {TARGET_RATIO} and ours F1 >= {TARGET_F1}",
        "met": bool(ratio >= TARGET_RATIO and f1["ours"][2] >= TARGET_F1),
        "f1_ours": round(f1["ours"][2], 4),
        "f1_baseline": round(f1["pyscenedetect"][2], 4),
        "cpu_ratio": round(tot.cpu["pyscenedetect"] / tot.cpu["ours"], 2),
        "video_minutes": round(tot.video_s / 60, 1),
        "cuts": tot.counts["ours"][2],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=6)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3)
    cache = Path(os.environ.get("LVR_CACHE", Path.home() / ".cache" / "lvr")) / "bench" / "segment"
    ap.add_argument("--cache", type=Path, default=cache)
    args = ap.parse_args()

    t = time.perf_counter()
    paths = make_videos(
        args.cache, args.videos, seed=11, duration_s=args.minutes * 60, width=320, height=240
    )
    print(f"videos: {len(paths)} x {args.minutes:g} min in {args.cache} "
          f"(ready in {time.perf_counter() - t:.1f} s)")  # fmt: skip
    tot = Totals()
    for i, path in enumerate(paths):
        print(measure_video(path, i, args.repeats, tot), flush=True)
    print(json.dumps(summary(tot)))


if __name__ == "__main__":
    main()
