"""The SDK's server-side transports as ScaiLink mounts them: the Streamable HTTP session manager of
`/mcp` and the per-server endpoint, the legacy SSE transport, and the SDK `Server` subclass both use.

Transport wiring only; the handlers are in mcp_server.py.
"""

from __future__ import annotations

from typing import Any

from mcp.server.lowlevel.server import NotificationOptions, Server
from mcp.server.models import InitializationOptions
from mcp.server.sse import SseServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from starlette.types import ASGIApp, Receive, Scope, Send

from scailink_mcp.config import Settings
from scailink_mcp.mcp_auth import security_settings


class ListChangedServer(Server[Any]):
    """The SDK's session manager builds init options without notification options; announce listChanged.

    The SDK's default OpenTelemetry middleware is dropped: it wraps every message on the hot path and
    ScaiLink exports Prometheus metrics instead.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.middleware = []

    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        return super().create_initialization_options(
            notification_options
            or NotificationOptions(prompts_changed=True, resources_changed=True, tools_changed=True),
            experimental_capabilities,
            extensions,
        )


def session_manager(server: Server[Any], settings: Settings) -> StreamableHTTPSessionManager:
    return StreamableHTTPSessionManager(
        app=server,
        security_settings=security_settings(settings),
        session_idle_timeout=settings.mcp_session_idle_s,
        max_sessions=settings.mcp_max_sessions,
        max_request_body_size=settings.max_body_bytes,
    )


def asgi(manager: StreamableHTTPSessionManager) -> ASGIApp:
    return StreamableHTTPASGIApp(manager)


class LegacySse:
    """The 2024-11-05 HTTP+SSE transport: `GET /sse` opens the stream, `POST /messages/` feeds it."""

    def __init__(self, server: Server[Any], settings: Settings) -> None:
        self.server = server
        self.transport = SseServerTransport("/messages/", security_settings=security_settings(settings))

    async def connect(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with self.transport.connect_sse(scope, receive, send) as (read, write):
                await self.server.run(read, write, self.server.create_initialization_options())
        except ValueError:
            return  # a forged Host/Origin: the transport already answered 403/421

    async def post(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.transport.handle_post_message(scope, receive, send)
