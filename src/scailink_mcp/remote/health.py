"""Periodic checks of registered servers: health (every 60 s ± jitter) and re-discovery (every 15 min).

A health check opens a fresh connection and runs the `initialize` handshake within
`health_timeout_s`. Failures count up `consecutive_failures`; at `health_failure_threshold` an active
server flips to `error` (its tools leave the catalog). A server in `error` comes back only through a
successful refresh, or, with `health_auto_recover`, after `health_recover_successes` good checks.
A server whose stored credential does not decrypt fails its check (`CredentialDecryptError`) and
flips at once; one server's failure, of any kind, never ends the round for the others.

A per-user OAuth server (`grant: authorization_code`) is checked without any user's token: an
unauthenticated request answered 401 with a Bearer challenge counts as reachable (`oauth_client.
OAuthHttp.challenged`); a `client_credentials` server is checked with its one token, like any other.

Several replicas (SPEC section 10): each server's check and re-discovery run on one replica per
interval. A round asks for the lease `health:<server id>` (`leases.py`) before checking a server and
skips the servers another replica holds; the holder renews its leases every round, so a server is
checked once per interval and a status flips once, on one replica, whose `ServerEvent` reaches the
others through the event bus. The lease lives `HEALTH_LEASE_INTERVALS` intervals: longer than the
holder's gap between rounds (the interval, its jitter and the round itself), so the holder keeps it,
and a replica that died is replaced within that. Re-discovery takes `discovery:<server id>` for a
period and one discovery, then re-reads the server (a peer may have re-discovered it meanwhile). Redis
unreachable: the lease is not granted and that round's work is skipped (`leases.py` logs it once).

Both loops are owned by the app lifespan; `run_once` steps them in tests without sleeping.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from functools import partial

import anyio
from sqlmodel import Session, col, select

from scailink_mcp.config import Settings
from scailink_mcp.events import ServerEventKind
from scailink_mcp.leases import Lease
from scailink_mcp.models import RemoteServer, utcnow
from scailink_mcp.remote.discovery import aware
from scailink_mcp.remote.registry import CredentialDecryptError, Registry
from scailink_mcp.remote.upstream import UpstreamTarget, error_class_name, open_session

logger = logging.getLogger(__name__)

Probe = Callable[[UpstreamTarget], Awaitable[None]]
CONCURRENCY = 16
HEALTH_LEASE_INTERVALS = 2.0


class HealthChecker:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        *,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        lease: Lease | None = None,
        counted: Callable[[str], None] = lambda result: None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.lease = lease or Lease()
        self.counted = counted  # each check's result, `ok` or `failed` (the metrics)

    async def probe(self, target: UpstreamTarget) -> None:
        """One bounded check over a fresh connection; raises on any failure."""
        timeout = self.settings.health_timeout_s
        with anyio.fail_after(timeout):
            async with open_session(
                target,
                self.registry.allowed,
                connect_timeout=timeout,
                read_timeout=timeout,
                max_event_bytes=self.settings.max_result_bytes,
            ) as session:
                if session.discover_result is None:  # a 2026-07-28-only upstream answered discover
                    await session.send_ping()  # (that era has no ping)

    async def check(self, server_id: str) -> str | None:
        """Check one server and record the outcome; returns the new `last_health_status`.

        A credential that does not decrypt is this server's failure (`CredentialDecryptError`), and a
        lasting one: the server goes to `error` at once (no later check can succeed until the
        credential is set again), the other servers of the round are checked as usual.
        """
        error: str | None = None
        lasting = False
        try:
            target = await self.registry.db.run(lambda s: self.registry.target_by_id(s, server_id))
        except CredentialDecryptError as exc:
            target, error, lasting = None, error_class_name(exc), True
        else:
            if target is None:
                return None
            try:
                if await self.registry.oauth.per_user(server_id):
                    # No user's token checks a server for everybody: its Bearer 401 says it is up.
                    await self.registry.oauth.http.challenged(target.endpoint_url, target.transport)
                else:
                    await self.probe(target)
            except Exception as exc:
                error = error_class_name(exc)
        self.counted("ok" if error is None else "failed")
        flipped, server = await self.registry.db.run(lambda s: self._record(s, server_id, error, lasting))
        if flipped and server is not None:
            await self.registry.publish(ServerEventKind.STATUS_CHANGED, server)
        return error or "ok"

    def _record(
        self, session: Session, server_id: str, error: str | None, lasting: bool = False
    ) -> tuple[bool, RemoteServer | None]:
        server = session.get(RemoteServer, server_id)
        if server is None:
            return False, None
        settings = self.settings
        flipped = False
        server.last_health_at = utcnow()
        server.last_health_status = error or "ok"
        if error is not None:
            server.consecutive_failures += 1
            server.consecutive_successes = 0
            threshold = 1 if lasting else settings.health_failure_threshold
            if server.status == "active" and server.consecutive_failures >= threshold:
                server.status = "error"
                flipped = True
        elif server.status == "active":
            server.consecutive_failures = 0
        elif settings.health_auto_recover:
            server.consecutive_successes += 1
            if server.consecutive_successes >= settings.health_recover_successes:
                server.status = "active"
                server.consecutive_failures = 0
                server.consecutive_successes = 0
                flipped = True
        session.add(server)
        session.commit()
        return flipped, server

    @property
    def lease_ttl_s(self) -> float:
        return HEALTH_LEASE_INTERVALS * self.settings.health_interval_s

    async def run_once(self) -> dict[str, str | None]:
        """Check every registered server this replica holds the lease of (bounded concurrency);
        returns id -> status, without the servers another replica checks this interval."""
        ids = await self.registry.db.run(lambda s: list(s.exec(select(RemoteServer.id)).all()))
        results: dict[str, str | None] = {}
        limiter = anyio.CapacityLimiter(CONCURRENCY)

        async def _one(server_id: str) -> None:
            # Taken before waiting for a check slot: the holder renews at the start of each round.
            if not await self.lease.acquire(f"health:{server_id}", self.lease_ttl_s):
                return
            async with limiter:
                try:
                    results[server_id] = await self.check(server_id)
                except Exception as exc:  # one server's trouble (e.g. its row) never ends the round
                    logger.exception("health check failed", extra={"server_id": server_id})
                    results[server_id] = error_class_name(exc)

        async with anyio.create_task_group() as tg:
            for server_id in ids:
                tg.start_soon(_one, server_id)
        return results

    def next_delay(self) -> float:
        jitter = self.settings.health_jitter
        return self.settings.health_interval_s * (1 + self.rng.uniform(-jitter, jitter))

    async def run(self) -> None:
        while True:
            await self.sleep(self.next_delay())
            try:
                await self.run_once()
            except Exception:
                logger.exception("health check round failed")


class Rediscovery:
    """Re-runs discovery for active servers whose last discovery is older than `discovery_interval_s`."""

    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        *,
        clock: Callable[[], datetime] = utcnow,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        lease: Lease | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.clock = clock
        self.sleep = sleep
        self.lease = lease or Lease()
        self._triggered: set[str] = set()
        self._wake = anyio.Event()

    def trigger(self, server_id: str) -> None:
        """Re-discover this server soon (an upstream announced list_changed)."""
        self._triggered.add(server_id)
        self._wake.set()

    async def run_triggered(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            ids, self._triggered = self._triggered, set()
            for server_id in ids:
                try:
                    await self.registry.run_discovery(server_id)
                except Exception:
                    logger.exception("triggered re-discovery failed", extra={"server_id": server_id})

    @property
    def period_s(self) -> float:
        # Due servers are looked for a few times per interval, so a server is never late by a whole one.
        return max(1.0, self.settings.discovery_interval_s / 10)

    def _is_due(self, server: RemoteServer, cutoff: datetime) -> bool:
        return server.last_discovery_at is None or aware(server.last_discovery_at) <= cutoff

    def due(self, session: Session) -> list[str]:
        cutoff = self.clock() - timedelta(seconds=self.settings.discovery_interval_s)
        rows = session.exec(select(RemoteServer).where(col(RemoteServer.status) == "active")).all()
        return [r.id for r in rows if self._is_due(r, cutoff)]

    def still_due(self, session: Session, server_id: str) -> bool:
        cutoff = self.clock() - timedelta(seconds=self.settings.discovery_interval_s)
        server = session.get(RemoteServer, server_id)
        return server is not None and server.status == "active" and self._is_due(server, cutoff)

    async def run_once(self) -> list[str]:
        """Re-discover the due servers this replica holds the lease of; returns the ids it ran."""
        ran: list[str] = []
        # Held for a period plus one discovery: a failed discovery is retried once per period in the
        # cluster (by this replica, which renews), never by every replica.
        ttl = self.period_s + self.settings.discovery_connect_timeout_s + self.settings.discovery_timeout_s
        for server_id in await self.registry.db.run(self.due):
            try:
                if not await self.lease.acquire(f"discovery:{server_id}", ttl):
                    continue
                # The list above may be stale by a whole round: a peer may have re-discovered it since.
                if not await self.registry.db.run(partial(self.still_due, server_id=server_id)):
                    continue
                ran.append(server_id)
                await self.registry.run_discovery(server_id)
            except Exception:  # one server's trouble never ends the round
                logger.exception("re-discovery failed", extra={"server_id": server_id})
        return ran

    async def run(self) -> None:
        period = self.period_s
        while True:
            await self.sleep(period)
            try:
                await self.run_once()
            except Exception:
                logger.exception("re-discovery round failed")
