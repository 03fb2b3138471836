"""Scores from predictions: accuracies per group, 95% CIs, the constant-letter floor.

Denominators (the headline is the honest one):

- ``robust`` / ``strict`` / ``format``: over ALL questions of the group; a question whose row has
  an error (missing video, decode failure, backend failure, malformed benchmark row) counts as
  wrong. This is the headline: a model that cannot be run on a question did not answer it.
- ``robust_answered`` / ``strict_answered``: over the questions without any error row only, to
  tell "the model is wrong" from "the pipeline failed".

Intervals (``mean_ci``): when every per-question value is 0 or 1 (one pass, or K passes that all
agree), the Wilson score interval over the n questions; otherwise (K passes giving fractional
values) the percentile bootstrap over questions. The percentile bootstrap of 0/1 values collapses
to a zero-width [1, 1] when every question is right (its true coverage at n = 10, p = 0.95 is 40%,
not 95%); Wilson's never does. With ``K`` passes per question (sampling), a question's value is its
mean over passes and the bootstrap resamples questions (not passes), so the CI reflects question
sampling only. ``macro`` rows keep the stratified bootstrap.

``floor`` is the accuracy of always answering the benchmark's most common gold letter (computed
once per benchmark, then measured in every group): LongVideo-Reason-eval's skew makes "always B"
score 44.1%, so a score means little without it. ``group_by = macro`` is the mean of per-category
accuracies (MLVU's official number), with a stratified bootstrap (resample within each category).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal
from statistics import NormalDist
from typing import Any

import numpy as np
import pyarrow as pa

from lvr.artifacts import rows_to_table

METRICS = ("robust", "strict", "format", "robust_answered", "strict_answered")
_CHUNK = 20_000_000  # max resampled elements held at once (160 MB of float64)


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float] | tuple[None, None]:
    """Percentile bootstrap confidence interval of a mean (vectorised, seeded).

    Args:
        values: Per-question scores in [0, 1], shape [n].
        n_boot: Number of bootstrap resamples (0: no interval).
        seed: RNG seed (same seed, same interval).
        level: Coverage, e.g. 0.95.

    Returns:
        ``(low, high)``, or ``(None, None)`` for no values or ``n_boot`` 0.

    >>> bootstrap_ci([1.0, 1.0, 1.0])
    (1.0, 1.0)
    >>> bootstrap_ci([1.0, 0.0], n_boot=0)
    (None, None)
    """
    x = np.asarray(values, dtype=np.float64)  # [n]
    if x.size == 0 or n_boot < 1:
        return None, None
    means = _boot_means(x, n_boot, np.random.default_rng(seed))  # [n_boot]
    return _percentiles(means, level)


def wilson_ci(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (successes out of n, n >= 1).

    Used for 0/1 scores instead of the percentile bootstrap: it stays inside [0, 1], is never
    zero-width (all right still leaves room below 1) and keeps near-nominal coverage at small n
    and at p near 0 or 1, where the bootstrap of 0/1 values degenerates.

    >>> [round(v, 4) for v in wilson_ci(10, 10)]
    [0.7225, 1.0]
    """
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    p = successes / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def mean_ci(
    values: Sequence[float] | np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[float, float] | tuple[None, None]:
    """CI of a mean of per-question scores: Wilson when all are 0/1, else percentile bootstrap.

    ``n_boot`` 0 still means "no interval" (the ``bootstrap: 0`` setting), for either method.

    >>> [round(v, 3) for v in mean_ci([1.0] * 9 + [0.0])]
    [0.596, 0.982]
    >>> mean_ci([1.0, 0.0], n_boot=0)
    (None, None)
    """
    x = np.asarray(values, dtype=np.float64)  # [n]
    if x.size == 0 or n_boot < 1:
        return None, None
    if np.all((x == 0.0) | (x == 1.0)):
        return wilson_ci(float(x.sum()), int(x.size), level)
    return bootstrap_ci(x, n_boot=n_boot, seed=seed, level=level)


def _boot_means(x: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``n_boot`` resamples of ``x`` with replacement, in memory-bounded chunks."""
    n = x.size
    per_chunk = max(1, _CHUNK // n)
    out = np.empty(n_boot, dtype=np.float64)
    for lo in range(0, n_boot, per_chunk):
        hi = min(n_boot, lo + per_chunk)
        idx = rng.integers(0, n, size=(hi - lo, n))  # [b, n]
        out[lo:hi] = x[idx].mean(axis=1)
    return out


def _percentiles(means: np.ndarray, level: float) -> tuple[float, float]:
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def macro_bootstrap_ci(
    values: Sequence[float] | np.ndarray,
    groups: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | tuple[None, None]:
    """CI of the mean of per-group means, resampling questions within each group.

    Args:
        values: Per-question scores, shape [n].
        groups: Group (task) of each question, length n.
        n_boot: Number of bootstrap resamples (0: no interval).
        seed: RNG seed.
        level: Coverage.

    Returns:
        ``(low, high)``, or ``(None, None)`` for no values or ``n_boot`` 0.
    """
    x = np.asarray(values, dtype=np.float64)
    g = np.asarray(groups, dtype=object)
    if x.size == 0 or n_boot < 1:
        return None, None
    rng = np.random.default_rng(seed)
    names = sorted(set(g.tolist()))
    per_group = np.stack([_boot_means(x[g == name], n_boot, rng) for name in names])  # [G, n_boot]
    return _percentiles(per_group.mean(axis=0), level)


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: binomial(only_a + only_b, 1/2) on the discordant pairs.

    >>> mcnemar_exact_p(0, 5)
    0.0625
    >>> mcnemar_exact_p(3, 3)
    1.0
    """
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2.0 * tail)


def paired_difference(
    a: dict[str, float], b: dict[str, float], n_boot: int = 1000, seed: int = 0
) -> dict[str, Any] | None:
    """B - A on the questions both evaluations scored, with a paired CI.

    The two accuracies share their questions, so their difference varies far less than two
    independent intervals suggest (a question easy for one model is easy for the other):
    comparing the per-model CIs for overlap is the unpaired, too-conservative reading. Here the
    per-question differences are resampled together (paired percentile bootstrap over
    questions), and for 0/1 scores the exact McNemar test is given on the discordant questions.

    Args:
        a: qa_id -> per-question score of evaluation A (errors as 0, passes averaged).
        b: The same for evaluation B.
        n_boot: Bootstrap resamples (0: no interval).
        seed: Bootstrap seed.

    Returns:
        ``n`` (common questions), ``diff``, ``ci_low``, ``ci_high``, ``only_a`` / ``only_b``
        (questions only A / only B got right; fractional scores: A / B scored higher) and
        ``p`` (exact McNemar; None unless every score is 0 or 1); None without common questions.
    """
    ids = sorted(set(a) & set(b))
    if not ids:
        return None
    xa = np.array([a[i] for i in ids], dtype=np.float64)  # [n]
    xb = np.array([b[i] for i in ids], dtype=np.float64)  # [n]
    d = xb - xa  # [n]
    low, high = bootstrap_ci(d, n_boot=n_boot, seed=seed)
    only_a, only_b = int((d < 0).sum()), int((d > 0).sum())
    binary = bool(np.all(np.isin(xa, (0.0, 1.0))) and np.all(np.isin(xb, (0.0, 1.0))))
    return {
        "n": len(ids),
        "diff": float(d.mean()),
        "ci_low": low,
        "ci_high": high,
        "only_a": only_a,
        "only_b": only_b,
        "p": mcnemar_exact_p(only_a, only_b) if binary else None,
    }


def pct_text(x: float) -> str:
    """A score in [0, 1] as a percent with one decimal, ties half up on the decimal value.

    ``f"{100 * x:.1f}"`` rounded exact binary ties half to even (81.25 -> "81.2") but a tie that
    float arithmetic nudged upward half up (0.7235 -> "72.4"): two conventions in one table. The
    shortest repr of ``x`` is the decimal it stands for (k/n), so it is rounded instead.

    >>> pct_text(13 / 16), pct_text(0.7235), pct_text(1 / 3)
    ('81.3', '72.4', '33.3')
    """
    pct = Decimal(repr(float(x))) * 100
    return str(pct.quantize(Decimal("0.1"), rounding=ROUND_HALF_UP))


def floor_letter(answers: Sequence[str | None], formats: Sequence[str | None]) -> str | None:
    """Most common gold letter among multiple-choice questions (ties: alphabetical first).

    >>> floor_letter(["B", "A", "B", "x"], ["mc", "mc", "mc", "open"])
    'B'
    """
    counts = Counter(a for a, f in zip(answers, formats, strict=True) if f == "mc" and a)
    if not counts:
        return None
    best = max(counts.values())
    return min(a for a, c in counts.items() if c == best)


def per_question(pred: pa.Table) -> dict[str, np.ndarray]:
    """Collapse prediction rows (one per question per pass) to one value per question.

    Args:
        pred: A ``predictions`` table.

    Returns:
        Arrays of length Q (sorted by qa_id): ``qa_id``, ``category``, ``duration_bucket``,
        ``answer``, ``format`` (question format), ``robust``, ``strict``, ``format_ok`` (means over
        passes, errors as 0), ``error`` (any pass errored), ``passes``.
    """
    cols = pred.select(
        ["qa_id", "category", "duration_bucket", "answer", "format", "correct", "strict_correct"]
        + ["format_ok", "error"]
    ).to_pylist()
    acc: dict[str, dict[str, Any]] = {}
    for row in cols:
        q = acc.setdefault(
            row["qa_id"],
            {**{k: row[k] for k in ("category", "duration_bucket", "answer", "format")}}
            | {"robust": 0.0, "strict": 0.0, "format_ok": 0.0, "error": False, "passes": 0},
        )
        ok = row["error"] is None
        q["robust"] += float(ok and bool(row["correct"]))
        q["strict"] += float(ok and bool(row["strict_correct"]))
        q["format_ok"] += float(ok and bool(row["format_ok"]))
        q["error"] = q["error"] or not ok
        q["passes"] += 1
    ids = sorted(acc)
    out: dict[str, np.ndarray] = {"qa_id": np.array(ids, dtype=object)}
    for key in ("category", "duration_bucket", "answer", "format", "error", "passes"):
        out[key] = np.array([acc[i][key] for i in ids], dtype=object)
    for key in ("robust", "strict", "format_ok"):
        out[key] = np.array([acc[i][key] / acc[i]["passes"] for i in ids], dtype=np.float64)
    out["error"] = out["error"].astype(bool)
    return out


def score_predictions(
    pred: pa.Table,
    n_boot: int = 1000,
    seed: int = 0,
    settings: dict[str, Any] | None = None,
    memberships: dict[str, list[str]] | None = None,
) -> pa.Table:
    """Compute the ``scores`` table of one (benchmark, model, settings) prediction set.

    Args:
        pred: A ``predictions`` table of a single benchmark and model.
        n_boot: Bootstrap resamples for the CIs.
        seed: Bootstrap seed.
        settings: Settings recorded next to every score (defaults to the first row's).
        memberships: qa_id -> categories, for benchmarks whose questions count in several
            categories (LVBench); the ``category`` rows then follow these memberships and the
            macro rows (mean of categories over a partition) are not computed.

    Returns:
        A ``scores`` table: metrics x {overall, category, duration_bucket, macro}.
    """
    return rows_to_table(score_rows(pred, n_boot, seed, settings, memberships), "scores")


def score_rows(
    pred: pa.Table,
    n_boot: int = 1000,
    seed: int = 0,
    settings: dict[str, Any] | None = None,
    memberships: dict[str, list[str]] | None = None,
) -> list[dict[str, Any]]:
    """The rows of ``score_predictions`` (to be extended with benchmark-specific rows)."""
    if pred.num_rows == 0:
        return []
    q = per_question(pred)
    letter = floor_letter(q["answer"].tolist(), q["format"].tolist())
    hit = np.array([letter is not None and a == letter for a in q["answer"]], dtype=np.float64)
    rows: list[dict[str, Any]] = []
    base = score_base(pred, settings)
    for group_by, groups in _groupings(q, memberships):
        for name, mask in groups.items():
            for metric in METRICS:
                rows.append(
                    {**base, **_score_row(q, mask, metric, hit, n_boot, seed), "group": name}
                    | {"group_by": group_by}
                )
    if memberships is None:
        rows.extend(_macro_rows(q, hit, base, n_boot, seed))
    return rows


def score_base(pred: pa.Table, settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """``benchmark``, ``model`` and ``settings`` (JSON) shared by every score row."""
    first = pred.slice(0, 1).to_pylist()[0]
    return {
        "benchmark": first["benchmark"],
        "model": first["model"],
        "settings": json.dumps(settings if settings is not None else json.loads(first["settings"])),
    }


def _groupings(
    q: dict[str, np.ndarray], memberships: dict[str, list[str]] | None
) -> list[tuple[str, dict[str, np.ndarray]]]:
    """(group_by, {group: mask}) for overall, category (partition or memberships), duration."""
    everyone = np.ones(len(q["qa_id"]), dtype=bool)
    out = [("overall", {"all": everyone})]
    for key in ("category", "duration_bucket"):
        if all(v is None for v in q[key]):  # the benchmark has no such field (no "(none)" rows)
            continue
        if key == "category" and memberships is not None:
            cats = [memberships.get(i, ["(none)"]) for i in q["qa_id"]]
            names = sorted({c for cs in cats for c in cs})
            out.append((key, {n: np.array([n in cs for cs in cats], dtype=bool) for n in names}))
            continue
        labels = np.array(["(none)" if v is None else str(v) for v in q[key]], dtype=object)
        out.append((key, {name: labels == name for name in sorted(set(labels.tolist()))}))
    return out


def _metric_values(q: dict[str, np.ndarray], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-question values and the mask of questions in the denominator."""
    key = {"robust": "robust", "strict": "strict", "format": "format_ok"}[metric.split("_")[0]]
    keep = ~q["error"] if metric.endswith("_answered") else np.ones_like(q["error"], dtype=bool)
    return q[key], keep


def _score_row(
    q: dict[str, np.ndarray], mask: np.ndarray, metric: str, hit: np.ndarray, n_boot: int, seed: int
) -> dict[str, Any]:
    values, keep = _metric_values(q, metric)
    sel = mask & keep
    x = values[sel]
    low, high = mean_ci(x, n_boot=n_boot, seed=seed)
    floor = None if metric == "format" or not sel.any() else float(hit[sel].mean())
    return {
        "metric": metric,
        "n": int(sel.sum()),
        "accuracy": float(x.mean()) if x.size else None,
        "ci_low": low,
        "ci_high": high,
        "floor": floor,
        "errors": int((q["error"] & mask).sum()),
    }


def _macro_rows(
    q: dict[str, np.ndarray], hit: np.ndarray, base: dict[str, Any], n_boot: int, seed: int
) -> list[dict[str, Any]]:
    """Mean of per-category accuracies (MLVU's official aggregate) for each metric."""
    cats = np.array(["(none)" if c is None else str(c) for c in q["category"]], dtype=object)
    rows = []
    for metric in METRICS:
        values, keep = _metric_values(q, metric)
        x, g = values[keep], cats[keep]
        names = sorted(set(g.tolist()))
        acc = float(np.mean([x[g == n].mean() for n in names])) if names else None
        low, high = macro_bootstrap_ci(x, g, n_boot=n_boot, seed=seed)
        floor = None
        if metric != "format" and names:
            floor = float(np.mean([hit[keep][g == n].mean() for n in names]))
        rows.append(
            {
                **base,
                "metric": metric,
                "group_by": "macro",
                "group": "mean_of_categories",
                "n": int(keep.sum()),
                "accuracy": acc,
                "ci_low": low,
                "ci_high": high,
                "floor": floor,
                "errors": int(q["error"].sum()),
            }
        )
    return rows


def pass_rate_rows(pred: pa.Table) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Per-question pass rates over K sampled answers, for ``lvr datagen filter``.

    A question with any errored pass is left out (its rate would blame the model for a pipeline
    failure) and returned in ``excluded`` with the first error, so callers can report it.

    Args:
        pred: A ``predictions`` table (one model).

    Returns:
        ``(rows, excluded)``: ``pass_rates`` rows, and ``{qa_id: error}`` for left-out questions.
    """
    by_q: dict[str, dict[str, Any]] = {}
    for row in pred.select(["qa_id", "model", "correct", "error"]).to_pylist():
        q = by_q.setdefault(row["qa_id"], {"model": row["model"], "n": 0, "ok": 0, "error": None})
        q["n"] += 1
        q["ok"] += int(bool(row["correct"]) and row["error"] is None)
        q["error"] = q["error"] or row["error"]
    rows, excluded = [], {}
    for qid in sorted(by_q):
        q = by_q[qid]
        if q["error"]:
            excluded[qid] = q["error"]
            continue
        rows.append(
            {
                "qa_id": qid,
                "model": q["model"],
                "passes": q["n"],
                "correct": q["ok"],
                "pass_rate": q["ok"] / q["n"],
            }
        )
    return rows, excluded
