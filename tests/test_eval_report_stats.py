"""Printed report numbers, checked on evaluation folders built by hand where the answer is known:
rounding of ties, the order of a frame sweep, and paired differences between evaluations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lvr.artifacts import rows_to_table, write_parquet
from lvr.eval.report import load_entry, paired_table, summary_table, write_report
from lvr.eval.runner import load_eval_dirs
from lvr.eval.scoring import score_predictions
from lvr.layout import RunLayout


def _row(qa_id: str, answer: str, extracted: str | None, frames: int, model: str = "m",
         error: str | None = None, k: int = 4, pass_index: int = 0) -> dict:  # fmt: skip
    correct = error is None and extracted == answer
    return {
        "qa_id": qa_id, "benchmark": "b", "model": model, "pass_index": pass_index,
        "category": "temporal", "duration_bucket": "short", "format": "mc",
        "options": [f"o{j}" for j in range(k)], "answer": answer, "response": "r", "extracted": extracted,
        "correct": correct, "strict_correct": correct, "format_ok": error is None,
        "frames": frames, "latency_s": 0.1,
        "settings": json.dumps({"frames": frames, "hash": "h"}), "error": error,
    }  # fmt: skip


def write_eval(run: Path, name: str, right: list[bool], frames: int = 8, model: str = "m",
               rows: list[dict] | None = None) -> None:  # fmt: skip
    """One evaluation folder as ``lvr eval run`` lays it out: question i is right iff right[i]."""
    if rows is None:
        rows = [
            _row(f"q{i:03d}", "A", "A" if ok else "B", frames, model) for i, ok in enumerate(right)
        ]
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


def test_paired_difference_of_two_models_on_the_same_questions(tmp_path: Path) -> None:
    # A: 100 of 200 right. B: the same 100 plus 12 more (56%). The per-model intervals overlap
    # (about +-7 points each), but every discordant question favours B: the paired difference
    # is 6 points with sd sqrt(0.06 * 0.94) per question, and McNemar's exact p is 2 / 2**12.
    right_a = [i < 100 for i in range(200)]
    right_b = [i < 112 for i in range(200)]
    write_eval(tmp_path, "b-a-f8", right_a, model="a")
    write_eval(tmp_path, "b-b-f8", right_b, model="b")
    entries = [load_entry(d) for d in load_eval_dirs(tmp_path)]
    summary = {r[0]: r[3] for r in summary_table(entries)[1]}
    low_b = float(summary["b-b-f8"].split("[")[1].split(",")[0])
    high_a = float(summary["b-a-f8"].split(", ")[1].rstrip("]"))
    assert low_b < high_a  # the unpaired reading: "overlapping, no difference"
    head, rows = paired_table(entries, n_boot=4000)
    assert len(rows) == 1
    a, b, n, diff, only_a, only_b, p = rows[0]
    assert (a, b, n, only_a, only_b) == ("b-a-f8", "b-b-f8", "200", "0", "12")
    assert diff.startswith("+6.0 [")
    low, high = (float(v) for v in diff.split("[")[1].rstrip("]").split(", "))
    half = 100 * 1.96 * (0.06 * 0.94 / 200) ** 0.5  # 3.3 points, normal approximation by hand
    assert abs((high - low) / 2 - half) < 0.5 and low > 0
    assert float(p) == pytest.approx(2 / 2**12, rel=1e-3)
    md = write_report(tmp_path)[0].read_text()
    assert "Paired differences" in md and "| b-a-f8 | b-b-f8 | 200 |" in md


def test_paired_difference_uses_only_common_questions_and_one_benchmark(tmp_path: Path) -> None:
    write_eval(tmp_path, "b-a-f8", [True, False, True, False])
    write_eval(tmp_path, "b-b-f8", [True, True])  # q000, q001 only (a --limit 2 run)
    entries = [load_entry(d) for d in load_eval_dirs(tmp_path)]
    rows = paired_table(entries, n_boot=200)[1]
    assert [r[2:4] for r in rows] == [["2", "+50.0 [0.0, +100.0]"]]
    entries[1].manifest["benchmark"] = "other"
    assert paired_table(entries, n_boot=200)[1] == []


def test_chance_level_averages_one_over_k_per_question(tmp_path: Path) -> None:
    # Two 2-option, one 5-option and one 8-option question, each answered in 2 passes:
    # chance = (1/2 + 1/2 + 1/5 + 1/8) / 4 = 33.125%, not the 25% of "four options".
    rows = [_row(f"q{i}", "A", "A", 8, k=k, pass_index=p)
            for i, k in enumerate((2, 2, 5, 8)) for p in range(2)]  # fmt: skip
    write_eval(tmp_path, "b-m-f8", [], rows=rows)
    head, table = summary_table([load_entry(d) for d in load_eval_dirs(tmp_path)])
    assert table[0][head.index("chance (mean 1/k)")] == "33.1"


def test_grouped_headline_is_named_and_has_no_question_chance(tmp_path: Path) -> None:
    # Video-MME-v2's headline is its nonlinear score over groups of 4 questions: its n counts
    # groups and a per-question 1/k chance is not its floor. The row was named like an accuracy.
    write_eval(tmp_path, "b-m-f8", [True, False, True, True])
    entry = load_entry(load_eval_dirs(tmp_path)[0])
    entry.manifest["headline_group"] = "nonlinear"
    overall = entry.score("robust", "overall")
    entry.scores.append({**overall, "group_by": "nonlinear", "group": "overall", "n": 1})
    head, rows = summary_table([entry])
    assert rows[0][0] == "b-m-f8 (nonlinear)" and rows[0][1] == "1"
    assert rows[0][head.index("chance (mean 1/k)")] == "n/a"
