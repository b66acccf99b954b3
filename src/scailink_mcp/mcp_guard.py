"""The guard in front of `/mcp`, `/messages/` and the per-server endpoint, inside bearer auth.

What the SDK's transport does not do for a multi-tenant gateway, checked before a message reaches it:
- the per-user request rate of the REST surface (one bucket per (tenant, user), shared with REST and,
  with Redis configured, with every replica: `ratelimit.py`);
- the body cap of SPEC section 2 (`max_body_bytes`, 1 MiB; the SDK's own default is 4 MiB), read
  incrementally so an oversized body is never buffered whole;
- JSON-RPC shape: a message whose `id` is `null`, an object, a list or a boolean is an Invalid Request
  (the SDK would take it for a notification and answer 202), and a body nested deeper than
  `max_json_depth` (or not JSON at all) is a Parse error, never a RecursionError;
- a per-principal cap of open handshake-era sessions (`mcp_max_sessions_per_principal`): opening one
  more closes that principal's oldest session, so one principal can never exhaust the SDK's global
  table (10,000 sessions) for every tenant.

POSTs are counted in `in_flight` until answered, so a shutdown can drain them (`inflight.py`). The
parsed message is left in the ASGI scope (`PARSED_MESSAGE`) for the `/mcp` front (`mcp_front.py`),
so a message is parsed once.

Errors are JSON-RPC error objects (id `null`) with the HTTP status a client expects (400, 413, 429).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import Any

from mcp.server.auth.middleware.bearer_auth import (
    AuthenticatedUser,
    AuthorizationContext,
    authorization_context,
)
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp_types import INVALID_REQUEST, PARSE_ERROR
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scailink_mcp import sdk_sessions
from scailink_mcp.errors import RateLimited
from scailink_mcp.inflight import InFlight
from scailink_mcp.jsondepth import too_deep
from scailink_mcp.ratelimit import RateLimiter

logger = logging.getLogger(__name__)

MCP_SESSION_ID = "mcp-session-id"
PARSED_MESSAGE = "scailink.mcp.message"


def _rpc_error(status: int, code: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=status, headers=headers)


def _valid_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def invalid_message(message: Any) -> str | None:
    """Why `message` is not a JSON-RPC 2.0 message ScaiLink accepts, or None."""
    if not isinstance(message, dict):
        return "a message must be a JSON object"
    if "id" in message and not _valid_id(message["id"]):
        return "id must be a string or an integer"
    return None


@dataclass(eq=False)
class McpGuard:
    """Pure ASGI middleware; `principal_key` gives the rate-limit bucket of the authenticated user."""

    app: ASGIApp
    _: KW_ONLY
    limiter: RateLimiter
    max_body_bytes: int
    max_json_depth: int
    principal_key: Callable[[Scope], str | None]
    manager: StreamableHTTPSessionManager | None = None
    max_sessions_per_principal: int = 0
    in_flight: InFlight | None = None
    # Drops the owner's oldest parked sessions (`session_park.py`) down to the count given; the number
    # dropped. Parked sessions count against the cap, and go first.
    trim_parked: Callable[[AuthorizationContext, int], int] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = self.principal_key(scope)
        if key is not None:
            try:
                await self.limiter.admit(key)
            except RateLimited as exc:
                retry = str(max(1, round(exc.retry_after or 1)))
                await _rpc_error(429, INVALID_REQUEST, exc.message, {"Retry-After": retry})(
                    scope, receive, send
                )
                return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body = await self._read_body(scope, receive, send)
        if body is None:
            return
        problem = self._check(scope, body)
        if problem is not None:
            await _rpc_error(400, *problem)(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.manager is not None and MCP_SESSION_ID not in headers:
            await self._make_room(scope)
        if self.in_flight is None:
            await self.app(scope, replay(body, receive), send)
            return
        self.in_flight.enter()  # until the answer (an SSE stream for a request) is complete
        try:
            await self.app(scope, replay(body, receive), send)
        finally:
            self.in_flight.exit()

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None after answering 413 (never more than the cap is held)."""
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await _rpc_error(413, INVALID_REQUEST, "request body too large")(scope, receive, send)
            return None
        chunks = bytearray()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client went away
            chunks += message.get("body", b"")
            if len(chunks) > self.max_body_bytes:
                await _rpc_error(413, INVALID_REQUEST, "request body too large")(scope, receive, send)
                return None
            if not message.get("more_body", False):
                return bytes(chunks)

    def _check(self, scope: Scope, body: bytes) -> tuple[int, str] | None:
        if too_deep(body, self.max_json_depth):
            return PARSE_ERROR, f"Parse error: JSON nested deeper than {self.max_json_depth} levels"
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            return PARSE_ERROR, "Parse error: the body is not valid JSON"
        scope[PARSED_MESSAGE] = parsed
        messages = parsed if isinstance(parsed, list) else [parsed]
        for message in messages:
            reason = invalid_message(message)
            if reason is not None:
                return INVALID_REQUEST, f"Invalid Request: {reason}"
        return None

    async def _make_room(self, scope: Scope) -> None:
        user = scope.get("user")
        if self.manager is None or self.max_sessions_per_principal <= 0:
            return
        if not isinstance(user, AuthenticatedUser):
            return
        owner = authorization_context(user)
        keep = self.max_sessions_per_principal - 1
        evicted = 0
        if self.trim_parked is not None:
            held = len(sdk_sessions.sessions_of(self.manager, owner))
            evicted = self.trim_parked(owner, max(0, keep - held))
        evicted += await sdk_sessions.evict_oldest(self.manager, owner, keep=keep)
        if evicted:
            logger.info("mcp sessions evicted: per-principal cap", extra={"count": evicted})


def replay(body: bytes, receive: Receive) -> Receive:
    """`receive` with `body` (already read) given first, as one message."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
