"""Small helpers the datagen stages share: settings ids, error lines, and the model-call side of a
stage (backends built on use, this machine's share of the request budget, usage in manifests).

Shard bookkeeping (upstream shards, orphans, retries) lives with the runner, :mod:`lvr.datagen.runner`,
which also builds a stage's `ModelBackends` and `CallReport` once per run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from lvr.artifacts import content_id
from lvr.backends import Backend, Limiter, RateLimiter, Usage, make_backend
from lvr.backends.usage import usage_table


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


# ---------------------------------------------------------------------------------------------
# Model calls: backends, request budget, usage
# ---------------------------------------------------------------------------------------------


def shard_limiter(backend: str, options: Mapping[str, Any], num_shards: int) -> Limiter | None:
    """This process's request budget: ``1 / num_shards`` of the job's limits in ``options``.

    Shards of a Slurm-array style run cannot talk to each other, so each spends an equal share of
    ``max_requests_per_minute`` / ``max_tokens_per_minute`` (the limits of the whole job).

    Args:
        backend: The stage's backend kind; only ``openai`` has rate limits.
        options: The stage's backend options.
        num_shards: Number of machines sharing the job.

    Returns:
        A `lvr.backends.RateLimiter`, or None for backends without rate limits.
    """
    if backend != "openai":
        return None
    return RateLimiter.for_share(
        options.get("max_requests_per_minute"),
        options.get("max_tokens_per_minute"),
        share=1.0 / num_shards,
    )


class ModelBackends:
    """The model backends of one stage worker, built on first use over the run's request cache.

    Building is deferred so that a run whose shards are all finished never loads a model. Every
    model of the stage (e.g. the qa and rewrite models, same endpoint and options) spends one
    request budget: this machine's share of the job's limits (`shard_limiter`).

    Args:
        kind: The stage's backend kind (``openai``, ``hf``).
        options: The stage's backend options (`lvr.backends.make_backend`).
        cache_file: This machine's request cache (`lvr.layout.RunLayout.request_cache`); lookups
            also read the folder's other ``requests*.sqlite`` files, so a rerun with another
            number of shards reuses every answer (`lvr.backends.cache`).
        num_shards: Number of machines sharing the job's request budget.
        limiter: The job's shared request budget (the Ray executor's `SharedLimiter`); None: this
            machine's share of it (`shard_limiter`).
    """

    def __init__(
        self, kind: str, options: Mapping[str, Any], cache_file: Path, num_shards: int = 1,
        limiter: Limiter | None = None,
    ):  # fmt: skip
        self.kind, self.options, self.cache_file = kind, dict(options), cache_file
        self.num_shards = num_shards
        self.limiter = shard_limiter(kind, self.options, num_shards)
        if limiter is not None and self.limiter is not None:  # only backends with rate limits
            self.limiter = limiter
        self._built: dict[str, Backend] = {}

    def __call__(self, model: str) -> Backend:
        """The backend serving ``model``."""
        if model not in self._built:
            self._built[model] = make_backend(self.kind, model, cache_path=self.cache_file,
                                              limiter=self.limiter, **self.options)  # fmt: skip
        return self._built[model]

    def built(self) -> list[Backend]:
        """The backends built so far (their ``usage`` goes into the manifest)."""
        return list(self._built.values())

    def usage(self) -> dict[str, Usage]:
        """Usage per model of the backends built so far (only cached backends count)."""
        out: dict[str, Usage] = {}
        for backend in self.built():
            usage = getattr(backend, "usage", None)
            if usage is not None:
                out[backend.model] = out.get(backend.model, Usage()) + usage
        return out

    def rate_limits(self) -> dict[str, Any] | None:
        """The job's limits and this machine's share of them, or None without rate limits."""
        if self.limiter is None:
            return None
        return {**self.limiter.describe(), "num_shards": self.num_shards}

    def close(self) -> None:
        for backend in self._built.values():
            if hasattr(backend, "close"):
                backend.close()


class CallSource(Protocol):
    """What a `CallReport` reads: usage per model so far, and the rate limits spent."""

    def usage(self) -> dict[str, Usage]: ...

    def rate_limits(self) -> dict[str, Any] | None: ...


class CallReport:
    """The model-call fields of a stage manifest: usage per model, cost, and the rate limits.

    ``usage`` counts this invocation; ``usage_total`` adds it to the ``usage_total`` of the
    manifest this invocation replaces (same stage, same machine name), so reruns and resumes add
    up to what the run folder cost. Cost comes from the config's ``prices`` at writing time.
    Create it before the stage writes its first manifest (it reads the one being replaced).

    Args:
        manifest: Path of the manifest this stage run will write.
        prices: model -> {prompt_per_1m, completion_per_1m}.
        models: The stage's model calls: its `ModelBackends` (those built so far are counted), or
            anything with the same ``usage()`` and ``rate_limits()`` (the Ray executor's tally of
            its workers).
    """

    def __init__(
        self, manifest: Path, prices: Mapping[str, Mapping[str, float]], models: CallSource
    ):
        self.prices, self.models = prices, models
        self.before: dict[str, Usage] = {}
        try:
            old = json.loads(manifest.read_text()).get("usage_total") or {}
            self.before = {m: Usage.from_dict(u) for m, u in old.items()}
        except (OSError, json.JSONDecodeError, AttributeError, TypeError, ValueError):
            pass  # no earlier manifest (or not one of ours): start from zero

    def __call__(self) -> dict[str, Any]:
        """The manifest fields: ``usage``, ``usage_total`` and (with limits) ``rate_limits``."""
        now = self.models.usage()
        total = dict(self.before)
        for model, usage in now.items():
            total[model] = total.get(model, Usage()) + usage
        out: dict[str, Any] = {
            "usage": usage_table(now, self.prices),
            "usage_total": usage_table(total, self.prices),
        }
        limits = self.models.rate_limits()
        if limits is not None:
            out["rate_limits"] = limits
        return out
