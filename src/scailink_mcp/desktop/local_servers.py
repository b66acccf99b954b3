"""The desktop client's local side: the `mcpServers` config and the stdio MCP servers it starts.

Owns: parsing the config (the shape desktop MCP hosts use); running each server through the SDK's
stdio client; listing its tools, prompts, resources and resource templates (each item as the server
sent it, `raw_listing.py`; following `nextCursor`); the names ScaiLink sees and the way back from
them (a resource URI that no server lists goes to the first server with a template matching it);
re-listing a server's tools after its `tools/list_changed`.

Names: with one local server its tool and prompt names are kept as they are; with several, each is
`{server}__{name}` (`server` is the config key reduced to `[A-Za-z0-9_-]`), so two servers' `search`
cannot clash. Resources keep their URIs (ScaiLink wraps them in its own); a name or URI offered twice
goes to the first server that offered it.

Must not: know about the WebSocket; a local server that fails to start must not stop the others.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import anyio
import mcp_types as types
from mcp.client.session import ClientSession, IncomingMessage, MessageHandlerFnT
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.uri_template import InvalidUriTemplate, UriTemplate
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from scailink_mcp import __version__
from scailink_mcp.desktop.client_errors import ConfigError
from scailink_mcp.desktop.protocol import first_error_field
from scailink_mcp.raw_listing import list_raw

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0  # a local server's initialize and listings
CLIENT_INFO = types.Implementation(name="scailink-desktop", version=__version__)


class ServerSpec(BaseModel):
    """One `mcpServers` entry that starts a local stdio server (other keys hosts add are ignored)."""

    model_config = ConfigDict(extra="ignore")

    command: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] | None = None
    cwd: str | None = None


def parse_config(document: Any) -> dict[str, ServerSpec]:
    """The stdio servers of an `mcpServers` document. Entries without a `command` (remote `url`
    servers) or with `"disabled": true` are skipped; a malformed entry is a ConfigError naming it."""
    if not isinstance(document, dict) or not isinstance(document.get("mcpServers"), dict):
        raise ConfigError('the config must be a JSON object with an "mcpServers" object')
    servers: dict[str, ServerSpec] = {}
    for name, entry in document["mcpServers"].items():
        if not isinstance(entry, dict):
            raise ConfigError(f"mcpServers.{name}: must be an object")
        if entry.get("disabled") is True or "command" not in entry:
            logger.info("skipping a server that is disabled or not stdio", extra={"server": name})
            continue
        try:
            servers[name] = ServerSpec.model_validate(entry)
        except ValidationError as exc:
            raise ConfigError(f"mcpServers.{name}.{first_error_field(exc)}") from None
    if not servers:
        raise ConfigError("the config has no stdio server (an mcpServers entry with a command)")
    return servers


def load_config(path: Path) -> dict[str, ServerSpec]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    return parse_config(document)


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def public_name(server: str, name: str, *, prefixed: bool) -> str:
    """The name ScaiLink sees for a local tool or prompt (see the module docstring)."""
    if not prefixed:
        return name
    return f"{_UNSAFE.sub('-', server).strip('-') or 'server'}__{name}"


def _matches(template: str, uri: str) -> bool:
    try:
        return UriTemplate.parse(template).match(uri) is not None
    except InvalidUriTemplate:
        return False


class UnknownItem(LookupError):
    """No local server offers this tool, prompt or resource."""


@dataclass(frozen=True)
class Route:
    """Where a public name leads: a local server's session and the server's own name (or URI)."""

    server: str
    session: ClientSession
    name: str


@dataclass
class Offers:
    """One kind of item (tools, prompts or resources) under its public names, with its wire dicts."""

    kind: str
    routes: dict[str, Route] = field(default_factory=dict)
    wire: dict[str, dict[str, Any]] = field(default_factory=dict)

    def replace(
        self, server: str, session: ClientSession, items: list[tuple[str, str, dict[str, Any]]]
    ) -> None:
        """`server`'s items become `items` (public name, own name, wire dict); others keep theirs."""
        for public in [p for p, route in self.routes.items() if route.server == server]:
            del self.routes[public], self.wire[public]
        for public, own, wire in items:
            if public in self.routes:
                logger.warning(
                    "offered twice: the first server keeps it", extra={"kind": self.kind, "item": public}
                )
                continue
            self.routes[public] = Route(server, session, own)
            self.wire[public] = wire

    def route(self, public: str) -> Route:
        route = self.routes.get(public)
        if route is None:
            raise UnknownItem(f"this device has no {self.kind} {public!r}")
        return route


def _wire(item: dict[str, Any], key: str, value: str) -> dict[str, Any]:
    return {**item, key: value}


class LocalServers:
    """The local servers of a config, started into an exit stack the caller owns."""

    def __init__(self, specs: Mapping[str, ServerSpec], *, errlog: TextIO | None = None) -> None:
        self.specs = dict(specs)
        self.errlog = errlog or sys.stderr
        self.prefixed = len(self.specs) > 1
        self.tools, self.prompts, self.resources = Offers("tool"), Offers("prompt"), Offers("resource")
        self.templates = Offers("resource template")  # keyed by uriTemplate
        self.sessions: dict[str, ClientSession] = {}  # the servers that started
        self._stale: set[str] = set()  # servers that announced tools/list_changed
        self._stale_event = anyio.Event()

    def capabilities(self) -> dict[str, list[dict[str, Any]]]:
        """`capabilities` of session_init."""
        return {
            "tools": list(self.tools.wire.values()),
            "resources": list(self.resources.wire.values()),
            "prompts": list(self.prompts.wire.values()),
            "resource_templates": list(self.templates.wire.values()),
        }

    async def start(self, stack: AsyncExitStack) -> None:
        """Start every server; those that fail are logged and left out. None started: ConfigError."""
        for name, spec in self.specs.items():
            try:
                await self._start(stack, name, spec)
            except Exception as exc:
                logger.error("a local MCP server did not start", extra={"server": name, "error": repr(exc)})
        if self.specs and not self.sessions:
            raise ConfigError("no local MCP server started (see the errors above)")

    async def _start(self, stack: AsyncExitStack, name: str, spec: ServerSpec) -> None:
        params = StdioServerParameters(command=spec.command, args=spec.args, env=spec.env, cwd=spec.cwd)
        async with AsyncExitStack() as own:  # unwound right here if this server fails to start
            read, write = await own.enter_async_context(stdio_client(params, errlog=self.errlog))
            session = await own.enter_async_context(
                ClientSession(read, write, message_handler=self._on_message(name), client_info=CLIENT_INFO)
            )
            with anyio.fail_after(START_TIMEOUT_S):
                await session.initialize()
                await self._list(name, session)
            self.sessions[name] = session
            stack.push_async_callback(own.pop_all().aclose)
        logger.info("local MCP server started", extra={"server": name})

    async def _list(self, server: str, session: ClientSession, *, tools_only: bool = False) -> None:
        """Each item kept as the server sent it (`raw_listing.py`), only the name made public."""
        caps = session.server_capabilities
        if caps is None or caps.tools is not None:
            tools = await list_raw(session, "tools/list")
            self.tools.replace(server, session, [self._named(server, str(t["name"]), t) for t in tools])
        if tools_only or caps is None:
            return
        if caps.prompts is not None:
            prompts = await list_raw(session, "prompts/list")
            self.prompts.replace(server, session, [self._named(server, str(p["name"]), p) for p in prompts])
        if caps.resources is not None:
            resources = await list_raw(session, "resources/list")
            self.resources.replace(
                server,
                session,
                [(str(r["uri"]), str(r["uri"]), _wire(r, "uri", str(r["uri"]))) for r in resources],
            )
            templates = await list_raw(session, "resources/templates/list")
            self.templates.replace(
                server,
                session,
                [
                    (
                        str(t["uriTemplate"]),
                        str(t["uriTemplate"]),
                        _wire(t, "uriTemplate", str(t["uriTemplate"])),
                    )
                    for t in templates
                ],
            )

    def _named(self, server: str, own: str, item: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
        public = public_name(server, own, prefixed=self.prefixed)
        return public, own, _wire(item, "name", public)

    def _on_message(self, server: str) -> MessageHandlerFnT:
        async def handle(message: IncomingMessage) -> None:
            # Called from the session's receive loop: note the change; re-listing happens elsewhere.
            if isinstance(message, types.ToolListChangedNotification):
                self._stale.add(server)
                self._stale_event.set()
            elif isinstance(message, Exception):
                logger.warning(
                    "local MCP server stream error", extra={"server": server, "error": repr(message)}
                )

        return handle

    async def refresh_tools(self, changed: Callable[[], Awaitable[None]]) -> None:
        """Forever: re-list the tools of servers that announced a change, then await `changed()`."""
        while True:
            await self._stale_event.wait()
            self._stale_event = anyio.Event()
            for server in sorted(self._stale):
                self._stale.discard(server)
                try:
                    with anyio.fail_after(START_TIMEOUT_S):
                        await self._list(server, self.sessions[server], tools_only=True)
                except Exception as exc:
                    logger.warning("re-listing tools failed", extra={"server": server, "error": repr(exc)})
            await changed()

    # ---- calls, by public name --------------------------------------------------------------------

    async def call_tool(
        self, name: str, arguments: dict[str, Any] | None, progress: ProgressFnT | None = None
    ) -> types.CallToolResult:
        route = self.tools.route(name)
        return await route.session.call_tool(route.name, arguments or {}, progress_callback=progress)

    async def read_resource(self, uri: str) -> types.ReadResourceResult:
        """A listed resource, else the first server with a template that matches `uri`."""
        if uri not in self.resources.routes:
            for template, route in self.templates.routes.items():
                if _matches(template, uri):
                    return await route.session.read_resource(uri)
        route = self.resources.route(uri)
        return await route.session.read_resource(route.name)

    async def get_prompt(self, name: str, arguments: dict[str, str] | None) -> types.GetPromptResult:
        route = self.prompts.route(name)
        return await route.session.get_prompt(route.name, arguments)
