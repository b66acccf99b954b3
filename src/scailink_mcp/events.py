"""The catalog-change publish/subscribe interface: the one way catalog-changing signals travel.

Everything that changes what a principal can see or how an upstream must be reached is published here:
registry changes, status flips, rediscovery (`ServerEvent`), desktop catalog changes
(`DesktopCatalogChanged`: a session started, updated its catalog, ended or expired) and custom-role
changes (`RolesChanged`); and one that is not a catalog change but must reach the replica holding an MCP
session: a finished upstream authorization (`UpstreamAuthorized`, for URL-mode elicitations). The
directory, the pool, the audit of registry changes and the list_changed notifier subscribe, each to the
event types it cares about; nobody calls them directly. In-process by default; a Redis-backed bus can
implement the same two methods for several workers."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

logger = logging.getLogger(__name__)


class ServerEventKind(StrEnum):
    CREATED = "server_created"
    UPDATED = "server_updated"  # metadata only (name, description, consent tier)
    ENDPOINT_CHANGED = "endpoint_changed"
    DELETED = "server_deleted"
    CREDENTIALS_CHANGED = "credentials_changed"
    CAPABILITIES_CHANGED = "capabilities_changed"
    STATUS_CHANGED = "status_changed"
    REFRESHED = "server_refreshed"


# Events after which a pooled upstream session for the server must not be reused.
CLOSES_SESSIONS = frozenset(
    {
        ServerEventKind.ENDPOINT_CHANGED,
        ServerEventKind.DELETED,
        ServerEventKind.CREDENTIALS_CHANGED,
        ServerEventKind.REFRESHED,
        ServerEventKind.STATUS_CHANGED,
    }
)


@dataclass(frozen=True)
class ServerEvent:
    kind: ServerEventKind
    server_id: str
    tenant_id: str
    owner_user_id: str
    is_tenant_shared: bool
    actor_user_id: str = ""  # who made the change ("" for the system: health checks, discovery)

    @property
    def closes_sessions(self) -> bool:
        return self.kind in CLOSES_SESSIONS


@dataclass(frozen=True)
class DesktopCatalogChanged:
    """What a (tenant, user)'s desktop sessions offer moved."""

    tenant_id: str
    user_id: str


@dataclass(frozen=True)
class RolesChanged:
    """A tenant's custom roles changed (a role put or deleted): permissions, hence listings, may move."""

    tenant_id: str


@dataclass(frozen=True)
class UpstreamAuthorized:
    """A user finished an upstream OAuth authorization started from a ticket (SPEC section 12): the
    URL-mode elicitation `elicitation_id` is complete, whichever replica holds its MCP session."""

    tenant_id: str
    user_id: str
    server_id: str
    elicitation_id: str


Event = ServerEvent | DesktopCatalogChanged | RolesChanged | UpstreamAuthorized
E = TypeVar("E", ServerEvent, DesktopCatalogChanged, RolesChanged, UpstreamAuthorized)
Handler = Callable[[E], Awaitable[None] | None]


class EventBus:
    """In-process fan-out, in subscription order. A failing subscriber is logged and never breaks the
    publisher. Handlers run one after the other, so a later subscriber (the notifier) sees what an
    earlier one (the directory) already applied."""

    def __init__(self) -> None:
        self._handlers: list[tuple[type[Any], Callable[[Any], Awaitable[None] | None]]] = []

    def subscribe(self, handler: Handler[E], event_type: type[E] = ServerEvent) -> Callable[[], None]:  # type: ignore[assignment]
        entry = (event_type, handler)
        self._handlers.append(entry)

        def unsubscribe() -> None:
            if entry in self._handlers:
                self._handlers.remove(entry)

        return unsubscribe

    async def publish(self, event: Event) -> None:
        for event_type, handler in list(self._handlers):
            if not isinstance(event, event_type):
                continue
            try:
                result = handler(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("event subscriber failed", extra={"event": type(event).__name__})
