"""Per-user request rate limiting: a token bucket in process, or one shared by replicas in Redis.

Each user has a bucket of `rate_limit_burst` requests refilled at `rate_limit_per_s`; an empty bucket
answers 429 `SCAILINK_RATE_LIMITED` with `retry_after`. REST, the dashboard and `/mcp` (`mcp_guard.py`)
share one bucket per (tenant, user) through `await limiter.admit(key)`.

- `RateLimiter` is the in-process bucket (`check` is synchronous: the desktop bridge's per-user
  `catalog_update` limit calls it from a frame handler). `admit` is the same check behind the async
  face the request paths await; it never suspends, so the single process pays no more than before.
- `RedisRateLimiter` (SPEC section 10, `SCAILINK_REDIS_URL` set) keeps the bucket in Redis so every
  replica counts against the same one: one EVALSHA of a small Lua script per request (GCRA, the token
  bucket stored as one number: the time at which the bucket is full again, on Redis' own clock, so
  replicas' clocks never matter). Same burst, same sustained rate and the same `retry_after` as the
  local bucket, so a limit reads alike with one replica or ten.

Why not the `limits` library: it offers fixed, moving and sliding windows, not a token bucket. A window
of `burst` requests per `burst / per_s` seconds locks a user out for the rest of the window once the
burst is spent (where the bucket lets one request through every `1 / per_s`), fixed windows let twice
the burst through at a boundary, windows are whole seconds (`per_s` is a float here), the moving window
stamps hits with the caller's clock and keeps a list of `burst` entries per user, and `retry_after`
needs a second round trip. One 10-line script on the redis-py client the gateway already uses keeps the
semantics and the one round trip.

Redis unreachable or slow (`timeout_s`): the request is admitted by this replica's in-process bucket
(fail open to the local limit; a request is never refused, nor answered 500, because Redis is down),
Redis is not asked again for `probe_interval_s`, and the outage is logged once, with its end.

Must not: import redis unless a Redis URL is configured; block a request longer than `timeout_s`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio

from scailink_mcp.errors import RateLimited
from scailink_mcp.redis_link import connect, make_worker_id

if TYPE_CHECKING:  # redis is imported only when a Redis URL is configured
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

logger = logging.getLogger(__name__)

MAX_USERS = 100_000

# GCRA: KEYS[1] holds `full_at`, the Redis time (ms) at which the bucket is full again; one request
# costs `step` ms (1000 / per_s) and the bucket holds `burst` of them. Returns 0 (admitted, and the key
# lives until the bucket is full again) or the ms to wait for one token, exactly as `RateLimiter.check`.
TOKEN_BUCKET_LUA = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local step, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local full_at = math.max(tonumber(redis.call('GET', KEYS[1])) or now, now) + step
local over = full_at - now - step * burst
if over > 0 then return math.ceil(over) end
redis.call('SET', KEYS[1], tostring(full_at), 'PX', math.ceil(full_at - now))
return 0
"""


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """The in-process token bucket (one per key, at most `MAX_USERS` remembered)."""

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

    async def admit(self, key: str) -> None:
        """Take one request of `key` or raise `RateLimited` (the request paths' face of `check`)."""
        self.check(key)

    async def run(self) -> None:
        """Nothing to own in process; `RedisRateLimiter` closes its connections here."""


class RedisRateLimiter(RateLimiter):
    """The bucket in Redis (key `<prefix>:ratelimit:<key>`), shared by every replica; the inherited
    in-process bucket answers while Redis does not. `run()` is owned by the app lifespan: it closes
    the connections on shutdown (they are opened by the first request, in the worker process)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "scailink",
        per_s: float,
        burst: int,
        timeout_s: float = 0.5,
        probe_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from redis.asyncio.connection import parse_url

        super().__init__(per_s=per_s, burst=burst, clock=clock)
        parse_url(url)  # a malformed URL is a configuration error: fail at start-up, not per request
        self.url = url
        self.key_prefix = f"{prefix}:ratelimit:"
        self.client_name_prefix = f"{prefix}:ratelimit"
        self.timeout_s = timeout_s
        self.probe_interval_s = probe_interval_s
        self._client: Redis | None = None
        self._script: AsyncScript | None = None
        self._local_until = 0.0  # while Redis is out: the local bucket answers until then (clock)
        self._out = False
        # Counters (tests, logs): requests counted in Redis, by the local bucket in an outage; outages.
        self.shared = 0
        self.local = 0
        self.outages = 0

    def _connect(self) -> AsyncScript:
        # One retry: a pooled connection Redis closed (a restart) is replaced without an outage.
        self._client = connect(
            self.url,
            name=f"{self.client_name_prefix}:{make_worker_id()}",  # made here: after any fork
            retries=1,
            timeout_s=self.timeout_s,
        )
        return self._client.register_script(TOKEN_BUCKET_LUA)

    async def admit(self, key: str) -> None:
        if self.per_s <= 0:
            return
        if self._out and self.clock() < self._local_until:
            self.local += 1
            self.check(key)
            return
        if self._out:  # one request probes Redis; the others keep to the local bucket meanwhile
            self._local_until = self.clock() + self.probe_interval_s
        try:
            script = self._script = self._script or self._connect()
            with anyio.fail_after(self.timeout_s):
                wait_ms = await script(keys=[self.key_prefix + key], args=[1000 / self.per_s, self.burst])
        except Exception as exc:  # Redis unreachable, slow, failing: fail open to the local bucket
            self._outage(exc)
            self.local += 1
            self.check(key)
            return
        if self._out:
            self._out = False
            logger.info("Redis rate limit restored: requests are counted across replicas again")
        self.shared += 1
        if int(wait_ms) > 0:
            raise RateLimited("too many requests for this user", retry_after=int(wait_ms) / 1000)

    def _outage(self, exc: Exception) -> None:
        self._local_until = self.clock() + self.probe_interval_s
        if self._out:
            return
        self._out = True
        self.outages += 1
        logger.warning(
            "Redis rate limit unavailable: each replica applies the per-user limit on its own until "
            "Redis answers again",
            extra={"error": type(exc).__name__},
        )

    async def run(self) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            client, self._client, self._script = self._client, None, None
            if client is not None:
                with anyio.move_on_after(2, shield=True):
                    await client.aclose()
