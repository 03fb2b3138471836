"""Scoring: bootstrap CIs, floors, denominators, macro means, pass rates."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lvr.artifacts import rows_to_table
from lvr.eval.scoring import (
    bootstrap_ci,
    floor_letter,
    macro_bootstrap_ci,
    pass_rate_rows,
    score_predictions,
)


def _pred(qa_id: str, answer: str, extracted: str | None, category: str = "temporal",
          pass_index: int = 0, error: str | None = None, strict: bool | None = None,
          fmt_ok: bool = True) -> dict:  # fmt: skip
    correct = error is None and extracted == answer
    return {
        "qa_id": qa_id, "benchmark": "b", "model": "m", "pass_index": pass_index,
        "category": category, "duration_bucket": "short", "format": "mc",
        "options": ["w", "x", "y", "z"], "answer": answer, "response": "r", "extracted": extracted,
        "correct": correct, "strict_correct": correct if strict is None else strict,
        "format_ok": fmt_ok and error is None, "frames": 8, "latency_s": 0.1,
        "settings": json.dumps({"frames": 8, "hash": "h"}), "error": error,
    }  # fmt: skip


def _scores(rows: list[dict], **kw) -> dict[tuple[str, str, str], dict]:
    table = score_predictions(rows_to_table(rows, "predictions"), **kw)
    return {(s["metric"], s["group_by"], s["group"]): s for s in table.to_pylist()}


def test_bootstrap_ci_contains_estimate_and_shrinks_with_n() -> None:
    rng = np.random.default_rng(1)
    widths = []
    for n in (50, 500, 5000):
        x = (rng.random(n) < 0.6).astype(float)
        low, high = bootstrap_ci(x, n_boot=2000, seed=0)
        assert low <= x.mean() <= high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    # sqrt(n) scaling: 100x the data, about a tenth of the width.
    assert 0.05 < widths[2] / widths[0] < 0.2


def test_bootstrap_ci_is_seeded_and_matches_normal_approximation() -> None:
    x = np.r_[np.ones(300), np.zeros(700)]
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    low, high = bootstrap_ci(x, n_boot=4000, seed=0)
    half = 1.96 * np.sqrt(0.3 * 0.7 / 1000)
    assert abs((high - low) / 2 - half) < 0.005
    assert bootstrap_ci([]) == (None, None)


def test_macro_ci_contains_macro_mean() -> None:
    values = np.r_[np.ones(90), np.zeros(10), np.ones(2), np.zeros(8)]
    groups = ["big"] * 100 + ["small"] * 10
    low, high = macro_bootstrap_ci(values, groups, n_boot=2000, seed=0)
    macro = (0.9 + 0.2) / 2
    assert low <= macro <= high
    assert not low <= values.mean() <= high  # the question-weighted mean (0.84) is far outside


def test_floor_letter_and_floor_accuracy() -> None:
    assert floor_letter(["B", "B", "A", "C"], ["mc"] * 4) == "B"
    assert floor_letter(["A", "B"], ["mc", "mc"]) == "A"  # tie: alphabetical
    assert floor_letter([], []) is None
    rows = [_pred(f"q{i}", "B" if i < 6 else "A", "A") for i in range(10)]
    s = _scores(rows)
    assert s[("robust", "overall", "all")]["floor"] == pytest.approx(0.6)
    assert s[("robust", "overall", "all")]["accuracy"] == pytest.approx(0.4)
    assert s[("format", "overall", "all")]["floor"] is None


def test_errors_count_as_wrong_in_headline_but_not_in_answered() -> None:
    rows = [_pred("q0", "A", "A"), _pred("q1", "A", "A"), _pred("q2", "B", "A"),
            _pred("q3", "C", None, error="video: cannot decode")]  # fmt: skip
    s = _scores(rows)
    head = s[("robust", "overall", "all")]
    assert (head["n"], head["errors"], head["accuracy"]) == (4, 1, 0.5)
    answered = s[("robust_answered", "overall", "all")]
    assert (answered["n"], answered["accuracy"]) == (3, pytest.approx(2 / 3))


def test_strict_differs_from_robust() -> None:
    rows = [_pred("q0", "A", "A", strict=False), _pred("q1", "B", "B", strict=True)]
    s = _scores(rows)
    assert s[("robust", "overall", "all")]["accuracy"] == 1.0
    assert s[("strict", "overall", "all")]["accuracy"] == 0.5


def test_groups_and_macro_mean() -> None:
    rows = [_pred(f"t{i}", "A", "A" if i < 9 else "B", category="big") for i in range(10)]
    rows += [_pred(f"s{i}", "A", "A" if i < 1 else "B", category="small") for i in range(2)]
    s = _scores(rows)
    assert s[("robust", "category", "big")]["accuracy"] == pytest.approx(0.9)
    assert s[("robust", "category", "small")]["accuracy"] == pytest.approx(0.5)
    assert s[("robust", "macro", "mean_of_categories")]["accuracy"] == pytest.approx(0.7)
    assert s[("robust", "overall", "all")]["accuracy"] == pytest.approx(10 / 12)
    assert s[("robust", "duration_bucket", "short")]["n"] == 12


def test_passes_average_per_question_and_pass_rates() -> None:
    rows = []
    for k in range(4):
        rows.append(_pred("easy", "A", "A", pass_index=k))
        rows.append(_pred("half", "A", "A" if k % 2 else "B", pass_index=k))
        rows.append(_pred("hard", "A", "C", pass_index=k))
    rows.append(_pred("broken", "A", None, error="video: missing"))
    s = _scores(rows)
    assert s[("robust", "overall", "all")]["n"] == 4  # questions, not rows
    assert s[("robust", "overall", "all")]["accuracy"] == pytest.approx((1 + 0.5 + 0) / 4)
    rates, excluded = pass_rate_rows(rows_to_table(rows, "predictions"))
    by_id = {r["qa_id"]: r for r in rates}
    assert by_id["easy"] == {
        "qa_id": "easy",
        "model": "m",
        "passes": 4,
        "correct": 4,
        "pass_rate": 1.0,
    }
    assert by_id["half"]["pass_rate"] == 0.5 and by_id["hard"]["pass_rate"] == 0.0
    assert "broken" not in by_id and excluded == {"broken": "video: missing"}
    rows_to_table(rates, "pass_rates")  # schema-valid


# --- audit of the reported intervals (references computed by hand, not with lvr's functions) ---

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def _hand_wilson(k: int, n: int) -> tuple[float, float]:
    """Wilson score interval written out from the textbook formula."""
    p = k / n
    center = (k + Z95**2 / 2) / (n + Z95**2)
    half = Z95 * n**0.5 / (n + Z95**2) * (p * (1 - p) + Z95**2 / (4 * n)) ** 0.5
    return center - half, center + half


def _overall_ci(k: int, n: int) -> tuple[float, float]:
    """The reported robust CI of an evaluation with k of n questions right (one pass)."""
    rows = [_pred(f"q{i:03d}", "A", "A" if i < k else "B") for i in range(n)]
    s = _scores(rows)[("robust", "overall", "all")]
    return s["ci_low"], s["ci_high"]


def test_ci_of_all_right_or_all_wrong_is_not_zero_width() -> None:
    # The percentile bootstrap printed 100.0 [100.0, 100.0] for 10 of 10 right.
    low, high = _overall_ci(10, 10)
    assert low == pytest.approx(10 / (10 + Z95**2), abs=1e-9)  # Wilson at k = n: n / (n + z^2)
    assert high == pytest.approx(1.0)
    low, high = _overall_ci(0, 10)
    assert (low, high) == (pytest.approx(0.0), pytest.approx(Z95**2 / (10 + Z95**2)))
    for k, n in ((4, 5), (9, 10), (1, 3)):
        assert _overall_ci(k, n) == pytest.approx(_hand_wilson(k, n), abs=1e-9)


@pytest.mark.parametrize(("n", "p"), [(10, 0.95), (30, 0.97)])
def test_ci_exact_coverage_near_one_at_small_n(n: int, p: float) -> None:
    """Exact coverage: sum of binomial P(k) over the k whose reported interval holds p.

    The percentile bootstrap covered 40% (n=10, p=0.95) and 59% (n=30, p=0.97) of the time.
    """
    cover = 0.0
    for k in range(n + 1):
        low, high = _overall_ci(k, n)
        if low <= p <= high:
            cover += math.comb(n, k) * p**k * (1 - p) ** (n - k)
    assert cover > 0.9
