"""Rate limiting, retry delays and the sync-to-async bridge of the API backend.

Rate limits are limits of the whole job. `max_requests_per_minute` and `max_tokens_per_minute`
describe what the endpoint allows the job; a process spends a *share* of that budget:

- one process: share 1;
- a Slurm-array style run (``--shard i --num-shards n``, processes that cannot talk to each other):
  each shard takes 1/n (`RateLimiter.for_share`) and says so in its stage manifest;
- the Ray executor (``lvr datagen run --executor ray``): every worker's `SharedLimiter` asks one
  limiter actor (`limiter_actor`), which holds the job's `RateLimiter`: ``acquire`` = a remote
  `RateLimiter.delay` returning the wait to sleep, ``settle`` = a fire-and-forget remote refund,
  so the whole job shares one budget without static shares.

`RateLimiter` is the local implementation: a leaky bucket without burst (GCRA with capacity one) on
two resources at once. Calls are spaced so that a 600 RPM quota is spent as one call every 100 ms
rather than 600 calls in the first second followed by a minute of 429s, and a call of ``c``
estimated tokens holds ``c / tokens_per_second`` seconds of the token schedule. Like OpenAI's own
accounting, the estimate is the prompt estimate plus ``max_tokens * n``; once the response's
``usage`` is known, `settle` gives back what was reserved but not used. The schedule is a pure
function of the arrival times (`reserve`), which the tests check without clocks.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import email.utils
import random
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, Protocol, TypeVar, runtime_checkable

T = TypeVar("T")
_SCHEDULE_KEPT = 100_000  # reserved start times kept for tests and benchmarks (bounded memory)


@runtime_checkable
class Limiter(Protocol):
    """What the API backend asks before every HTTP attempt (local bucket or a shared Ray actor)."""

    async def acquire(self, tokens: int = 0) -> float:
        """Wait until a call estimated at ``tokens`` tokens may start; return the seconds waited."""
        ...

    def settle(self, reserved: int, used: int) -> None:
        """Correct the token schedule once a call's real usage is known."""
        ...

    def describe(self) -> dict[str, Any]:
        """The job limits, this process's share and its effective limits (for manifests)."""
        ...


class RateLimiter:
    """Smooth requests- and tokens-per-minute limiter (leaky bucket, no burst).

    Args:
        per_minute: Allowed calls per minute for this process; None or <= 0 disables it.
        clock: Monotonic clock in seconds (injectable for tests).
        tokens_per_minute: Allowed tokens per minute for this process; None or <= 0 disables it.
        job: The job-wide limits and share this process's limits were derived from (manifests).
    """

    def __init__(
        self,
        per_minute: float | None,
        clock: Callable[[], float] = time.monotonic,
        tokens_per_minute: float | None = None,
        job: dict[str, Any] | None = None,
    ):
        self.interval = 60.0 / per_minute if per_minute and per_minute > 0 else 0.0
        self.token_interval = (
            60.0 / tokens_per_minute if tokens_per_minute and tokens_per_minute > 0 else 0.0
        )
        self.clock = clock
        self.job = job or {
            "max_requests_per_minute": per_minute,
            "max_tokens_per_minute": tokens_per_minute,
            "share": 1.0,
        }
        self._next = float("-inf")  # earliest start of the next call (request schedule)
        self._next_tokens = float("-inf")  # same, token schedule
        # Reserved start times, in reservation order (the last `_SCHEDULE_KEPT`).
        self.schedule: collections.deque[float] = collections.deque(maxlen=_SCHEDULE_KEPT)

    @classmethod
    def for_share(
        cls,
        max_requests_per_minute: float | None,
        max_tokens_per_minute: float | None,
        share: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> RateLimiter:
        """This process's limiter when it spends ``share`` of a job's limits.

        >>> RateLimiter.for_share(600, None, share=0.25).interval  # 150 RPM: one call every 0.4 s
        0.4
        """
        if not 0 < share <= 1:
            raise ValueError(f"a rate share must be in (0, 1], got {share}")
        rpm = max_requests_per_minute * share if max_requests_per_minute else None
        tpm = max_tokens_per_minute * share if max_tokens_per_minute else None
        job = {"max_requests_per_minute": max_requests_per_minute,
               "max_tokens_per_minute": max_tokens_per_minute, "share": share}  # fmt: skip
        return cls(rpm, clock, tokens_per_minute=tpm, job=job)

    @property
    def limited(self) -> bool:
        """False when neither limit is set (acquire is then free)."""
        return self.interval > 0 or self.token_interval > 0

    def reserve(self, now: float, tokens: int = 0) -> float:
        """Reserve the next slot for a call of ``tokens`` estimated tokens arriving at ``now``.

        Args:
            now: Arrival time (clock seconds).
            tokens: Estimated tokens of the call (ignored without a token limit).

        Returns:
            The time at which the call may start (>= now). Consecutive reservations are at least
            `interval` apart and the token schedule advances by ``tokens * token_interval``; an
            idle limiter does not bank slots, so there is never a burst.
        """
        start = max(now, self._next, self._next_tokens) if self.limited else now
        self._next = start + self.interval
        if self.token_interval:
            self._next_tokens = start + max(tokens, 0) * self.token_interval
        self.schedule.append(start)
        return start

    async def acquire(self, tokens: int = 0) -> float:
        """Wait for this call's slot.

        Args:
            tokens: Estimated tokens of the call.

        Returns:
            The seconds waited.
        """
        if not self.limited:  # the common case at full speed: no clock read, no sleep
            return 0.0
        delay = self.delay(tokens)
        if delay > 0:
            await asyncio.sleep(delay)
        return delay

    def delay(self, tokens: int = 0) -> float:
        """Reserve a slot now and return how long the caller must wait for it (>= 0).

        This is what a shared limiter serves remotely: a Ray actor holding one `RateLimiter`
        answers ``delay(tokens)`` and ``settle(...)`` for every worker of a job, whose clocks then
        never need to agree (a worker sleeps the returned delay; network latency only adds slack).
        """
        now = self.clock()
        return max(self.reserve(now, tokens) - now, 0.0)

    def settle(self, reserved: int, used: int) -> None:
        """Move the token schedule by ``used - reserved`` tokens (a refund when negative).

        The schedule never moves before the present: a refund frees future capacity, it does not
        create a burst of capacity banked in the past.
        """
        if not self.token_interval or used == reserved:
            return
        moved = self._next_tokens + (used - reserved) * self.token_interval
        self._next_tokens = max(moved, min(self._next_tokens, self.clock()))

    def describe(self) -> dict[str, Any]:
        """Job limits, this process's share, and the limits it enforces."""
        per_minute = 60.0 / self.interval if self.interval else None
        tokens = 60.0 / self.token_interval if self.token_interval else None
        return {**self.job, "process_requests_per_minute": per_minute,
                "process_tokens_per_minute": tokens}  # fmt: skip


class SharedLimiter:
    """The `Limiter` of one worker of a distributed job: every call asks the job's limiter actor.

    The actor (`limiter_actor`) holds one `RateLimiter` with the job's whole limits and answers
    `RateLimiter.delay` for every worker, so the workers' clocks never need to agree: a worker
    sleeps the delay it was given (the round trip only adds slack). Without limits no call goes
    to the actor at all.

    Args:
        actor: Handle of the Ray actor made by `limiter_actor`.
        job: The job's limits (``max_requests_per_minute``, ``max_tokens_per_minute``).
    """

    def __init__(self, actor: Any, job: Mapping[str, Any]):
        self.actor = actor
        self.job = {**job, "share": 1.0}
        self.limited = bool(job.get("max_requests_per_minute") or job.get("max_tokens_per_minute"))

    async def acquire(self, tokens: int = 0) -> float:
        """Reserve the next slot of the job's schedule and wait for it; return the seconds waited."""
        if not self.limited:
            return 0.0
        delay = float(await self.actor.delay.remote(tokens))  # a Ray ObjectRef is awaitable
        if delay > 0:
            await asyncio.sleep(delay)
        return delay

    def settle(self, reserved: int, used: int) -> None:
        """Correct the job's token schedule (fire and forget: nothing waits for the answer)."""
        if self.job.get("max_tokens_per_minute") and used != reserved:
            self.actor.settle.remote(reserved, used)

    def describe(self) -> dict[str, Any]:
        """The job's limits, spent by every worker through one shared schedule."""
        return {**self.job, "shared_by": "ray actor",
                "process_requests_per_minute": self.job.get("max_requests_per_minute"),
                "process_tokens_per_minute": self.job.get("max_tokens_per_minute")}  # fmt: skip


def limiter_actor(
    max_requests_per_minute: float | None, max_tokens_per_minute: float | None, name: str
) -> Any:
    """Start the Ray actor that holds a job's request budget (needs ``ray``, the ``ray`` extra).

    Args:
        max_requests_per_minute: The job's request limit (None: unlimited).
        max_tokens_per_minute: The job's token limit (None: unlimited).
        name: The actor's name: workers find it with ``ray.get_actor(name)`` (a handle passed as
            an argument would keep their constructor arguments in Ray's object store).

    Returns:
        The actor handle; workers wrap it in a `SharedLimiter`.
    """
    import ray  # the optional `ray` extra: only a Ray run gets here

    # One call at a time (max_concurrency 1): the schedule needs no lock. A restarted actor
    # starts a fresh schedule, which never bursts (an idle limiter banks no slots).
    remote = ray.remote(num_cpus=0, max_restarts=-1)(_LimiterActor)
    return remote.options(name=name).remote(max_requests_per_minute, max_tokens_per_minute)


class _LimiterActor:
    """The actor behind `SharedLimiter`: one `RateLimiter` with the whole job's limits."""

    def __init__(self, max_requests_per_minute: float | None, max_tokens_per_minute: float | None):
        self.limiter = RateLimiter.for_share(max_requests_per_minute, max_tokens_per_minute)

    def delay(self, tokens: int = 0) -> float:
        return self.limiter.delay(tokens)

    def settle(self, reserved: int, used: int) -> None:
        self.limiter.settle(reserved, used)

    def schedule(self) -> list[float]:
        """The reserved start times (actor clock), for tests and benchmarks."""
        return list(self.limiter.schedule)


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Read the server's requested wait from `retry-after-ms` or `Retry-After` headers.

    Args:
        headers: Response headers (any mapping; names are matched case-insensitively).
        now: Current Unix time for HTTP-date values (default time.time()).

    Returns:
        Seconds to wait (>= 0), or None when absent or unreadable.

    >>> parse_retry_after({"retry-after": "2"})
    2.0
    >>> parse_retry_after({"retry-after-ms": "250"})
    0.25
    """
    if not headers:
        return None
    lower = {k.lower(): v for k, v in headers.items()}
    if "retry-after-ms" in lower:
        try:
            return max(float(lower["retry-after-ms"]) / 1000.0, 0.0)
        except ValueError:
            pass
    value = lower.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(when - (time.time() if now is None else now), 0.0)


def backoff_delay(
    retry: int,
    base_s: float,
    cap_s: float,
    rng: random.Random,
    retry_after_s: float | None = None,
    max_retry_after_s: float = 120.0,
) -> float:
    """Delay before retry number `retry` (1 = first retry): full jitter, or the server's wish.

    Full jitter draws uniformly in [0, min(cap, base * 2**(retry-1))], which spreads retries of many
    concurrent callers instead of synchronizing them. When the server sent Retry-After, we wait at
    least that long (capped by `max_retry_after_s`) plus a little jitter for the same reason.

    Args:
        retry: 1 for the first retry, 2 for the second...
        base_s: Backoff base.
        cap_s: Largest exponential window.
        rng: Random source (seeded per backend for reproducible tests).
        retry_after_s: Server-requested wait, if any.
        max_retry_after_s: Ceiling on honoured Retry-After values.

    Returns:
        Seconds to sleep.
    """
    window = min(cap_s, base_s * (2 ** (retry - 1)))
    jitter = rng.uniform(0.0, window)
    if retry_after_s is not None:
        return min(retry_after_s, max_retry_after_s) + rng.uniform(0.0, min(base_s, window))
    return jitter


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code.

    Uses `asyncio.run` in the calling thread, or, when that thread already runs an event loop
    (Jupyter, an async app), a fresh loop in a helper thread.

    Args:
        coro: The coroutine.

    Returns:
        Its result.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()
