"""The upstream session pool: warm MCP client sessions keyed by (server, credential version, user).

Owns: one owner task per session (entered and exited in that task, inside the pool's task group that
`run()` holds for the app lifespan), single-flight opening, idle TTL and the reaper, LRU bound,
closing on any RPC/transport error and on registry events, and the mapping of a failed call to the
error it raises. The circuit breakers it consults are `breaker.py`'s; what a warm session holds and how
a `tools/call` is sent on it, `pooled_session.py`'s.

Must not: touch the database on a warm call (only the connector, on a cold start, may), exit a
session's context from a request task (closing is a signal to the owner), or share a session between
users (a stateful upstream must not leak one user's state to another).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.abc
from mcp.client.session import ClientSession
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError

from scailink_mcp.errors import ResultTooLarge, ScaiLinkError, UpstreamError, UpstreamTimeout
from scailink_mcp.events import ServerEvent
from scailink_mcp.remote.breaker import (
    DEFAULT_POLICY,
    SDK_CONNECTION_CLOSED,
    BreakerPolicy,
    CircuitBreakers,
    counts_for_breaker,
)
from scailink_mcp.remote.pooled_session import LogSink, PooledSession
from scailink_mcp.remote.upstream import error_class_name
from scailink_mcp.remote.wire import SessionGone

__all__ = ["SDK_CONNECTION_CLOSED", "Opener", "PoolKey", "PoolStats", "UpstreamPool", "counts_for_breaker"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class PoolKey:
    server_id: str
    credential_version: int
    user_id: str
    # An OAuth upstream's token version (`oauth_tokens.Held.version`): a refreshed token gets a new
    # session, never a stale one opened with the token before it.
    token_version: int = 0


# Opens the session of a key (cold path): `remote/connector.py` in the app, anything yielding a
# `ClientSession` in tests. Entered and exited only in the session's owner task.
Opener = Callable[[PoolKey], AbstractAsyncContextManager[ClientSession]]


@dataclass
class PoolStats:
    """What the metrics (`scailink_pool_*`) and tests read."""

    hits: int = 0
    misses: int = 0  # each a new handshake
    evictions: int = 0


@dataclass(eq=False)
class _Entry:
    key: PoolKey
    last_used: float
    session: PooledSession | None = None
    error: BaseException | None = None
    in_flight: int = 0
    # Downstream calls in flight (opaque here: a `relay.Downstream`, which `relay.py` reads back).
    relays: list[object] = field(default_factory=list)
    # Cancel scopes of the calls in flight, cancelled by the owner when the session ends mid-call.
    scopes: set[anyio.CancelScope] = field(default_factory=set)
    ready: anyio.Event = field(default_factory=anyio.Event)
    stop: anyio.Event = field(default_factory=anyio.Event)
    closed: anyio.Event = field(default_factory=anyio.Event)


class UpstreamPool:
    """Warm sessions, one owner task each, behind circuit breakers that one user cannot open for
    others (`breaker.CircuitBreakers`, opening as `breakers` says)."""

    def __init__(
        self,
        connector: Opener,
        *,
        idle_ttl_s: float,
        max_sessions: int,
        breakers: BreakerPolicy = DEFAULT_POLICY,
        clock: Callable[[], float] = time.monotonic,
        reap_interval_s: float = 10.0,
        lean_calls: bool = True,
    ) -> None:
        self.connector = connector
        self.lean_calls = lean_calls
        self.idle_ttl_s = idle_ttl_s
        self.max_sessions = max_sessions
        self.clock = clock
        self.reap_interval_s = reap_interval_s
        self._entries: OrderedDict[PoolKey, _Entry] = OrderedDict()
        self._breakers = CircuitBreakers(breakers, clock=clock)
        self._tg: anyio.abc.TaskGroup | None = None
        self._started = anyio.Event()
        self.stats = PoolStats()

    # ---- lifetime --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Owned by the app lifespan: holds every session's owner task and the reaper."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                self._started.set()
                tg.start_soon(self._reaper)
                await anyio.sleep_forever()
        finally:
            self._tg = None
            for entry in list(self._entries.values()):
                entry.stop.set()
            self._entries.clear()

    async def _reaper(self) -> None:
        while True:
            await anyio.sleep(self.reap_interval_s)
            self.reap_once()

    async def _owner(self, entry: _Entry) -> None:
        """Enters and exits one session's context stack; never lets a failure escape into the pool."""
        try:
            async with self.connector(entry.key) as session:
                entry.session = PooledSession.of(session)
                entry.ready.set()
                await entry.stop.wait()
        except Exception as exc:
            entry.error = exc
            logger.info(
                "upstream session ended",
                extra={"server_id": entry.key.server_id, "error": error_class_name(exc)},
            )
        finally:
            entry.session = None
            entry.ready.set()
            entry.closed.set()
            for scope in list(entry.scopes):
                scope.cancel()
            if self._entries.get(entry.key) is entry:
                del self._entries[entry.key]

    # ---- sessions --------------------------------------------------------------------------------

    def _close(self, entry: _Entry) -> None:
        entry.stop.set()
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]

    async def _acquire(self, key: PoolKey) -> _Entry:
        if self._tg is None and not self._started.is_set():
            await self._started.wait()  # the lifespan is starting `run()`; bounded by the call's timeout
        if self._tg is None:
            raise UpstreamError("the upstream pool is not running")
        entry = self._entries.get(key)
        if entry is not None and not entry.stop.is_set():
            self.stats.hits += 1
            self._entries.move_to_end(key)
        else:
            self.stats.misses += 1
            entry = _Entry(key, last_used=self.clock())
            self._entries[key] = entry
            while len(self._entries) > self.max_sessions:
                _, oldest = next(iter(self._entries.items()))
                self._close(oldest)
                self.stats.evictions += 1
            self._tg.start_soon(self._owner, entry)
        await entry.ready.wait()
        if entry.session is None:
            if isinstance(entry.error, ResultTooLarge):  # the handshake's own answer was too large
                raise ResultTooLarge(entry.error.message, details=entry.error.details)
            detail = error_class_name(entry.error) if entry.error else "closed"
            raise UpstreamError(f"cannot connect to the upstream MCP server ({detail})")
        return entry

    async def close_server(self, server_id: str) -> int:
        doomed = [e for e in self._entries.values() if e.key.server_id == server_id]
        for entry in doomed:
            self._close(entry)
        return len(doomed)

    async def on_event(self, event: ServerEvent) -> None:
        if event.closes_sessions:
            await self.close_server(event.server_id)

    def reap_once(self) -> int:
        now = self.clock()
        idle = [
            e for e in self._entries.values() if e.in_flight == 0 and now - e.last_used >= self.idle_ttl_s
        ]
        for entry in idle:
            self._close(entry)
        self._breakers.prune(now)
        return len(idle)

    def size(self) -> int:
        return len(self._entries)

    def breaker_open(self, server_id: str, user_id: str | None = None) -> bool:
        """Whether calls fail fast: `user_id`'s calls to the server, or (None) some user's or everyone's."""
        return self._breakers.is_open(server_id, user_id)

    # ---- calls -----------------------------------------------------------------------------------

    def current_relay(self, key: PoolKey) -> object | None:
        """The most recent downstream call in flight on this key's session, if any."""
        entry = self._entries.get(key)
        return entry.relays[-1] if entry is not None and entry.relays else None

    async def use(
        self,
        key: PoolKey,
        fn: Callable[[ClientSession], Awaitable[T]],
        *,
        timeout: float,
        relay: object | None = None,
    ) -> T:
        """Run `fn` on the SDK session of the key's warm (or new) session; see `_run`."""
        return await self._run(key, lambda pooled: fn(pooled.client), timeout=timeout, relay=relay)

    async def call_modern(
        self,
        key: PoolKey,
        method: str,
        params: dict[str, Any],
        *,
        timeout: float,
        progress_callback: ProgressFnT | None = None,
        log: LogSink | None = None,
    ) -> dict[str, Any]:
        """`method` in the 2026-07-28 era over the key's session's HTTP client (`PooledSession.modern`);
        `log` receives the upstream's log messages on the call's stream."""
        return await self._run(
            key, lambda pooled: pooled.modern(method, params, progress_callback, log), timeout=timeout
        )

    async def _run(
        self,
        key: PoolKey,
        fn: Callable[[PooledSession], Awaitable[T]],
        *,
        timeout: float,
        relay: object | None = None,
    ) -> T:
        """Run `fn` on the key's warm (or new) session; every failure maps to an `UpstreamError`.

        An answer stopped at the size limit is `ResultTooLarge` and drops the session (its connection
        is in an unknown state). Cancellation from the caller (a downstream `notifications/cancelled`)
        propagates unchanged; the SDK then cancels the upstream request.
        """
        if self._watched(key):
            self._breakers.check(key.server_id, key.user_id)
        entry: _Entry | None = None
        session: PooledSession | None = None
        tripped = 0
        try:
            with anyio.fail_after(timeout):
                for attempt in (1, 2):
                    entry = await self._acquire(key)
                    session = entry.session
                    tripped = session.trips() if session is not None else 0
                    entry.in_flight += 1
                    if relay is not None:
                        entry.relays.append(relay)
                    try:
                        result = await _unless_closed(entry, fn)
                        break
                    except Exception as exc:
                        if attempt == 2 or not session_gone(exc):
                            raise
                        # The upstream forgot the session (it restarted): the request was not run.
                        self._close(entry)
                    finally:
                        entry.in_flight -= 1
                        if relay is not None:
                            entry.relays.remove(relay)
                        entry.last_used = self.clock()
        except Exception as exc:
            raise self._failed(key, entry, session, tripped, exc, timeout) from None
        if self._watched(key):
            self._breakers.success(key.server_id, key.user_id)
        return result

    def _watched(self, key: PoolKey) -> bool:
        """Whether a breaker of this call exists: without one, `check` and `success` do nothing."""
        active = self._breakers.active
        return bool(active) and ((key.server_id, key.user_id) in active or (key.server_id, None) in active)

    def _failed(
        self,
        key: PoolKey,
        entry: _Entry | None,
        session: PooledSession | None,
        tripped: int,
        exc: Exception,
        timeout: float,
    ) -> ScaiLinkError:
        """The error a failed call raises; closes the session and counts the breaker as needed."""
        limit = session.tripped_since(tripped) if session is not None else None
        too_large = exc if isinstance(exc, ResultTooLarge) else limit.error() if limit is not None else None
        if too_large is not None:
            if entry is not None:
                self._close(entry)
            return too_large
        if counts_for_breaker(exc):
            self._breakers.failure(key.server_id, key.user_id)
        if isinstance(exc, TimeoutError):
            return UpstreamTimeout(f"the upstream did not answer within {timeout:g} s")
        if isinstance(exc, ScaiLinkError):
            return exc
        # A transport error: this session is not reused, the next call handshakes again. A JSON-RPC
        # error answer (MCPError) came over a working session: it stays warm.
        if entry is not None and (not isinstance(exc, MCPError) or session_gone(exc)):
            self._close(entry)
        return UpstreamError(f"upstream MCP server failed ({error_class_name(exc)}: {_short(exc)})")

    async def call_tool(
        self,
        key: PoolKey,
        name: str,
        arguments: dict[str, Any] | None,
        *,
        timeout: float,
        progress_callback: ProgressFnT | None = None,
        meta: dict[str, Any] | None = None,
        relay: object | None = None,
        retry: dict[str, Any] | None = None,
        capabilities: Callable[[], dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """`tools/call` passed through unchanged: the upstream's result dict, never re-validated
        (`PooledSession.call_tool`: the lean path over Streamable HTTP, the SDK's over legacy SSE).

        `retry`: a multi-round-trip retry's `inputResponses` and `requestState` (era_reverse.py);
        `capabilities`: what the caller declared (asked only when the upstream speaks only 2026-07-28,
        whose requests carry them)."""
        params: dict[str, Any] = {"name": name}
        if arguments is not None:
            params["arguments"] = arguments
        if retry:
            params.update(retry)
        return await self._run(
            key,
            lambda pooled: pooled.call_tool(
                params, meta, progress_callback, lean=self.lean_calls, capabilities=capabilities
            ),
            timeout=timeout,
            relay=relay,
        )


async def _unless_closed(entry: _Entry, fn: Callable[[PooledSession], Awaitable[T]]) -> T:
    """Run `fn`, but give up at once if the session's owner ends (upstream gone mid-call).

    A cancel scope registered on the entry (rather than a watcher task per call) keeps the warm path
    to one await on the SDK.
    """
    session = entry.session
    if session is None or entry.closed.is_set():
        raise UpstreamError("the upstream session closed")
    with anyio.CancelScope() as scope:
        entry.scopes.add(scope)
        try:
            return await fn(session)
        finally:
            entry.scopes.discard(scope)
    raise UpstreamError("the upstream connection was lost during the call")


def session_gone(exc: BaseException) -> bool:
    """The upstream no longer knows our session (it restarted, or expired it): the lean path's
    `SessionGone`, or the SDK client's error for the same 404 (which carries the server's message)."""
    if isinstance(exc, SessionGone):
        return True
    return isinstance(exc, MCPError) and "session not found" in exc.error.message.lower()


def _short(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text[:200]
