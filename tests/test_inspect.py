from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from lvr.artifacts import SCHEMAS, rows_to_table
from lvr.layout import RunLayout
from lvr.stages import Stage, plan_shards, run_stage


def _lvr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lvr.cli", *args],
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": ""},
    )


def _qa_run(tmp_path: Path) -> Path:
    rows = [
        {
            "qa_id": f"q{i}",
            "video_id": f"v{i % 3}",
            "category": ["temporal", "goal", "plot"][i % 3],
            "format": "mc",
            "question": f"What happens {i}?",
            "options": ["a", "b", "c", "d"],
            "answer": "B",
            "split": "sft" if i % 2 else "rl",
            "error": None if i < 5 else "bad json",
        }
        for i in range(7)
    ]
    outputs = {"qa": rows_to_table(rows, "qa"), "qa_rejected": SCHEMAS["qa_rejected"].empty_table()}
    stage = Stage(tmp_path / "run", "filter")
    run_stage(stage, plan_shards(["job"], 1), lambda s: outputs, config=None, progress=False)
    return tmp_path / "run"


def test_inspect_summarizes_tables(tmp_path: Path) -> None:
    run = _qa_run(tmp_path)
    out = _lvr("inspect", str(run)).stdout
    # the overview: every table folder of the run, then every stage manifest
    assert "tables (one folder each)" in out and "qa/" in out and "qa_rejected/" in out
    assert "_stages/filter/manifest.json" in out and "qa 7 (2)" in out
    assert "qa (lvr table): 7 rows in 1 file(s)" in out
    assert "errors by reason" in out and "bad json" in out
    assert "distribution of category" in out and "temporal" in out
    assert "sample row 0" in out and "What happens 0?" in out
    single = _lvr("inspect", str(RunLayout(run).shard_file("qa", 0))).stdout
    assert "7 rows" in single


def test_inspect_sql_over_named_views(tmp_path: Path) -> None:
    run = _qa_run(tmp_path)
    res = _lvr(
        "inspect", str(run), "--sql", "SELECT split, count(*) AS n FROM qa GROUP BY 1 ORDER BY 1"
    )
    assert res.returncode == 0, res.stderr
    assert "rl" in res.stdout and "sft" in res.stdout and "4" in res.stdout and "3" in res.stdout


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    run = _qa_run(tmp_path)
    for args, needle in [
        (["inspect", str(tmp_path / "missing")], "does not exist"),
        (["inspect", str(run), "--sql", "SELECT nope FROM qa"], "SQL failed"),
    ]:
        res = _lvr(*args)
        assert res.returncode == 2
        assert needle in res.stderr and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1


def test_help_lists_every_command() -> None:
    out = _lvr("--help").stdout
    for cmd in ("datagen", "sft", "rl", "eval", "demo", "inspect"):
        assert cmd in out
