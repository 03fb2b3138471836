"""The `openai` backend: any OpenAI-compatible chat endpoint (vLLM, SGLang, hosted APIs).

One asyncio event loop, `concurrency` workers pulling rows, a smooth RPM limiter shared by every
attempt, and our own retries (the client's are disabled so that every HTTP call is counted): 429, 408,
409, 5xx, timeouts, connection errors, truncated or non-JSON bodies, and - when JSON was asked for -
outputs that do not parse or fail the schema. A preflight `GET /models` turns an unreachable endpoint
or a rejected key into one `BackendError` before any row is sent, and a breaker stops sending once many
consecutive rows could not connect (those rows get an honest "not sent" error, the rest of the run is
not burnt on retries).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import importlib
import io
import json
import os
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from lvr.backends.base import (
    BackendError,
    OnResponse,
    Request,
    Response,
    check_request,
    one_line,
    with_system_line,
)
from lvr.backends.limits import RateLimiter, backoff_delay, parse_retry_after, run_sync
from lvr.backends.progress import progress_bar
from lvr.backends.schema import parse_and_validate, schema_instruction

JsonMode = Literal["json_schema", "json_object", "prompt"]
API_KEY_ENV = ("LVR_API_KEY", "OPENAI_API_KEY")
RETRYABLE_STATUS = frozenset({408, 409, 425, 429})


@dataclass
class OpenAIOptions:
    """Options of the `openai` backend (all settable through `make_backend("openai", model, ...)`).

    Attributes:
        base_url: Endpoint root including /v1, e.g. http://127.0.0.1:8000/v1 for `vllm serve`.
        api_key: Key; default from $LVR_API_KEY, then $OPENAI_API_KEY, else "EMPTY" (local servers).
        concurrency: Requests in flight at once.
        max_requests_per_minute: Smooth RPM limit over all attempts; None = unlimited.
        max_retries: Retries after the first attempt (4 attempts in total by default).
        timeout_s: Per-attempt timeout.
        backoff_base_s: Full-jitter backoff base (window doubles per retry).
        backoff_cap_s: Largest backoff window.
        max_retry_after_s: Ceiling on a server's Retry-After.
        json_mode: How json_schema is requested: "json_schema" (response_format with the schema),
            "json_object" (JSON mode + schema in the system prompt) or "prompt" (schema in the
            system prompt only), for servers that lack structured output.
        jpeg_quality: Quality of the base64 JPEG images.
        preflight: GET /models before the first row, to fail fast on a dead endpoint or bad key.
        check_model: In the preflight, fail when the model is not among the served models.
        unreachable_after: Stop sending after this many consecutive rows ended in connection
            failures with no success in between (0 = never).
        extra_body: Extra JSON fields sent with every request (e.g. vLLM's top_k).
        jitter_seed: Seed of the backoff jitter.
    """

    base_url: str = "http://127.0.0.1:8000/v1"
    api_key: str | None = None
    concurrency: int = 64
    max_requests_per_minute: float | None = None
    max_retries: int = 3
    timeout_s: float = 120.0
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    max_retry_after_s: float = 120.0
    json_mode: JsonMode = "json_schema"
    jpeg_quality: int = 90
    preflight: bool = True
    check_model: bool = True
    unreachable_after: int = 32
    extra_body: dict[str, Any] | None = None
    jitter_seed: int = 0


@dataclass
class Failure:
    """Why one attempt failed."""

    kind: str  # label for counts: "HTTP 500", "timeout", "connection", "bad body", ...
    message: str
    retryable: bool
    retry_after_s: float | None = None


@dataclass
class RunStats:
    """What one `run` did, for tests, benchmarks and logs."""

    attempts: int = 0
    failures: Counter = field(default_factory=Counter)
    delays: list[tuple[str, float, float | None]] = field(default_factory=list)  # kind, s, RA
    not_sent: int = 0


def encode_image(img: np.ndarray, quality: int = 90) -> str:
    """Encode a uint8 [H, W, 3] frame as a data URL with a base64 JPEG.

    Args:
        img: The frame.
        quality: JPEG quality.

    Returns:
        "data:image/jpeg;base64,...".
    """
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img, mode="RGB").save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _with_images(messages: list[dict[str, Any]], urls: list[str]) -> list[dict[str, Any]]:
    """Put image parts before the text of the last user message (frames first, then the ask)."""
    out = [dict(m) for m in messages]
    users = [i for i, m in enumerate(out) if m.get("role") == "user"]
    idx = users[-1] if users else len(out) - 1
    content = out[idx].get("content", "")
    parts = content if isinstance(content, list) else [{"type": "text", "text": content}]
    images = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    out[idx]["content"] = images + list(parts)
    return out


def build_payload(req: Request, model: str, opts: OpenAIOptions) -> dict[str, Any]:
    """Build the chat-completions keyword arguments of one request.

    Args:
        req: The request.
        model: Served model name.
        opts: Backend options.

    Returns:
        The JSON body of `POST /chat/completions`.
    """
    messages = list(req.messages)
    kwargs: dict[str, Any] = {}
    if req.json_schema is not None:
        if opts.json_mode == "json_schema":
            spec = {"name": "output", "schema": req.json_schema, "strict": False}
            kwargs["response_format"] = {"type": "json_schema", "json_schema": spec}
        else:
            messages = with_system_line(messages, schema_instruction(req.json_schema))
            if opts.json_mode == "json_object":
                kwargs["response_format"] = {"type": "json_object"}
    if req.images:
        messages = _with_images(messages, [encode_image(i, opts.jpeg_quality) for i in req.images])
    kwargs.update(model=model, messages=messages, max_tokens=req.max_tokens)
    kwargs.update(temperature=req.temperature, top_p=req.top_p)
    if req.n > 1:  # omitted when 1: some servers reject the field
        kwargs["n"] = req.n
    if req.seed is not None:
        kwargs["seed"] = req.seed
    if opts.extra_body:
        kwargs.update(opts.extra_body)
    return kwargs


def read_choices(body: bytes, req: Request) -> tuple[list[str], Failure | None]:
    """Extract and check the n output texts of a chat-completions response body.

    Args:
        body: Raw HTTP body.
        req: The request (n and json_schema).

    Returns:
        (texts, None) on success, else ([], the failure).
    """
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [], Failure(
            "bad body", f"response body is not JSON ({one_line(str(exc), 80)})", True
        )
    try:
        texts = [c["message"]["content"] for c in data["choices"]]
    except (KeyError, TypeError):
        return [], Failure("bad body", "response has no choices[].message.content", True)
    if any(not isinstance(t, str) for t in texts):
        return [], Failure("bad body", "a choice has null or non-text content", True)
    if len(texts) != req.n:  # a server ignoring n would do so on every retry
        return [], Failure("bad body", f"asked for n={req.n} outputs, got {len(texts)}", False)
    if req.json_schema is None:
        return texts, None
    clean = []
    for text in texts:
        cleaned, problem = parse_and_validate(text, req.json_schema)
        if problem:
            return [], Failure("bad output", problem, True)
        clean.append(cleaned)
    return clean, None


def resolve_api_key(explicit: str | None) -> str:
    """Return the API key: explicit option, then $LVR_API_KEY, $OPENAI_API_KEY, else "EMPTY"."""
    if explicit:
        return explicit
    for name in API_KEY_ENV:
        if os.environ.get(name):
            return os.environ[name]
    return "EMPTY"


class OpenAIBackend:
    """Backend over an OpenAI-compatible `/chat/completions` endpoint.

    Args:
        model: Model name as served (e.g. the `vllm serve` model argument).
        options: `OpenAIOptions`.
    """

    name = "openai"

    def __init__(self, model: str, options: OpenAIOptions | None = None):
        self.model = model
        self.opts = options or OpenAIOptions()
        if self.opts.concurrency < 1:
            raise BackendError(f"concurrency must be >= 1, got {self.opts.concurrency}")
        if self.opts.max_retries < 0:
            raise BackendError(f"max_retries must be >= 0, got {self.opts.max_retries}")
        if self.opts.json_mode not in ("json_schema", "json_object", "prompt"):
            raise BackendError(
                f"json_mode must be json_schema|json_object|prompt, got {self.opts.json_mode!r}"
            )
        self.limiter = RateLimiter(self.opts.max_requests_per_minute)
        self.last_stats = RunStats()
        self._rng = random.Random(self.opts.jitter_seed)

    def run(
        self,
        requests: Sequence[Request],
        progress: bool = True,
        on_response: OnResponse | None = None,
    ) -> list[Response]:
        """Send every request; see `Backend.run`.

        Raises:
            BackendError: The endpoint is unreachable or rejects the key (before any row is sent).
        """
        return run_sync(self.arun(list(requests), progress, on_response))

    async def arun(
        self,
        requests: list[Request],
        progress: bool = True,
        on_response: OnResponse | None = None,
    ) -> list[Response]:
        """Async form of `run`, for callers that already run an event loop."""
        self.last_stats = RunStats()
        results: list[Response | None] = [None] * len(requests)
        n_workers = min(self.opts.concurrency, len(requests))
        client = self._client()
        try:
            if self.opts.preflight and requests:
                await self._preflight(client)
            todo = iter(range(len(requests)))
            with progress_bar(f"{self.name}:{self.model}", len(requests), progress) as advance:
                state = _Breaker(self.opts.unreachable_after)

                async def worker() -> None:
                    for i in todo:  # shared iterator: each index is taken exactly once
                        try:
                            resp = await self._one(client, requests[i], state)
                        except Exception as exc:  # a bug must cost one row, not the run
                            err = f"unexpected error: {type(exc).__name__}: {one_line(str(exc))}"
                            resp = Response(requests[i].item_id, [], err, 0, 0.0)
                        results[i] = resp
                        if on_response is not None:
                            on_response(i, resp)
                        advance(resp)

                await asyncio.gather(*(worker() for _ in range(n_workers)))
        finally:
            await client.close()
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    def _client(self) -> Any:
        """An AsyncOpenAI client with the client's own retries off (ours are counted)."""
        import openai

        return openai.AsyncOpenAI(
            base_url=self.opts.base_url,
            api_key=resolve_api_key(self.opts.api_key),
            max_retries=0,
            timeout=self.opts.timeout_s,
        )

    async def _preflight(self, client: Any) -> None:
        """GET /models: raise one BackendError for a dead endpoint, a bad key or an unknown model."""
        import openai

        url = self.opts.base_url
        last: Exception | None = None
        for attempt in range(3):  # a server that is just starting gets ~1.5 s
            try:
                page = await client.models.list(timeout=min(10.0, self.opts.timeout_s))
            except openai.APIStatusError as exc:
                if exc.status_code in (401, 403):
                    raise BackendError(
                        f"{url} rejected the API key (HTTP {exc.status_code}); set api_key or "
                        f"${API_KEY_ENV[0]} / ${API_KEY_ENV[1]}"
                    ) from exc
                return  # reachable; this server just does not list models
            except openai.APIConnectionError as exc:  # includes timeouts
                last = exc
                if attempt < 2:
                    await asyncio.sleep(0.5 * (attempt + 1))
                continue
            ids = [m.id for m in getattr(page, "data", [])]
            if self.opts.check_model and ids and self.model not in ids:
                raise BackendError(
                    f"model {self.model!r} is not served at {url}; served: {ids[:10]} "
                    "(set the backend model to one of them, or check_model=false)"
                )
            return
        cause = one_line(str(getattr(last, "__cause__", None) or last), 120)
        raise BackendError(
            f"cannot reach the OpenAI-compatible endpoint {url} ({cause}); start the server "
            "(e.g. `vllm serve MODEL`) or fix base_url"
        )

    async def _one(self, client: Any, req: Request, breaker: _Breaker) -> Response:
        """Run one request with retries; always returns a Response."""
        bad = check_request(req)
        if bad:
            return Response(req.item_id, [], bad, 0, 0.0)
        if breaker.tripped:
            self.last_stats.not_sent += 1
            return Response(req.item_id, [], breaker.message(self.opts.base_url), 0, 0.0)
        if req.images:  # JPEG encoding is CPU work: keep it off the event loop
            payload = await asyncio.get_running_loop().run_in_executor(
                None, build_payload, req, self.model, self.opts
            )
        else:
            payload = build_payload(req, self.model, self.opts)
        start = time.monotonic()
        kinds: Counter = Counter()
        failure: Failure | None = None
        attempt = 0
        for attempt in range(1, self.opts.max_retries + 2):
            await self.limiter.acquire()
            self.last_stats.attempts += 1
            texts, failure = await self._attempt(client, payload, req)
            if failure is None:
                breaker.record(ok=True)
                return Response(req.item_id, texts, None, attempt, time.monotonic() - start)
            kinds[failure.kind] += 1
            self.last_stats.failures[failure.kind] += 1
            if not failure.retryable or attempt > self.opts.max_retries:
                break
            delay = backoff_delay(
                attempt,
                self.opts.backoff_base_s,
                self.opts.backoff_cap_s,
                self._rng,
                failure.retry_after_s,
                self.opts.max_retry_after_s,
            )
            self.last_stats.delays.append((failure.kind, delay, failure.retry_after_s))
            await asyncio.sleep(delay)
        assert failure is not None
        breaker.record(ok=False, connection_only=set(kinds) <= {"connection"})
        return Response(
            req.item_id, [], _error_line(failure, kinds, attempt), attempt, time.monotonic() - start
        )

    async def _attempt(
        self, client: Any, payload: dict[str, Any], req: Request
    ) -> tuple[list[str], Failure | None]:
        """One HTTP call; classify every way it can fail."""
        import openai

        try:
            # The client's generic `post` with a raw response: same auth, base URL, timeouts and
            # error mapping as `chat.completions.create`, without its typed request transform and
            # pydantic response parsing (a third of the client CPU per call, measured); we parse
            # the body ourselves so that broken bodies are classified, not raised.
            call = client.post("/chat/completions", body=payload, cast_to=_raw_type())
            # httpx's timeout bounds each read, not the whole call: a trickling server is cut too.
            raw = await asyncio.wait_for(call, self.opts.timeout_s * 2)
            body = raw.content
        except (openai.APITimeoutError, asyncio.TimeoutError):
            return [], Failure("timeout", f"timeout ({self.opts.timeout_s:g}s per attempt)", True)
        except openai.APIConnectionError as exc:
            cause = exc.__cause__ or exc
            if "complete message body" in str(cause):  # h11: peer closed before Content-Length
                return [], Failure("truncated", "truncated response body", True)
            msg = f"connection error ({type(cause).__name__}: {one_line(str(cause), 80)})"
            return [], Failure("connection", msg, True)
        except openai.APIStatusError as exc:
            status = exc.status_code
            retryable = status in RETRYABLE_STATUS or status >= 500
            detail = one_line(_error_detail(exc), 120)
            msg = f"HTTP {status}" + (f": {detail}" if detail else "")
            ra = parse_retry_after(exc.response.headers)
            return [], Failure(f"HTTP {status}", msg, retryable, ra)
        return read_choices(body, req)


@functools.cache
def _raw_type() -> type:
    """The HTTP response class of the openai client's HTTP library (httpx, or httpx2 in newer
    releases), which `post(cast_to=...)` returns unparsed."""
    import openai

    base = openai.DefaultAsyncHttpxClient.__mro__[1]  # the library's AsyncClient
    return importlib.import_module(base.__module__.split(".")[0]).Response


def _error_detail(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        return str(inner.get("message", "")) if isinstance(inner, dict) else str(inner)
    return str(body or "")


def _error_line(last: Failure, kinds: Counter, attempts: int) -> str:
    """One line: 'HTTP 500: boom after 4 attempts [HTTP 429 x1, HTTP 500 x3]' (mix if mixed)."""
    plural = "attempt" if attempts == 1 else "attempts"
    line = f"{last.message} after {attempts} {plural}"
    if len(kinds) > 1:
        line += " [" + ", ".join(f"{k} x{v}" for k, v in sorted(kinds.items())) + "]"
    return one_line(line, 300)


class _Breaker:
    """Counts consecutive rows that ended in connection failures with no success in between."""

    def __init__(self, threshold: int):
        self.threshold = threshold
        self.consecutive = 0
        self.tripped = False

    def record(self, ok: bool, connection_only: bool = False) -> None:
        if ok or not connection_only:
            self.consecutive = 0
            return
        self.consecutive += 1
        if self.threshold > 0 and self.consecutive >= self.threshold:
            self.tripped = True

    def message(self, url: str) -> str:
        return (
            f"not sent: endpoint {url} unreachable ({self.consecutive} consecutive rows failed "
            "to connect); rerun to retry"
        )
