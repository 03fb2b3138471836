"""Usage accounting of model calls: rows, cache hits, HTTP attempts, failures, tokens and cost.

A `Usage` tallies the `Response`s one backend returned. Cache hits are counted apart and cost
nothing; every HTTP attempt that came back with a `usage` object is counted (also one whose output
then failed validation: the provider bills it). A price table turns tokens into money::

    prices:                        # per million tokens, in your currency
      gpt-4.1-mini: {prompt_per_1m: 0.40, completion_per_1m: 1.60}
      Qwen/Qwen2.5-VL-7B-Instruct: {prompt_per_1m: 0, completion_per_1m: 0}

>>> u = Usage(sent=2, attempts=3, prompt_tokens=2_000_000, completion_tokens=500_000)
>>> u.cost({"prompt_per_1m": 0.4, "completion_per_1m": 1.6})
1.6
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lvr.backends.base import Response

PRICE_KEYS = ("prompt_per_1m", "completion_per_1m")


@dataclass
class Usage:
    """What one model's calls did.

    Attributes:
        requests: Rows asked for (cache hits included).
        cache_hits: Rows answered from the request cache (no spend).
        sent: Rows that went to the model (``requests - cache_hits``).
        attempts: HTTP calls (or generate passes) spent on the sent rows.
        retries: Attempts beyond the first of each row.
        failures: Rows that ended with an error.
        prompt_tokens: Prompt tokens billed over all attempts (from the API's ``usage``).
        completion_tokens: Completion tokens billed over all attempts.
    """

    requests: int = 0
    cache_hits: int = 0
    sent: int = 0
    attempts: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def record(self, resp: Response) -> None:
        """Count one response."""
        self.requests += 1
        self.failures += resp.error is not None
        if resp.cached:
            self.cache_hits += 1
            return
        self.sent += 1
        self.attempts += resp.attempts
        self.retries += max(resp.attempts - 1, 0)
        self.prompt_tokens += resp.prompt_tokens
        self.completion_tokens += resp.completion_tokens

    def record_all(self, responses: Iterable[Response]) -> None:
        """Count several responses."""
        for resp in responses:
            self.record(resp)

    def __add__(self, other: Usage) -> Usage:
        return Usage(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in _FIELDS})

    def __sub__(self, other: Usage) -> Usage:
        """What was counted since ``other`` (an earlier copy of the same tally)."""
        return Usage(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in _FIELDS})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Usage:
        """Read the counts of `to_dict` (other keys, such as cost, are ignored)."""
        return cls(**{f.name: int(data.get(f.name) or 0) for f in _FIELDS})

    def cost(self, price: Mapping[str, float] | None) -> float | None:
        """Money spent at ``price`` (per million tokens), or None without a price."""
        if not price:
            return None
        total = self.prompt_tokens * float(price["prompt_per_1m"])
        total += self.completion_tokens * float(price["completion_per_1m"])
        return round(total / 1e6, 6)

    def to_dict(self, price: Mapping[str, float] | None = None) -> dict[str, Any]:
        """Counts, plus ``cost`` (None when the model has no price)."""
        return {**dataclasses.asdict(self), "cost": self.cost(price)}


_FIELDS = dataclasses.fields(Usage)


def check_prices(prices: Mapping[str, Any]) -> None:
    """Raise ValueError (one line) unless ``prices`` maps model -> {prompt_per_1m, completion_per_1m}.

    >>> check_prices({"m": {"prompt_per_1m": 1, "completion_per_1m": 2}})
    >>> check_prices({"m": {"prompt": 1}})
    Traceback (most recent call last):
    ...
    ValueError: prices.m must set prompt_per_1m and completion_per_1m (numbers >= 0), got {'prompt': 1}
    """
    for model, price in prices.items():
        ok = isinstance(price, Mapping) and set(price) == set(PRICE_KEYS)
        ok = ok and all(
            isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
            for v in price.values()
        )
        if not ok:
            raise ValueError(
                f"prices.{model} must set {' and '.join(PRICE_KEYS)} (numbers >= 0), got {price!r}"
            )


def usage_table(
    usage: Mapping[str, Usage], prices: Mapping[str, Mapping[str, float]]
) -> dict[str, dict[str, Any]]:
    """model -> counts and cost, for a manifest."""
    return {model: u.to_dict(prices.get(model)) for model, u in usage.items()}
