"""A loopback OpenAI-compatible server with seeded fault injection, for tests, benchmarks and the demo.

Real HTTP/1.1 with keep-alive on 127.0.0.1 (asyncio streams: one thread serves hundreds of concurrent
connections without a thread each, so at 2 cores the server is not the bottleneck of the benchmark).
Routes: `GET /v1/models`, `POST /v1/chat/completions` (n choices, plausible content from
`fake_content`, and a `usage` object counted like a real server: prompt tokens of the chat-templated
messages and images, completion tokens of every choice). Every answer except a 429 waits `latency_s`.
A wrong key gets a 401 whose message shows the key masked, as OpenAI's does.

Faults are deterministic: the k-th arrival of a given request body is faulty when
hash(seed, body, k) < rate, and the fault kind is drawn the same way from `kinds`:

- "429": Retry-After header, JSON error body      - "500", "503": JSON error body
- "timeout": sleeps `timeout_sleep_s` (beyond the client's timeout) before answering
- "truncated": announces the full Content-Length, sends half the body, closes the connection
- "non_json": 200 with an HTML body                 - "missing_fields": 200 whose content lacks the
  required JSON keys (or lacks `content` for text requests)

Run standalone (the benchmark does, so that server and client do not share a GIL)::

    python -m lvr.testing.fake_server --latency 0.2 --port 0    # prints "URL http://127.0.0.1:PORT/v1"
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from lvr.testing.fake_content import (
    PromptFacts,
    answer_text,
    broken_answer,
    schema_from_request,
    usage_of,
)

FAULT_KINDS = ("429", "500", "503", "timeout", "truncated", "non_json", "missing_fields")
_REASONS = {
    200: "OK",
    401: "Unauthorized",
    404: "Not Found",
    400: "Bad Request",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass
class FaultConfig:
    """Seeded fault injection.

    Attributes:
        rate: Probability that one arrival is faulty.
        kinds: Fault kinds drawn uniformly (see module docstring).
        seed: Seed of the deterministic draws.
        retry_after_s: Value of the Retry-After header on 429s.
        timeout_sleep_s: How long a "timeout" fault stalls (set it above the client's timeout).
    """

    rate: float = 0.0
    kinds: tuple[str, ...] = FAULT_KINDS
    seed: int = 0
    retry_after_s: float = 1.0
    timeout_sleep_s: float = 5.0


@dataclass
class Arrival:
    """One received chat-completions request, as logged by the server."""

    user_text: str  # last user message text (tests put the item id there)
    body_hash: str
    attempt: int  # 1 for the first arrival of this body
    outcome: str  # "ok" or the fault kind
    t: float
    usage: dict[str, Any] | None = None  # usage of a complete 200 answer the client can read


@dataclass
class _Ctx:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


def _draw(seed: int, body_hash: str, attempt: int, salt: str) -> float:
    blob = f"{seed}\x1f{body_hash}\x1f{attempt}\x1f{salt}".encode()
    return int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "big") / 2.0**64


class FakeOpenAIServer:
    """Loopback OpenAI-compatible server; use as a context manager or `start()`/`stop()`.

    Args:
        latency_s: Fixed delay before each answer.
        faults: Fault injection (default none).
        model: The one served model id.
        api_key: When set, requests must carry `Authorization: Bearer <api_key>` (else 401).
        port: 0 for a free port.
        echo_auth: Injected 500/503 errors quote the request's Authorization header, as some
            misconfigured gateways do (tests check that such a key never reaches a row).
    """

    def __init__(
        self,
        latency_s: float = 0.0,
        faults: FaultConfig | None = None,
        model: str = "fake-model",
        api_key: str | None = None,
        port: int = 0,
        echo_auth: bool = False,
    ):
        self.latency_s = latency_s
        self.faults = faults or FaultConfig()
        self.model = model
        self.api_key = api_key
        self.port = port
        self.echo_auth = echo_auth
        self.log: list[Arrival] = []
        self.model_lists = 0  # GET /v1/models answered (the clients' preflights)
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        """Base URL for clients, with /v1."""
        return f"http://127.0.0.1:{self.port}/v1"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeOpenAIServer:
        """Serve from a daemon thread with its own event loop; returns once listening."""
        ready = threading.Event()

        def main() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(self._listen())
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._shutdown())
            self._loop.close()

        self._thread = threading.Thread(target=main, name="fake-openai-server", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake server did not start")
        return self

    def stop(self) -> None:
        """Stop serving, cancel stalled handlers and join the thread."""
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _listen(self) -> None:
        # A deep backlog: 64+ clients connect at once when a run starts.
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, backlog=1024
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- HTTP ----------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = h.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                keep = await self._route(method, path, headers, body, writer)
                if not keep or headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass  # client went away (e.g. after its timeout) or sent garbage
        except asyncio.CancelledError:
            pass  # server shutdown: end quietly (a cancelled handler makes asyncio log an error)
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    async def _send(
        self, writer: asyncio.StreamWriter, status: int, payload: bytes, ctx: _Ctx | None = None
    ) -> None:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (ctx.headers if ctx else {}).items())
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
            f"Connection: keep-alive\r\n{extra}\r\n"
        )
        writer.write(head.encode("latin-1") + payload)
        await writer.drain()

    async def _route(
        self, method: str, path: str, headers: dict[str, str], body: bytes, writer: Any
    ) -> bool:
        """Answer one request; return False to close the connection."""
        if self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
            sent = headers.get("authorization", "").removeprefix("Bearer ")
            masked = (
                f"{sent[:3]}{'*' * max(len(sent) - 7, 0)}{sent[-4:]}" if len(sent) > 7 else "***"
            )
            msg = f"Incorrect API key provided: {masked}."
            await self._send(writer, 401, _error_body(msg, "invalid_request_error"))
            return True
        path = path.split("?", 1)[0].rstrip("/")
        if method == "GET" and path == "/v1/models":
            with self._lock:
                self.model_lists += 1
            data = [{"id": self.model, "object": "model", "created": 0, "owned_by": "lvr"}]
            await self._send(writer, 200, json.dumps({"object": "list", "data": data}).encode())
            return True
        if method == "POST" and path == "/v1/chat/completions":
            return await self._chat(body, writer, headers.get("authorization", ""))
        await self._send(writer, 404, _error_body(f"no route {method} {path}", "not_found"))
        return True

    def _arrive(self, raw: bytes, req: dict[str, Any]) -> tuple[str, Arrival]:
        """Count this body's arrival and decide its fault (deterministically)."""
        body_hash = hashlib.blake2b(raw, digest_size=8).hexdigest()
        with self._lock:
            attempt = self._counts.get(body_hash, 0) + 1
            self._counts[body_hash] = attempt
        f = self.faults
        kind = "ok"
        if f.rate > 0 and f.kinds and _draw(f.seed, body_hash, attempt, "rate") < f.rate:
            kind = f.kinds[int(_draw(f.seed, body_hash, attempt, "kind") * len(f.kinds))]
        users = [m for m in req.get("messages", []) if m.get("role") == "user"]
        text = PromptFacts.of(users[-1:]).text if users else ""
        arrival = Arrival(text, body_hash, attempt, kind, time.monotonic())
        with self._lock:
            self.log.append(arrival)
        return kind, arrival

    async def _chat(self, raw: bytes, writer: Any, auth: str = "") -> bool:
        try:
            req = json.loads(raw)
        except json.JSONDecodeError:
            await self._send(writer, 400, _error_body("body is not JSON", "invalid_request"))
            return True
        kind, arrival = self._arrive(raw, req)
        if kind == "429":
            ctx = _Ctx(headers={"Retry-After": f"{self.faults.retry_after_s:g}"})
            await self._send(writer, 429, _error_body("rate limit exceeded", "rate_limit"), ctx)
            return True
        await asyncio.sleep(self.faults.timeout_sleep_s if kind == "timeout" else self.latency_s)
        if kind in ("500", "503"):
            msg = "injected failure" + (
                f" (request had authorization: {auth})" if self.echo_auth else ""
            )
            await self._send(writer, int(kind), _error_body(msg, "server_error"))
            return True
        if kind == "non_json":
            await self._send(writer, 200, b"<html><body>502 Bad Gateway</body></html>")
            return True
        completion = self._completion(req, broken=kind == "missing_fields")
        payload = json.dumps(completion).encode()
        if kind != "truncated" and kind != "timeout":  # what the client receives, in full
            arrival.usage = completion["usage"]
        if kind == "truncated":
            head = (
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n"
            )
            writer.write(head.encode() + payload[: len(payload) // 2])
            await writer.drain()
            return False  # close mid-body
        await self._send(writer, 200, payload)
        return True

    def _completion(self, req: dict[str, Any], broken: bool) -> dict[str, Any]:
        n = int(req.get("n") or 1)
        choices = []
        for k in range(n):
            sampled = float(req.get("temperature") or 0.0) > 0
            idx = k if sampled else 0  # greedy: n identical answers, as a real server gives
            if broken:
                msg = {"role": "assistant"}  # text requests: no content at all
                if schema_from_request(req) is not None:  # JSON requests: required keys missing
                    msg["content"] = broken_answer(req, idx)
            else:
                msg = {"role": "assistant", "content": answer_text(req, idx)}
            choices.append({"index": k, "message": msg, "finish_reason": "stop"})
        usage = usage_of(req, [c["message"].get("content") or "" for c in choices])
        return {
            "id": f"chatcmpl-{hashlib.blake2b(json.dumps(req).encode(), digest_size=6).hexdigest()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.get("model", self.model),
            "choices": choices,
            "usage": usage,
        }


def _error_body(message: str, typ: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": typ, "code": None}}).encode()


def main(argv: list[str] | None = None) -> None:
    """Standalone server: prints "URL <base_url>" then serves until SIGTERM/SIGINT."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--fault-rate", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="fake-model")
    args = ap.parse_args(argv)
    server = FakeOpenAIServer(
        args.latency, FaultConfig(args.fault_rate, seed=args.seed), model=args.model, port=args.port
    )

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)  # type: ignore[union-attr]
        await server._listen()
        print(f"URL {server.url}", flush=True)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass
        finally:
            await server._shutdown()

    asyncio.run(serve())
    sys.exit(0)


if __name__ == "__main__":
    main()
