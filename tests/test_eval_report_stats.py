"""Printed report numbers, checked on evaluation folders built by hand where the answer is known:
rounding of ties, the order of a frame sweep, and paired differences between evaluations."""

from __future__ import annotations

import json
from pathlib import Path

from lvr.artifacts import rows_to_table, write_parquet
from lvr.eval.report import load_entry, summary_table, write_report
from lvr.eval.runner import load_eval_dirs
from lvr.eval.scoring import score_predictions
from lvr.layout import RunLayout


def _row(qa_id: str, answer: str, extracted: str | None, frames: int, model: str = "m",
         error: str | None = None) -> dict:  # fmt: skip
    correct = error is None and extracted == answer
    return {
        "qa_id": qa_id, "benchmark": "b", "model": model, "pass_index": 0,
        "category": "temporal", "duration_bucket": "short", "format": "mc",
        "options": ["w", "x", "y", "z"], "answer": answer, "response": "r", "extracted": extracted,
        "correct": correct, "strict_correct": correct, "format_ok": error is None,
        "frames": frames, "latency_s": 0.1,
        "settings": json.dumps({"frames": frames, "hash": "h"}), "error": error,
    }  # fmt: skip


def write_eval(run: Path, name: str, right: list[bool], frames: int = 8, model: str = "m") -> None:
    """One evaluation folder as ``lvr eval run`` lays it out: question i is right iff right[i]."""
    rows = [_row(f"q{i:03d}", "A", "A" if ok else "B", frames, model) for i, ok in enumerate(right)]
    pred = rows_to_table(rows, "predictions")
    paths = RunLayout(run).eval_run(name)
    write_parquet(paths.predictions / "00000.parquet", pred, "predictions")
    scores = score_predictions(pred, n_boot=200)
    write_parquet(paths.scores / "00000.parquet", scores, "scores")
    manifest = {"benchmark": "b", "model": model, "settings": {"frames": frames, "hash": "h"}}
    paths.manifest.write_text(json.dumps(manifest))


def test_printed_percent_rounds_ties_half_up(tmp_path: Path) -> None:
    # 13 of 16 right is 81.25%: printed 81.2 before (binary tie, half to even), while 0.7235 of
    # another evaluation printed 72.4 (a tie float arithmetic nudged up). Half up for both now.
    write_eval(tmp_path, "b-m-f8", [True] * 13 + [False] * 3)
    write_eval(tmp_path, "b-m-f9", [True] * 1447 + [False] * 553, frames=9)
    rows = summary_table([load_entry(d) for d in load_eval_dirs(tmp_path)])[1]
    assert [r[3].split(" ")[0] for r in rows] == ["81.3", "72.4"]


def test_frame_sweep_is_listed_by_frame_count(tmp_path: Path) -> None:
    # Folder names sort -f128 < -f16 < -f32 < -f64; the report listed the sweep in that order.
    for frames in (16, 32, 64, 128):
        write_eval(tmp_path, f"b-m-f{frames}", [True, False, True], frames=frames)
    md = write_report(tmp_path)[0].read_text()
    summary = md.split("### Settings")[0]
    order = [summary.index(f"| b-m-f{f} |") for f in (16, 32, 64, 128)]
    assert order == sorted(order)
