"""The front of `/mcp` and the per-server endpoint (issue 14): answers what it owns itself, and lets
the SDK's Streamable HTTP app answer everything else, unchanged.

Why: profiled, the SDK server's machinery around a warm `tools/call` (its transport, a dispatcher task
per request, per-method validation and the result sieve, the SSE response) cost about what the
upstream's own server does. A request the front owns is parsed once (by the guard, `mcp_guard.py`),
routed through the dispatch table (`methods`: method name -> `Handler`; `tools/call` is
`front_calls.py`'s, list pages plug in the same way), run on the one call path, and answered with the
result's bytes (`front_answer.py`).

Owned (anything else, or in doubt, falls through to the SDK, which answers as it always did):
- one JSON-RPC request (an object with an id and `params` an object) POSTed as JSON by an
  authenticated principal, accepting `application/json` and `text/event-stream`, passing the SDK's
  Host/Origin check;
- handshake era (no `MCP-Protocol-Version` header, or a handshake version): the `Mcp-Session-Id` of
  an established session of this endpoint (`sdk_sessions.SessionTable`: held by the SDK's manager,
  opened by the same credential, handshake done) whose client declared none of sampling, elicitation
  and roots (the upstream's requests of those need the SDK's back-channel; the list methods, which
  never need it, are served whatever the client declared). An unknown session, or
  another principal's, falls through: the SDK answers its 404;
- 2026-07-28 era: a request the SDK's own inbound ladder accepts (`classify_inbound_request`), without
  a log-level opt-in and without capabilities the front cannot serve;
- a handler that takes it (it returns None to decline, before anything is sent).
Never owned: initialize, notifications, batches, responses, GET/DELETE streams, the legacy SSE
transport (its own route). One exception: `notifications/cancelled` naming a request the front is
serving on that session is honored here (the SDK does not know that request): its call is cancelled
and answered `-32800` on its stream, as the SDK answers a cancelled request of this era.

A 2026-07-28 request is cancelled when its client disconnects, as in the SDK's single-exchange entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import anyio
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser, authorization_context
from mcp.server.streamable_http import check_accept_headers
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from mcp.shared.inbound import (
    ERROR_CODE_HTTP_STATUS,
    InboundModernRoute,
    classify_inbound_request,
    find_duplicated_routing_header,
)
from mcp_types import INTERNAL_ERROR, LOG_LEVEL_META_KEY, RequestId
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from scailink_mcp.auth import Principal
from scailink_mcp.front_answer import (
    PING_INTERVAL_S,
    REQUEST_CANCELLED,
    Answer,
    Reply,
    envelope,
    error_envelope,
    modern_result,
)
from scailink_mcp.mcp_auth import scope_principal
from scailink_mcp.mcp_guard import PARSED_MESSAGE
from scailink_mcp.relay import BACK_CHANNEL
from scailink_mcp.sdk_sessions import Established, SessionTable

logger = logging.getLogger(__name__)

MCP_SESSION_ID = "mcp-session-id"
MCP_PROTOCOL_VERSION = "mcp-protocol-version"
# Methods whose answer never needs the client's back-channel (no upstream request travels back while
# they run): the front serves them whatever the client declared, so a client declaring roots (many do)
# still gets the pre-serialized pages, with every field the upstream sent.
NO_BACK_CHANNEL = frozenset({"tools/list", "prompts/list", "resources/list", "resources/templates/list"})
WATCH_AFTER_S = 1.0  # a 2026-07-28 call's disconnect is watched once it has run this long


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request the front may own, as a handler sees it (plain data: a handler never calls back)."""

    scope: Scope
    principal: Principal
    request_id: RequestId
    method: str
    params: dict[str, Any]
    protocol_version: str
    session: Established | None  # the handshake-era session; None in the 2026-07-28 era
    answer: Answer
    modern: bool  # the 2026-07-28 era (no session)
    http_request_id: str | None  # the X-Request-ID (`RequestIdMiddleware`), for the audit
    names: str | None  # `?names=` (the aggregate endpoint's naming style)
    server_id: str  # the per-server endpoint's `{server_id}`, else ""


def _exchange(
    scope: Scope,
    principal: Principal,
    plain: tuple[RequestId, str, dict[str, Any]],
    version: str,
    session: Established | None,
    answer: Answer,
) -> Exchange:
    state, raw_query = scope.get("state", {}).get("request_id"), scope.get("query_string", b"")
    names = parse_qs(raw_query.decode("latin-1")).get("names") if raw_query else None
    server_id = str(scope.get("path_params", {}).get("server_id", ""))
    return Exchange(
        scope, principal, *plain, version, session, answer, session is None,
        str(state) if state else None, names[0] if names else None, server_id,
    )  # fmt: skip


Call = Callable[[], Awaitable[Reply]]
# A handler decides synchronously whether it owns the request (a `Call` that produces the result) or
# declines (None: the SDK answers). It may send `answer.event`s while its call runs.
Handler = Callable[[Exchange], Call | None]


def _client_capable(capabilities: Any) -> bool:
    """Whether declared capabilities (a model or the raw 2026-07-28 envelope) ask for a back-channel."""
    if isinstance(capabilities, Mapping):
        return any(capabilities.get(name) is not None for name in BACK_CHANNEL)
    return any(getattr(capabilities, name, None) is not None for name in BACK_CHANNEL)


def _plain_request(message: Any) -> tuple[RequestId, str, dict[str, Any]] | None:
    """(id, method, params) of a single JSON-RPC request of the plain shape the front serves."""
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0" or len(message) > 4:
        return None
    request_id, method, params = message.get("id"), message.get("method"), message.get("params", {})
    if not isinstance(request_id, str | int) or isinstance(request_id, bool):
        return None
    if not isinstance(method, str) or not isinstance(params, dict):
        return None
    return request_id, method, params


@dataclass(eq=False)
class McpFront:
    """ASGI layer right in front of one endpoint's SDK app (inside the guard and the replicas layer)."""

    app: ASGIApp
    sessions: SessionTable
    security_settings: TransportSecuritySettings | None
    server_info: dict[str, Any]  # the SDK server's `serverInfo` stamp (2026-07-28 results; never mutated)
    methods: dict[str, Handler] = field(default_factory=dict)
    answered: int = 0  # requests the front answered (the `scailink_mcp_front_answers` gauge)
    _running: dict[tuple[str, RequestId], anyio.CancelScope] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._security = TransportSecurityMiddleware(self.security_settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and await self._owned(scope, receive, send):
            return
        await self.app(scope, receive, send)

    async def _owned(self, scope: Scope, receive: Receive, send: Send) -> bool:
        """Serve the request if the front owns it; False (nothing sent) to let the SDK answer."""
        message = scope.get(PARSED_MESSAGE)
        principal = scope_principal(scope)
        if principal is None or not isinstance(message, dict):
            return False
        request = Request(scope)
        if message.get("method") == "notifications/cancelled":
            return await self._cancel(request, message, scope, receive, send)
        plain = _plain_request(message)
        if plain is None or plain[1] not in self.methods:
            return False
        if await self._security.validate_request(request, is_post=True) is not None:
            return False
        if check_accept_headers(request) != (True, True):
            return False
        version = request.headers.get(MCP_PROTOCOL_VERSION)
        method, params = plain[1], plain[2]
        session: Established | None = None
        relays = method not in NO_BACK_CHANNEL  # the client's back-channel may be needed while it runs
        if version is None or version in HANDSHAKE_PROTOCOL_VERSIONS:
            session = self._session(request, relays)
            if session is None:
                return False
            version = session.connection.protocol_version
        else:
            version = self._modern_version(request, message, params, relays)
            if version is None:
                return False
        answer = Answer(send, modern=session is None, session_id=session.session_id if session else None)
        exchange = _exchange(scope, principal, plain, version, session, answer)
        call = self.methods[method](exchange)
        if call is None:
            return False
        self.answered += 1
        if session is None:
            await self._run(exchange, call, receive)
            return True
        async with SessionTable.serving(session):
            await self._run(exchange, call, receive)
        return True

    def _session(self, request: Request, relays: bool) -> Established | None:
        session_id = request.headers.get(MCP_SESSION_ID)
        user = request.scope.get("user")
        if session_id is None or not isinstance(user, AuthenticatedUser):
            return None
        session = self.sessions.established(session_id, authorization_context(user))
        if session is None or (relays and _client_capable(session.connection.client_capabilities)):
            return None
        return session

    def _modern_version(
        self, request: Request, message: dict[str, Any], params: dict[str, Any], relays: bool
    ) -> str | None:
        """The 2026-07-28 request's version if the SDK's inbound ladder accepts it and the front can
        serve it, else None (the SDK then answers, rejections included)."""
        if find_duplicated_routing_header(request.headers.items()) is not None:
            return None
        verdict = classify_inbound_request(message, headers=dict(request.headers))
        if not isinstance(verdict, InboundModernRoute):
            return None
        if relays and _client_capable(verdict.client_capabilities):
            return None
        meta = params.get("_meta")
        if isinstance(meta, dict) and meta.get(LOG_LEVEL_META_KEY) is not None:
            return None  # log delivery opted in: the SDK's per-request log gate applies
        return verdict.protocol_version

    async def _run(self, exchange: Exchange, call: Call, receive: Receive) -> None:
        """Run the call with its keep-alive (and, in the 2026-07-28 era, its disconnect watch)."""
        answer, key = exchange.answer, None
        reply: Reply | None = None
        failed = False
        with anyio.CancelScope() as cancelled:
            if exchange.session is not None:
                key = (exchange.session.session_id, exchange.request_id)
                self._running[key] = cancelled
            watch = Watch(answer, receive, cancelled if exchange.modern else None)
            try:
                reply = await call()
            except Exception:
                logger.exception("the MCP front's handler failed", extra={"method": exchange.method})
                failed = True
            finally:
                if key is not None:
                    self._running.pop(key, None)
                if not watch.stop_if_untasked():  # its task started (a long call): end it, even if cancelled
                    with anyio.CancelScope(shield=True):
                        await watch.stop()
        if cancelled.cancelled_caught:
            if not exchange.modern:  # the 2026-07-28 client is gone; a handshake-era stream is told
                cancelled_answer = error_envelope(exchange.request_id, REQUEST_CANCELLED, "Request cancelled")
                await answer.finish(cancelled_answer)
            return
        if reply is None or failed:
            await answer.finish(error_envelope(exchange.request_id, INTERNAL_ERROR, "Internal error"))
            return
        if reply.error_code is not None:  # a JSON-RPC error the call path raised (as the SDK answers it)
            status = ERROR_CODE_HTTP_STATUS.get(reply.error_code, 200)
            await answer.finish(envelope(exchange.request_id, reply.raw, member=b"error"), status)
            return
        result = modern_result(reply, self.server_info) if exchange.modern else reply.raw
        await answer.finish(envelope(exchange.request_id, result))

    async def _cancel(
        self, request: Request, message: dict[str, Any], scope: Scope, receive: Receive, send: Send
    ) -> bool:
        """`notifications/cancelled` of a request the front serves on that session: cancel it, 202."""
        params = message.get("params")
        session_id = request.headers.get(MCP_SESSION_ID)
        target = params.get("requestId") if isinstance(params, dict) else None
        if session_id is None or target is None or "id" in message:
            return False
        scope_ = self._running.get((session_id, target))
        user = scope.get("user")
        owner = authorization_context(user) if isinstance(user, AuthenticatedUser) else None
        if scope_ is None or self.sessions.established(session_id, owner) is None:
            return False
        scope_.cancel()
        headers = {"content-type": "application/json", MCP_SESSION_ID: session_id}
        await Response(status_code=202, headers=headers)(scope, receive, send)
        return True


class Watch:
    """The keep-alive of a call the front serves: a ping comment every 15 s while it runs and, in the
    2026-07-28 era (`cancel`), a disconnect cancels it, as in the SDK's single-exchange entry.

    Its task starts only once the call has run `WATCH_AFTER_S` (2026-07-28) or a ping interval
    (handshake era): most calls end sooner and cost no task (a timer of the event loop).
    """

    def __init__(self, answer: Answer, receive: Receive, cancel: anyio.CancelScope | None) -> None:
        self._args = answer, receive, cancel
        self._task: asyncio.Task[None] | None = None
        delay = WATCH_AFTER_S if cancel is not None else PING_INTERVAL_S
        self._timer = asyncio.get_running_loop().call_later(delay, self._start, delay)

    def _start(self, waited: float) -> None:
        self._task = asyncio.get_running_loop().create_task(_keepalive(*self._args, PING_INTERVAL_S - waited))

    def stop_if_untasked(self) -> bool:
        """Stop the watch if its task never started (most calls): True when nothing is left to end."""
        if self._task is None:
            self._timer.cancel()
            return True
        return False

    async def stop(self) -> None:
        self._timer.cancel()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _keepalive(
    answer: Answer, receive: Receive, cancel: anyio.CancelScope | None, first: float
) -> None:
    """Pings (the first after `first` s, then every 15 s); with `cancel`, the disconnect watch."""
    wait = first
    while True:
        with anyio.move_on_after(wait):
            if cancel is None:  # handshake era: the SDK keeps serving a request whose client left
                await anyio.sleep_forever()
            while (await receive())["type"] != "http.disconnect":
                pass
            if cancel is not None:
                cancel.cancel()
            return
        await answer.ping()
        wait = PING_INTERVAL_S
