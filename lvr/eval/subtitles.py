"""Subtitle files as benchmarks publish them: SRT (and WebVTT-style times), read into cues."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# "00:01:02,500" (SRT) or "01:02.500" (WebVTT without hours), on both sides of the arrow.
_CUE_TIME = r"(?:(\d+):)?(\d+):(\d+)[,.](\d+)"
_SRT_TIME = re.compile(rf"{_CUE_TIME}\s*-->\s*{_CUE_TIME}")


def _seconds(hours: str | None, minutes: str, seconds: str, fraction: str) -> float:
    return int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds) + float(f"0.{fraction}")


def read_srt(path: Path) -> list[list[Any]]:
    """Cues of an SRT file as ``[start_s, end_s, text]`` (markup like ``<font>`` removed).

    Args:
        path: The .srt file (WebVTT-style times without hours also read).

    Returns:
        Cues in file order, multi-line text joined. A cue's number is the line right before its
        time line; every other line is text, numbers included ("2024", "42").
    """
    lines = [
        ln.strip() for ln in path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    ]
    cues: list[list[Any]] = []
    for i, line in enumerate(lines):
        match = _SRT_TIME.search(line)
        if match:
            groups = match.groups()
            cues.append([_seconds(*groups[:4]), _seconds(*groups[4:]), ""])
        elif line and cues:
            is_number = line.isdigit() and i + 1 < len(lines) and _SRT_TIME.search(lines[i + 1])
            if not is_number:
                text = re.sub(r"<[^>]+>", "", line)
                cues[-1][2] = f"{cues[-1][2]} {text}".strip()
    return [c for c in cues if c[2]]
