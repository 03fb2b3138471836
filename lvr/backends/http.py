"""HTTP transport of the `openai` backend: aiohttp, one keep-alive session per run.

Why not the `openai` client: at 64 requests in flight, a profile of the backend (py-spy, see
benchmarks/api_stage.py) put ~95% of the client's CPU per request in the HTTP stack - the openai
client's request building (~15%) and httpx/httpcore (~35% plus two socket writes per request) -
and 4% in lvr's own code (limiter, JSON parsing, accounting). With the event loop that busy,
every response waits behind others and throughput fell to ~89% of the concurrency / latency
bound. aiohttp (C HTTP parser, O(1) connection pool) spends ~5x less CPU per request; the few
things the backend needs from the client (Bearer auth, the organization / project headers that
the openai client reads from the environment, per-read timeouts, status and Retry-After) are
done here, and every way an attempt can fail is classified into a `Failure`.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import aiohttp

from lvr.backends.base import BackendError, one_line
from lvr.secrets import scrub

RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
# Headers the openai client adds from these environment variables (hosted OpenAI routing/billing).
_ENV_HEADERS = {"OPENAI_ORG_ID": "OpenAI-Organization", "OPENAI_PROJECT_ID": "OpenAI-Project"}


@dataclass
class Failure:
    """Why one attempt failed."""

    kind: str  # label for counts: "HTTP 500", "timeout", "connection", "bad body", ...
    message: str
    retryable: bool
    retry_after_s: float | None = None


def _ssl_context() -> ssl.SSLContext:
    """Certificates of `certifi` when installed (what the openai client trusts), else the system's."""
    try:
        import certifi

        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:  # pragma: no cover - certifi comes with the openai client
        return ssl.create_default_context()


def open_session(base_url: str, api_key: str, concurrency: int, timeout_s: float) -> Any:
    """A keep-alive session for one run (call inside the running event loop).

    Args:
        base_url: Endpoint root including /v1.
        api_key: Bearer token ("EMPTY" for local servers that ignore it).
        concurrency: Connections kept open at most (one per worker).
        timeout_s: Limit on connecting and on each read; a whole call (a server trickling
            bytes) is cut at twice this.

    Returns:
        An ``aiohttp.ClientSession``.
    """
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json",
               "Accept": "application/json", "User-Agent": "lvr"}  # fmt: skip
    for env, header in _ENV_HEADERS.items():
        if os.environ.get(env):
            headers[header] = os.environ[env]
    ssl_ctx = _ssl_context() if base_url.startswith("https") else None
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=ssl_ctx if ssl_ctx else True)
    timeout = aiohttp.ClientTimeout(
        total=2 * timeout_s, sock_connect=timeout_s, sock_read=timeout_s
    )
    # The proxy is resolved once: aiohttp's trust_env would redo it (and read ~/.netrc) in a
    # thread for every request, ~10% of the CPU per request at 64 in flight (measured).
    return aiohttp.ClientSession(
        headers=headers, connector=connector, timeout=timeout, proxy=env_proxy(base_url)
    )


def env_proxy(url: str) -> str | None:
    """The proxy that ``$HTTP(S)_PROXY`` / ``$NO_PROXY`` give for ``url``, as the openai client
    (httpx) would use it; None for a direct connection."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies_environment()
    if not proxies or urllib.request.proxy_bypass_environment(parts.hostname or "", proxies):
        return None
    return proxies.get(parts.scheme) or proxies.get("all")


async def post_json(
    session: Any, url: str, body: bytes, timeout_s: float, secrets: list[str]
) -> tuple[bytes, Failure | None]:
    """POST one JSON body and read the whole answer; classify every way it can fail.

    Args:
        session: From `open_session`.
        url: Full URL (``<base_url>/chat/completions``).
        body: Encoded JSON.
        timeout_s: The session's per-read timeout (for the message).
        secrets: Values masked in failure messages (before shortening: no half key is left).

    Returns:
        (body bytes, None) for a 2xx answer, else (b"", the failure).
    """
    try:
        async with session.post(url, data=body) as resp:
            raw = await resp.read()
            if resp.status < 400:
                return raw, None
            return b"", _status_failure(resp.status, raw, resp.headers, secrets)
    except asyncio.TimeoutError:  # aiohttp's read/connect/total timeouts all derive from it
        return b"", Failure("timeout", f"timeout ({timeout_s:g}s per attempt)", True)
    except aiohttp.ClientPayloadError:  # the peer closed before Content-Length bytes came
        return b"", Failure("truncated", "truncated response body", True)
    except aiohttp.ClientError as exc:
        text = one_line(scrub(str(exc) or type(exc).__name__, secrets), 80)
        return b"", Failure("connection", f"connection error ({type(exc).__name__}: {text})", True)


def _status_failure(status: int, raw: bytes, headers: Any, secrets: list[str]) -> Failure:
    """A Failure for an HTTP error status, with the server's message and Retry-After."""
    from lvr.backends.limits import parse_retry_after

    detail = one_line(scrub(_error_detail(raw), secrets), 120)
    msg = f"HTTP {status}" + (f": {detail}" if detail else "")
    retryable = status in RETRYABLE_STATUS or status >= 500
    return Failure(f"HTTP {status}", msg, retryable, parse_retry_after(headers))


def _error_detail(raw: bytes) -> str:
    """The message of an OpenAI-style error body ``{"error": {"message": ...}}``, or its text."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return raw[:200].decode("utf-8", "replace")
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return str(inner.get("message", "") or inner.get("detail", ""))
        return str(inner)
    return str(body)


async def preflight(
    session: Any, base_url: str, model: str, check_model: bool, timeout_s: float
) -> None:
    """GET /models: raise one BackendError for a dead endpoint, a bad key or an unknown model.

    Raises:
        BackendError: Unreachable after ~1.5 s of retries, key rejected (401/403), or
            ``check_model`` and the model is not among those served.
    """
    url = base_url.rstrip("/") + "/models"
    last = ""
    for attempt in range(3):  # a server that is just starting gets ~1.5 s
        try:
            limit = aiohttp.ClientTimeout(total=min(10.0, timeout_s))
            async with session.get(url, timeout=limit) as resp:
                raw = await resp.read()
                status = resp.status
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if attempt < 2:
                await asyncio.sleep(0.5 * (attempt + 1))
            continue
        if status in (401, 403):
            raise BackendError(
                f"{base_url} rejected the API key (HTTP {status}); set api_key or "
                "$LVR_API_KEY / $OPENAI_API_KEY"
            )
        if status >= 400:
            return  # reachable; this server just does not list models
        _check_served(raw, model, base_url, check_model)
        return
    raise BackendError(
        f"cannot reach the OpenAI-compatible endpoint {base_url} ({one_line(last, 120)}); start "
        "the server (e.g. `vllm serve MODEL`) or fix base_url"
    )


def _check_served(raw: bytes, model: str, base_url: str, check_model: bool) -> None:
    """Raise when ``check_model`` and the /models listing does not name ``model``."""
    try:
        data = json.loads(raw).get("data") or []
        ids = [m["id"] for m in data if isinstance(m, dict) and "id" in m]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, TypeError):
        return  # not a listing we can read: do not guess
    if check_model and ids and model not in ids:
        raise BackendError(
            f"model {model!r} is not served at {base_url}; served: {ids[:10]} "
            "(set the backend model to one of them, or check_model=false)"
        )
