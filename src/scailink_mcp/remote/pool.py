"""The upstream session pool: warm MCP client sessions keyed by (server, credential version, user).

Owns: one owner task per session (entered and exited in that task, inside the pool's task group that
`run()` holds for the app lifespan), single-flight opening, idle TTL and the reaper, LRU bound,
closing on any RPC/transport error and on registry events, and the circuit breakers (see
`UpstreamPool`: per (server, user), and per server once several users fail).

Must not: touch the database on a warm call (only the connector, on a cold start, may), exit a
session's context from a request task (closing is a signal to the owner), or share a session between
users (a stateful upstream must not leak one user's state to another).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.abc
import mcp_types as types
from mcp.client.session import ClientSession
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError

from scailink_mcp.errors import ResultTooLarge, ScaiLinkError, UpstreamError, UpstreamTimeout
from scailink_mcp.events import ServerEvent
from scailink_mcp.remote.upstream import error_class_name, trip_count, tripped_since
from scailink_mcp.remote.wire import MessageSink, Wire

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class PoolKey:
    server_id: str
    credential_version: int
    user_id: str


Connector = Callable[[PoolKey], AbstractAsyncContextManager[ClientSession]]


@dataclass
class PoolStats:
    size: int = 0
    hits: int = 0
    misses: int = 0
    opened: int = 0
    closed: int = 0
    evictions: int = 0
    failures: int = 0


@dataclass(eq=False)
class _Entry:
    key: PoolKey
    last_used: float
    session: ClientSession | None = None
    error: BaseException | None = None
    in_flight: int = 0
    relays: list[Any] = field(default_factory=list)  # downstream calls in flight (see relay.py)
    # Cancel scopes of the calls in flight, cancelled by the owner when the session ends mid-call.
    scopes: set[anyio.CancelScope] = field(default_factory=set)
    ready: anyio.Event = field(default_factory=anyio.Event)
    stop: anyio.Event = field(default_factory=anyio.Event)
    closed: anyio.Event = field(default_factory=anyio.Event)


@dataclass
class _Breaker:
    failures: deque[tuple[float, str]] = field(default_factory=deque)  # (time, user id)
    open_until: float = 0.0

    def prune(self, now: float, window_s: float) -> None:
        while self.failures and now - self.failures[0][0] > window_s:
            self.failures.popleft()

    def idle(self, now: float) -> bool:
        return not self.failures and self.open_until <= now


# The SDK transports resolve a request whose stream broke with this code (`SSE stream failed`, `SSE
# stream ended without a response`, reconnection exhausted): a transport failure, not an answer.
SDK_CONNECTION_CLOSED = types.CONNECTION_CLOSED


def counts_for_breaker(exc: BaseException) -> bool:
    """Whether a failed call counts towards a circuit breaker: transport failures and timeouts only.

    Not counted: a JSON-RPC error the upstream answered (`MCPError`: bad arguments, unknown tool,
    the tool's own failure; it is the caller's, and the upstream is evidently up) and an answer over
    the size limit (`ResultTooLarge`: it depends on the call, not on the upstream's health).
    """
    if isinstance(exc, ResultTooLarge):
        return False
    if isinstance(exc, MCPError):
        return exc.error.code == SDK_CONNECTION_CLOSED
    return True


class UpstreamPool:
    """Warm sessions, and circuit breakers scoped so that one user cannot open a circuit for others.

    Breakers: only transport failures and timeouts count (`counts_for_breaker`). Each (server, user)
    has its own: `breaker_failures` of that user's calls failing within `breaker_window_s` make that
    user's calls fail fast for `breaker_open_s`. So a user whose calls time out or break (whatever
    the cause, their own arguments included) only blocks themselves. A real outage shows as failures
    of many users: when the server's failures within the window reach `breaker_failures` and come
    from at least `breaker_min_users` distinct users, the server's circuit opens for everyone at
    once. One user alone can never open it (unless `breaker_min_users` is 1). A success clears the
    caller's own breaker and the server's count.
    """

    def __init__(
        self,
        connector: Connector,
        *,
        idle_ttl_s: float,
        max_sessions: int,
        breaker_failures: int = 5,
        breaker_window_s: float = 60.0,
        breaker_open_s: float = 30.0,
        breaker_min_users: int = 3,
        clock: Callable[[], float] = time.monotonic,
        reap_interval_s: float = 10.0,
        lean_calls: bool = True,
    ) -> None:
        self.connector = connector
        self.lean_calls = lean_calls
        self.idle_ttl_s = idle_ttl_s
        self.max_sessions = max_sessions
        self.breaker_failures = breaker_failures
        self.breaker_window_s = breaker_window_s
        self.breaker_open_s = breaker_open_s
        self.breaker_min_users = max(1, breaker_min_users)
        self.clock = clock
        self.reap_interval_s = reap_interval_s
        self._entries: OrderedDict[PoolKey, _Entry] = OrderedDict()
        # (server id, user id): that user's breaker; (server id, None): the server's, for everyone.
        self._breakers: dict[tuple[str, str | None], _Breaker] = {}
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
                entry.session = session
                self.stats.opened += 1
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
            self.stats.closed += 1
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
        self._prune_breakers(now)
        return len(idle)

    def size(self) -> int:
        return len(self._entries)

    # ---- circuit breakers ------------------------------------------------------------------------

    def _check_breaker(self, key: PoolKey) -> None:
        now = self.clock()
        for name in ((key.server_id, key.user_id), (key.server_id, None)):
            breaker = self._breakers.get(name)
            if breaker is not None and breaker.open_until > now:
                raise UpstreamError(
                    "circuit open: the upstream failed repeatedly", retry_after=breaker.open_until - now
                )

    def _failure(self, key: PoolKey) -> None:
        self.stats.failures += 1
        now = self.clock()
        for name in ((key.server_id, key.user_id), (key.server_id, None)):
            breaker = self._breakers.setdefault(name, _Breaker())
            breaker.failures.append((now, key.user_id))
            breaker.prune(now, self.breaker_window_s)
            users = {user for _, user in breaker.failures}
            needed = 1 if name[1] is not None else self.breaker_min_users
            if len(breaker.failures) >= self.breaker_failures and len(users) >= needed:
                breaker.open_until = now + self.breaker_open_s
                breaker.failures.clear()

    def _success(self, key: PoolKey) -> None:
        now = self.clock()
        for name in ((key.server_id, key.user_id), (key.server_id, None)):
            breaker = self._breakers.get(name)
            if breaker is not None:
                breaker.failures.clear()
                if breaker.idle(now):
                    del self._breakers[name]

    def _prune_breakers(self, now: float) -> None:
        """Forget breakers with nothing left in their window (bounds memory: one per failing user)."""
        for name, breaker in list(self._breakers.items()):
            breaker.prune(now, self.breaker_window_s)
            if breaker.idle(now):
                del self._breakers[name]

    def breaker_open(self, server_id: str, user_id: str | None = None) -> bool:
        """Whether calls fail fast: `user_id`'s calls to the server, or (None) some user's or everyone's."""
        now = self.clock()
        return any(
            breaker.open_until > now
            for (sid, uid), breaker in self._breakers.items()
            if sid == server_id and (user_id is None or uid in (user_id, None))
        )

    # ---- calls -----------------------------------------------------------------------------------

    def current_relay(self, key: PoolKey) -> Any | None:
        """The most recent downstream call in flight on this key's session, if any."""
        entry = self._entries.get(key)
        return entry.relays[-1] if entry is not None and entry.relays else None

    async def use(
        self, key: PoolKey, fn: Callable[[ClientSession], Awaitable[T]], *, timeout: float, relay: Any = None
    ) -> T:
        """Run `fn` on the key's warm (or new) session; every failure maps to an `UpstreamError`.

        An answer stopped at the size limit is `ResultTooLarge` and drops the session (its connection
        is in an unknown state). Cancellation from the caller (a downstream `notifications/cancelled`)
        propagates unchanged; the SDK then cancels the upstream request.
        """
        self._check_breaker(key)
        entry: _Entry | None = None
        session: ClientSession | None = None
        tripped = 0
        try:
            with anyio.fail_after(timeout):
                entry = await self._acquire(key)
                session = entry.session
                tripped = trip_count(session)
                entry.in_flight += 1
                if relay is not None:
                    entry.relays.append(relay)
                try:
                    result = await _unless_closed(entry, fn)
                finally:
                    entry.in_flight -= 1
                    if relay is not None:
                        entry.relays.remove(relay)
                    entry.last_used = self.clock()
        except Exception as exc:
            raise self._failed(key, entry, session, tripped, exc, timeout) from None
        self._success(key)
        return result

    def _failed(
        self,
        key: PoolKey,
        entry: _Entry | None,
        session: ClientSession | None,
        tripped: int,
        exc: Exception,
        timeout: float,
    ) -> ScaiLinkError:
        """The error a failed call raises; closes the session and counts the breaker as needed."""
        limit = tripped_since(session, tripped)
        too_large = exc if isinstance(exc, ResultTooLarge) else limit.error() if limit is not None else None
        if too_large is not None:
            if entry is not None:
                self._close(entry)
            return too_large
        if counts_for_breaker(exc):
            self._failure(key)
        if isinstance(exc, TimeoutError):
            return UpstreamTimeout(f"the upstream did not answer within {timeout:g} s")
        if isinstance(exc, ScaiLinkError):
            return exc
        # Any RPC or transport error: this session is not reused; the next call handshakes again.
        if entry is not None:
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
        relay: Any = None,
    ) -> dict[str, Any]:
        """`tools/call` passed through unchanged: the upstream's result dict, never re-validated.

        Over Streamable HTTP it takes the lean path (`wire.py`). Over legacy SSE it is the SDK's
        `send_request` (never `ClientSession.call_tool`: a proxy must not validate the upstream's output
        against its schema, nor pay the `tools/list` the SDK issues to learn it).
        """
        params: dict[str, Any] = {"name": name}
        if arguments is not None:
            params["arguments"] = arguments

        async def send(session: ClientSession) -> dict[str, Any]:
            wire = getattr(session, "wire", None)
            if self.lean_calls and isinstance(wire, Wire):
                sink = _sink(wire, progress_callback)
                return await wire.call_tool(_with_progress(params, meta, progress_callback), sink)
            request = types.CallToolRequest(
                params=types.CallToolRequestParams.model_validate(
                    {**params, "_meta": meta} if meta else params
                )
            )
            result = await session.send_request(
                request, types.CallToolResult, progress_callback=progress_callback
            )
            return result.model_dump(by_alias=True, mode="json", exclude_none=True)

        return await self.use(key, send, timeout=timeout, relay=relay)


PROGRESS_TOKEN = "scailink-progress"


def _with_progress(
    params: dict[str, Any], meta: dict[str, Any] | None, progress: ProgressFnT | None
) -> dict[str, Any]:
    if progress is not None:
        meta = {**(meta or {}), "progressToken": PROGRESS_TOKEN}
    return {**params, "_meta": meta} if meta else params


def _sink(wire: Wire, progress: ProgressFnT | None) -> MessageSink | None:
    """Where a call's other messages go: its own progress to `progress`, the rest to the SDK session."""
    if progress is None:
        return None  # the wire hands everything to the session

    async def deliver(message: dict[str, Any]) -> None:
        params = message.get("params")
        if (
            message.get("method") == "notifications/progress"
            and isinstance(params, dict)
            and params.get("progressToken") == PROGRESS_TOKEN
            and isinstance(params.get("progress"), int | float)
        ):
            total, text = params.get("total"), params.get("message")
            await progress(
                params["progress"],
                total if isinstance(total, int | float) else None,
                text if isinstance(text, str) else None,
            )
        else:
            await wire.inject(message)

    return deliver


async def _unless_closed(entry: _Entry, fn: Callable[[ClientSession], Awaitable[T]]) -> T:
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


def _short(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text[:200]
