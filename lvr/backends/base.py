"""The model-call interface every stage uses: `Request` in, `Response` out, one per row.

A backend turns a list of requests into exactly one response per request, in the same order. It never
drops a row and never raises for one bad row: a failure is a `Response` with empty `texts` and a one-line
`error`. It raises (an `LvrError`) only for problems that would fail every row alike, such as an
unreachable endpoint, so that the user sees one actionable message instead of thousands of error rows.

This module imports nothing heavy (no torch, no openai), so `datagen` with API backends stays light.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lvr.errors import LvrError

# Bump when the payload hashing below changes: old cache entries then stop matching.
PAYLOAD_HASH_VERSION = "payload-v1"

OnResponse = Callable[[int, "Response"], None]


class BackendError(LvrError):
    """A backend problem that would fail every request alike (bad options, unreachable endpoint)."""


@dataclass
class Request:
    """One model call.

    Attributes:
        item_id: The row this call serves (clip_id, video_id, qa_id...).
        messages: OpenAI chat messages; content is a string or a list of text parts.
        images: uint8 [H, W, 3] frames; each backend renders them its own way.
        fps: Frame rate of `images` when they are consecutive video frames (local VLMs use it).
        timestamps: Time in seconds of each of `images` when they are video frames; local VLMs
            tell the model these times (Qwen3-VL writes them into the prompt), else `i / fps`.
        json_schema: Ask for one JSON object matching this schema.
        max_tokens: Generation budget per output.
        temperature: 0 means greedy.
        top_p: Nucleus sampling mass.
        n: Outputs per request (e.g. `lvr eval --passes K`).
        seed: Sampling seed, when the backend supports one.
        prompt_version: Version of the prompt that built `messages`; part of the cache key.
    """

    item_id: str
    messages: list[dict[str, Any]]
    images: list[np.ndarray] = field(default_factory=list)
    fps: float | None = None
    timestamps: list[float] | None = None
    json_schema: dict[str, Any] | None = None
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    prompt_version: str = ""


@dataclass
class Response:
    """The outcome of one `Request`.

    Attributes:
        item_id: Copied from the request.
        texts: The n outputs; [] on error. With a json_schema, each text is one JSON object that
            parsed and validated (code fences stripped).
        error: None on success, else one line such as "HTTP 500 after 4 attempts".
        attempts: HTTP calls or generate passes spent on this request (0 for a cache hit).
        latency_s: Wall time from the first attempt to the outcome.
        cached: True when served from the request cache.
        prompt_tokens: Prompt tokens billed over all attempts (the API's ``usage``; 0 if unknown).
        completion_tokens: Completion tokens billed over all attempts (0 for a cache hit).
    """

    item_id: str
    texts: list[str]
    error: str | None
    attempts: int
    latency_s: float
    cached: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def ok(self) -> bool:
        """True when the request produced its outputs."""
        return self.error is None


@runtime_checkable
class Backend(Protocol):
    """What `lvr datagen caption/qa` and `lvr eval` call.

    `run` returns exactly one Response per Request, in order. `on_response(index, response)` is
    called as each response becomes final (used by the cache to persist results as they arrive, so
    a killed process keeps what it paid for).
    """

    name: str
    model: str

    def run(
        self,
        requests: Sequence[Request],
        progress: bool = True,
        on_response: OnResponse | None = None,
    ) -> list[Response]: ...


def check_request(req: Request) -> str | None:
    """Return a one-line problem with a request's fields, or None when it is well formed.

    Args:
        req: The request.

    Returns:
        An error line for the response row, or None.
    """
    if not req.messages:
        return "bad request: no messages"
    if req.n < 1:
        return f"bad request: n must be >= 1, got {req.n}"
    if req.max_tokens < 1:
        return f"bad request: max_tokens must be >= 1, got {req.max_tokens}"
    for i, img in enumerate(req.images):
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3:
            return f"bad request: image {i} must be a uint8 [H, W, 3] array"
        if img.shape[-1] != 3:
            return f"bad request: image {i} has shape {img.shape}, expected [H, W, 3]"
    if req.timestamps is not None:
        if len(req.timestamps) != len(req.images):
            return f"bad request: {len(req.timestamps)} timestamps for {len(req.images)} images"
        if any(b < a for a, b in zip(req.timestamps, req.timestamps[1:], strict=False)):
            return "bad request: timestamps must not decrease"  # a repeated frame keeps its time
    return None


def payload_hash(req: Request) -> str:
    """Hash everything that determines a request's outputs except its item id and prompt version.

    Messages and schema are hashed as canonical JSON, images by shape + raw bytes, together with the
    sampling parameters. Two requests with the same hash ask the model the same thing.

    Args:
        req: The request.

    Returns:
        32 hex characters.
    """
    h = hashlib.blake2b(digest_size=16)
    head = {
        "v": PAYLOAD_HASH_VERSION,
        "messages": req.messages,
        "schema": req.json_schema,
        "fps": req.fps,
        "sampling": [req.max_tokens, req.temperature, req.top_p, req.n, req.seed],
        "images": [list(img.shape) for img in req.images],
    }
    if req.timestamps is not None:  # only then: keys of requests without times stay as they were
        head["timestamps"] = [round(float(t), 6) for t in req.timestamps]
    h.update(json.dumps(head, sort_keys=True, ensure_ascii=False, default=str).encode())
    for img in req.images:
        h.update(np.ascontiguousarray(img).tobytes())
    return h.hexdigest()


def cache_key(req: Request, model: str) -> str:
    """Key of a request in the persistent cache: item, model, prompt version and payload.

    Args:
        req: The request.
        model: The backend's model name (a different model never shares answers).

    Returns:
        32 hex characters.
    """
    parts = [req.item_id, model, req.prompt_version, payload_hash(req)]
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16).hexdigest()


def message_text(messages: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """Flatten chat messages into (role, text) pairs, joining list content's text parts.

    Args:
        messages: OpenAI chat messages.

    Returns:
        One (role, text) per message.
    """
    out = []
    for msg in messages:
        content = msg.get("content", "")
        if isinstance(content, list):
            parts = [p.get("text", "") for p in content if isinstance(p, dict)]
            content = "\n".join(p for p in parts if p)
        out.append((str(msg.get("role", "user")), str(content)))
    return out


def with_system_line(messages: Sequence[dict[str, Any]], line: str) -> list[dict[str, Any]]:
    """Append a line to the system message (string content), or insert a system message.

    Args:
        messages: Chat messages (not modified).
        line: Text to add.

    Returns:
        New messages.
    """
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
        out[0]["content"] = f"{out[0]['content']}\n\n{line}"
    else:
        out.insert(0, {"role": "system", "content": line})
    return out


def one_line(text: str, limit: int = 200) -> str:
    """Squash an error message to one line of at most `limit` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
