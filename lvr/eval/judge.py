"""LLM judge for open-ended answers: a Yes/No question to an OpenAI-compatible model.

Used only when the normalized exact match fails (an exact match is never overruled). The judge
must reply Yes or No; anything else (an essay, "maybe", an empty reply, a failed call) makes the
prediction row an error — never a guess in either direction.
"""

from __future__ import annotations

from typing import Any

from lvr.answers import JUDGE_PROMPT_VERSION, judge_messages, parse_verdict
from lvr.backends import Request

__all__ = ["JUDGE_PROMPT_VERSION", "judge_messages", "judge_rows", "parse_verdict"]


def judge_rows(
    rows: list[dict[str, Any]],
    questions: dict[str, dict[str, Any]],
    backend: Any,
    max_tokens: int = 8,
) -> int:
    """Judge open-ended prediction rows that did not match exactly; update them in place.

    Rows with ``format == "open"``, no error, ``correct`` False and an extracted answer are sent;
    a Yes sets ``correct``; a failed call or a malformed reply sets ``error``.

    Args:
        rows: Prediction rows (dicts of the ``predictions`` schema).
        questions: Question rows by qa_id (for the question text).
        backend: An OpenAI-compatible backend (``lvr.backends``).
        max_tokens: Budget of each reply.

    Returns:
        The number of judge requests sent.
    """
    todo = [
        r
        for r in rows
        if r["format"] == "open" and r["error"] is None and not r["correct"] and r["extracted"]
    ]
    if not todo:
        return 0
    requests = [
        Request(
            item_id=f"{r['qa_id']}#{r['pass_index']}",
            messages=judge_messages(questions[r["qa_id"]]["question"], r["answer"], r["extracted"]),
            max_tokens=max_tokens,
            temperature=0.0,
            prompt_version=JUDGE_PROMPT_VERSION,
        )
        for r in todo
    ]
    for row, resp in zip(todo, backend.run(requests, progress=False), strict=True):
        if resp.error is not None:
            row["error"] = f"judge failed: {resp.error}"
            continue
        verdict = parse_verdict(resp.texts[0] if resp.texts else None)
        if verdict is None:
            reply = (resp.texts[0] if resp.texts else "")[:60]
            row["error"] = f"judge reply is not Yes/No: {reply!r}"
        else:
            row["correct"] = verdict
    return len(requests)
