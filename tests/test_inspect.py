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


def _two_evals(tmp_path: Path) -> Path:
    """A run with two evaluations (one folder each) of different models over the same questions."""
    from lvr.artifacts import write_parquet

    run = tmp_path / "evals"
    for folder, model, correct in (("qa-model-f4", "model", True), ("qa-openai-m-f4", "m", False)):
        base = run / "eval" / folder
        qs = [{"qa_id": f"q{i}", "benchmark": "qa", "question": f"Q{i}?"} for i in range(3)]
        preds = [{"qa_id": f"q{i}", "benchmark": "qa", "model": model, "correct": correct}
                 for i in range(3)]  # fmt: skip
        write_parquet(
            base / "questions" / "00000.parquet", rows_to_table(qs, "questions"), "questions"
        )
        write_parquet(base / "predictions" / "00000.parquet", rows_to_table(preds, "predictions"),
                      "predictions")  # fmt: skip
    return run


def test_several_evals_never_mix_in_plain_views(tmp_path: Path) -> None:
    run = _two_evals(tmp_path)
    sql = (
        "SELECT p.eval, p.model, count(*) AS n FROM questions q JOIN predictions p "
        "USING (eval, qa_id) GROUP BY ALL ORDER BY 1"
    )
    res = _lvr("inspect", str(run), "--sql", sql)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if "qa-" in line]
    assert len(lines) == 2 and "qa-model-f4" in lines[0] and " model " in lines[0]
    assert "qa-openai-m-f4" in lines[1] and " m " in lines[1] and "3" in lines[1]
    # each eval's own view, named without characters that need quoting
    own = _lvr(
        "inspect", str(run), "--sql", "SELECT DISTINCT model FROM qa_openai_m_f4_predictions"
    )
    assert own.returncode == 0, own.stderr
    assert "│ m " in own.stdout and "│ model" not in own.stdout
    listing = _lvr("inspect", str(run)).stdout
    assert "qa_model_f4_predictions" in listing and "union of 2, column eval" in listing


def test_usage_view_is_empty_without_model_calls(tmp_path: Path) -> None:
    run = _qa_run(tmp_path)
    res = _lvr("inspect", str(run), "--sql", "SELECT count(*) AS calls FROM usage")
    assert res.returncode == 0, res.stderr
    assert "calls" in res.stdout and "0" in res.stdout
    assert "usage" in _lvr("inspect", str(run)).stdout


def test_inspect_is_read_only(tmp_path: Path) -> None:
    run = _qa_run(tmp_path)
    for sql in (
        f"COPY (SELECT 1) TO '{tmp_path / 'evil.csv'}'",
        f"COPY (SELECT 1) TO '{run / 'qa' / 'evil.csv'}'",
        f"SELECT * FROM read_csv('{tmp_path / 'outside.csv'}')",
        "SET enable_external_access = true",
        "SELECT 1; SELECT 2",
    ):
        (tmp_path / "outside.csv").write_text("a\n1\n")
        res = _lvr("inspect", str(run), "--sql", sql)
        assert res.returncode == 2 and "Traceback" not in res.stderr, (sql, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("evil.csv"))
    res = _lvr("inspect", str(run), "-n", "-1")
    assert res.returncode == 2 and "--samples must be 0 or more" in res.stderr


def test_unreadable_parquet_is_one_line(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    run = _qa_run(tmp_path)
    (run / "qa" / "00001.parquet").write_bytes(b"garbage, not Parquet")
    res = _lvr("inspect", str(run))
    assert res.returncode == 2 and "not a readable Parquet file" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = _lvr("inspect", str(run / "qa"))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    (run / "qa" / "00001.parquet").unlink()
    pq.write_table(pa.table({"x": [1]}).replace_schema_metadata({"lvr.table": "qa"}),
                   run / "qa" / "00001.parquet")  # fmt: skip
    res = _lvr("inspect", str(run))
    assert res.returncode == 2 and "missing column" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
