"""Error messages grouped by reason: one line per kind of failure, not one per video.

An error row names its video, path or value ("video not found: abc123 (looked under /data)"), so
2,700 missing videos are 2,700 distinct messages. ``error_reason`` blanks out those specifics
(quoted values, paths, ids after "video not found:", numbers) so that counting by reason says
"2700 x video not found: … (looked under …)" — what the CLI, the run summary and the report show.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_PATHLIKE = re.compile(r"[^\s(]*[/\\]\S*?(?=[),;:]?(?:\s|$))")
_AFTER_NOT_FOUND = re.compile(r"(not found: )\S+")
_NUMBER = re.compile(r"(?<![A-Za-z])\d+(?:\.\d+)?(?![A-Za-z])")
_SPACES = re.compile(r"\s+")


def error_reason(message: str) -> str:
    """The reason of an error message, with its row-specific values blanked.

    Args:
        message: One error row's message.

    Returns:
        At most 160 characters; equal for errors that differ only in ids, paths or numbers.

    >>> error_reason("video not found: vid_7 (looked under /data/videos)")
    'video not found: … (looked under …)'
    >>> error_reason("answer 'B.' is not one option label")
    'answer … is not one option label'
    """
    text = _QUOTED.sub("…", message)
    text = _PATHLIKE.sub("…", text)
    text = _AFTER_NOT_FOUND.sub(r"\1…", text)
    text = _NUMBER.sub("N", text)
    return _SPACES.sub(" ", text).strip()[:160]


def group_errors(messages: Iterable[str | None]) -> list[tuple[str, int, str]]:
    """Count error messages by reason.

    Args:
        messages: Error messages (None entries are skipped).

    Returns:
        ``(reason, count, first example)`` sorted by count (then reason).
    """
    counts: Counter[str] = Counter()
    example: dict[str, str] = {}
    for msg in messages:
        if not msg:
            continue
        reason = error_reason(msg)
        counts[reason] += 1
        example.setdefault(reason, msg)
    return [(r, n, example[r]) for r, n in sorted(counts.items(), key=lambda t: (-t[1], t[0]))]


def summarize_errors(messages: Iterable[str | None], top: int = 3) -> str:
    """One line: the commonest reasons with counts, e.g. ``"5 x video not found: …; 1 x ..."``.

    >>> summarize_errors(["video not found: a (looked under /v)", "video not found: b (looked under /v)"])
    '2 x video not found: … (looked under …)'
    """
    groups = group_errors(messages)
    parts = [f"{n} x {reason}" for reason, n, _ in groups[:top]]
    if len(groups) > top:
        parts.append(f"+{len(groups) - top} more reasons")
    return "; ".join(parts) if parts else "no errors"
