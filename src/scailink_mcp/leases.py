"""`Lease`: work done once per cluster (SPEC section 10): health checks, re-discovery, audit pruning and
`scailink kek rotate` each ask for a named lease before they work, and skip when another holds it.

- `Lease` is the single process's: it always grants (there is no one else to share the work with).
- `RedisLease` holds each lease as one Redis key, `<prefix>:lease:<name>`, whose value is this
  holder's owner token (`host:pid:random`, made on first use, so in the worker process after any fork)
  and whose TTL is the lease's. Acquiring is SET NX PX, in one small Lua script that also lets the
  holder renew its own lease: the holder of a periodic job keeps it round after round (the work runs at
  its cadence, once per interval), and another replica takes over only once it has stopped renewing
  (it died: within one TTL; it shut down: at once, since `run()` releases what it holds). Releasing is
  compare-and-delete (another Lua script), so a holder whose lease expired never deletes its
  successor's.

Redis unreachable or slow: `acquire` answers False (the caller skips this round's work, it never
raises into a loop), the outage is logged once with its end, and `unavailable` is True meanwhile.
A lease is a time-bounded promise, not a mutual exclusion proof: work under it must stay correct if it
ever runs twice (every job here is; the lease keeps it from being repeated by every replica).

Must not: import redis unless a Redis URL is configured; hold a connection per caller (a small pool
serves every lease of the process).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import anyio

from scailink_mcp.redis_link import _keepalive_options, make_worker_id

if TYPE_CHECKING:  # redis is imported only when a Redis URL is configured
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

logger = logging.getLogger(__name__)

# Granted (1) when the lease is free or already this owner's (then its TTL starts again), else 0.
ACQUIRE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# Deleted (1) only while it is still this owner's.
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Lease:
    """The single process's lease: always granted, nothing to release."""

    unavailable = False

    async def acquire(self, name: str, ttl_s: float) -> bool:
        """Whether this process may do the work called `name` now (and, renewing, until `ttl_s`)."""
        return True

    async def release(self, name: str) -> None:
        """Give `name` up before its TTL (no-op when not held)."""

    async def run(self) -> None:
        """Owned by the app lifespan; nothing to own in process."""


class RedisLease(Lease):
    """Leases shared by every replica on one Redis. `run()` is owned by the app lifespan (or the CLI):
    on cancellation it releases the leases still held and closes the connections."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "scailink",
        timeout_s: float = 2.0,
        max_connections: int = 16,
    ) -> None:
        from redis.asyncio.connection import parse_url

        parse_url(url)  # a malformed URL is a configuration error: fail at start-up
        self.url = url
        self.key_prefix = f"{prefix}:lease:"
        self.client_name_prefix = f"{prefix}:lease"
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.owner = ""  # made on first use, in the process that holds the leases
        self.held: set[str] = set()
        self.unavailable = False
        self._client: Redis | None = None
        self._acquire: AsyncScript | None = None
        self._release: AsyncScript | None = None
        # Counters (tests, logs): leases granted (renewals included), refused (held elsewhere), failed.
        self.granted = 0
        self.refused = 0
        self.failures = 0

    def _connect(self) -> tuple[AsyncScript, AsyncScript]:
        from redis.asyncio import BlockingConnectionPool, Redis
        from redis.asyncio.retry import Retry
        from redis.backoff import ExponentialBackoff

        self.owner = self.owner or make_worker_id()
        # A bounded pool: a health round asks for one lease per server at once; they queue here.
        pool = BlockingConnectionPool.from_url(
            self.url,
            max_connections=self.max_connections,
            timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            socket_timeout=self.timeout_s,
            socket_keepalive=True,
            socket_keepalive_options=_keepalive_options(),
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 1),
            client_name=f"{self.client_name_prefix}:{self.owner}",
        )
        self._client = Redis.from_pool(pool)
        self._acquire = self._client.register_script(ACQUIRE_LUA)
        self._release = self._client.register_script(RELEASE_LUA)
        return self._acquire, self._release

    def _scripts(self) -> tuple[AsyncScript, AsyncScript]:
        if self._acquire is None or self._release is None:
            return self._connect()
        return self._acquire, self._release

    async def acquire(self, name: str, ttl_s: float) -> bool:
        try:
            acquire, _ = self._scripts()
            with anyio.fail_after(self.timeout_s * 2):
                granted = await acquire(
                    keys=[self.key_prefix + name], args=[self.owner, max(1, round(ttl_s * 1000))]
                )
        except Exception as exc:
            self._failed(exc, name)
            return False
        self._restored()
        if int(granted) == 1:
            self.granted += 1
            self.held.add(name)
            return True
        self.refused += 1
        self.held.discard(name)
        return False

    async def release(self, name: str) -> None:
        self.held.discard(name)
        try:
            _, release = self._scripts()
            with anyio.fail_after(self.timeout_s * 2):
                await release(keys=[self.key_prefix + name], args=[self.owner])
        except Exception as exc:  # it expires on its own
            self._failed(exc, name)
            return
        self._restored()

    async def holder(self, name: str) -> str | None:
        """The owner token holding `name` now, or None (raises when Redis does not answer)."""
        self._scripts()
        assert self._client is not None
        with anyio.fail_after(self.timeout_s * 2):
            value = await self._client.get(self.key_prefix + name)
        return value.decode() if isinstance(value, bytes) else value

    def _failed(self, exc: Exception, name: str) -> None:
        self.failures += 1
        if self.unavailable:
            return
        self.unavailable = True
        logger.warning(
            "Redis leases unavailable: work done once per cluster (health checks, re-discovery, audit "
            "pruning) is skipped until Redis answers again",
            extra={"lease": name, "error": type(exc).__name__},
        )

    def _restored(self) -> None:
        if self.unavailable:
            self.unavailable = False
            logger.info("Redis leases available again")

    async def run(self) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            with anyio.move_on_after(self.timeout_s * 2, shield=True):
                for name in sorted(self.held):  # hand over at once rather than after the TTL
                    await self.release(name)
                client, self._client, self._acquire, self._release = self._client, None, None, None
                if client is not None:
                    await client.aclose()
