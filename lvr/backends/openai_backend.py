"""The `openai` backend: any OpenAI-compatible chat endpoint (vLLM, SGLang, hosted APIs).

One asyncio event loop, `concurrency` workers pulling rows over one keep-alive aiohttp session
(`lvr.backends.http` says why not the openai client), a smooth RPM/TPM limiter shared by every
attempt (this process's share of the job's budget, see `lvr.backends.limits`), and our own
counted retries: 429, 408, 409, 5xx, timeouts, connection errors, truncated or non-JSON bodies,
and - when JSON was asked for - outputs that do not parse or fail the schema. A preflight `GET /models` turns an unreachable endpoint
or a rejected key into one `BackendError` before any row is sent, and a breaker stops sending once many
consecutive rows could not connect (those rows get an honest "not sent" error, the rest of the run is
not burnt on retries). Every response carries the tokens billed over its attempts (the API's
`usage`), and the API key never appears in an error line or exception message (`lvr.secrets`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np

from lvr.backends.base import (
    BackendError,
    OnResponse,
    Request,
    Response,
    check_request,
    message_text,
    one_line,
    with_system_line,
)
from lvr.backends.http import Failure, open_session, post_json, preflight
from lvr.backends.limits import Limiter, RateLimiter, backoff_delay, run_sync
from lvr.backends.progress import progress_bar
from lvr.backends.schema import parse_and_validate, schema_instruction
from lvr.secrets import REDACTED, SECRET_ENV, scrub

JsonMode = Literal["json_schema", "json_object", "prompt"]
API_KEY_ENV = SECRET_ENV
# Pixels per prompt token of an image when estimating a call for the tokens-per-minute limiter
# (Qwen2-VL/2.5-VL: one token per 28x28 patch; a 448x448 frame is 256 tokens). Only an estimate:
# the response's usage settles the difference.
IMAGE_PIXELS_PER_TOKEN = 28 * 28


@dataclass
class OpenAIOptions:
    """Options of the `openai` backend (all settable through `make_backend("openai", model, ...)`).

    Attributes:
        base_url: Endpoint root including /v1, e.g. http://127.0.0.1:8000/v1 for `vllm serve`.
        api_key: Key; default from $LVR_API_KEY, then $OPENAI_API_KEY, else "EMPTY" (local servers).
            Never written anywhere: manifests and config dumps show it as "<redacted>".
        concurrency: Requests in flight at once.
        max_requests_per_minute: Smooth RPM limit over all attempts of the whole job (a shard of
            an n-way sharded run spends 1/n of it); None = unlimited.
        max_tokens_per_minute: Smooth TPM limit of the whole job, counted like OpenAI does (prompt
            estimate + max_tokens * n per call, settled with the real usage); None = unlimited.
        max_retries: Retries after the first attempt (4 attempts in total by default).
        timeout_s: Per-attempt timeout on connecting and on each read (a whole call is cut at
            twice this, so a server trickling bytes cannot hold a worker).
        backoff_base_s: Full-jitter backoff base (window doubles per retry).
        backoff_cap_s: Largest backoff window.
        max_retry_after_s: Ceiling on a server's Retry-After.
        json_mode: How json_schema is requested: "json_schema" (response_format with the schema),
            "json_object" (JSON mode + schema in the system prompt) or "prompt" (schema in the
            system prompt only), for servers that lack structured output.
        jpeg_quality: Quality of the base64 JPEG images.
        preflight: GET /models before the backend's first row (once, not per `run`), to fail fast
            on a dead endpoint or bad key.
        check_model: In the preflight, fail when the model is not among the served models.
        unreachable_after: Stop sending after this many consecutive rows ended in connection
            failures with no success in between (0 = never).
        extra_body: Extra JSON fields sent with every request (e.g. vLLM's top_k).
        jitter_seed: Seed of the backoff jitter.
    """

    base_url: str = "http://127.0.0.1:8000/v1"
    api_key: str | None = field(default=None, repr=False)
    concurrency: int = 64
    max_requests_per_minute: float | None = None
    max_tokens_per_minute: float | None = None
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


def encode_body(req: Request, model: str, opts: OpenAIOptions) -> bytes:
    """The encoded JSON body of one request (built once, reused by every retry)."""
    return json.dumps(build_payload(req, model, opts), ensure_ascii=False).encode()


def estimate_tokens(req: Request) -> int:
    """Tokens a call may use, as providers count them for TPM limits: prompt + max_tokens * n.

    Text is estimated at 4 characters per token plus 4 per message, images at one token per
    28x28 pixels.

    >>> estimate_tokens(Request("x", [{"role": "user", "content": "a" * 400}], max_tokens=50))
    154
    """
    chars = sum(len(text) for _, text in message_text(req.messages))
    pixels = sum(img.shape[0] * img.shape[1] for img in req.images)
    prompt = chars // 4 + 4 * len(req.messages) + pixels // IMAGE_PIXELS_PER_TOKEN
    return prompt + req.max_tokens * req.n


def read_usage(data: Any) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) of a parsed response body; None when it has no usage.

    >>> read_usage({"usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}})
    (12, 3)
    """
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return prompt, completion


def parse_body(body: bytes) -> tuple[Any, Failure | None]:
    """JSON-decode a response body: (data, None), or (None, the failure)."""
    try:
        return json.loads(body), None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, Failure(
            "bad body", f"response body is not JSON ({one_line(str(exc), 80)})", True
        )


def read_choices(body: bytes, req: Request) -> tuple[list[str], Failure | None]:
    """Extract and check the n output texts of a chat-completions response body.

    Args:
        body: Raw HTTP body.
        req: The request (n and json_schema).

    Returns:
        (texts, None) on success, else ([], the failure).
    """
    data, failure = parse_body(body)
    return ([], failure) if failure else check_choices(data, req)


def check_choices(data: Any, req: Request) -> tuple[list[str], Failure | None]:
    """Extract and check the n output texts of a parsed chat-completions response."""
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
    """Return the API key: explicit option, then $LVR_API_KEY, $OPENAI_API_KEY, else "EMPTY".

    Surrounding whitespace is dropped (a key read with ``$(cat keyfile)`` keeps its newline, which
    HTTP headers reject). `REDACTED` (a config copied from a manifest or ``--show-config``) counts
    as unset.

    Raises:
        BackendError: The option is `REDACTED` and no key is set in the environment.
    """
    key = (explicit or "").strip()
    if key and key != REDACTED:
        return key
    for name in API_KEY_ENV:
        if os.environ.get(name, "").strip():
            return os.environ[name].strip()
    if key == REDACTED:
        raise BackendError(
            f"api_key is {REDACTED!r} (a config copied from a manifest or --show-config): set the "
            f"key in ${API_KEY_ENV[0]} or ${API_KEY_ENV[1]}"
        )
    return "EMPTY"


class OpenAIBackend:
    """Backend over an OpenAI-compatible `/chat/completions` endpoint.

    Args:
        model: Model name as served (e.g. the `vllm serve` model argument).
        options: `OpenAIOptions`.
        limiter: The request budget to spend (default: a local `RateLimiter` with the options'
            whole-job limits, i.e. share 1). A sharded stage passes this process's share; a
            distributed executor passes one limiter shared by all its workers.
    """

    name = "openai"

    def __init__(
        self, model: str, options: OpenAIOptions | None = None, limiter: Limiter | None = None
    ):
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
        self.limiter: Limiter = limiter or RateLimiter.for_share(
            self.opts.max_requests_per_minute, self.opts.max_tokens_per_minute
        )
        if _has_userinfo(self.opts.base_url):
            raise BackendError(
                f"base_url {scrub(self.opts.base_url)} holds credentials (user:password@): remove "
                "them and pass the key via the api_key option (or $LVR_API_KEY / $OPENAI_API_KEY)"
            )
        # Resolved once, so that a bad (redacted) key fails before any row and errors can mask it.
        self._api_key = resolve_api_key(self.opts.api_key)
        self._url = self.opts.base_url.rstrip("/") + "/chat/completions"
        self.last_stats = RunStats()
        self._rng = random.Random(self.opts.jitter_seed)
        self._checked = False  # the endpoint passed the preflight

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
        session = open_session(
            self.opts.base_url, self._api_key, self.opts.concurrency, self.opts.timeout_s
        )
        try:
            # Once per backend: a stage calls `run` once per shard, and each check is a round
            # trip during which no request is in flight (one latency per shard).
            if self.opts.preflight and requests and not self._checked:
                try:
                    await preflight(session, self.opts.base_url, self.model,
                                    self.opts.check_model, self.opts.timeout_s)  # fmt: skip
                except BackendError as exc:
                    raise BackendError(self.scrub(str(exc))) from None
                self._checked = True
            todo = iter(range(len(requests)))
            with progress_bar(f"{self.name}:{self.model}", len(requests), progress) as advance:
                state = _Breaker(self.opts.unreachable_after)

                async def worker() -> None:
                    for i in todo:  # shared iterator: each index is taken exactly once
                        try:
                            resp = await self._one(session, requests[i], state)
                        except Exception as exc:  # a bug must cost one row, not the run
                            text = one_line(self.scrub(str(exc)))
                            err = f"unexpected error: {type(exc).__name__}: {text}"
                            resp = Response(requests[i].item_id, [], err, 0, 0.0)
                        if resp.error is not None:  # server bodies and exceptions may echo it
                            resp.error = self.scrub(resp.error)
                        results[i] = resp
                        if on_response is not None:
                            on_response(i, resp)
                        advance(resp)

                await asyncio.gather(*(worker() for _ in range(n_workers)))
        finally:
            await session.close()
        if state.rejected:  # a wrong key fails every row: stop the run, not 10,000 rows later
            raise BackendError(
                f"{self.opts.base_url} rejected the API key ({self.scrub(state.rejected)}); set "
                "the api_key option (or $LVR_API_KEY / $OPENAI_API_KEY) to a valid key"
            )
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]

    def scrub(self, text: str) -> str:
        """``text`` with this backend's API key (and the environment's, URL passwords) masked."""
        return scrub(text, [self._api_key])

    async def _one(self, session: Any, req: Request, breaker: _Breaker) -> Response:
        """Run one request with retries; always returns a Response."""
        bad = check_request(req)
        if bad:
            return Response(req.item_id, [], bad, 0, 0.0)
        if breaker.tripped or breaker.rejected:
            self.last_stats.not_sent += 1
            return Response(req.item_id, [], breaker.message(self.opts.base_url), 0, 0.0)
        if req.images:  # JPEG encoding is CPU work: keep it off the event loop
            body = await asyncio.get_running_loop().run_in_executor(
                None, encode_body, req, self.model, self.opts
            )
        else:
            body = encode_body(req, self.model, self.opts)
        start = time.monotonic()
        kinds: Counter = Counter()
        failure: Failure | None = None
        attempt = 0
        billed = [0, 0]  # prompt, completion tokens over all attempts
        estimate = estimate_tokens(req)
        for attempt in range(1, self.opts.max_retries + 2):
            await self.limiter.acquire(estimate)
            self.last_stats.attempts += 1
            texts, failure, used = await self._attempt(session, body, req)
            if used is not None:  # the server answered with usage: it counted these tokens
                self.limiter.settle(estimate, used[0] + used[1])
                billed[0] += used[0]
                billed[1] += used[1]
            if failure is None:
                breaker.record(ok=True)
                return Response(req.item_id, texts, None, attempt, time.monotonic() - start,
                                prompt_tokens=billed[0], completion_tokens=billed[1])  # fmt: skip
            kinds[failure.kind] += 1
            self.last_stats.failures[failure.kind] += 1
            if failure.kind in ("HTTP 401", "HTTP 403"):
                breaker.rejected = one_line(failure.message, 160)
                break
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
        return Response(req.item_id, [], _error_line(failure, kinds, attempt), attempt,
                        time.monotonic() - start, prompt_tokens=billed[0], completion_tokens=billed[1])  # fmt: skip

    async def _attempt(
        self, session: Any, body: bytes, req: Request
    ) -> tuple[list[str], Failure | None, tuple[int, int] | None]:
        """One HTTP call, its failure if any, and the tokens its answer reported.

        Returns:
            (texts, failure or None, (prompt, completion) tokens when the body reported usage).
        """
        raw, failure = await post_json(
            session, self._url, body, self.opts.timeout_s, [self._api_key]
        )
        if failure is not None:
            return [], failure, None
        data, failure = parse_body(raw)
        if failure is not None:
            return [], failure, None
        texts, failure = check_choices(data, req)
        return texts, failure, read_usage(data)


def _has_userinfo(url: str) -> bool:
    try:
        parts = urlsplit(url)
        return bool(parts.username or parts.password)
    except ValueError:
        return "@" in url.split("/")[2] if url.count("/") >= 2 else False


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
        self.rejected = ""  # the 401/403 answer once the server rejected the key

    def record(self, ok: bool, connection_only: bool = False) -> None:
        if ok or not connection_only:
            self.consecutive = 0
            return
        self.consecutive += 1
        if self.threshold > 0 and self.consecutive >= self.threshold:
            self.tripped = True

    def message(self, url: str) -> str:
        if self.rejected:
            return f"not sent: {url} rejected the API key ({self.rejected})"
        return (
            f"not sent: endpoint {url} unreachable ({self.consecutive} consecutive rows failed "
            "to connect); rerun to retry"
        )
