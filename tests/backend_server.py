"""Test helpers for anything that talks to an OpenAI-compatible server (import as `backend_server`).

The server itself lives in the package's test scaffolding (`lvr.testing.fake_server`) because the
throughput benchmarks use it too; this module adds pytest-friendly pieces: a context manager, a port nothing listens on, and
caption / QA shaped requests with the schemas the fake server answers plausibly.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lvr.backends import Request
from lvr.testing.fake_server import FakeOpenAIServer, FaultConfig

CAPTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["caption"],
    "properties": {"caption": {"type": "string", "minLength": 1, "maxLength": 400}},
}

QA_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["question", "options", "answer", "reasoning", "evidence"],
    "properties": {
        "question": {"type": "string", "minLength": 5, "maxLength": 200},
        "options": {
            "type": "array",
            "items": {"type": "string", "minLength": 1, "maxLength": 80},
            "minItems": 4,
            "maxItems": 4,
        },
        "answer": {"type": "string", "enum": ["A", "B", "C", "D"]},
        "reasoning": {"type": "string", "minLength": 1, "maxLength": 400},
        "evidence": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "required": ["start_s", "end_s"],
                "properties": {"start_s": {"type": "number"}, "end_s": {"type": "number"}},
            },
        },
    },
}


@contextmanager
def fake_server(
    latency_s: float = 0.0, faults: FaultConfig | None = None, **kwargs: Any
) -> Iterator[FakeOpenAIServer]:
    """Run a `FakeOpenAIServer` on a free loopback port for the duration of a `with` block."""
    server = FakeOpenAIServer(latency_s=latency_s, faults=faults, **kwargs).start()
    try:
        yield server
    finally:
        server.stop()


def dead_port() -> int:
    """A loopback port that was free a moment ago and has no listener (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def caption_request(i: int, prompt_version: str = "cap-v1", **kwargs: Any) -> Request:
    """A caption-shaped request for clip `i` (the item id appears in the prompt)."""
    text = (
        f"[clip-{i}] Elaborate on the visual and narrative elements of the video in detail. "
        f"From {10 * i} to {10 * i + 10}, a red ball rolls past a dog."
    )
    return Request(
        f"clip-{i}",
        [{"role": "user", "content": text}],
        json_schema=CAPTION_SCHEMA,
        prompt_version=prompt_version,
        **kwargs,
    )


def qa_request(i: int, prompt_version: str = "qa-v1", **kwargs: Any) -> Request:
    """A QA-shaped request for video `i` with timestamped caption lines."""
    lines = "\n".join(
        f"From {10 * k} to {10 * k + 10}, {what}"
        for k, what in enumerate(
            [
                "a man enters the kitchen",
                "he opens the fridge",
                "he pours milk into a cup",
                "he drinks and leaves",
            ]
        )
    )
    text = f"[video-{i}] Category: temporal. Captions:\n{lines}\nWrite one hard question."
    return Request(
        f"video-{i}",
        [{"role": "user", "content": text}],
        json_schema=QA_SCHEMA,
        prompt_version=prompt_version,
        **kwargs,
    )


def mixed_requests(n: int, **kwargs: Any) -> list[Request]:
    """n requests alternating caption and QA shapes."""
    return [caption_request(i, **kwargs) if i % 2 else qa_request(i, **kwargs) for i in range(n)]


def item_tag(user_text: str) -> str | None:
    """The "[clip-3]" / "[video-4]" tag of a logged prompt, as an item id ("clip-3")."""
    if user_text.startswith("[") and "]" in user_text:
        return user_text[1 : user_text.index("]")]
    return None
