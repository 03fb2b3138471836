"""The prompt text every model sees (SFT targets, RL rollouts, eval questions): no torch here.

Kept apart from `lvr.models.inputs` (which tokenizes and builds tensors) so that `lvr eval`
against an OpenAI-compatible API builds exactly the same messages on the core install, without
torch. Bump `PROMPT_VERSION` whenever any constant or layout below changes
(`prompt_fingerprint()` and its test catch a forgotten bump).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any, Literal

Mode = Literal["think", "direct"]

PROMPT_VERSION = "lvr-prompt-v1"
SYSTEM_PROMPT = "You are a helpful assistant."
THINK_INSTRUCTION = (
    "Think step by step inside <think></think>, "
    "then give the option letter inside <answer></answer>."
)
THINK_INSTRUCTION_OPEN = (
    "Think step by step inside <think></think>, "
    "then give the final answer inside <answer></answer>."
)
DIRECT_INSTRUCTION = "Answer with the option letter only, inside <answer></answer>."
DIRECT_INSTRUCTION_OPEN = "Give only the final answer, inside <answer></answer>."
OPTION_LETTERS = "ABCDEFGHIJ"


def prompt_fingerprint() -> str:
    """Hash every prompt constant, so a test can tell when `PROMPT_VERSION` must be bumped.

    Returns:
        16 hex characters.
    """
    parts = [
        SYSTEM_PROMPT,
        THINK_INSTRUCTION,
        THINK_INSTRUCTION_OPEN,
        DIRECT_INSTRUCTION,
        DIRECT_INSTRUCTION_OPEN,
        format_question("Q?", ["x", "y"]),
        format_target("B", "r"),
        format_target("B"),
    ]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def instruction_for(mode: Mode, has_options: bool) -> str:
    """Return the answer-format instruction for a mode and question kind.

    Args:
        mode: "think" (reasoning then answer) or "direct" (answer only).
        has_options: Multiple choice (letter answer) or open-ended.

    Returns:
        One of the four instruction constants.

    Raises:
        ValueError: Unknown mode.
    """
    if mode == "think":
        return THINK_INSTRUCTION if has_options else THINK_INSTRUCTION_OPEN
    if mode == "direct":
        return DIRECT_INSTRUCTION if has_options else DIRECT_INSTRUCTION_OPEN
    raise ValueError(f"mode must be 'think' or 'direct', got {mode!r}")


def format_question(question: str, options: Sequence[str] | None) -> str:
    """Append lettered options to a question, one per line ("\\nA. red\\nB. blue").

    An option that already starts with its own letter ("A. red", as in Video-MME) is kept as is.

    Args:
        question: Question text.
        options: Option texts in order, or None for an open-ended question.

    Returns:
        The question block of the user turn.

    Raises:
        ValueError: Empty question, empty option, or more options than letters.
    """
    if not question.strip():
        raise ValueError("question is empty")
    if not options:
        return question.strip()
    if len(options) > len(OPTION_LETTERS):
        raise ValueError(f"at most {len(OPTION_LETTERS)} options, got {len(options)}")
    lines = [question.strip()]
    for letter, option in zip(OPTION_LETTERS, options, strict=False):
        text = str(option).strip()
        if not text:
            raise ValueError(f"option {letter} is empty")
        prefixed = re.match(rf"^{letter}[.)]\s", text) is not None
        lines.append(text if prefixed else f"{letter}. {text}")
    return "\n".join(lines)


def format_target(answer: str, reasoning: str | None = None) -> str:
    """Build the assistant target text.

    Args:
        answer: Option letter or short answer.
        reasoning: Chain of thought; None for a direct answer.

    Returns:
        `<think>{reasoning}</think><answer>{answer}</answer>` or `<answer>{answer}</answer>`.

    >>> format_target("B", "The ball moves first.")
    '<think>The ball moves first.</think><answer>B</answer>'
    >>> format_target("B")
    '<answer>B</answer>'
    """
    if reasoning is None:
        return f"<answer>{answer}</answer>"
    return f"<think>{reasoning}</think><answer>{answer}</answer>"


def build_messages(
    question: str,
    options: Sequence[str] | None = None,
    mode: Mode = "think",
    has_video: bool = True,
    system_prompt: str | None = SYSTEM_PROMPT,
    instruction: str | None = None,
) -> list[dict[str, Any]]:
    """Build the chat messages of one prompt (no assistant turn).

    Args:
        question: Question text.
        options: Option texts, or None for open-ended.
        mode: "think" or "direct"; picks the instruction.
        has_video: Put a `{"type": "video"}` item before the text (list content); otherwise the
            user content is a plain string, which text-only chat templates require.
        system_prompt: System turn text; None leaves it to the chat template's default.
        instruction: Override of the instruction line (e.g. a benchmark's own prompt).

    Returns:
        Messages for `apply_chat_template`.
    """
    text = format_question(question, options)
    instr = instruction if instruction is not None else instruction_for(mode, bool(options))
    if instr:
        text = f"{text}\n{instr}"
    messages: list[dict[str, Any]] = []
    if system_prompt is not None:
        messages.append({"role": "system", "content": system_prompt})
    if has_video:
        content: Any = [{"type": "video"}, {"type": "text", "text": text}]
    else:
        content = text
    messages.append({"role": "user", "content": content})
    return messages
