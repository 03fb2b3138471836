"""Parse, validate and safely repair one generated question (an LLM's raw JSON text).

Safe repairs (each noted in ``ParsedQA.repairs``): a ``<think>`` block or prose around the JSON
object, code fences, a one-element list around the object, option prefixes ``A. ``/``(B)`` that match
their position, options given as an ``{"A": ...}`` mapping or as one ``A. ..\\nB. ..`` string,
an answer given as ``B.``/``(B)``/``Option B``/``B. <text of B>``/``<answer>B</answer>`` or as the
exact text of one option, inline option lines repeated at the end of the question, evidence given
as ``[start, end]`` pairs or numeric strings, and whitespace. Everything else is rejected with a
one-line reason (:class:`QAParseError`): nothing is guessed.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

LETTERS = "ABCDEFGH"
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_FENCE = re.compile(r"^\s*```(?:json|JSON)?\s*\n?(.*?)\n?\s*```\s*$", re.DOTALL)
_PREFIX = re.compile(r"^\s*\(?([A-Ha-h])\s*[.):：]\s*")
_LEAK = re.compile(
    r"\b(answer|reasons?|reasoning|explanation|rationale|evidence)\s*[:：]|\bstep\s*\d|"
    r"\bthe (correct )?answer is\b|\bcorrect option\b",
    re.IGNORECASE,
)
_INLINE_OPTIONS = re.compile(r"(?:^|\n)\s*\(?A\s*[.):]\s+.*", re.DOTALL)
# Natural chain of thought: no enumerated steps, no raw time stamps.
_COT_RULES = (
    (re.compile(r"\bsteps?\b", re.IGNORECASE), "uses the word 'step'"),
    (re.compile(r"\b\d{1,2}:\d{2}(?::\d{2})?\b"), "contains a clock time stamp"),
    (re.compile(r"\(\s*\d+(?:\.\d+)?\s*s?\s*[-–~]\s*\d+(?:\.\d+)?\s*s?\s*\)"), "contains a time range like (20-30)"),
    (re.compile(r"\bfrom\s+\d+(?:\.\d+)?\s*(?:s|sec|secs|seconds)?\s+to\s+\d+", re.IGNORECASE), "contains a time range 'from X to Y'"),
    (re.compile(r"\bat\s+\d+(?:\.\d+)?\s*(?:s|sec|secs|seconds)\b", re.IGNORECASE), "contains a raw time 'at N seconds'"),
)  # fmt: skip
MAX_OPTION_CHARS = 300
MIN_REASONING_CHARS = 20


class QAParseError(ValueError):
    """A generated question that cannot be used; the message is the reason for the error row."""


@dataclass
class ParsedQA:
    """A validated question.

    Attributes:
        question: Question text without options.
        options: Option texts without letter prefixes (empty for open questions).
        answer: Gold letter (mc) or gold text (open).
        reasoning: Chain of thought.
        evidence: ``[{"start_s", "end_s"}]`` supporting time ranges.
        repairs: What was repaired, for audits.
    """

    question: str
    options: list[str]
    answer: str
    reasoning: str
    evidence: list[dict[str, float]]
    repairs: list[str] = field(default_factory=list)


def norm(text: str) -> str:
    """Comparison form: NFKC, casefolded, punctuation dropped, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def _clean(text: str) -> str:
    return " ".join(str(text).split())


def load_object(raw: str, repairs: list[str]) -> dict[str, Any]:
    """The JSON object of a raw model output (think blocks, fences and surrounding prose removed)."""
    if not isinstance(raw, str) or not raw.strip():
        raise QAParseError("empty output")
    text = _THINK.sub("", raw).strip()
    if text != raw.strip():
        repairs.append("removed think block")
    m = _FENCE.match(text)
    text = m.group(1).strip() if m else text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as first:
        a, b = text.find("{"), text.rfind("}")
        if a < 0 or b <= a:
            if text[:1] in "{[":
                raise QAParseError(
                    f"output is not valid JSON ({first.msg} at char {first.pos})"
                ) from None
            raise QAParseError("output holds no JSON object") from None
        try:
            value = json.loads(text[a : b + 1])
        except json.JSONDecodeError as exc:
            raise QAParseError(f"output is not valid JSON ({exc.msg} at char {exc.pos})") from None
        repairs.append("extracted JSON from surrounding text")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        value, _ = value[0], repairs.append("unwrapped one-element list")
    if isinstance(value, dict) and len(value) == 1:
        inner = next(iter(value.values()))
        if isinstance(inner, dict) and "question" in inner:
            value, _ = inner, repairs.append("unwrapped nested object")
    if not isinstance(value, dict):
        raise QAParseError(f"output is a JSON {type(value).__name__}, expected an object")
    return value


def _text_field(obj: dict[str, Any], key: str, min_chars: int = 1) -> str:
    if key not in obj or obj[key] is None:
        raise QAParseError(f"missing field '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise QAParseError(f"field '{key}' must be a string, got {type(value).__name__}")
    text = _clean(value)
    if len(text) < min_chars:
        raise QAParseError(f"field '{key}' is too short ({len(text)} chars, need {min_chars})")
    return text


def _options_list(value: Any, n: int, repairs: list[str]) -> list[Any]:
    """The options as a list (from a list, an {A: ..} mapping, or one lettered multi-line string)."""
    if isinstance(value, dict):
        keys = [str(k).strip().rstrip(".").upper() for k in value]
        if keys != list(LETTERS[: len(keys)]):
            raise QAParseError(
                f"options mapping keys must be A, B, C, ... in order, got {list(value)}"
            )
        repairs.append("options mapping -> list")
        return list(value.values())
    if isinstance(value, str):
        lines = [ln for ln in value.splitlines() if ln.strip()]
        marks = [_PREFIX.match(ln) for ln in lines]
        if len(lines) == n and all(
            m and m.group(1).upper() == LETTERS[i] for i, m in enumerate(marks)
        ):
            repairs.append("options string -> list")
            return lines
        raise QAParseError("field 'options' must be a list of strings, got a string")
    if not isinstance(value, list):
        raise QAParseError(f"field 'options' must be a list, got {type(value).__name__}")
    return value


def _strip_prefixes(opts: list[str], repairs: list[str]) -> list[str]:
    marks = [_PREFIX.match(o) for o in opts]
    if not any(marks):
        return opts
    if not all(m and m.group(1).upper() == LETTERS[i] for i, m in enumerate(marks)):
        raise QAParseError("option letter prefixes do not match the option positions")
    repairs.append("stripped option letter prefixes")
    return [o[m.end() :].strip() for o, m in zip(opts, marks, strict=True) if m]


def parse_options(obj: dict[str, Any], n: int, repairs: list[str]) -> list[str]:
    """Validated option texts (exactly ``n``, distinct, short, no leaked reasoning)."""
    if "options" not in obj or obj["options"] is None:
        raise QAParseError("missing field 'options'")
    raw = _options_list(obj["options"], n, repairs)
    bad = [type(o).__name__ for o in raw if not isinstance(o, str)]
    if bad:
        raise QAParseError(f"every option must be a string, got {bad[0]}")
    for i, o in enumerate(raw):
        if "\n" in o.strip():
            raise QAParseError(f"option {LETTERS[i]} spans several lines (leaked reasoning?)")
    opts = _strip_prefixes([_clean(o) for o in raw], repairs)
    if len(opts) != n:
        raise QAParseError(f"expected {n} options, got {len(opts)}")
    for i, o in enumerate(opts):
        if not o:
            raise QAParseError(f"option {LETTERS[i]} is empty")
        if len(o) > MAX_OPTION_CHARS or _LEAK.search(o):
            raise QAParseError(f"option {LETTERS[i]} looks like leaked reasoning: {o[:60]!r}")
    normed = [norm(o) for o in opts]
    dup = next((i for i, x in enumerate(normed) if normed.index(x) != i), None)
    if dup is not None:
        raise QAParseError(
            f"option {LETTERS[dup]} duplicates option {LETTERS[normed.index(normed[dup])]}"
        )
    return opts


_LETTER_FORMS = (
    re.compile(r"^\(?([A-Ha-h])\)?[.):]?$"),
    re.compile(r"^<answer>\s*\(?([A-H])\)?\.?\s*</answer>$", re.IGNORECASE),
    re.compile(r"^(?:option|answer|choice)\s*[:：]?\s*\(?([A-H])\)?\.?$", re.IGNORECASE),
)


def parse_mc_answer(value: Any, options: list[str], repairs: list[str]) -> str:
    """The gold letter from an answer field (letter forms, ``B. text``, or an option's exact text)."""
    if not isinstance(value, str):
        raise QAParseError(f"field 'answer' must be a string letter, got {type(value).__name__}")
    text = value.strip()
    letters = LETTERS[: len(options)]
    for form in _LETTER_FORMS:
        m = form.match(text)
        if m:
            letter = m.group(1).upper()
            if letter not in letters:
                raise QAParseError(
                    f"answer {text!r} is not one of the options {', '.join(letters)}"
                )
            if text != letter:
                repairs.append(f"answer {text!r} -> {letter}")
            return letter
    m = _PREFIX.match(text)
    if m and m.group(1).upper() in letters:
        letter = m.group(1).upper()
        if norm(text[m.end() :]) != norm(options[letters.index(letter)]):
            raise QAParseError(f"answer {text[:60]!r} names option {letter} but not with its text")
        repairs.append(f"answer '{letter}. <text>' -> {letter}")
        return letter
    hits = [i for i, o in enumerate(options) if norm(o) == norm(text)]
    if len(hits) == 1:
        repairs.append("answer given as option text -> letter")
        return letters[hits[0]]
    raise QAParseError(f"answer {text[:60]!r} is not one of the options")


def parse_evidence(
    value: Any, duration_s: float | None, repairs: list[str]
) -> list[dict[str, float]]:
    """Time ranges inside the video (``[s, e]`` pairs and numeric strings are repaired)."""
    if value is None:
        raise QAParseError("missing field 'evidence'")
    if not isinstance(value, list) or not value:
        raise QAParseError("field 'evidence' must be a non-empty list of time ranges")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, dict):
            s, e = item.get("start_s", item.get("start")), item.get("end_s", item.get("end"))
        elif isinstance(item, list | tuple) and len(item) == 2:
            (s, e), _ = item, repairs.append("evidence pair -> range")
        else:
            raise QAParseError(f"evidence[{i}] must be {{start_s, end_s}}, got {item!r:.60}")
        s, e = (
            _seconds(s, f"evidence[{i}].start_s", repairs),
            _seconds(e, f"evidence[{i}].end_s", repairs),
        )
        if not 0 <= s < e:
            raise QAParseError(f"evidence[{i}] [{s:g}, {e:g}] is not a range with 0 <= start < end")
        if duration_s is not None and e > duration_s + 1.0:
            raise QAParseError(f"evidence[{i}] ends at {e:g} s, after the video ({duration_s:g} s)")
        out.append({"start_s": s, "end_s": min(e, duration_s) if duration_s is not None else e})
    return out


def _seconds(value: Any, where: str, repairs: list[str]) -> float:
    if isinstance(value, bool):
        raise QAParseError(f"{where} must be a number, got bool")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value.strip().rstrip("s").strip())
        except ValueError:
            raise QAParseError(f"{where} must be a number of seconds, got {value!r:.30}") from None
        repairs.append("numeric string -> number")
        return number
    raise QAParseError(f"{where} must be a number, got {type(value).__name__}")


def _question(obj: dict[str, Any], fmt: str, repairs: list[str]) -> str:
    q = obj.get("question")
    if isinstance(q, str) and fmt == "mc" and _INLINE_OPTIONS.search(q):
        stripped = _INLINE_OPTIONS.sub("", q).strip()
        if stripped:
            obj = {**obj, "question": stripped}
            repairs.append("removed inline options from question")
    return _text_field(obj, "question", min_chars=10)


def parse_qa(raw: str, fmt: str, duration_s: float | None = None, num_options: int = 4) -> ParsedQA:
    """Parse, repair and validate one generated question.

    Args:
        raw: The model's output text.
        fmt: ``mc`` (``num_options`` options + letter) or ``open`` (no options, text answer).
        duration_s: Video duration, to check evidence ranges.
        num_options: Options of a multiple-choice question.

    Returns:
        The validated question.

    Raises:
        QAParseError: With the reason, when the output cannot be used.
    """
    repairs: list[str] = []
    obj = load_object(raw, repairs)
    question = _question(obj, fmt, repairs)
    reasoning = _text_field(obj, "reasoning", min_chars=MIN_REASONING_CHARS)
    if fmt == "mc":
        options = parse_options(obj, num_options, repairs)
        answer = parse_mc_answer(obj.get("answer"), options, repairs)
    elif fmt == "open":
        if obj.get("options") not in (None, [], ""):
            raise QAParseError("an open-ended question must not have options")
        options, answer = [], _text_field(obj, "answer")
        if re.fullmatch(r"\(?[A-Ha-h]\)?\.?", answer):
            raise QAParseError(f"open answer {answer!r} is a bare option letter")
    else:
        raise QAParseError(f"unknown format {fmt!r}")
    evidence = parse_evidence(obj.get("evidence"), duration_s, repairs)
    return ParsedQA(question, options, answer, reasoning, evidence, repairs)


def cot_problem(text: str) -> str | None:
    """Why a reasoning text is not natural chain of thought (steps, raw time stamps), or None.

    >>> cot_problem("Checking the video, the cup falls after the door opens.") is None
    True
    >>> cot_problem("Step 1: at (0:00:20-0:00:30) the cup falls.")
    "uses the word 'step'"
    """
    for pattern, reason in _COT_RULES:
        if pattern.search(text):
            return reason
    return None


def parse_rewrite(raw: str) -> str:
    """The rewritten reasoning of the second pass, checked by :func:`cot_problem`.

    Raises:
        QAParseError: Not a JSON object with a ``reasoning`` string, or not natural CoT.
    """
    obj = load_object(raw, [])
    text = _text_field(obj, "reasoning", min_chars=MIN_REASONING_CHARS)
    problem = cot_problem(text)
    if problem:
        raise QAParseError(f"rewritten reasoning {problem}")
    return text


def qa_schema(fmt: str, num_options: int = 4) -> dict[str, Any]:
    """JSON schema sent with the request: structure only; meaning is checked by :func:`parse_qa`.

    The answer stays a free string so that near-misses reach the repairs above instead of failing
    inside the backend, where the raw text would be lost.
    """
    evidence = {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["start_s", "end_s"],
            "properties": {"start_s": {"type": "number"}, "end_s": {"type": "number"}},
        },
    }
    props: dict[str, Any] = {"question": {"type": "string"}}
    if fmt == "mc":
        props["options"] = {"type": "array", "items": {"type": "string"},
                            "minItems": num_options, "maxItems": num_options}  # fmt: skip
    # minLength: a constrained decoder (lvr's hf backend, vLLM/SGLang guided decoding) cannot
    # stop before the reasoning is long enough to pass `parse_qa`; a small model otherwise
    # writes a few words and the question is lost.
    reasoning = {"type": "string", "minLength": MIN_REASONING_CHARS}
    props.update(reasoning=reasoning, answer={"type": "string"}, evidence=evidence)
    return {"type": "object", "required": list(props), "properties": props}


REWRITE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["reasoning"],
    "properties": {"reasoning": {"type": "string", "minLength": MIN_REASONING_CHARS}},
}
