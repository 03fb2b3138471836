"""Answer extraction: from a model's free text to an option letter (or an open-ended answer).

This is the part of an evaluation people have to trust, so every decision is a named rule and
every rule is tested against adversarial responses (``tests/test_eval_extract.py``).

``extract_choice(response, offered_letters, options)`` returns ``(letter | None, rule)``:

1. The target text is the model's answer span, read by `lvr.answers.answer_span` exactly as the
   RL rewards and the strict score read it: the FIRST closed ``<answer>...</answer>`` span
   outside reasoning (tags case-insensitive; a stray ``</think>`` after the answer does not hide
   it; a later span is an invented turn). With a span, text outside it is never looked at: the
   model committed there.
2. Without a closed span, reasoning is removed (`strip_reasoning`: closed ``<think>`` blocks, an
   unclosed ``<think>`` up to the first ``<answer>``, everything before a ``</think>`` the prompt
   opened); then an unclosed ``<answer>`` (a response cut by ``max_tokens``) runs to the end,
   and without any ``<answer>`` the target is the remaining text.
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

   A letter right after "not " in any case ("not B", "Not (B)") is a rejection and is skipped by
   the ``end``, ``paren``, ``dot``, ``colon``, ``rparen`` and ``any`` rules.

   ``ambiguous``: when the winning rule's letter is one of alternatives ("B or C", "either B or
   C", "B, C", "A, B, C, D", "B/C", "\\boxed{B} or \\boxed{C}", one letter per line), the response
   named several answers: ``(None, "<where>/ambiguous")``, scored wrong, and no later rule or
   option text is tried. Letters mentioned elsewhere ("B and C are wrong, so A") do not count.

   Numbered options (``offered`` = ``"01234"``, NExT-QA) use the number rules of `lvr.answers` instead: only
   ``alone``, ``start``, ``phrase`` (also "option 2", "choice 2") and ``paren``, since counts
   and times in prose ("3 people", "at 0:30") would otherwise read as answers.

   Lower-case letters are accepted only where they cannot be prose: ``alone`` (the whole answer
   is "b"), ``phrase`` when the letter is not followed by a word ("the answer is b",
   "answer: (c)" — but not "the answer is a man"), and ``paren`` ("(b)"). Everywhere else only upper case counts, so "a", "I" or "c." in
   prose are never read as answers.
4. Option text: when no letter rule matched and option texts are given, a target whose normalized
   text equals exactly one option's normalized text maps to that letter (``option_text``); failing
   that, a target that contains exactly one option's normalized text (``option_text_contained``),
   not counting a text right after a negation ("not red", "isn't red", "nor red").
5. Otherwise ``(None, "no_match")`` — never a random letter (LongVideoBench's harness picks one at
   random when parsing fails; we count it as wrong and report how often it happens).

Rule names are prefixed by where they matched: ``tag/phrase`` (inside ``<answer>``) or
``text/end`` (free text). Scores use two comparisons side by side:

- ``strict_match``: the official LongVideo-Reason comparison — the answer span (the same span
  as above and as the reward's), whitespace-trimmed, must equal the gold letter exactly (``B.``
  scores 0).
- ``extract_choice``: the robust comparison above.

and ``format_ok`` checks the training reward's format: the whole (trimmed) response matches
``<think>.*?</think>\\s*<answer>.*?</answer>`` with ``.`` matching newlines.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from lvr.answers import ALL_LETTERS, answer_span, format_ok, letter_by_rule, normalize_text

__all__ = [
    "ALL_LETTERS",
    "PARSER_VERSION",
    "answer_span",
    "answer_target",
    "extract_choice",
    "extract_open",
    "format_ok",
    "normalize_text",
    "open_match",
    "strict_answer",
    "strict_match",
    "strip_option_prefix",
    "strip_reasoning",
]

PARSER_VERSION = "lvr-extract-v3"  # v3: hedges ("B or C") and negations ("Not A") score no letter

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)
_ANSWER_OPEN = re.compile(r"<answer>", re.IGNORECASE)
_ANSWER_CLOSE = re.compile(r"</answer>", re.IGNORECASE)


def strip_reasoning(text: str) -> str:
    """Remove reasoning blocks so that letters inside a chain of thought never count.

    Used where a response has no closed answer span (the span itself is `lvr.answers`').

    Args:
        text: Raw model response.

    Returns:
        The response without ``<think>`` content: closed blocks; an unclosed ``<think>`` up to
        the first ``<answer>`` (or to the end); and, when a ``</think>`` appears without an
        opening tag (templates that put ``<think>`` in the prompt), everything before the last
        one.

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


def answer_target(response: str) -> tuple[str, str]:
    """Where the answer is read and the text read there: ``("tag", span)`` or ``("text", text)``.

    >>> answer_target("<think>A?</think><answer>B</answer> </think>")
    ('tag', 'B')
    >>> answer_target("<think>x</think><answer>C, because the")
    ('tag', 'C, because the')
    >>> answer_target("<think>x</think> so C")
    ('text', ' so C')
    """
    span = answer_span(response)
    if span is not None:
        return "tag", span
    text = strip_reasoning(response)
    opened = list(_ANSWER_OPEN.finditer(text))
    if opened:  # cut by max_tokens: the unclosed span runs to the end
        return "tag", _ANSWER_CLOSE.split(text[opened[-1].end() :])[0]
    return "text", text


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
    inside = [i for i, n in enumerate(norms) if n and _asserted(norm_target, n)]
    if len(inside) == 1:
        return letters[inside[0]], "option_text_contained"
    return None, None


# Words that reject what follows ("not red", "it isn't red": normalized "isn t red").
_NEGATIONS = {"not", "no", "never", "t", "nor", "neither"}


def _asserted(norm_target: str, norm_option: str) -> bool:
    """Whether a normalized target names the option other than right after a negation."""
    words = norm_target.split()
    size = len(norm_option.split())
    return any(
        " ".join(words[i : i + size]) == norm_option and (i == 0 or words[i - 1] not in _NEGATIONS)
        for i in range(len(words) - size + 1)
    )


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
    where, target = answer_target(response)
    if not target.strip():
        return None, f"{where}/empty"
    if offered:
        letter, rule = letter_by_rule(target, offered)
        if rule is not None:  # a letter, or "ambiguous": several named, none answered
            return letter, f"{where}/{rule}"
    if options:
        letters = offered or ALL_LETTERS[: len(options)]
        letter, rule = _option_text_letter(target, list(options)[: len(letters)], letters)
        if letter is not None:
            return letter, f"{where}/{rule}"
    return None, "no_match"


def strict_answer(response: str | None) -> str | None:
    """Return the official answer text: the answer span (`lvr.answers`), whitespace-trimmed.

    Args:
        response: Raw model output.

    Returns:
        The span text, or None without a closed ``<answer>`` span outside reasoning.
    """
    span = answer_span(response)
    return span.strip() if span is not None else None


def strict_match(response: str | None, gold: str) -> bool:
    """Official comparison: the ``<answer>`` text equals the gold exactly (``"B."`` != ``"B"``).

    >>> strict_match("<think>x</think><answer>B</answer>", "B")
    True
    >>> strict_match("<answer>B.</answer>", "B")
    False
    """
    answer = strict_answer(response)
    return answer is not None and answer == gold


def extract_open(response: str | None) -> str | None:
    """Return the open-ended answer: the answer span (as `extract_choice` reads it), or the text.

    Args:
        response: Raw model output.

    Returns:
        The trimmed answer text, or None when nothing is left.
    """
    if not response:
        return None
    out = answer_target(response)[1].strip()
    return out or None


def open_match(response: str | None, gold: str) -> bool:
    """Normalized exact match of an open-ended answer (articles, case, punctuation ignored).

    >>> open_match("<answer>The red car.</answer>", "red car")
    True
    """
    answer = extract_open(response)
    return answer is not None and normalize_text(answer) == normalize_text(gold)
