"""Benchmark-specific official scores, beside the question-weighted accuracies of ``scoring``.

- Video-MME-v2 (``videomme-v2``): grouped non-linear scoring. The 4 questions of a video form a
  group. A *relevance* (capability consistency) group with k of 4 right scores (k/4)^2, so
  scattered right answers earn little: 0, 1/16, 4/16, 9/16, 1. A *logic* (reasoning coherence)
  group is a chain scored by its unbroken prefix: the first wrong step ends the credit. The chain
  ``[1, 2, 3, 4]`` maps a prefix of L right answers to (L/4)^2; ``[1, [2, 3], 4]`` (steps 2 and 3
  parallel) maps L to 0, 1/12, 4/12, 7/12, 1 and counts step 3 in place of step 2 when step 1 is
  right but step 2 is not; ``[[1, 2], 3, 4]`` (steps 1 and 2 parallel) maps L to 0, 1/10, 2/10,
  5/10, 1 and counts step 2 when step 1 is wrong. The overall score is the mean over groups; the
  release also reports it per level, per group type, per second and third head (a group's labels
  are those of its questions; releases put them on the last one). Scores are in [0, 1] here (the
  release prints them x100). One deliberate difference: the release scores an answer it could not
  parse as -1, which counts as *right* in a logic chain (``if val``) and subtracts one in a
  relevance group; here an unparsed answer or an error row is simply wrong.
- LVBench (``lvbench``): a question may have several types and counts in each type's accuracy
  (the release's ``compute_accuracy``); the per-category rows are computed from those
  memberships (``category_memberships``), and the overall accuracy is question-weighted.

Rows come out in the ``scores`` schema; ``group_by`` names say what they are
(``nonlinear``: overall first, then each group type and level; ``nonlinear_second_head``, ...).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from lvr.eval.scoring import floor_letter, mean_ci

# Score of an unbroken prefix of L right answers, per logic structure.
_CHAIN_SCORES = {
    "[1, 2, 3, 4]": (0.0, 1 / 16, 4 / 16, 9 / 16, 1.0),
    "[1, [2, 3], 4]": (0.0, 1 / 12, 4 / 12, 7 / 12, 1.0),
    "[[1, 2], 3, 4]": (0.0, 1 / 10, 2 / 10, 5 / 10, 1.0),
}
_RELEVANCE_SCORES = (0.0, 1 / 16, 4 / 16, 9 / 16, 1.0)


def relevance_score(right: Sequence[bool]) -> float:
    """Consistency group: (k/4)^2 for k right answers out of 4.

    >>> relevance_score([True, False, True, True])
    0.5625
    """
    return _RELEVANCE_SCORES[sum(bool(r) for r in right)]


def logic_score(right: Sequence[bool], structure: Sequence[Any]) -> float:
    """Coherence group: credit for the unbroken prefix of right steps (see the module docstring).

    Args:
        right: Correctness of the 4 questions in chain order.
        structure: ``[1, 2, 3, 4]``, ``[1, [2, 3], 4]`` or ``[[1, 2], 3, 4]``.

    Returns:
        The group score in [0, 1].

    Raises:
        ValueError: An unknown structure.

    >>> logic_score([True, False, True, False], [1, [2, 3], 4])
    0.3333333333333333
    >>> logic_score([False, True, True, True], [[1, 2], 3, 4])
    0.1
    """
    key = json.dumps(list(structure))
    if key not in _CHAIN_SCORES:
        raise ValueError(f"unknown Video-MME-v2 group structure {key}")
    prefix = 0
    for ok in right:
        if not ok:
            break
        prefix += 1
    if key == "[1, [2, 3], 4]" and prefix == 1 and right[2]:
        prefix = 2  # step 3 stands in for the parallel step 2
    elif key == "[[1, 2], 3, 4]" and prefix == 0 and right[1]:
        prefix = 1  # step 2 stands in for the parallel step 1
    return _CHAIN_SCORES[key][prefix]


def group_score(right: Sequence[bool], group_type: str, structure: Sequence[Any] | None) -> float:
    """Score of one Video-MME-v2 group (relevance or logic)."""
    if group_type == "logic":
        return logic_score(right, structure or [1, 2, 3, 4])
    return relevance_score(right)


# ---------------------------------------------------------------------------------------------
# Video-MME-v2 rows
# ---------------------------------------------------------------------------------------------


def _groups(questions: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Video id -> ``{ids (chain order), type, structure, labels}`` from question rows."""
    groups: dict[str, dict[str, Any]] = {}
    for q in questions:
        extra = json.loads(q["extra"] or "{}")
        g = groups.setdefault(str(extra.get("group")), {"members": [], "labels": {}})
        g["members"].append((extra.get("group_index", 0), q["qa_id"]))
        g["type"], g["structure"] = extra.get("group_type"), extra.get("group_structure")
        for key in ("level", "second_head", "third_head"):
            if extra.get(key) is not None:
                g["labels"][key] = str(extra[key])
    for g in groups.values():
        g["ids"] = [qa_id for _, qa_id in sorted(g["members"])]
    return groups


def _per_pass(pred_rows: Sequence[dict[str, Any]], key: str) -> dict[int, dict[str, bool]]:
    """pass index -> {qa_id: right} (an error row is wrong)."""
    out: dict[int, dict[str, bool]] = {}
    for r in pred_rows:
        out.setdefault(int(r["pass_index"]), {})[r["qa_id"]] = r["error"] is None and bool(r[key])
    return out


def videomme_v2_rows(
    pred_rows: Sequence[dict[str, Any]],
    questions: Sequence[dict[str, Any]],
    base: dict[str, Any],
    floor_letter: str | None,
    n_boot: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """The grouped non-linear scores of a Video-MME-v2 evaluation as ``scores`` rows.

    Args:
        pred_rows: Prediction rows (one per question per pass).
        questions: Question rows (their ``extra`` holds group, index, type, structure, labels).
        base: ``benchmark``, ``model``, ``settings`` of every row.
        floor_letter: The constant answer whose non-linear score is the floor.
        n_boot: Bootstrap resamples (over groups).
        seed: Bootstrap seed.

    Returns:
        Rows for metrics ``robust`` and ``strict``: ``nonlinear`` (``overall`` first, then
        ``relevance``/``logic`` and ``level <k>``), ``nonlinear_second_head``,
        ``nonlinear_third_head``, and the release's linear relevance score
        (``linear`` / ``relevance``).
    """
    groups = {k: g for k, g in _groups(questions).items() if g["type"] in {"relevance", "logic"}}
    gold = {q["qa_id"]: q["answer"] for q in questions}
    errors = {r["qa_id"] for r in pred_rows if r["error"] is not None}
    floor_right = {qid: floor_letter is not None and a == floor_letter for qid, a in gold.items()}
    rows: list[dict[str, Any]] = []
    for metric, key in (("robust", "correct"), ("strict", "strict_correct")):
        passes = _per_pass(pred_rows, key)
        scores, floors, linear = {}, {}, {}
        for vid, g in groups.items():
            per_pass = [
                group_score([p.get(i, False) for i in g["ids"]], g["type"], g["structure"])
                for p in passes.values()
            ]
            scores[vid] = float(np.mean(per_pass)) if per_pass else 0.0
            floors[vid] = group_score([floor_right[i] for i in g["ids"]], g["type"], g["structure"])
            linear[vid] = float(
                np.mean([[p.get(i, False) for i in g["ids"]] for p in passes.values()] or [0.0])
            )
        for group_by, name, members in _slices(groups):
            rows.append(
                _row(
                    base,
                    metric,
                    group_by,
                    name,
                    members,
                    scores,
                    floors,
                    groups,
                    errors,
                    n_boot,
                    seed,
                )
            )
        rel = [v for v, g in groups.items() if g["type"] == "relevance"]
        if rel:
            rows.append(
                _row(
                    base,
                    metric,
                    "linear",
                    "relevance",
                    rel,
                    linear,
                    floors,
                    groups,
                    errors,
                    n_boot,
                    seed,
                )
            )
    return rows


def _slices(groups: dict[str, dict[str, Any]]) -> list[tuple[str, str, list[str]]]:
    """(group_by, name, video ids): overall first, then type, level and heads."""
    out = [("nonlinear", "overall", sorted(groups))]
    for group_by, label in (("nonlinear", None), ("nonlinear", "level"),
                            ("nonlinear_second_head", "second_head"),
                            ("nonlinear_third_head", "third_head")):  # fmt: skip
        names: dict[str, list[str]] = {}
        for vid, g in groups.items():
            value = g["type"] if label is None else g["labels"].get(label)
            if value is not None:
                names.setdefault(f"level {value}" if label == "level" else value, []).append(vid)
        out += [(group_by, name, sorted(vids)) for name, vids in sorted(names.items())]
    return out


def _row(
    base: dict[str, Any],
    metric: str,
    group_by: str,
    name: str,
    members: list[str],
    scores: dict[str, float],
    floors: dict[str, float],
    groups: dict[str, dict[str, Any]],
    errors: set[str],
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    values = np.array([scores[v] for v in members], dtype=np.float64)  # [G]
    low, high = mean_ci(values, n_boot=n_boot, seed=seed)
    return {
        **base,
        "metric": metric,
        "group_by": group_by,
        "group": name,
        "n": len(members),
        "accuracy": float(values.mean()) if values.size else None,
        "ci_low": low,
        "ci_high": high,
        "floor": float(np.mean([floors[v] for v in members])) if members else None,
        "errors": sum(any(i in errors for i in groups[v]["ids"]) for v in members),
    }


# ---------------------------------------------------------------------------------------------
# Multi-label categories (LVBench)
# ---------------------------------------------------------------------------------------------


def category_memberships(questions: Sequence[dict[str, Any]]) -> dict[str, list[str]] | None:
    """qa_id -> the categories a question counts in, when the benchmark lists several per question.

    Returns:
        None when no question lists ``categories`` in its ``extra`` (single-label benchmarks).
    """
    out: dict[str, list[str]] = {}
    for q in questions:
        cats = json.loads(q["extra"] or "{}").get("categories")
        if isinstance(cats, list) and cats:
            out[q["qa_id"]] = [str(c) for c in cats]
    return out or None


def official_rows(
    benchmark: str,
    pred_rows: Sequence[dict[str, Any]],
    questions: Sequence[dict[str, Any]],
    base: dict[str, Any],
    n_boot: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Benchmark-specific score rows (Video-MME-v2's grouped score); [] for other benchmarks."""
    if benchmark != "videomme-v2" or not pred_rows:
        return []
    letter = floor_letter([q["answer"] for q in questions], [q["format"] for q in questions])
    return videomme_v2_rows(pred_rows, questions, base, letter, n_boot, seed)
