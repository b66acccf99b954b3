"""Handshake-era MCP sessions served by every replica (SPEC section 10), with Redis; and revived from
a record after parking (`session_park.py`: the same path, with an in-process store when there is no
Redis).

The choice: shared session state, not owner forwarding. When an `initialize` succeeds, the replica
that served it stores what the handshake established (the principal, and the client's `initialize`
params: protocol version, capabilities, client info) in Redis under the session id. A request for a
session id this replica does not hold loads that state and, when the request's principal is the
session's, revives the session here under the same id (`sdk_sessions.revive`): the SDK then serves it
as its own, owner check included. Why not forwarding to an owner: the SDK's per-session state beyond
the handshake (a GET stream, requests in flight) is per connection anyway, and with owner forwarding
every request of a session would cross replicas through Redis and a dead owner would take its
sessions with it; here a replica's death loses only what was in flight on it, and a `--workers N`
process needs no internal address per worker. Why not sealing the state into the id (agentgateway's
approach): a sealed id cannot be ended or expire when idle across replicas without shared state anyway.

- Another principal (or another credential than the one that opened it: the SDK's rule) presenting the
  id gets the SDK's 404 (nothing is revived for it).
- `DELETE` on any replica ends the session everywhere: its key is deleted and every replica drops its
  copy (a message on `<prefix>:mcp`).
- Idle expiry: the key lives `mcp_session_idle_s` after the last request on any replica (each replica
  refreshes it at most every `TOUCH_S` per session); each copy also ends after that long idle.
- A revived session is registered with the notifier at once, so `list_changed` reaches a GET stream
  opened on any replica.
- The per-principal session cap (`mcp_guard.py`) counts the sessions opened on each replica.
- Redis unreachable: a session this replica does not hold answers 404 (the client re-initializes).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import anyio
from mcp.server.auth.middleware.bearer_auth import (
    AuthenticatedUser,
    AuthorizationContext,
    authorization_context,
)
from mcp.server.connection import Connection
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp_types import INTERNAL_ERROR
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scailink_mcp import sdk_sessions
from scailink_mcp.auth import Principal
from scailink_mcp.mcp_auth import scope_principal
from scailink_mcp.mcp_guard import PARSED_MESSAGE
from scailink_mcp.redis_link import PeerLink, Subscription, connect

if TYPE_CHECKING:
    from redis.asyncio import Redis

logger = logging.getLogger(__name__)

MCP_SESSION_ID = "mcp-session-id"
TOO_MANY = JSONResponse(  # the SDK manager's answer at its session cap, byte for byte
    {"jsonrpc": "2.0", "id": None, "error": {"code": INTERNAL_ERROR, "message": "Too many open sessions"}},
    status_code=503,
)
TOUCH_S = 30.0
PRUNE_AT = 1024  # `_touched` entries kept before stale ones are dropped
Revived = Callable[[Connection, Principal, Scope], None]


class TouchTimes:
    """When each held session's Redis key was last refreshed (at most once per `every_s`).

    An entry older than `every_s` means the same as none, so those are dropped whenever the table
    has doubled since the last sweep: a session that expires, or ends on another replica (no DELETE
    here), leaves nothing behind for long.
    """

    def __init__(self, every_s: float = TOUCH_S, sweep_at: int = PRUNE_AT) -> None:
        self.every_s = every_s
        self._floor = self._sweep_at = sweep_at
        self._at: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._at)

    def due(self, session_id: str, now: float) -> bool:
        """Whether the key should be refreshed now (then it counts as refreshed)."""
        last = self._at.get(session_id)
        if last is not None and now - last < self.every_s:
            return False
        self.mark(session_id, now)
        return True

    def mark(self, session_id: str, now: float) -> None:
        self._at[session_id] = now
        if len(self._at) > self._sweep_at:
            self._at = {k: t for k, t in self._at.items() if now - t < self.every_s}
            self._sweep_at = max(self._floor, 2 * len(self._at))

    def forget(self, session_id: str) -> None:
        self._at.pop(session_id, None)


class Store(Protocol):
    """Where `SharedSessions` records what a session's handshake established, and revives it from:
    Redis (`SessionStore`, shared by the replicas) or this process (`session_park.LocalSessions`)."""

    shared: bool  # several replicas read it (its records are refreshed while the session is used)

    def register(self, endpoint: str, manager: StreamableHTTPSessionManager) -> None: ...
    async def save(self, endpoint: str, session_id: str, state: dict[str, Any]) -> None: ...
    async def load(self, endpoint: str, session_id: str) -> dict[str, Any] | None: ...
    async def touch(self, endpoint: str, session_id: str) -> None: ...
    async def end(self, endpoint: str, session_id: str) -> None: ...
    def park(self, endpoint: str, session_id: str, expires_in: float) -> bool: ...
    def revived(self, endpoint: str, session_id: str) -> None: ...
    def ended(self, endpoint: str, session_id: str) -> None: ...
    def trim(self, endpoint: str, owner: AuthorizationContext, keep: int) -> int: ...
    def parked_count(self, endpoint: str) -> int: ...


class SessionStore:
    """The session keys (`<prefix>:mcp:<endpoint>:<session id>`) and the `ended` messages.

    A session parked here is revived from its key like one created on another replica (`park` has
    nothing to record); its key expires as it always did."""

    shared = True

    def __init__(self, link: PeerLink, *, ttl_s: float) -> None:
        self.link = link
        self.ttl_ms = int(ttl_s * 1000)
        self._client: Redis | None = None
        self._managers: dict[str, StreamableHTTPSessionManager] = {}
        self._subscription = Subscription(
            "MCP session", on_message=self._ended, backoff_s=lambda: (link.backoff_min_s, link.backoff_max_s)
        )

    def _key(self, endpoint: str, session_id: str) -> str:
        return f"{self.link.prefix}:mcp:{endpoint}:{session_id}"

    @property
    def _channel(self) -> str:
        return f"{self.link.prefix}:mcp"

    def health(self) -> str:
        return self._subscription.health()

    def register(self, endpoint: str, manager: StreamableHTTPSessionManager) -> None:
        self._managers[endpoint] = manager

    def holds(self, endpoint: str, session_id: str) -> bool:
        """This replica serves that session right now (created or revived here)."""
        manager = self._managers.get(endpoint)
        return manager is not None and sdk_sessions.has_session(manager, session_id)

    def _redis(self) -> Redis:
        if self._client is None:
            self._client = connect(
                self.link.url, name=f"{self.link.prefix}:mcp:cmd", retries=1, timeout_s=self.link.timeout_s
            )
        return self._client

    async def save(self, endpoint: str, session_id: str, state: dict[str, Any]) -> None:
        value = self.link.signer.sign(json.dumps(state))
        await self._redis().set(self._key(endpoint, session_id), value, px=self.ttl_ms)

    async def load(self, endpoint: str, session_id: str) -> dict[str, Any] | None:
        raw = await self._redis().get(self._key(endpoint, session_id))
        try:
            state = json.loads(self.link.signer.verify(raw)) if raw else None
        except ValueError:
            logger.warning("ignored an MCP session state not signed by this gateway")
            return None
        return state if isinstance(state, dict) else None

    async def touch(self, endpoint: str, session_id: str) -> None:
        await self._redis().pexpire(self._key(endpoint, session_id), self.ttl_ms)

    def park(self, endpoint: str, session_id: str, expires_in: float) -> bool:
        """The key is the record; while Redis is not answering, a session is not parked (its revival
        would need Redis)."""
        return self._subscription.ready

    def revived(self, endpoint: str, session_id: str) -> None:
        return None

    def ended(self, endpoint: str, session_id: str) -> None:
        return None

    def trim(self, endpoint: str, owner: AuthorizationContext, keep: int) -> int:
        return 0  # the per-principal cap counts the sessions held by each replica (module docstring)

    def parked_count(self, endpoint: str) -> int:
        return 0  # so does `mcp_max_sessions`

    async def end(self, endpoint: str, session_id: str) -> None:
        client = self._redis()
        await client.delete(self._key(endpoint, session_id))
        message = json.dumps({"v": 1, "endpoint": endpoint, "session_id": session_id})
        await client.publish(self._channel, self.link.signer.sign(message))

    async def run(self) -> None:
        """The `ended` subscription (owned by the app lifespan)."""
        self._subscription.state = "connecting"
        receiver = connect(
            self.link.url, name=f"{self.link.prefix}:mcp:sub", retries=0, timeout_s=self.link.timeout_s
        )
        try:
            await self._subscription.run(receiver, self._channel)
        finally:
            with anyio.move_on_after(2, shield=True):
                await receiver.aclose()
                if self._client is not None:
                    await self._client.aclose()

    async def _ended(self, data: bytes | str) -> None:
        try:
            message = json.loads(self.link.signer.verify(data))
            manager = self._managers.get(str(message["endpoint"]))
            if manager is not None:
                await sdk_sessions.discard(manager, str(message["session_id"]))
        except (ValueError, TypeError, KeyError) as exc:
            logger.warning("ignored a malformed MCP session message", extra={"error": str(exc)[:200]})


class SharedSessions:
    """ASGI layer in front of one session manager (inside the guard): records, revives, ends."""

    def __init__(
        self,
        app: ASGIApp,
        store: Store,
        endpoint: str,
        settled: Callable[[str], Awaitable[None]],
        *,
        manager: StreamableHTTPSessionManager,
        on_revived: Revived,
    ) -> None:
        self.app = app
        self.manager = manager
        self.store = store
        self.endpoint = endpoint
        self.settled = settled  # a parked session's old copy is gone (`SessionTable.settled`)
        self.on_revived = on_revived
        self._touched = TouchTimes()
        self._reviving: dict[str, anyio.Event] = {}
        store.register(endpoint, manager)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = scope_principal(scope)
        if scope["type"] != "http" or principal is None:
            await self.app(scope, receive, send)
            return
        session_id = Headers(scope=scope).get(MCP_SESSION_ID)
        if session_id is None:
            if scope["method"] == "POST":
                await self._opening(scope, receive, send, principal)
            else:
                await self.app(scope, receive, send)
            return
        await self._established(scope, session_id, principal)
        if scope["method"] != "DELETE":
            await self.app(scope, receive, send)
            return
        status = await _status_of(self.app, scope, receive, send)
        if status is not None and status < 300:
            self._touched.forget(session_id)
            await self._quietly(self.store.end(self.endpoint, session_id), "end")

    async def _opening(self, scope: Scope, receive: Receive, send: Send, principal: Principal) -> None:
        """A request without a session id: when it is a successful `initialize`, record the session.
        The body is the guard's parse (`PARSED_MESSAGE`): a 2026-07-28 request passes untouched."""
        message = scope.get(PARSED_MESSAGE)
        if not isinstance(message, dict) or message.get("method") != "initialize":
            await self.app(scope, receive, send)
            return
        cap, parked = self.manager.max_sessions, self.store.parked_count(self.endpoint)
        if parked and cap is not None and sdk_sessions.session_count(self.manager) + parked >= cap:
            await TOO_MANY(scope, receive, send)  # held and parked together: the SDK's own refusal
            return
        created: list[str] = []

        async def watch(event: Message) -> None:
            if event["type"] == "http.response.start" and event["status"] < 400:
                created.extend(
                    v.decode() for k, v in event.get("headers", []) if k.decode().lower() == MCP_SESSION_ID
                )
            await send(event)

        await self.app(scope, receive, watch)
        user = scope.get("user")
        if created:
            state = {"principal": list(principal.identity), "params": message.get("params") or {}}
            if isinstance(user, AuthenticatedUser):  # the credential the SDK checks on every request
                state["owner"] = dict(authorization_context(user))
            await self._quietly(self.store.save(self.endpoint, created[0], state), "save")

    async def _established(self, scope: Scope, session_id: str, principal: Principal) -> None:
        reviving = self._reviving.get(session_id)
        if reviving is not None:  # another request of this session is reviving it (a GET and a POST)
            await reviving.wait()
            return
        if sdk_sessions.has_session(self.manager, session_id):
            if not self.store.shared:
                return
            now = time.monotonic()
            if self._touched.due(session_id, now):
                await self._quietly(self.store.touch(self.endpoint, session_id), "touch")
            if sdk_sessions.has_session(self.manager, session_id):
                return  # (else it was parked or ended while Redis answered: as if not held)
        self._reviving[session_id] = anyio.Event()
        try:
            await self._revive(scope, session_id, principal)
        finally:
            self._reviving.pop(session_id).set()

    async def _revive(self, scope: Scope, session_id: str, principal: Principal) -> None:
        try:
            state = await self.store.load(self.endpoint, session_id)
        except Exception as exc:  # Redis unreachable: the SDK answers 404, the client re-initializes
            logger.warning("MCP session state unavailable", extra={"error": type(exc).__name__})
            return
        user = scope.get("user")
        if state is None or state.get("principal") != list(principal.identity):
            return  # unknown, or another principal's: the SDK answers 404
        owner = authorization_context(user) if isinstance(user, AuthenticatedUser) else None
        if owner is None or state.get("owner", owner) != owner:
            return  # another credential's (a state saved before owners were recorded names none)
        params = state.get("params")
        await self.settled(session_id)
        revived = await sdk_sessions.revive(
            self.manager,
            session_id,
            owner,
            params if isinstance(params, dict) else {},
            lambda connection: self.on_revived(connection, principal, scope),
        )
        if not revived:
            return
        self.store.revived(self.endpoint, session_id)
        if self.store.shared:
            self._touched.mark(session_id, time.monotonic())
        level = logging.INFO if self.store.shared else logging.DEBUG  # a parked one revives often
        logger.log(level, "MCP session revived", extra={"session_id": session_id[:64]})

    async def _quietly(self, work: Any, what: str) -> None:
        try:
            await work
        except Exception as exc:
            logger.warning(f"MCP session state not {what}d in Redis", extra={"error": type(exc).__name__})


async def _status_of(app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> int | None:
    status: int | None = None

    async def watch(event: Message) -> None:
        nonlocal status
        if event["type"] == "http.response.start":
            status = int(event["status"])
        await send(event)

    await app(scope, receive, watch)
    return status
