"""The one error every media function raises for a file it cannot turn into frames."""

from __future__ import annotations

import os


class VideoDecodeError(Exception):
    """A video could not be probed or decoded: corrupt, truncated, empty, audio-only or not a video.

    The message is one line naming the path and the reason. The error pickles (it crosses process
    boundaries in data-generation workers) and carries ``path`` and ``reason`` for error columns.

    Args:
        path: The file that failed.
        reason: What went wrong, in a few words (newlines are folded into spaces).
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = " ".join(str(reason).split())
        super().__init__(
            self.path, self.reason
        )  # args = (path, reason) so that pickling round-trips

    def __str__(self) -> str:
        return f"cannot decode video {self.path}: {self.reason}"


def short_reason(e: BaseException) -> str:
    """``"<Type>: <reason>"`` of an FFmpeg error (its messages repeat the path; keep the reason)."""
    msg = getattr(e, "strerror", None) or str(e)
    return f"{type(e).__name__}: {msg}"
