"""The built-in demo MCP server of `scailink dev`: three small tools (`echo`, `add`, `time_now`) on a
loopback port, so a first run has a real upstream to list and call.

Owns: the demo server (the SDK's `MCPServer` over Streamable HTTP), the uvicorn thread that serves it
(started and stopped by `scailink dev`, never by `serve`) and its registration as the dev admin's
personal server `demo` through the registry (the same business call as `POST /remote-servers`).

Must not: run in production or listen on anything but 127.0.0.1.
"""

from __future__ import annotations

import logging
import socket
import threading
from contextlib import ExitStack
from datetime import UTC, datetime
from types import TracebackType

import anyio
import uvicorn
from mcp.server.mcpserver import MCPServer

from scailink_mcp.auth import Principal, TokenVerifier
from scailink_mcp.banner import DemoInfo
from scailink_mcp.config import Settings
from scailink_mcp.crypto import Keyring
from scailink_mcp.db import Database
from scailink_mcp.events import EventBus
from scailink_mcp.remote.registry import Registry
from scailink_mcp.remote.schemas import RegisterServer, ServerDetail, UpdateServer

DEMO_NAME = "demo"
DEMO_TOOLS = ("echo", "add", "time_now")
HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0

logger = logging.getLogger(__name__)


def build_demo_server() -> MCPServer:
    server = MCPServer("scailink-demo", instructions="A demo server started by `scailink dev`.")

    @server.tool(description="Echo the text back.")
    def echo(text: str) -> str:
        return text

    @server.tool(description="Add two integers.")
    def add(a: int, b: int) -> int:
        return a + b

    @server.tool(description="The current time in UTC, ISO-8601.")
    def time_now() -> str:
        return datetime.now(UTC).isoformat(timespec="seconds")

    return server


class _Server(uvicorn.Server):
    """Sets `ready` when start-up is over, whether it succeeded (`started`) or not."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        finally:
            self.ready.set()


class DemoServer:
    """The demo server on a free loopback port, served by uvicorn in a thread (a context manager)."""

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind((HOST, 0))
        self.port: int = self._socket.getsockname()[1]
        app = build_demo_server().streamable_http_app(host=HOST)
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on")
        self._server = _Server(config)
        self._thread = threading.Thread(target=self._run, name="scailink-demo", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/mcp"

    def _run(self) -> None:
        self._server.run(sockets=[self._socket])

    def _quiet(self, record: logging.LogRecord) -> bool:
        """uvicorn's start-up lines of this thread would read like the gateway's own."""
        return record.threadName != self._thread.name or record.levelno >= logging.WARNING

    def start(self) -> None:
        logging.getLogger("uvicorn.error").addFilter(self._quiet)
        self._thread.start()
        if not self._server.ready.wait(START_TIMEOUT_S) or not self._server.started:
            self.stop()
            raise RuntimeError("the demo MCP server did not start")

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=START_TIMEOUT_S)
        self._socket.close()
        logging.getLogger("uvicorn.error").removeFilter(self._quiet)

    def __enter__(self) -> DemoServer:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


async def register_demo(settings: Settings, owner: Principal, url: str) -> ServerDetail:
    """Register (or, on a later start, re-point and re-discover) the owner's personal server `demo`."""
    db = Database(settings.effective_database_url)
    try:
        registry = Registry(settings, db, Keyring.from_settings(settings), EventBus())
        existing = await _find_demo(registry, owner)
        if existing is None:
            body = RegisterServer(
                name=DEMO_NAME, description="Built-in demo of `scailink dev`.", endpoint_url=url
            )
            return await registry.register(owner, body)
        if existing.endpoint_url == url:
            return await registry.refresh(owner, existing.id)
        return await registry.update(owner, existing.id, UpdateServer(endpoint_url=url))
    finally:
        db.dispose()


async def _find_demo(registry: Registry, owner: Principal) -> ServerDetail | None:
    after: tuple[str, str] | None = None
    while True:
        page = await registry.list(owner, limit=registry.settings.page_limit_max, after=after)
        for server in page.items:
            mine = not server.is_tenant_shared and server.owner_user_id == owner.user_id
            if server.name == DEMO_NAME and mine:
                return server
        if page.next_cursor is None:
            return None
        after = page.next_cursor


def start_demo(settings: Settings, token: str, stack: ExitStack) -> DemoInfo | None:
    """For `scailink dev`: the demo server (stopped when `stack` closes), registered for the owner of
    `token`; None (and a warning) if it cannot start: the dev server is useful without it."""
    try:
        server = stack.enter_context(DemoServer())

        async def register() -> DemoInfo:
            owner = await TokenVerifier(settings).verify(token)
            detail = await register_demo(settings, owner, server.url)
            names = tuple(t.namespaced_name for t in detail.capabilities.tools)
            return DemoInfo(server.url, names, detail.status)

        return anyio.run(register)
    except Exception as exc:
        logger.warning("the demo MCP server could not start", extra={"error": type(exc).__name__})
        return None
