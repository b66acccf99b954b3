"""Per-user request rate limiting of the REST surface (token bucket, in-process).

Each user has a bucket of `rate_limit_burst` requests refilled at `rate_limit_per_s`; an empty bucket
answers 429 `SCAILINK_RATE_LIMITED` with `retry_after`. Several replicas would each apply the limit
(a Redis-backed limiter is the multi-worker follow-up).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from scailink_mcp.errors import RateLimited

MAX_USERS = 100_000


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, *, per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_s = per_s
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def check(self, key: str) -> None:
        if self.per_s <= 0:
            return
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_USERS:  # bounded memory: forget the idle ones
                self._buckets = {k: b for k, b in self._buckets.items() if b.tokens < self.burst}
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.per_s)
        bucket.updated = now
        if bucket.tokens < 1:
            raise RateLimited("too many requests for this user", retry_after=(1 - bucket.tokens) / self.per_s)
        bucket.tokens -= 1
