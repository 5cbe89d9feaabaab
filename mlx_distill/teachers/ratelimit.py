"""The Anthropic API's rate limits as the teacher sees them: a concurrency limiter (AIMD) and the 429 headers.

:class:`AdaptiveLimiter` keeps at most ``limit`` requests in flight; a 429
halves the limit (once a cooldown), successes grow it back by one.
:func:`parse_retry_after` and :func:`ratelimit_wait` read how long to wait
from a response's headers; :func:`is_spend_limit` tells a spend-limit 429
(never retried) from a rate-limit one. Used by ``teachers.anthropic``.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

MAX_WAIT_S = 600.0  # the longest retry-after / reset we honour in one go
RATELIMIT_KINDS = ("requests", "tokens", "input-tokens", "output-tokens")


class AdaptiveLimiter:
    """At most ``limit`` requests in flight; ``limit`` halves on 429s and creeps back up."""

    def __init__(
        self, max_limit: int, clock: Callable[[], float] = time.monotonic, cooldown_s: float = 1.0
    ):
        self.max_limit = max(1, int(max_limit))
        self.limit = self.max_limit
        self.lowest = self.max_limit  # for the summary / tests
        self.in_use = 0
        self.paused_until = 0.0
        self._clock = clock
        self._cooldown = cooldown_s
        self._last_cut = -math.inf
        self._streak = 0
        self._cond: asyncio.Condition | None = None

    @property
    def cond(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def acquire(self) -> None:
        async with self.cond:
            await self.cond.wait_for(lambda: self.in_use < self.limit)
            self.in_use += 1

    async def release(self) -> None:
        async with self.cond:
            self.in_use -= 1
            self.cond.notify_all()

    def pause(self, seconds: float) -> None:
        self.paused_until = max(
            self.paused_until, self._clock() + min(max(seconds, 0.0), MAX_WAIT_S)
        )

    async def wait_unpaused(self, sleep: Callable[[float], Awaitable[Any]]) -> None:
        while (left := self.paused_until - self._clock()) > 0:
            await sleep(left)

    def rate_limited(self) -> tuple[int, int]:
        """Halve the limit (once per cooldown, so one burst of 429s is one cut)."""
        before = self.limit
        now = self._clock()
        if now - self._last_cut >= self._cooldown:
            self.limit = max(1, self.limit // 2)
            self.lowest = min(self.lowest, self.limit)
            self._last_cut = now
        self._streak = 0
        return before, self.limit

    async def succeeded(self) -> None:
        self._streak += 1
        if self._streak >= self.limit and self.limit < self.max_limit:
            self._streak = 0
            async with self.cond:
                self.limit += 1
                self.cond.notify_all()


def parse_retry_after(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` / ``retry-after`` (seconds), else None."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            continue
    return None


def ratelimit_wait(headers: Any, now: float | None = None) -> float | None:
    """Seconds until the earliest reset among exhausted ``anthropic-ratelimit-*`` buckets."""
    if headers is None:
        return None
    now = time.time() if now is None else now
    waits = []
    for kind in RATELIMIT_KINDS:
        remaining = headers.get(f"anthropic-ratelimit-{kind}-remaining")
        reset = headers.get(f"anthropic-ratelimit-{kind}-reset")
        if remaining is None or reset is None:
            continue
        try:
            if int(remaining) > 0:
                continue
            at = datetime.fromisoformat(reset.replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
        waits.append(max(0.0, at - now))
    return min(waits) if waits else None


def is_spend_limit(e: Any) -> bool:
    """A 429 that says the organisation's spend limit is reached (never worth retrying)."""
    body = getattr(e, "body", None)
    blob = json.dumps(body) if isinstance(body, (dict, list)) else str(body or "")
    return (
        "enforced_spend_limit_reached" in blob
        or getattr(e, "error_code", None) == "enforced_spend_limit_reached"
    )
