"""Connected downstream MCP sessions and the list_changed notifications they are owed.

The SDK keeps no registry of sessions, so this module does: a session is tracked from its first
request (with the principal and naming style it used) and forgotten when the SDK drops its
connection (weak references). When a tenant's catalog moves, the sessions of that tenant are
re-checked after a debounce (250 ms): each gets `notifications/{tools,prompts,resources}/list_changed`
only for the kinds whose listing actually changed for it.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import anyio
from mcp.server.connection import Connection
from mcp.server.session import ServerSession
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler
from mcp.shared.subscriptions import PromptsListChanged, ResourcesListChanged, ToolsListChanged

from scailink_mcp.auth import Principal
from scailink_mcp.catalog import Catalog, NameStyle, server_fingerprint
from scailink_mcp.sdk_sessions import connection_of

logger = logging.getLogger(__name__)


@dataclass
class Tracked:
    principal: Principal
    style: NameStyle
    server_id: str | None
    fingerprint: tuple[str, str, str]


class ModernListeners:
    """The 2026-07-28 era has no standing stream: clients `subscriptions/listen`. Each principal (and
    naming style) gets its own SDK `ListenHandler` over its own bus, so an event is only ever delivered
    to streams of a principal whose listing changed."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._entries: dict[
            tuple[str, str, NameStyle], tuple[Principal, InMemorySubscriptionBus, ListenHandler]
        ] = {}
        self._fingerprints: dict[tuple[str, str, NameStyle], tuple[str, str, str]] = {}

    def handler(self, principal: Principal, style: NameStyle) -> ListenHandler:
        key = (principal.tenant_id, principal.user_id, style)
        entry = self._entries.get(key)
        if entry is None:
            bus = InMemorySubscriptionBus()
            entry = (principal, bus, ListenHandler(bus))
            self._entries[key] = entry
            self._fingerprints[key] = self.catalog.view(principal, style).fingerprint
        return entry[2]

    async def flush(self, tenants: set[str]) -> int:
        sent = 0
        for key, (principal, bus, _) in list(self._entries.items()):
            if key[0] not in tenants:
                continue
            fresh = self.catalog.view(principal, key[2]).fingerprint
            old, self._fingerprints[key] = self._fingerprints[key], fresh
            events: list[ToolsListChanged | PromptsListChanged | ResourcesListChanged] = []
            if fresh[0] != old[0]:
                events.append(ToolsListChanged())
            if fresh[1] != old[1]:
                events.append(PromptsListChanged())
            if fresh[2] != old[2]:
                events.append(ResourcesListChanged())
            for event in events:
                await bus.publish(event)
                sent += 1
        return sent


class SessionNotifier:
    def __init__(self, catalog: Catalog, *, debounce_s: float) -> None:
        self.catalog = catalog
        self.modern = ModernListeners(catalog)
        self.debounce_s = debounce_s
        self._sessions: weakref.WeakKeyDictionary[Connection, Tracked] = weakref.WeakKeyDictionary()
        self._pending: set[str] = set()
        self._wake = anyio.Event()
        self.sent = 0

    def _fingerprint(self, tracked: Tracked) -> tuple[str, str, str]:
        if tracked.server_id is not None:
            server = self.catalog.directory.get(tracked.server_id)
            visible = server if server is not None and server.visible_to(tracked.principal) else None
            return server_fingerprint(visible)
        return self.catalog.view(tracked.principal, tracked.style).fingerprint

    def track(
        self, session: ServerSession, principal: Principal, style: NameStyle, server_id: str | None = None
    ) -> None:
        # the connection lives as long as the MCP session (sdk_sessions.py)
        self.track_connection(connection_of(session), principal, style, server_id)

    def track_connection(
        self, connection: Connection, principal: Principal, style: NameStyle, server_id: str | None = None
    ) -> None:
        tracked = self._sessions.get(connection)
        if tracked is None or tracked.principal != principal or tracked.style != style:
            tracked = Tracked(principal, style, server_id, ("", "", ""))
            tracked.fingerprint = self._fingerprint(tracked)
            self._sessions[connection] = tracked

    def tenant_changed(self, tenant_id: str) -> None:
        self._pending.add(tenant_id)
        self._wake.set()

    def session_count(self) -> int:
        return len(self._sessions)

    async def flush(self) -> int:
        tenants, self._pending = self._pending, set()
        sent = 0
        for session, tracked in list(self._sessions.items()):
            if tracked.principal.tenant_id not in tenants:
                continue
            fresh = self._fingerprint(tracked)
            old, tracked.fingerprint = tracked.fingerprint, fresh
            try:
                if fresh[0] != old[0]:
                    await session.send_tool_list_changed()
                    sent += 1
                if fresh[1] != old[1]:
                    await session.send_prompt_list_changed()
                    sent += 1
                if fresh[2] != old[2]:
                    await session.send_resource_list_changed()
                    sent += 1
            except Exception as exc:  # a closed connection: forget it
                logger.debug(
                    "dropping session after failed notification", extra={"error": type(exc).__name__}
                )
                self._sessions.pop(session, None)
        sent += await self.modern.flush(tenants)
        self.sent += sent
        return sent

    async def run(self) -> None:
        """Owned by the app lifespan."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            await anyio.sleep(self.debounce_s)
            try:
                await self.flush()
            except Exception:
                logger.exception("list_changed fan-out failed")
