"""Serving one process: the uvicorn config of `scailink serve`/`dev` and `serve`, which runs the app
until SIGTERM with a drain that answers the MCP requests in flight first."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from scailink_mcp.config import Settings

if TYPE_CHECKING:
    import uvicorn


def uvicorn_config(settings: Settings, app: Any, **overrides: Any) -> uvicorn.Config:
    """The uvicorn config of `scailink serve`/`dev`; the tests' live server uses it too, with
    `overrides` (e.g. its own port, a shorter graceful-shutdown timeout)."""
    import uvicorn

    from scailink_mcp.desktop.ws_server import WebSocketProtocol

    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": settings.shutdown_grace_s,
        "ws": WebSocketProtocol,  # answers an upgrade over the header limits (431) instead of hanging
        "ws_max_size": settings.ws_max_frame_bytes,  # a larger frame closes with 1009
        "ws_ping_interval": 20.0,
        "ws_per_message_deflate": settings.ws_per_message_deflate,  # memory per session (config.py)
    }
    return uvicorn.Config(app, **(options | overrides))


def serve(
    settings: Settings,
    prepare: Callable[[Any], None] | None = None,
    *,
    sockets: list[socket.socket] | None = None,
    on_started: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM; `prepare(app)` runs once the app is built, before it serves. A worker of
    `serve --workers N` passes the listening socket its supervisor bound, and `on_started`, called
    once the app is serving."""
    import anyio
    import uvicorn
    from sse_starlette.sse import AppStatus

    from scailink_mcp.app import build_components, create_app
    from scailink_mcp.desktop.protocol import Close

    parts = build_components(settings)

    # sse-starlette would end every SSE stream at SIGTERM, in-flight `tools/call` answers included;
    # `DrainingServer` ends them itself once those answers are out.
    AppStatus.disable_automatic_graceful_drain()  # type: ignore[no-untyped-call]

    class DrainingServer(uvicorn.Server):
        """On SIGTERM: stop accepting, tell desktop clients 1001 (they resume elsewhere), wait for the
        MCP requests in flight to be answered, then end the remaining SSE streams and let uvicorn
        finish the other requests, all within `shutdown_grace_s`, before the lifespan closes the pool."""

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started and on_started is not None:
                on_started()

        async def shutdown(self, sockets: Any = None) -> None:
            for server in self.servers:
                server.close()
            await parts.desktop.close_all(Close.GOING_AWAY, "server shutting down")
            with anyio.move_on_after(settings.shutdown_grace_s):
                await parts.in_flight.wait_idle()
            AppStatus.should_exit = True
            await super().shutdown(sockets)

    app = create_app(settings, parts)
    if prepare is not None:
        prepare(app)
    DrainingServer(uvicorn_config(settings, app)).run(sockets)
