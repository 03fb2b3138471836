"""How a model's answer is read: ONE reading for the RL rewards and for every eval score.

Training and scoring must agree on what a response answered, or RL optimises one thing and the
benchmark measures another. Everything that reads an ``<answer>`` span goes through this module:
the RL rewards (`lvr.train.rewards`), the strict (official) score and the robust extractor
(`lvr.eval.extract`). Tags are case-insensitive everywhere (``<ANSWER>`` is ``<answer>``).

The model's answer span (`answer_span`) is the FIRST closed ``<answer>...</answer>`` span that is
not inside reasoning, found by walking the tags in order:

- a closed ``<think>...</think>`` block is reasoning: a span inside it is a draft, not the answer;
- a ``</think>`` before any ``<think>`` closes a block the prompt opened (chat templates that end
  with ``<think>``): the text before it is reasoning;
- a ``</think>`` with no open block (a stray tag after the answer, as in
  ``...</think>\\n<answer>B</answer> </think>``) changes nothing: it does not turn the answer
  before it into reasoning;
- an ``<answer>`` inside a ``<think>`` that is never closed ends the reasoning (the model forgot
  the closing tag and answered);
- of several answer spans the first one counts: later ones are invented turns
  (``<answer>D</answer> user ... <answer>C</answer>`` answered D). It is also what the official
  LongVideo-Reason scorer reads.

The option letter of a span (`span_letter`) is read by the first two ranked rules of the robust
extractor (`letter_by_rule`), so the reward, the strict score and the robust score agree on every
span that holds a standalone letter: ``B``, ``B.``, ``(b)``, ``**B**``, ``B. red``, ``(B) red``.
A letter given as one of alternatives (``B or C``, ``A, B, C, D``, ``B/C``) is no answer in all
three: a hedge must never score, and a policy must not learn to list every letter.

Open-ended answers are compared after `normalize_text`; when that fails, an LLM judge is asked
the same Yes/No question (`judge_messages`, `parse_verdict`) by `lvr eval` and by the RL reward
`judged_accuracy`.
"""

from __future__ import annotations

import re
import string
import unicodedata
from typing import NamedTuple

_TAG = re.compile(r"<(/?)(think|answer)>", re.IGNORECASE)
# The paper's format reward is case-sensitive: it teaches these exact tags.
_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)

# Decorations a model wraps a letter in: markdown bold/italics, quotes, brackets.
_DECO = r"[\s*_`'\"\[\]]*"
ALL_LETTERS = "ABCDEFGHIJ"
ALL_NUMBERS = "0123456789"  # numbered options (NExT-QA: 0-4)


class _Tag(NamedTuple):
    start: int
    end: int
    closing: bool
    name: str  # "think" | "answer"


def _tags(text: str) -> list[_Tag]:
    return [
        _Tag(m.start(), m.end(), bool(m.group(1)), m.group(2).lower()) for m in _TAG.finditer(text)
    ]


def answer_span(text: str | None) -> str | None:
    """The content of the model's answer span (see the module docstring), untrimmed, or None.

    Args:
        text: A raw model response.

    Returns:
        The text between the first closed ``<answer>`` and its ``</answer>`` outside reasoning,
        or None when there is no such span.

    >>> answer_span("<think>maybe <answer>A</answer></think>\\n<answer>B</answer> </think>")
    'B'
    >>> answer_span("<answer>D</answer> user: and? <answer>C</answer>")
    'D'
    >>> answer_span("I reason</think><ANSWER> C </ANSWER>")
    ' C '
    >>> answer_span("<think>hm <answer>A") is None
    True
    """
    if not text:
        return None
    tags = _tags(text)
    thinks = [t for t in tags if t.name == "think"]
    # A closing tag before any opening one: the prompt opened the reasoning block.
    in_think = bool(thinks) and thinks[0].closing
    opened: _Tag | None = None  # the <answer> of the span being read
    for i, tag in enumerate(tags):
        if opened is not None:
            if tag.name == "answer" and tag.closing:
                return text[opened.end : tag.start]
            continue  # inside a span, only its end matters
        if tag.name == "think":
            in_think = not tag.closing
        elif not tag.closing:
            closes_later = any(t.name == "think" and t.closing for t in tags[i + 1 :])
            if in_think and closes_later:
                continue  # a draft inside the reasoning
            in_think = False  # an unclosed <think> ends where the answer starts
            opened = tag
    return None


def format_ok(text: str | None) -> bool:
    """The paper's format: the whole (trimmed) text is ``<think>.*?</think>\\s*<answer>.*?</answer>``.

    >>> format_ok("<think>r</think>\\n<answer>A</answer>"), format_ok("<answer>A</answer>")
    (True, False)
    """
    return bool(text) and _FORMAT.fullmatch(text.strip()) is not None


# "not B", "Not (B)", "NOT B": a rejection, not an answer.
_NOT = r"(?<![Nn][Oo][Tt] )(?<![Nn][Oo][Tt] \()"
# What joins alternatives: "B or C", "B and C", "B, C", "B; C", "B/C", "B or maybe C", "B\nC".
_JOIN = r"\s*(?:,|;|/|&|\+|\n|\b(?:or|and)\b(?:\s+(?:maybe|possibly|perhaps))?)\s*"
# Wrappers around a letter in such a list: brackets, markdown, quotes, LaTeX's \boxed{...}.
_WRAP = r"[\s*_`'\"\[\](){}]*(?:\\boxed\{)?"


def _letter_class(letters: str) -> str:
    return "[" + re.escape(letters) + "]"


def _rules(offered: str) -> list[tuple[str, re.Pattern[str]]]:
    """The ranked letter rules for a set of offered (upper-case) letters (see lvr.eval.extract)."""
    up = _letter_class(offered)
    both = _letter_class(offered + offered.lower())
    no_word = r"(?![A-Za-z0-9])"
    neg = _NOT
    phrase = (
        r"(?:answer|option|choice)\s*(?:is|would\s+be|should\s+be|will\s+be|=|:|-)"
        r"\s*(?:option|choice|letter)?\s*:?"
        r"|i\s+(?:choose|pick|select)|i\s+(?:would\s+|will\s+)?go\s+with"
    )
    lower_ok = r"(?=\s*(?:[.,;:!?)\]*]|$))"  # a lower-case letter must not be followed by a word
    # "A" and "I" are also English words: as a bare occurrence they count only when not followed
    # by a lower-case word ("A man", "I think").
    words = "".join(x for x in offered if x in "AI")
    others = "".join(x for x in offered if x not in "AI")
    any_alts = []
    if others:
        any_alts.append(rf"({_letter_class(others)}){no_word}")
    if words:
        any_alts.append(rf"({_letter_class(words)}){no_word}(?!\s+[a-z])")
    return [
        ("alone", re.compile(rf"^{_DECO}\(?({both})\)?{_DECO}\.?{_DECO}$")),
        ("start", re.compile(rf"^{_DECO}\(?({up}){_DECO}(?:[.):,]|$|\n)")),
        ("end", re.compile(rf"(?:^|[^A-Za-z0-9]){_DECO}\(?{neg}({up})\)?{_DECO}[.!]?{_DECO}$")),
        (
            "phrase",
            re.compile(rf"(?i:{phrase})\s*{_DECO}[(\[]?(?:({up}){no_word}|({both}){lower_ok})"),
        ),
        ("paren", re.compile(rf"{neg}\(({both})\)")),
        ("dot", re.compile(rf"(?<![A-Za-z0-9.]){neg}({up})\.{no_word}")),
        ("colon", re.compile(rf"(?<![A-Za-z0-9]){neg}({up}):")),
        ("rparen", re.compile(rf"(?<![A-Za-z0-9(]){neg}({up})\)")),
        ("any", re.compile(rf"(?<![A-Za-z0-9]){neg}(?:{'|'.join(any_alts)})")),
    ]


def _number_rules(offered: str) -> list[tuple[str, re.Pattern[str]]]:
    """Ranked rules for numbered options (``"01234"``, NExT-QA style).

    Numbers are everywhere in prose ("3 people", "at 0:30", "1.5 s"), so only the forms that
    cannot be a count or a time are read: the whole answer, a number opening the answer with a
    mark ("2." / "2)" / "(2)"), a number after an answer phrase or the word option/choice/number,
    and "(2)" anywhere.
    """
    num = _letter_class(offered)
    no_digit = r"(?![0-9A-Za-z])"
    phrase = (
        r"(?:answer|option|choice|number)\s*(?:is|would\s+be|should\s+be|=|:|-|#)?\s*"
        r"|i\s+(?:choose|pick|select)\s*(?:option|choice|number)?\s*"
    )
    return [
        ("alone", re.compile(rf"^{_DECO}\(?({num})\)?{_DECO}\.?{_DECO}$")),
        ("start", re.compile(rf"^{_DECO}\(?({num})\)?{_DECO}(?:[.):,](?![0-9])|\n)")),
        ("phrase", re.compile(rf"(?i:{phrase}){_DECO}[(\[]?({num}){no_digit}(?!\.[0-9])")),
        ("paren", re.compile(rf"\(({num})\)")),
    ]


_RULE_CACHE: dict[str, list[tuple[str, re.Pattern[str]]]] = {}
# The rules that read a span as a standalone letter: the reward's and the strict letter reading.
SPAN_RULES = ("alone", "start")


def letter_by_rule(
    target: str, offered: str, rules: tuple[str, ...] | None = None
) -> tuple[str | None, str | None]:
    """The letter the highest-ranked matching rule reads in `target`, and that rule's name.

    Args:
        target: The text to read (an answer span, or a response without reasoning).
        offered: The offered upper-case letters, e.g. "ABCD".
        rules: Only these rule names (default: all, in rank order).

    Returns:
        ``(letter, rule)``; ``(None, None)`` when no rule matches; ``(None, "ambiguous")`` when
        the winning match is one of alternatives ("B or C", "A, B, C, D": `_hedged`). Within a
        rank the LAST match wins.

    >>> letter_by_rule("so the answer is (c).", "ABCD")
    ('C', 'phrase')
    """
    ranked = _RULE_CACHE.get(offered)
    if ranked is None:  # numbered options ("01234") have rules of their own
        ranked = _RULE_CACHE[offered] = (_number_rules if offered.isdigit() else _rules)(offered)
    stripped = target.strip()
    for name, pattern in ranked:
        if rules is not None and name not in rules:
            continue
        matches = list(pattern.finditer(stripped))
        if matches:
            match = matches[-1]
            index = next(i for i, g in enumerate(match.groups(), 1) if g)
            if _hedged(stripped, match.start(index), match.end(index), offered):
                return None, "ambiguous"
            return match.group(index).upper(), name
    return None, None


def _hedged(text: str, start: int, end: int, offered: str) -> bool:
    """Whether the letter at `text[start:end]` is one of alternatives: "B or C", "A, B, C, D".

    A hedge names several answers, so it answers none of them (it must never score as one). A
    letter only mentioned elsewhere ("B and C are wrong, so A") does not make `A` a hedge.
    """
    others = offered.replace(text[start:end].upper(), "")
    if not others:
        return False
    # An alternative is a standalone letter; "A" and "I" not starting an English phrase ("I
    # think", "A man"), though "A or B" joins them.
    word = r"(?!\s+(?!(?:or|and)\b)[a-z])" if set(others) & set("AI") else ""
    other = rf"(?<![A-Za-z0-9]){_letter_class(others)}(?![A-Za-z0-9]){word}"
    before = re.search(rf"{other}{_WRAP}{_JOIN}{_WRAP}$", text[:start])
    after = re.match(rf"[\s*_`'\"\[\](){{}}.]*?{_JOIN}{_WRAP}{other}", text[end:])
    return bool(before or after)


def span_letter(span: str | None, offered: str = ALL_LETTERS) -> str | None:
    """The option letter (or number, with ``offered="01234"``) an answer span holds alone.

    >>> [span_letter(s) for s in ["B", " (b) ", "B. red", "**C**", "the answer is B", "Bee"]]
    ['B', 'B', 'B', 'C', None, None]
    >>> span_letter("2. a dog", "01234")
    '2'
    """
    if span is None:
        return None
    return letter_by_rule(span, offered, SPAN_RULES)[0]


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
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)


def judge_messages(question: str, gold: str, answer: str) -> list[dict[str, str]]:
    """Chat messages asking an LLM judge whether ``answer`` means ``gold`` (text only).

    >>> judge_messages("Q?", "red", "crimson")[1]["content"].splitlines()[1]
    'Reference answer: red'
    """
    user = JUDGE_TEMPLATE.format(
        question=question.strip(), gold=gold.strip(), answer=answer.strip()
    )
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_verdict(text: str | None) -> bool | None:
    """Read a judge reply: True for Yes, False for No, None for anything else (never a guess).

    Reasoning blocks are ignored; the rest must be the single word (punctuation allowed).

    >>> parse_verdict("Yes."), parse_verdict("<think>hm</think> no"), parse_verdict("Yes, but no")
    (True, False, None)
    """
    if text is None:
        return None
    text = _THINK_BLOCK.sub("", text)
    text = text.rsplit("</think>", 1)[-1]  # a block the prompt opened
    match = _VERDICT.match(text.strip())
    if not match:
        return None
    return match.group(1).lower() == "yes"


def normalize_text(text: str) -> str:
    """Normalize an answer text for comparison: NFKC, lower case, no punctuation or articles.

    >>> normalize_text("  The Red-Car! ")
    'red car'
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if ch in string.punctuation else ch for ch in text)
    words = [w for w in text.split() if w not in {"a", "an", "the"}]
    return " ".join(words)
