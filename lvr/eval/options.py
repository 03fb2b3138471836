"""Option lists in every shape benchmarks publish them, read into one checked, ordered list.

Shapes seen in released files:

- lines appended to a question: ``"Why?\\nA. x\\nB. y"`` (LongVideo-Reason), ``"(A) x"`` (LVBench);
- a list of prefixed strings ``["A. x", "B. y"]`` (Video-MME) or one string of such lines
  (Video-MME-v2);
- a letter -> text dict ``{"A": "x", "B": "y"}`` (Video-Holmes);
- plain texts ``["x", "y"]`` (MLVU candidates, LongVideoBench) or numbered fields ``a0..a4``
  (NExT-QA, whose labels are the numbers 0-4, not letters).

Every reader returns the option texts in label order (A, B, C... or 0, 1, 2...) and the first
problem found, so an adapter turns a defect into a reasoned error row instead of a wrong question:
a blank option, a duplicated or skipped label (two options with the same text are only a warning:
the gold letter still names one of them). Labels listed out
of order (re-formatted files list C, A, B, D) are put back in order: the label, not the position,
is what the gold answer names.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

LETTERS = "ABCDEFGHIJ"
NUMBERS = "0123456789"
NUMBERED = "numbers"  # value of extra["option_labels"] for 0-based numbered options

# One labelled option: "A. x", "A) x", "(A) x", "[A] x", "A: x"; never "A man..." (no mark).
_LABELLED = re.compile(r"^\s*(?:\(([A-J])\)|\[([A-J])\]|([A-J])[.):])\s*(.*?)\s*$", re.DOTALL)
# An answer-format line some re-formats put after the options ("Answer with the option's letter
# from the given choices directly.", "Please think step by step..."): lvr states its own.
_INSTRUCTION = re.compile(
    r"^\s*(?:$|(?:please\s+)?(?:answer|respond|reply|select|choose|output|provide|put|think)\b)",
    re.IGNORECASE,
)
# Model-specific media placeholders some re-formats leave in the question text.
_PLACEHOLDER = re.compile(r"<(?:image|video)>", re.IGNORECASE)


def option_labels(count: int, extra: Mapping[str, Any] | None = None) -> str:
    """The labels of ``count`` options: letters, or numbers when the benchmark numbers them.

    Args:
        count: Number of options.
        extra: The question's ``extra`` dict (``option_labels`` = "numbers" for NExT-QA style).

    Returns:
        A string of one-character labels.

    >>> option_labels(4), option_labels(3, {"option_labels": "numbers"})
    ('ABCD', '012')
    """
    labels = NUMBERS if extra and extra.get("option_labels") == NUMBERED else LETTERS
    return labels[:count]


def clean_question(text: Any) -> str:
    """Question text without media placeholders (``<image>``, ``<video>``) and outer whitespace.

    >>> clean_question("<image>What happens?  ")
    'What happens?'
    """
    return _PLACEHOLDER.sub("", "" if text is None else str(text)).strip()


def split_label(text: str) -> tuple[str | None, str]:
    """``"(B) red"`` -> ``("B", "red")``; a text without a label mark -> ``(None, text)``."""
    match = _LABELLED.match(text)
    if not match:
        return None, text.strip()
    label = next(g for g in match.groups()[:3] if g)
    return label, match.group(4)


def order_labelled(
    pairs: Sequence[tuple[str, str]], labels: str = LETTERS
) -> tuple[list[str], str | None]:
    """Option texts in label order, or the first defect.

    Args:
        pairs: ``(label, text)`` in the order the file lists them.
        labels: The label alphabet (letters, or numbers for NExT-QA style).

    Returns:
        ``(texts, error)``: texts sorted by label; ``error`` names a missing, repeated or unknown
        label, a blank option, or fewer than two options.

    >>> order_labelled([("C", "z"), ("A", "x"), ("B", "y")])
    (['x', 'y', 'z'], None)
    >>> order_labelled([("A", "x"), ("C", "z")])[1]
    'option labels A, C are not A-B (a label is missing or repeated)'
    """
    found = [label for label, _ in pairs]
    expected = labels[: len(pairs)]
    if len(pairs) > len(labels) or sorted(found) != sorted(expected):
        last = expected[-1] if expected else labels[0]
        return [t for _, t in pairs], (
            f"option labels {', '.join(found)} are not {labels[0]}-{last} "
            "(a label is missing or repeated)"
        )
    texts = [str(text).strip() for _, text in sorted(pairs, key=lambda p: labels.index(p[0]))]
    return texts, check_texts(texts, labels)


def check_texts(texts: Sequence[str], labels: str = LETTERS) -> str | None:
    """The first defect of option texts in label order (blank, too few, too many), or None.

    Two options with the same text are not a defect here (Video-MME publishes ten such
    questions and scores them by letter): ``duplicate_texts`` reports them as a warning.

    >>> check_texts(["x", " ", "y"])
    'option B is blank'
    """
    if len(texts) < 2:
        return f"only {len(texts)} option(s)"
    if len(texts) > len(labels):
        return f"{len(texts)} options, more than the {len(labels)} labels {labels}"
    blank = [labels[i] for i, t in enumerate(texts) if not str(t).strip()]
    if len(blank) == 1:
        return f"option {blank[0]} is blank"
    if blank:
        return f"options {' and '.join(blank)} are blank"
    return None


def duplicate_texts(texts: Sequence[str], labels: str = LETTERS) -> str | None:
    """Which options share one text (case and spacing ignored), or None.

    >>> duplicate_texts(["Yes", "no", "yes "])
    'options A and C have the same text'
    """
    seen: dict[str, int] = {}
    for i, text in enumerate(texts[: len(labels)]):
        key = " ".join(str(text).lower().split())
        if key and key in seen:
            return f"options {labels[seen[key]]} and {labels[i]} have the same text"
        seen.setdefault(key, i)
    return None


def from_prefixed(items: Sequence[Any]) -> tuple[list[str], str | None]:
    """Options given as a list: ``["A. x", "B. y"]`` (labels in any order) or plain ``["x", "y"]``.

    A list where every item carries a label is ordered by label; a list where none does is taken
    in its order (re-formats strip the prefixes); a mix is a defect.

    >>> from_prefixed(["B. y", "A. x"]), from_prefixed(["x", "y"])
    ((['x', 'y'], None), (['x', 'y'], None))
    """
    split = [split_label(str(item)) for item in items]
    if all(label is None for label, _ in split):
        texts = [text for _, text in split]
        return texts, check_texts(texts)
    for i, (label, _) in enumerate(split):
        if label is None:
            want = LETTERS[i] if i < len(LETTERS) else "?"
            return [str(o) for o in items], (
                f"option {i} {str(items[i])[:30]!r} lacks its '{want}. ' prefix"
            )
    return order_labelled([(label or "", text) for label, text in split])


def from_lines(text: str) -> tuple[str, list[str], str | None]:
    """Split a block into the question and the labelled option lines that end it.

    The options are the lines from the first labelled line to the end (blank lines skipped);
    anything else among them (reasoning that leaked into the options) is a defect.

    Args:
        text: Question text with options appended, or an options-only block.

    Returns:
        ``(question, options, error)``.

    >>> from_lines("Why?\\n(B) y\\n(A) x")
    ('Why?', ['x', 'y'], None)
    """
    lines = str(text).strip().splitlines()
    first = next((i for i, ln in enumerate(lines) if split_label(ln)[0]), None)
    if first is None:
        return str(text).strip(), [], "no 'A. ...' option lines"
    question = "\n".join(lines[:first]).strip()
    while lines and _INSTRUCTION.match(lines[-1]):  # the answer format, not an option
        lines.pop()
    pairs = []
    for line in lines[first:]:
        if not line.strip():
            continue
        label, body = split_label(line)
        if label is None:
            return (
                question,
                [t for _, t in pairs],
                f"option lines malformed at {line.strip()[:60]!r}",
            )
        pairs.append((label, body))
    options, err = order_labelled(pairs)
    return question, options, err


def from_dict(mapping: Mapping[Any, Any]) -> tuple[list[str], str | None]:
    """Options given as a label -> text dict (Video-Holmes), in label order.

    >>> from_dict({"B": "y", "A": "x"})
    (['x', 'y'], None)
    """
    pairs = [(str(k).strip().upper(), "" if v is None else str(v)) for k, v in mapping.items()]
    return order_labelled(pairs)


def _literal(text: str) -> Any:
    """A JSON or Python literal (``'["A. x"]'``, ``"['A. x']"``), or None when it is neither."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def from_any(value: Any) -> tuple[list[str], str | None]:
    """Options in whichever published shape ``value`` has (dict, prefixed list, block of lines).

    Args:
        value: A dict, a list/array of prefixed strings, or one string of option lines.

    Returns:
        ``(options, error)``.

    >>> from_any("A. x\\nB. y")
    (['x', 'y'], None)
    """
    if value is None:
        return [], "record has no options"
    if isinstance(value, Mapping):
        return from_dict(value)
    if isinstance(value, str) and value.lstrip().startswith(("[", "{")):
        parsed = _literal(value)  # a list kept as text by a CSV or Parquet writer
        if isinstance(parsed, (list, dict)):
            return from_any(parsed)
    if isinstance(value, str):
        question, options, err = from_lines(value)
        if not err and question:
            return options, f"options text starts with an unlabelled line {question[:40]!r}"
        return options, err
    try:
        items = list(value)
    except TypeError:
        return [], f"options field is a {type(value).__name__}, not a list, dict or text"
    if not items:
        return [], "options list is empty"
    return from_prefixed(items)


def gold_label(answer: Any, labels: str) -> tuple[str | None, str | None]:
    """The gold label from an answer field: ``"B"`` or ``"<answer>B</answer>"`` (nothing looser:
    a gold of ``"B."`` is a malformed row, since the official strict comparison would need ``"B."``).

    Args:
        answer: The record's answer value.
        labels: The offered labels, e.g. ``"ABCD"``.

    Returns:
        ``(label, error)``; the error names a blank, unlabelled or not offered answer.

    >>> gold_label("<answer>C</answer>", "ABCD"), gold_label("E", "ABCD")[1]
    (('C', None), 'answer E is not among the offered labels ABCD')
    """
    text = "" if answer is None else str(answer).strip()
    inner = re.fullmatch(r"<answer>\s*(.*?)\s*</answer>", text, re.DOTALL)
    core = (inner.group(1) if inner else text).strip()
    if not core:
        return None, "answer is blank"
    match = re.fullmatch(r"([A-Ja-j0-9])", core)
    if not match:
        return None, f"answer {text[:40]!r} is not one option label"
    label = match.group(1).upper()  # a lower-case gold letter is still one letter
    if label not in labels:
        return label, f"answer {label} is not among the offered labels {labels or '(none)'}"
    return label, None


def question_error(question: str) -> str | None:
    """``"question is blank"`` for an empty question text, else None."""
    return "question is blank" if not question.strip() else None


def lettered_question(
    question: Any, options: Any, answer: Any
) -> tuple[str, list[str], str | None, list[str | None]]:
    """Question text, options (any published shape) and gold letter of one record, checked.

    Args:
        question: The record's question field.
        options: Its options field (dict, prefixed list, or block of lines).
        answer: Its answer field (a letter, optionally in ``<answer>`` tags).

    Returns:
        ``(question, options, answer, errors)``; ``errors`` holds one entry per check.

    >>> lettered_question("<image>Q?", {"B": "y", "A": "x"}, "B")
    ('Q?', ['x', 'y'], 'B', [None, None, None])
    """
    text = clean_question(question)
    texts, err = from_any(options)
    gold, gold_err = gold_label(answer, LETTERS[: len(texts)])
    return text, texts, gold, [question_error(text), err, gold_err]
