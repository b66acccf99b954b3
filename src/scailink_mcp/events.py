"""The catalog-change publish/subscribe interface.

Everything that changes what a principal can see or how an upstream must be reached (registration,
deletion, refresh, status flips, credential rotation, endpoint changes) is published here; the
upstream session pool and the catalog cache subscribe. Nobody calls those directly. In-process by
default; a Redis-backed bus can implement the same two methods for several workers.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum

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


Handler = Callable[[ServerEvent], Awaitable[None] | None]


class EventBus:
    """In-process fan-out. A failing subscriber is logged and never breaks the publisher."""

    def __init__(self) -> None:
        self._handlers: list[Handler] = []

    def subscribe(self, handler: Handler) -> Callable[[], None]:
        self._handlers.append(handler)

        def unsubscribe() -> None:
            if handler in self._handlers:
                self._handlers.remove(handler)

        return unsubscribe

    async def publish(self, event: ServerEvent) -> None:
        for handler in list(self._handlers):
            try:
                result = handler(event)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("event subscriber failed", extra={"event": event.kind.value})
