"""Answer extraction: from a model's free text to an option letter (or an open-ended answer).

This is the part of an evaluation people have to trust, so every decision is a named rule and
every rule is tested against adversarial responses (``tests/test_eval_extract.py``).

``extract_choice(response, offered_letters, options)`` returns ``(letter | None, rule)``:

1. Reasoning is removed first: every closed ``<think>...</think>`` block; an unclosed ``<think>``
   up to the first ``<answer>`` (or to the end); and, when a ``</think>`` appears without an
   opening tag (templates that put ``<think>`` in the prompt), everything before the last one.
2. The target text is the LAST ``<answer>...</answer>`` span (an unclosed ``<answer>`` — e.g. a
   response cut by ``max_tokens`` — runs to the end). Without any span, the target is the
   remaining text. With a span, text outside it is never looked at: the model committed there.
3. Letter rules, tried in rank order; within a rank the LAST match wins; only offered letters
   count (``E`` is ignored when only A-D are offered):

   ``alone``   the target is just the letter: ``B``, ``B.``, ``(b)``, ``**B**``.
   ``start``   the target opens with a standalone letter: ``B. red``, ``(B) red``, ``B:``,
               ``B`` + newline; a letter followed by a word ("A video shows...") is NOT standalone.
   ``end``     the target closes with a standalone letter: ``... so C``, ``... (C).``
   ``phrase``  after "answer is / answer: / correct option is / choose ...": ``answer is B``.
   ``paren``   ``(B)``        ``dot``  ``B.``      ``colon``  ``B:``      ``rparen``  ``B)``
   ``any``     any standalone occurrence, except ``A``/``I`` used as English words (followed by a
               lower-case word: "A man", "I think").

   A letter right after "not " ("not B", "not (B)") is a rejection and is skipped by the ``end``,
   ``paren``, ``dot``, ``colon``, ``rparen`` and ``any`` rules.

   Numbered options (``offered`` = ``"01234"``, NExT-QA) use ``_number_rules`` instead: only
   ``alone``, ``start``, ``phrase`` (also "option 2", "choice 2") and ``paren``, since counts
   and times in prose ("3 people", "at 0:30") would otherwise read as answers.

   Lower-case letters are accepted only where they cannot be prose: ``alone`` (the whole answer
   is "b"), ``phrase`` when the letter is not followed by a word ("the answer is b",
   "answer: (c)" — but not "the answer is a man"), and ``paren`` ("(b)"). Everywhere else only upper case counts, so "a", "I" or "c." in
   prose are never read as answers.
4. Option text: when no letter rule matched and option texts are given, a target whose normalized
   text equals exactly one option's normalized text maps to that letter (``option_text``); failing
   that, a target that contains exactly one option's normalized text (``option_text_contained``).
5. Otherwise ``(None, "no_match")`` — never a random letter (LongVideoBench's harness picks one at
   random when parsing fails; we count it as wrong and report how often it happens).

Rule names are prefixed by where they matched: ``tag/phrase`` (inside ``<answer>``) or
``text/end`` (free text). Scores use two comparisons side by side:

- ``strict_match``: the official LongVideo-Reason comparison — the first ``<answer>`` span,
  whitespace-trimmed, must equal the gold letter exactly (``B.`` scores 0).
- ``extract_choice``: the robust comparison above.

and ``format_ok`` checks the training reward's format: the whole (trimmed) response matches
``<think>.*?</think>\\s*<answer>.*?</answer>`` with ``.`` matching newlines.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence

PARSER_VERSION = "lvr-extract-v1"
ALL_LETTERS = "ABCDEFGHIJ"

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)
_ANSWER_SPAN = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_ANSWER_OPEN = re.compile(r"<answer>", re.IGNORECASE)
_FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)

# Decorations a model wraps a letter in: markdown bold/italics, quotes, brackets.
_DECO = r"[\s*_`'\"\[\]]*"


def strip_reasoning(text: str) -> str:
    """Remove reasoning blocks so that letters inside a chain of thought never count.

    Args:
        text: Raw model response.

    Returns:
        The response without ``<think>`` content (see the module docstring for the three cases).

    >>> strip_reasoning("<think>A is wrong</think><answer>B</answer>")
    '<answer>B</answer>'
    >>> strip_reasoning("<think>maybe A... <answer>C</answer>")
    '<answer>C</answer>'
    >>> strip_reasoning("reasoning about A</think> B")
    ' B'
    """
    text = _THINK_BLOCK.sub("", text)
    opened = _THINK_OPEN.search(text)
    if opened:  # unclosed <think>: drop up to the answer, or everything after it
        answer = _ANSWER_OPEN.search(text, opened.end())
        end = answer.start() if answer else len(text)
        text = text[: opened.start()] + text[end:]
    closes = list(_THINK_CLOSE.finditer(text))
    if closes:  # a closing tag without its opening one: the prompt opened the block
        text = text[closes[-1].end() :]
    return text


def answer_span(text: str) -> str | None:
    """Return the content of the last ``<answer>`` span (unclosed runs to the end), or None.

    Args:
        text: Response with reasoning already stripped.

    Returns:
        The span text, or None when the response has no ``<answer>`` tag.
    """
    spans = _ANSWER_SPAN.findall(text)
    if spans:
        return spans[-1]
    opened = list(_ANSWER_OPEN.finditer(text))
    if opened:
        return text[opened[-1].end() :]
    return None


def _letter_class(letters: str) -> str:
    return "[" + re.escape(letters) + "]"


def _rules(offered: str) -> list[tuple[str, re.Pattern[str]]]:
    """Compile the ranked letter rules for a set of offered (upper-case) letters."""
    up = _letter_class(offered)
    both = _letter_class(offered + offered.lower())
    no_word = r"(?![A-Za-z0-9])"
    neg = r"(?<!not )(?<!not \()"  # "not B" / "not (B)" is a rejection, not an answer
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


def _letters_by_rule(target: str, offered: str) -> tuple[str | None, str | None]:
    rules = _RULE_CACHE.get(offered)
    if rules is None:
        rules = _RULE_CACHE[offered] = (_number_rules if offered.isdigit() else _rules)(offered)
    stripped = target.strip()
    for name, pattern in rules:
        matches = list(pattern.finditer(stripped))
        if matches:
            groups = [g for g in matches[-1].groups() if g]  # last match wins within a rank
            return groups[0].upper(), name
    return None, None


def normalize_text(text: str) -> str:
    """Normalize an answer text for comparison: NFKC, lower case, no punctuation or articles.

    Args:
        text: Any answer text.

    Returns:
        Lower-case words separated by single spaces.

    >>> normalize_text("  The Red-Car! ")
    'red car'
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if ch in string.punctuation else ch for ch in text)
    words = [w for w in text.split() if w not in {"a", "an", "the"}]
    return " ".join(words)


def _option_text_letter(
    target: str, options: Sequence[str], letters: str
) -> tuple[str | None, str | None]:
    norm_target = normalize_text(target)
    if not norm_target:
        return None, None
    norms = [normalize_text(strip_option_prefix(o, letters[i])) for i, o in enumerate(options)]
    equal = [i for i, n in enumerate(norms) if n and n == norm_target]
    if len(equal) == 1:
        return letters[equal[0]], "option_text"
    padded = f" {norm_target} "
    inside = [i for i, n in enumerate(norms) if n and f" {n} " in padded]
    if len(inside) == 1:
        return letters[inside[0]], "option_text_contained"
    return None, None


def strip_option_prefix(option: str, letter: str) -> str:
    """Remove a leading "A. " / "A) " that some benchmarks (Video-MME) keep in option texts.

    Args:
        option: Option text.
        letter: Its letter.

    Returns:
        The option text without its own letter prefix.

    >>> strip_option_prefix("B. a red car", "B")
    'a red car'
    """
    return re.sub(rf"^\s*\(?{re.escape(letter)}[.):]\s*", "", option)


def extract_choice(
    response: str | None,
    offered_letters: str | Sequence[str],
    options: Sequence[str] | None = None,
) -> tuple[str | None, str]:
    """Extract the chosen option letter from a response (see the module docstring for the rules).

    Args:
        response: Raw model output (None or empty gives ``(None, "empty")``).
        offered_letters: Letters of the offered options, e.g. ``"ABCD"``.
        options: Option texts in letter order, for the full-text fallback.

    Returns:
        ``(letter, rule)``; the letter is upper case or None, the rule names what matched.

    >>> extract_choice("<think>A video shows... I think B is wrong</think> so C", "ABCD")
    ('C', 'text/end')
    >>> extract_choice("<answer>B.</answer>", "ABCD")
    ('B', 'tag/alone')
    >>> extract_choice("The answer is E", "ABCD")
    (None, 'no_match')
    """
    offered = "".join(sorted({str(x).strip().upper() for x in offered_letters if str(x).strip()}))
    if not response or not response.strip():
        return None, "empty"
    text = strip_reasoning(response)
    span = answer_span(text)
    where, target = ("tag", span) if span is not None else ("text", text)
    if not target.strip():
        return None, f"{where}/empty"
    if offered:
        letter, rule = _letters_by_rule(target, offered)
        if letter is not None:
            return letter, f"{where}/{rule}"
    if options:
        letters = offered or ALL_LETTERS[: len(options)]
        letter, rule = _option_text_letter(target, list(options)[: len(letters)], letters)
        if letter is not None:
            return letter, f"{where}/{rule}"
    return None, "no_match"


def strict_answer(response: str | None) -> str | None:
    """Return the official answer text: the first ``<answer>`` span, whitespace-trimmed.

    Args:
        response: Raw model output.

    Returns:
        The span text, or None without a closed ``<answer>`` span.
    """
    if not response:
        return None
    match = _ANSWER_SPAN.search(response)
    return match.group(1).strip() if match else None


def strict_match(response: str | None, gold: str) -> bool:
    """Official comparison: the ``<answer>`` text equals the gold exactly (``"B."`` != ``"B"``).

    >>> strict_match("<think>x</think><answer>B</answer>", "B")
    True
    >>> strict_match("<answer>B.</answer>", "B")
    False
    """
    answer = strict_answer(response)
    return answer is not None and answer == gold


def format_ok(response: str | None) -> bool:
    """Reward format check: ``<think>.*?</think>\\s*<answer>.*?</answer>`` matches the whole text.

    >>> format_ok("<think>r</think>\\n<answer>A</answer>")
    True
    >>> format_ok("<answer>A</answer>")
    False
    """
    return bool(response) and _FORMAT.fullmatch(response.strip()) is not None


def extract_open(response: str | None) -> str | None:
    """Return the open-ended answer: the last ``<answer>`` span, or the text without reasoning.

    Args:
        response: Raw model output.

    Returns:
        The trimmed answer text, or None when nothing is left.
    """
    if not response:
        return None
    text = strip_reasoning(response)
    span = answer_span(text)
    out = (span if span is not None else text).strip()
    return out or None


def open_match(response: str | None, gold: str) -> bool:
    """Normalized exact match of an open-ended answer (articles, case, punctuation ignored).

    >>> open_match("<answer>The red car.</answer>", "red car")
    True
    """
    answer = extract_open(response)
    return answer is not None and normalize_text(answer) == normalize_text(gold)
