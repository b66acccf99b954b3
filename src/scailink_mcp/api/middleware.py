"""Pure ASGI middleware: request ids on every HTTP response, the one mapping of exceptions to the
error envelope (a bug becomes `SCAILINK_INTERNAL` with nothing internal in the message), and the app
class whose `/mcp` requests skip the layers that do nothing for them (`LanedStarlette`).

A bug that escapes a handler before its response started is answered here (500 envelope, one log line
with the traceback) instead of by Starlette's outermost middleware, which re-raises it to the server:
uvicorn then closes the connection, so one bad request would also drop a client's keep-alive
connection and whatever it had queued on it.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from scailink_mcp.errors import NotFound, ScaiLinkError, ValidationFailed, error_response

logger = logging.getLogger("scailink_mcp.access")

_WELL_FORMED_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class MethodNotAllowed(ValidationFailed):
    status = 405
    default_message = "method not allowed"


class RequestIdMiddleware:
    """Echo a well-formed `X-Request-ID`, else mint one; store it in `scope["state"]`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        incoming = ""
        for key, value in scope.get("headers", []):
            if key == b"x-request-id":
                incoming = value.decode("latin-1")
        rid = incoming if _WELL_FORMED_ID.match(incoming) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        started = time.perf_counter()
        status = 0
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", rid.encode()))
                message["headers"] = headers
            await send(message)

        try:
            try:
                await self.app(scope, receive, send_with_id)
            except Exception as exc:
                if scope["type"] != "http" or response_started:
                    raise
                response = await unhandled_error_handler(Request(scope), exc)
                await response(scope, receive, send_with_id)
        finally:
            # One line per request: never headers, query strings or bodies (they may carry secrets).
            logger.info(
                "request",
                extra={
                    "request_id": rid,
                    "method": scope.get("method", "WEBSOCKET"),
                    "path": scope.get("path", ""),
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )


def _rid(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (RFC 9110 `Allow`). Each method of a path is its own
    `Route`, and Starlette's 405 names only the first route whose path matched."""
    methods: set[str] = set()
    for route in getattr(request.scope.get("app"), "routes", ()):
        if isinstance(route, Route) and route.methods and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return ", ".join(sorted(methods))


async def scailink_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ScaiLinkError)
    return error_response(exc, _rid(request))


async def http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return error_response(NotFound("no such endpoint"), _rid(request))
    if exc.status_code == 405:
        response = error_response(MethodNotAllowed(), _rid(request))
        allow = _allowed_methods(request) or (exc.headers or {}).get("Allow")
        if allow:
            response.headers["Allow"] = allow
        return response
    return error_response(ScaiLinkError(), _rid(request))


async def unhandled_error_handler(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error", extra={"request_id": _rid(request)})
    return error_response(
        ScaiLinkError("internal error; quote the request id to the operator"), _rid(request)
    )


Lanes = Mapping[str, ASGIApp]
WebSocketEndpoint = Callable[[WebSocket], Awaitable[None]]


class LanedStarlette(Starlette):
    """Starlette, with the requests of a few exact paths taken straight to their endpoint's own chain.

    Why: a warm `tools/call` is one HTTP request, and before reaching `/mcp`'s chain (bearer auth, the
    guard, the front) it passed Starlette's error middleware, `RequestIdMiddleware`, the exception
    middleware, the router and the route, each wrapping `send` again (~3 % of its CPU); an idle desktop
    WebSocket keeps a suspended frame of each of those layers for its whole life (~5 KiB a session).
    A lane keeps what acts on such a request: `RequestIdMiddleware` (its id and access log line) and,
    for HTTP, the exception middleware (the error envelope of a `ScaiLinkError`, with the app's
    handlers). `lanes` maps an exact HTTP path to its app, `websocket_lanes` an exact WebSocket path
    to its endpoint function, called with the `WebSocket` as its route would (none of the app's
    handlers applies to a WebSocket: an error escapes to uvicorn, which closes the socket, as behind
    the router). Only a scope without `root_path` takes a lane; anything else goes through the full
    stack, where the same paths are routed to the same endpoints.
    """

    def __init__(
        self,
        *args: Any,
        lanes: Lanes | None = None,
        websocket_lanes: Mapping[str, WebSocketEndpoint] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        # The handlers of the app's exception middleware (those of 500/`Exception` are
        # `RequestIdMiddleware`'s own in this app), as Starlette splits them.
        handled = {k: v for k, v in self.exception_handlers.items() if k not in (500, Exception)}
        self._lanes: dict[tuple[str, str], ASGIApp] = {
            ("http", path): RequestIdMiddleware(ExceptionMiddleware(chain, handlers=handled))
            for path, chain in (lanes or {}).items()
        }
        for path, endpoint in (websocket_lanes or {}).items():
            self._lanes["websocket", path] = RequestIdMiddleware(_websocket_app(endpoint))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lane = self._lanes.get((scope["type"], scope.get("path", "")))
        if lane is not None and not scope.get("root_path"):
            scope["app"] = self
            await lane(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _websocket_app(endpoint: WebSocketEndpoint) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await endpoint(WebSocket(scope, receive=receive, send=send))

    return app
