"""Benchmark questions -> a ``qa`` table, so a benchmark's train split feeds ``lvr sft`` / ``lvr rl``.

Video-Holmes publishes a train split (1,551 questions with explanations) next to its test set;
``lvr eval questions --benchmark video-holmes --data train_Video-Holmes.json --video-dir V
--as-qa runs/R/qa`` writes its error-free questions in the ``qa`` contract that
``lvr.train.data.read_qa`` reads (``--set data.split=rl`` picks them). Numbered options are
re-labelled with letters there: training prompts always letter their options.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from lvr.artifacts import rows_to_table
from lvr.eval.options import LETTERS, NUMBERS


def _video_id(extra: dict[str, Any], path: str) -> str:
    for key in ("video_id", "videoID", "key", "video"):
        if extra.get(key) not in (None, ""):
            return str(extra[key])
    return Path(path).stem


def question_to_qa(q: dict[str, Any], split: str) -> dict[str, Any]:
    """One error-free ``questions`` row as a ``qa`` row of ``split``.

    Args:
        q: A questions row without an error.
        split: The qa split to write (``rl``, ``sft``, ``eval``).

    Returns:
        A dict in the ``qa`` schema (reasoning from the benchmark's explanation, if any).
    """
    extra = json.loads(q["extra"] or "{}")
    answer = q["answer"]
    if q["format"] == "mc" and answer is not None and answer in NUMBERS:
        answer = LETTERS[NUMBERS.index(answer)]  # training prompts letter their options
    duration = extra.get("duration_s", extra.get("duration"))
    return {
        "qa_id": q["qa_id"],
        "video_id": _video_id(extra, q["video_path"]),
        "video_path": q["video_path"],
        "duration_s": float(duration) if isinstance(duration, int | float) else None,
        "category": q["category"],
        "format": q["format"],
        "question": q["question"],
        "options": list(q["options"] or []),
        "answer": answer,
        "reasoning": extra.get("explanation"),
        "evidence": None,
        "generator": f"benchmark:{q['benchmark']}",
        "prompt_version": None,
        "raw": None,
        "error": None,
        "split": split,
        "pass_rate": None,
    }


def questions_to_qa(questions: list[dict[str, Any]], split: str) -> tuple[pa.Table, int]:
    """Error-free questions as a ``qa`` table; returns ``(table, rows left out for errors)``."""
    good = [q for q in questions if q["error"] is None]
    return rows_to_table([question_to_qa(q, split) for q in good], "qa"), len(questions) - len(good)
