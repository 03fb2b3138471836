"""LLM judge for open-ended answers: a Yes/No question to an OpenAI-compatible model.

Used only when the normalized exact match fails (an exact match is never overruled). The judge
must reply Yes or No; anything else (an essay, "maybe", an empty reply, a failed call) makes the
prediction row an error — never a guess in either direction.
"""

from __future__ import annotations

import re
from typing import Any

from lvr.eval.extract import strip_reasoning

JUDGE_PROMPT_VERSION = "lvr-judge-v1"
JUDGE_SYSTEM = (
    "You grade answers to questions about a video. Reply with exactly one word: Yes or No."
)
JUDGE_TEMPLATE = (
    "Question: {question}\n"
    "Reference answer: {gold}\n"
    "Candidate answer: {answer}\n"
    "Does the candidate answer mean the same as the reference answer? Reply Yes or No."
)
_VERDICT = re.compile(r"^\W*(yes|no)\W*$", re.IGNORECASE)


def judge_messages(question: str, gold: str, answer: str) -> list[dict[str, Any]]:
    """Chat messages asking whether ``answer`` matches ``gold``.

    Args:
        question: The question text.
        gold: Reference answer.
        answer: The model's extracted answer.

    Returns:
        System + user messages (text only).
    """
    user = JUDGE_TEMPLATE.format(
        question=question.strip(), gold=gold.strip(), answer=answer.strip()
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_verdict(text: str | None) -> bool | None:
    """Read a judge reply: True for Yes, False for No, None for anything else.

    Reasoning blocks are ignored; the rest must be the single word (punctuation allowed).

    >>> parse_verdict("Yes."), parse_verdict("no"), parse_verdict("Yes, but no")
    (True, False, None)
    """
    if text is None:
        return None
    match = _VERDICT.match(strip_reasoning(text).strip())
    if not match:
        return None
    return match.group(1).lower() == "yes"


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
    from lvr.backends import Request

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
