"""The one adapter to private parts of the SDK (mcp 2.3) that ScaiLink needs.

1. The session table of `StreamableHTTPSessionManager`.

Why private attributes: mcp 2.3 caps sessions only globally (`max_sessions`) and offers no public way
to count or close the sessions of one owner. ScaiLink needs both for the per-principal cap
(`mcp_guard.py`). The table is `_server_instances` (session id -> transport, in creation order) and
`_session_owners` (session id -> the owner's `AuthorizationContext`); `_discard_session` forgets a
session and terminates its transport the way the manager itself does.

2. Reviving a handshake-era session on another replica (`mcp_sessions.py`, SPEC section 10). mcp 2.3
creates a session only from an `initialize` on the replica that receives it. `revive` registers a
transport under the session's existing id in the manager's table (with the owner the SDK checks on
every request), and serves it with the SDK's own loop (`serve_connection` over a `JSONRPCDispatcher`,
as `serve_loop` does) on a `Connection` whose handshake state (client params, protocol version,
initialized) is restored through its public attributes; the version is negotiated with the SDK's own
rule. It runs in the manager's task group and is discarded the way the manager discards its own.
`discard` ends a local copy (the session was ended on another replica).

3. The connection behind a handler's `ctx.session`. `ctx.session` is a per-request proxy; the
`Connection` behind it lives as long as the downstream MCP session, so it is what the list_changed
registry (notifier.py) and resource subscriptions key on. The SDK exposes no public accessor.

4. Names of the SDK's private client modules (re-exported below for `remote/upstream.py` and
`remote/netguard.py`): the client transports' default timeouts and the type of an http-client
factory (`mcp.shared._httpx_utils`), and the read-stream protocol a client transport yields
(`mcp.shared._stream_protocols`). mcp 2.3 takes a factory and hands out such streams in its public
API but exports neither the type nor the defaults, and ScaiLink's guarded clients must use the same
defaults as the SDK's own.

5. The table the `/mcp` front (`mcp_front.py`) answers established sessions from: `SessionTable`.
A session is the SDK's when its id is in `_server_instances` (its transport not terminated, its idle
scope not fired) and `_session_owners` names the same credential; what the handshake established
(negotiated version, client capabilities) lives on the session's `Connection`, which the SDK keeps
inside its serve loop only, so the table records each connection when ScaiLink first sees it
(`notifications/initialized`, or a revival by `mcp_sessions.py`) and forgets it with the
connection's own exit stack (`record`, the SDK server middleware ScaiLink installs, records each
session when its `initialize` is answered). A call the front serves counts as a request in flight on the
transport (`SessionTable.serving`), exactly as `StreamableHTTPServerTransport.handle_request` counts
its own, so the SDK's idle expiry sees front-served calls.

6. Parking idle sessions (`session_park.py`, issue 14). An idle handshake-era session costs ~49 KiB in
the SDK's machinery (its transport, task group, tasks, memory streams, dispatcher, runner, models).
The SDK keeps no public idle clock: a session is idle when its transport has no request in flight (an
open GET stream is one) and no stream, and its last request ended `_idle_timeout` before its idle
scope's deadline (the transport sets that deadline when its last request ends). `SessionTable.park`
discards such a session the way the manager does (its id is forgotten before any await) and says when
the SDK would have expired it; the session's record then lives in the store and a later request
revives it (2., `mcp_sessions.SharedSessions`), as for a session created on another replica.

Keep every such access here.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskStatus
from mcp.server.auth.middleware.bearer_auth import AuthorizationContext
from mcp.server.connection import Connection
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.runner import ServerRunner, serve_connection
from mcp.server.session import ServerSession
from mcp.server.streamable_http import StreamableHTTPServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared._httpx_utils import MCP_DEFAULT_SSE_READ_TIMEOUT as MCP_DEFAULT_SSE_READ_TIMEOUT
from mcp.shared._httpx_utils import MCP_DEFAULT_TIMEOUT as MCP_DEFAULT_TIMEOUT
from mcp.shared._httpx_utils import McpHttpClientFactory as McpHttpClientFactory
from mcp.shared._stream_protocols import ReadStream as ReadStream
from mcp.shared.jsonrpc_dispatcher import JSONRPCDispatcher

logger = logging.getLogger(__name__)

SETTLE_S = 5.0
Keep = Callable[[float], bool]  # records a session being parked, given the seconds until it expires


def sessions_of(manager: StreamableHTTPSessionManager, owner: AuthorizationContext) -> list[str]:
    """Session ids of `owner`, oldest first."""
    owners = manager._session_owners
    return [sid for sid in manager._server_instances if owners.get(sid) == owner]


async def evict_oldest(
    manager: StreamableHTTPSessionManager, owner: AuthorizationContext, *, keep: int
) -> int:
    """Close `owner`'s oldest sessions until at most `keep` remain; the number closed."""
    ids = sessions_of(manager, owner)
    closed = 0
    for sid in ids[: max(0, len(ids) - keep)]:
        transport = manager._server_instances.get(sid)
        if transport is not None:
            await manager._discard_session(sid, transport)
            closed += 1
    return closed


def connection_of(session: ServerSession) -> Connection:
    """The long-lived connection behind a handler's per-request `ctx.session`."""
    connection: Connection = session._connection
    return connection


def has_session(manager: StreamableHTTPSessionManager, session_id: str) -> bool:
    return session_id in manager._server_instances


def session_count(manager: StreamableHTTPSessionManager) -> int:
    """The sessions the manager holds (what its `max_sessions` counts)."""
    return len(manager._server_instances)


async def discard(manager: StreamableHTTPSessionManager, session_id: str) -> bool:
    """End this replica's copy of a session; False if it had none."""
    transport = manager._server_instances.get(session_id)
    if transport is None:
        return False
    await manager._discard_session(session_id, transport)
    return True


async def revive(
    manager: StreamableHTTPSessionManager,
    session_id: str,
    owner: AuthorizationContext,
    initialize_params: dict[str, Any],
    on_connection: Callable[[Connection], None],
) -> bool:
    """Serve an established session (created on another replica, or parked) here, under its own id;
    False if the manager is not running."""
    if session_id in manager._server_instances or manager._task_group is None:
        return session_id in manager._server_instances
    client_params, version = ServerRunner._negotiate_initialize(initialize_params)
    transport = StreamableHTTPServerTransport(
        mcp_session_id=session_id,
        is_json_response_enabled=manager.json_response,
        event_store=manager.event_store,
        security_settings=manager.security_settings,
        retry_interval=manager.retry_interval,
        idle_timeout=manager.session_idle_timeout,
    )
    manager._session_owners[session_id] = owner
    manager._server_instances[session_id] = transport

    async def run(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        try:
            async with transport.connect() as (read_stream, write_stream):
                dispatcher: JSONRPCDispatcher[Any] = JSONRPCDispatcher(
                    read_stream, write_stream, inline_methods=frozenset({"initialize"})
                )
                connection = Connection.for_loop(
                    dispatcher, session_id=session_id, protocol_version_hint=version
                )
                connection.client_params, connection.protocol_version = client_params, version
                connection.initialized.set()
                on_connection(connection)
                task_status.started()
                idle = transport.idle_scope or anyio.CancelScope()
                with idle:
                    await serve_connection(
                        manager.app, dispatcher, connection=connection, lifespan_state=manager._lifespan_state
                    )
        except Exception:
            logger.exception("revived MCP session crashed", extra={"session_id": session_id[:64]})
        finally:
            if manager._server_instances.get(session_id, transport) is transport:
                await manager._discard_session(session_id, transport)
            else:  # revived again since (another copy serves the id now): end only this one
                await transport.terminate()

    await manager._task_group.start(run)
    return True


def _idle_deadline(transport: StreamableHTTPServerTransport, idle_s: float, now: float) -> float | None:
    """The SDK's expiry deadline of a session idle for at least `idle_s` with nothing open, else None."""
    idle, timeout = transport.idle_scope, transport._idle_timeout
    if idle is None or timeout is None or idle.cancel_called or transport.is_terminated:
        return None
    if transport._requests_in_flight or transport._request_streams or not math.isfinite(idle.deadline):
        return None
    return idle.deadline if now >= idle.deadline - timeout + idle_s else None


@dataclass(frozen=True, slots=True)
class Established:
    """A handshake-era session the front may answer for: its transport and its connection."""

    session_id: str
    transport: StreamableHTTPServerTransport
    connection: Connection


class SessionTable:
    """The established sessions of one session manager (one table per endpoint, one owner: the SDK's
    manager decides existence and ownership, this table only adds what the handshake established).

    Used by the `/mcp` front (`established`, `serving`), by the replicas layer (`holds`, and the
    revived sessions it records with `known`) and by parking (`idle`, `park`, `on_ended`).
    """

    def __init__(self) -> None:
        self.manager: StreamableHTTPSessionManager | None = None
        self._connections: dict[str, Connection] = {}
        self._parking: set[Connection] = set()  # parked, their connection not closed yet
        self._settling: dict[str, anyio.Event] = {}  # parked, the SDK's task of the old copy not done
        self.on_ended: Callable[[str], None] | None = None  # a session ended (not parked)

    def bind(self, manager: StreamableHTTPSessionManager) -> None:
        self.manager = manager

    def known(self, connection: Connection) -> None:
        """Record a session's connection (idempotent); forgotten when the connection closes."""
        session_id = connection.session_id
        if session_id is None or self._connections.get(session_id) is connection:
            return
        self._connections[session_id] = connection
        connection.exit_stack.callback(self._forget, session_id, connection)

    async def record(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        """SDK server middleware: a session's connection is recorded when its `initialize` is answered
        (before the client reads the answer, so its next request can be served by the front)."""
        result = await call_next(ctx)
        if ctx.method == "initialize":
            self.known(connection_of(ctx.session))
        return result

    def _forget(self, session_id: str, connection: Connection) -> None:
        if self._connections.get(session_id) is connection:
            del self._connections[session_id]
        if connection in self._parking:
            self._parking.discard(connection)
            event = self._settling.get(session_id)
            task = asyncio.current_task()  # the old copy's serve task (its exit stack closes in it)
            if event is not None and task is not None:
                task.add_done_callback(lambda _: self._settle(session_id, event))
            elif event is not None:
                self._settle(session_id, event)
        elif self.on_ended is not None:
            self.on_ended(session_id)

    def idle(self, idle_s: float) -> list[tuple[str, Connection]]:
        """The sessions idle for `idle_s` with nothing open (candidates for `park`)."""
        manager = self.manager
        if manager is None or manager._task_group is None:
            return []
        now, found = anyio.current_time(), []
        for session_id, connection in self._connections.items():
            transport = manager._server_instances.get(session_id)
            if transport is not None and _idle_deadline(transport, idle_s, now) is not None:
                found.append((session_id, connection))
        return found

    async def park(self, session_id: str, connection: Connection, idle_s: float, keep: Keep) -> bool:
        """Tear the session's SDK machinery down if it is still idle for `idle_s` with nothing open.

        `keep(expires_in)` records the session (it returns False to leave it running), synchronously
        before the SDK forgets the id: no request can find the session neither held nor recorded."""
        manager = self.manager
        transport = None if manager is None else manager._server_instances.get(session_id)
        if manager is None or transport is None or self._connections.get(session_id) is not connection:
            return False
        now = anyio.current_time()
        deadline = _idle_deadline(transport, idle_s, now)
        if deadline is None or not connection.initialize_accepted or not keep(deadline - now):
            return False
        self._parking.add(connection)
        self._settling.setdefault(session_id, anyio.Event())
        await manager._discard_session(session_id, transport)
        return True

    def _settle(self, session_id: str, event: anyio.Event) -> None:
        event.set()
        if self._settling.get(session_id) is event:
            del self._settling[session_id]

    async def settled(self, session_id: str) -> None:
        """Wait until a parked session's old copy is gone: its task's last act is the manager's
        `_discard_session`, which forgets whatever transport is under the id, so a copy revived
        before it would be forgotten with it. Bounded: a task that never ends delays no request long."""
        event = self._settling.get(session_id)
        if event is not None:
            with anyio.move_on_after(SETTLE_S):
                await event.wait()

    def holds(self, session_id: str) -> bool:
        return self.manager is not None and session_id in self.manager._server_instances

    def established(self, session_id: str, requestor: AuthorizationContext | None) -> Established | None:
        """The session if the SDK would serve `requestor` on it right now and its handshake is done;
        None for anything else (unknown, another credential's, ending, not initialized): the caller
        then lets the SDK answer, with the SDK's own 404."""
        manager = self.manager
        connection = self._connections.get(session_id)
        if manager is None or connection is None or not connection.initialize_accepted:
            return None
        transport = manager._server_instances.get(session_id)
        if transport is None or transport.is_terminated:
            return None
        if manager._session_owners.get(session_id) != requestor:
            return None
        idle = transport.idle_scope
        if idle is not None and idle.cancel_called:
            return None
        return Established(session_id, transport, connection)

    def __len__(self) -> int:
        return len(self._connections)

    @staticmethod
    @asynccontextmanager
    async def serving(session: Established) -> AsyncIterator[None]:
        """A request in flight on the session, for the SDK's idle expiry (as `handle_request` counts)."""
        transport = session.transport
        idle, timeout = transport.idle_scope, transport._idle_timeout
        if idle is None or timeout is None:
            yield
            return
        transport._requests_in_flight += 1
        idle.deadline = math.inf
        try:
            yield
        finally:
            transport._requests_in_flight -= 1
            if not transport._requests_in_flight:
                idle.deadline = anyio.current_time() + timeout
