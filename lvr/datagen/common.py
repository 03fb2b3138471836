"""Small helpers the datagen stages share: settings ids, error lines, model backends built on use.

Shard bookkeeping (upstream shards, orphans, retries) lives with the runner, :mod:`lvr.datagen.runner`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lvr.artifacts import content_id
from lvr.backends import Backend, make_backend


def settings_id(settings: dict[str, Any]) -> str:
    """Id of the settings that change a stage's rows; it joins every shard item's fingerprint.

    Changing them (e.g. the clip stride) makes a rerun recompute the shards instead of trusting
    markers written under other settings; settings that only change speed are left out.
    """
    return content_id("settings", json.dumps(settings, sort_keys=True, default=str))


def error_line(exc: BaseException, limit: int = 300) -> str:
    """One line naming the error type and message, for ``error`` columns."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ModelBackends:
    """The model backends of one stage worker, built on first use over the run's request cache.

    Building is deferred so that a run whose shards are all finished never loads a model.
    """

    def __init__(self, kind: str, options: dict[str, Any], cache_file: Path):
        self.kind, self.options, self.cache_file = kind, options, cache_file
        self._built: dict[str, Backend] = {}

    def __call__(self, model: str) -> Backend:
        """The backend serving ``model``."""
        if model not in self._built:
            self._built[model] = make_backend(
                self.kind, model, cache_path=self.cache_file, **self.options
            )
        return self._built[model]

    def close(self) -> None:
        for backend in self._built.values():
            if hasattr(backend, "close"):
                backend.close()
