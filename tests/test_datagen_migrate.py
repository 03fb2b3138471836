"""Runs written before the one-folder-per-table layout: refused with one line naming the migration,
migrated by `lvr datagen migrate`, then resumed without recomputing a finished shard."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from lvr.artifacts import read_table

REPO = Path(__file__).resolve().parents[1]
SETS = [
    "input.synthetic.videos=2", "input.synthetic.duration_s=6", "input.synthetic.width=96",
    "input.synthetic.height=64", "input.synthetic.fps=12", "shards.videos_per_shard=1",
    "segment.stride_s=2", "caption.backend=annotations", "caption.annotations=sidecar",
    "qa.backend=template", "qa.categories=[{name: temporal, share: 1}]", "filter.category_shares={}",
]  # fmt: skip
KEYS = {"videos": "video_id", "clips": "clip_id", "captions": "clip_id", "qa_raw": "qa_id",
        "qa": "qa_id", "qa_rejected": "qa_id"}  # fmt: skip


def lvr(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lvr.cli", *map(str, args)], env=env, cwd=REPO,
                          text=True, capture_output=True, check=check)  # fmt: skip


def datagen_run(run: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    sets = [a for s in SETS for a in ("--set", s)]
    return lvr("datagen", "run", "--run", run, "-q", *sets, check=check)


def tables(run: Path) -> dict[str, list[dict[str, Any]]]:
    return {t: read_table(run / t, t).sort_by(k).to_pylist() for t, k in KEYS.items()}


def to_old_layout(run: Path) -> None:
    """Lay ``run`` out as lvr wrote runs before: one folder per stage holding its tables."""
    (run / "filter").mkdir()
    shutil.move(run / "qa", run / "filter" / "qa")  # first: the old stage folder qa/ takes its name
    old = {"videos": "segment", "clips": "segment", "captions": "caption", "qa_raw": "qa",
           "qa_rejected": "filter"}  # fmt: skip
    for table, stage in old.items():
        (run / stage).mkdir(exist_ok=True)
        shutil.move(run / table, run / stage / table)
    for stage in ("segment", "caption", "qa", "filter"):
        for path in (run / "_stages" / stage).iterdir():  # _done/ and manifest.json
            shutil.move(path, run / stage / path.name)
    shutil.rmtree(run / "_stages")
    for path in (run / "caption" / "captions").glob("*.parquet"):  # captions had no video columns
        pq.write_table(pq.read_table(path).drop_columns(["video_path", "duration_s"]), path)


def test_old_run_is_refused_migrated_and_resumed_without_recomputing(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "synthetic_videos").mkdir(parents=True)  # where an older lvr rendered synthetic inputs
    first = datagen_run(run)
    assert first.stdout.count("2 shards run") == 3, first.stdout + first.stderr
    assert not (run / "inputs").exists()  # the run's rows name files in synthetic_videos/
    want = tables(run)
    to_old_layout(run)

    refusals = [
        datagen_run(run, check=False),
        lvr("datagen", "qa", "--run", run, check=False),
        lvr("datagen", "export", "--run", run, check=False),
        lvr("inspect", run, check=False),
        lvr("eval", "run", "--model", "m", "--benchmark", "qa", "--run", run, check=False),
    ]
    for res in refusals:
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert f"lvr datagen migrate --run {run}" in res.stderr

    migrated = lvr("datagen", "migrate", "--run", run).stdout
    assert f"moved {run / 'segment' / 'clips'} -> {run / 'clips'}" in migrated
    assert migrated.count("upgraded") == 2 and "current layout" in migrated
    assert sorted(p.name for p in run.iterdir()) == sorted([*KEYS, "_stages", "synthetic_videos"])

    again = datagen_run(run)
    assert again.stdout.count("0 shards run, 2 skipped") == 3, again.stdout + again.stderr
    assert tables(run) == want  # captions carry their video columns again; every id the same
    assert lvr("inspect", run, "--sql", "SELECT count(*) AS n FROM captions").returncode == 0
    assert "nothing to do" in lvr("datagen", "migrate", "--run", run).stdout
