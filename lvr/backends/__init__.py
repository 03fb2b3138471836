"""Model-call layer: one `Request` -> `Response` interface over API servers and local models.

Usage::

    from lvr.backends import CachedBackend, Request, make_backend

    backend = make_backend("openai", "Qwen/Qwen2.5-VL-7B-Instruct", base_url="http://gpu1:8000/v1")
    backend = CachedBackend(backend, "runs/default/cache/requests.sqlite")
    responses = backend.run([Request(item_id=clip_id, messages=[...], images=frames)])

Backends: "openai" (`OpenAIBackend`, any OpenAI-compatible endpoint, async with retries and rate
limits) and "hf" (`HFBackend`, local transformers with JSON-schema constrained decoding). The API
path needs no torch: `lvr.backends.hf` (and with it torch and transformers) is imported only when
an "hf" backend is built, and the openai client only when an "openai" backend runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lvr.backends.base import Backend, BackendError, Request, Response, cache_key, payload_hash
from lvr.backends.cache import CachedBackend, RequestCache
from lvr.backends.limits import Limiter, RateLimiter
from lvr.backends.openai_backend import OpenAIBackend, OpenAIOptions
from lvr.backends.usage import Usage

KINDS = ("openai", "hf")

__all__ = [
    "KINDS",
    "Backend",
    "BackendError",
    "CachedBackend",
    "Limiter",
    "RateLimiter",
    "Request",
    "RequestCache",
    "Response",
    "Usage",
    "cache_key",
    "check_options",
    "make_backend",
    "payload_hash",
]


def _options(cls: type, kind: str, opts: dict[str, Any]) -> Any:
    """Build an options dataclass, naming unknown keys and the valid ones."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(opts) - set(names))
    if unknown:
        raise BackendError(f"unknown {kind} backend options {unknown}; valid: {names}")
    return cls(**opts)


def check_options(kind: str, opts: Mapping[str, Any], where: str = "options") -> None:
    """Check backend options as a config section: known keys, right types, valid values.

    The stages call this before any work (``lvr datagen run`` checks the caption and qa options
    before segmenting), so a misspelled or mistyped option is one line naming the key, not a
    traceback from deep inside the backend after hours of segmenting.

    Args:
        kind: "openai" or "hf".
        opts: The options (``caption.options``...).
        where: The options' config key, for messages (``caption.options``).

    Raises:
        lvr.config.ConfigError: An unknown key or a wrong type (names ``<where>.<key>``).
        BackendError: Unknown kind.
    """
    from lvr.config import from_dict  # the typed YAML/--set builder every config uses

    if kind == "openai":
        cls: type = OpenAIOptions
    elif kind == "hf":
        from lvr.backends.hf import HFOptions  # no torch at import: only numpy and lvr.backends

        cls = HFOptions
    else:
        raise BackendError(f"unknown backend kind {kind!r}; valid: {list(KINDS)}")
    from_dict(cls, dict(opts), prefix=f"{where}.")


def make_backend(
    kind: str,
    model: str,
    cache_path: str | Path | None = None,
    limiter: Limiter | None = None,
    **opts: Any,
) -> Backend:
    """Build a backend by kind.

    Args:
        kind: "openai" or "hf".
        model: Served model name ("openai") or hub id / local folder ("hf").
        cache_path: When given, wrap the backend in a `CachedBackend` on this SQLite file.
        limiter: "openai": the request budget to spend (default: the options' limits, share 1;
            see `RateLimiter.for_share`). Local models have no rate limit and ignore it.
        **opts: Fields of `OpenAIOptions` or `HFOptions`.

    Returns:
        The backend.

    Raises:
        BackendError: Unknown kind or option.
    """
    if kind == "openai":
        backend: Backend = OpenAIBackend(model, _options(OpenAIOptions, kind, opts), limiter)
    elif kind == "hf":
        from lvr.backends.hf import HFBackend, HFOptions  # local models: torch, transformers

        backend = HFBackend(model, _options(HFOptions, kind, opts))
    else:
        raise BackendError(f"unknown backend kind {kind!r}; valid: {list(KINDS)}")
    return CachedBackend(backend, cache_path) if cache_path is not None else backend
