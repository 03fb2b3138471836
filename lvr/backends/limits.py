"""Rate limiting, retry delays and the sync-to-async bridge of the API backend.

The limiter is a leaky bucket without burst (GCRA with capacity one): calls are spaced exactly
`60 / max_requests_per_minute` seconds apart, whatever the concurrency, so a 600 RPM quota is spent as
one call every 100 ms rather than 600 calls in the first second followed by a minute of 429s. Its
schedule is a pure function of the arrival times (`reserve`), which the tests check without clocks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import random
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class RateLimiter:
    """Smooth requests-per-minute limiter (leaky bucket, no burst).

    Args:
        per_minute: Allowed calls per minute; None or <= 0 disables limiting.
        clock: Monotonic clock in seconds (injectable for tests).
    """

    def __init__(self, per_minute: float | None, clock: Callable[[], float] = time.monotonic):
        self.interval = 60.0 / per_minute if per_minute and per_minute > 0 else 0.0
        self.clock = clock
        self._next = float("-inf")
        self.schedule: list[float] = []  # reserved start times, in reservation order

    def reserve(self, now: float) -> float:
        """Reserve the next slot for a call arriving at `now`.

        Args:
            now: Arrival time (clock seconds).

        Returns:
            The time at which the call may start (>= now). Consecutive reservations are at least
            `interval` apart; an idle limiter does not bank slots, so there is never a burst.
        """
        start = now if self.interval == 0 else max(now, self._next)
        self._next = start + self.interval
        self.schedule.append(start)
        return start

    async def acquire(self) -> float:
        """Wait for this call's slot.

        Returns:
            The seconds waited.
        """
        now = self.clock()
        delay = self.reserve(now) - now
        if delay > 0:
            await asyncio.sleep(delay)
        return max(delay, 0.0)


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Read the server's requested wait from `retry-after-ms` or `Retry-After` headers.

    Args:
        headers: Response headers (case-insensitive mapping, e.g. httpx.Headers).
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
