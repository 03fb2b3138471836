"""A stage worker that kills its own process once, for the Ray executor tests (import as
`ray_faults`; Ray workers import it by name, so the tests put this folder on their PYTHONPATH)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


class CrashOnce:
    """Wraps a stage's ``open_worker``: the first attempt of the shard holding ``video_id`` dies.

    The worker process exits (``os._exit``, as a segfault or the OOM killer would end it) halfway
    through that shard, after the first half of its items was processed; ``marker`` records the
    crash (created atomically, so exactly one attempt dies even with several workers).
    """

    def __init__(self, open_worker: Callable[..., Any], video_id: str, marker: Path):
        self.open_worker, self.video_id, self.marker = open_worker, video_id, str(marker)

    def __call__(self, cfg: Any, ctx: Any) -> _Crashing:
        return _Crashing(self.open_worker(cfg, ctx), self.video_id, self.marker)


class _Crashing:
    def __init__(self, inner: Any, video_id: str, marker: str):
        self.inner, self.video_id, self.marker = inner, video_id, marker

    def __call__(self, items: list[Any]) -> dict[str, list[dict[str, Any]]]:
        if any(it.video_id == self.video_id for it in items) and self._claim():
            self.inner(items[: max(1, len(items) // 2)])  # half the shard's work is done...
            os._exit(1)  # ... when the process dies: no shard file, no marker
        return self.inner(items)

    def _claim(self) -> bool:
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True

    def close(self) -> None:
        if hasattr(self.inner, "close"):
            self.inner.close()
