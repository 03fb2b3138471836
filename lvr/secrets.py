"""Keep API keys out of every file lvr writes: manifests, config dumps, logs, error rows.

Two tools, both dependency-free:

- `redact(obj)`: a deep copy of a config-like structure where every value under a secret-looking
  key (``api_key``, ``password``, ``authorization``...) becomes `REDACTED`, user:password parts of
  URLs are masked, and any string holding a known secret (the keys in ``$LVR_API_KEY`` /
  ``$OPENAI_API_KEY``) is masked wherever it sits. `lvr.config.to_dict` applies it, so every
  manifest and config dump (datagen, eval, sft, rl, W&B) is redacted at one point.
- `scrub(text, secrets)`: replace the given secrets (and the environment's) inside free text, for
  error lines and exception messages that end up in rows or logs.

A config printed by ``--show-config`` or copied from a manifest holds `REDACTED` where the key
was; the API backend treats that value as "not set" and takes the key from the environment.

>>> redact({"options": {"api_key": "sk-123", "base_url": "https://u:pw@host/v1"}, "max_tokens": 9})
{'options': {'api_key': '<redacted>', 'base_url': 'https://***@host/v1'}, 'max_tokens': 9}
>>> scrub("401: bad key sk-123", ["sk-123"])
'401: bad key <redacted>'
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

REDACTED = "<redacted>"
# Environment variables whose values are API keys (read by the `openai` backend).
SECRET_ENV = ("LVR_API_KEY", "OPENAI_API_KEY")

# Key names whose values are secrets. Token *counts* (max_tokens, tokens_per_minute) are not:
# only names ending in a secret word (or exactly one) match.
_SECRET_NAME = re.compile(
    r"(^|[_\-.])(api_?key|apikey|secret|secret_key|password|passwd|token|access_token|auth_token|"
    r"bearer|authorization|credentials?)$",
    re.IGNORECASE,
)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.\-]*://)[^/@\s]+@")
# Secrets shorter than this are not searched for in free text (they would mask ordinary words).
_MIN_SECRET_LEN = 6


def is_secret_name(name: str) -> bool:
    """True for mapping keys whose values are secrets.

    >>> [is_secret_name(n) for n in ("api_key", "OPENAI_API_KEY", "max_tokens", "token", "model")]
    [True, True, False, True, False]
    """
    return bool(_SECRET_NAME.search(str(name)))


def env_secrets() -> list[str]:
    """The API keys set in the environment (``$LVR_API_KEY``, ``$OPENAI_API_KEY``)."""
    return [v.strip() for name in SECRET_ENV if (v := os.environ.get(name, "")).strip()]


def scrub(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Mask ``secrets`` (and the environment's API keys, and URL passwords) inside ``text``.

    Args:
        text: Free text such as an error line.
        secrets: Extra secret values to mask (e.g. the backend's own key); None entries are ignored.

    Returns:
        The text with each secret replaced by `REDACTED`.
    """
    out = _URL_USERINFO.sub(r"\g<scheme>***@", str(text))
    values = {s.strip() for s in [*secrets, *env_secrets()] if s and s.strip() != REDACTED}
    for value in sorted(values, key=len, reverse=True):  # longest first: no partial leftovers
        if len(value) >= _MIN_SECRET_LEN:
            out = out.replace(value, REDACTED)
    return out


def redact(obj: Any, secrets: Iterable[str | None] = ()) -> Any:
    """A copy of ``obj`` (dicts, lists, tuples, scalars) with its secrets masked.

    Args:
        obj: A plain structure, e.g. ``dataclasses.asdict(config)``.
        secrets: Extra secret values to mask wherever they appear as (part of) a string.

    Returns:
        The same shape; values under secret-looking keys that are set become `REDACTED`.
    """
    known = [*secrets]

    def walk(value: Any, name: str | None) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, str(k)) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(walk(v, None) for v in value)
        if name is not None and is_secret_name(name) and value not in (None, ""):
            return REDACTED
        if isinstance(value, str):
            return scrub(value, known)
        return value

    return walk(obj, None)
