"""Running discovery for one registered server and recording the outcome on its row.

Owns the order of a discovery run: load and decrypt the target (cold path), ask the upstream
(`discovery.discover`, bounded in time and size), record the outcome in one transaction (capability
rows, status, health fields), then publish what changed: `CAPABILITIES_CHANGED` when the visible
capabilities moved, `STATUS_CHANGED` when the status flipped. A first discovery that fails (on
register, or after the endpoint changed) leaves the server `status: error` and publishes that flip
too, so the catalog, the per-server endpoint and the pool all see it.

Must not: raise an upstream failure to the caller (it is the server's state, recorded on its row),
check permissions (the registry did), or publish anything but through `publish`.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import KW_ONLY, dataclass
from datetime import datetime

from sqlmodel import Session

from scailink_mcp.config import Settings
from scailink_mcp.db import Database
from scailink_mcp.events import ServerEventKind
from scailink_mcp.models import RemoteServer, utcnow
from scailink_mcp.remote.credentials import CredentialDecryptError
from scailink_mcp.remote.discovery import DiscoveryResult, discover, store_discovery
from scailink_mcp.remote.oauth_tokens import AuthorizationMissing, BearerAuth
from scailink_mcp.remote.upstream import Network, UpstreamTarget, error_class_name

logger = logging.getLogger(__name__)

LoadTarget = Callable[[Session, str], UpstreamTarget | None]
Publish = Callable[[ServerEventKind, RemoteServer], Awaitable[None]]
Outcome = DiscoveryResult | BaseException


@dataclass(frozen=True, eq=False)
class DiscoveryRunner:
    """One per registry. `target` loads a server's decrypted target (None once it is deleted);
    `publish` tells the bus a server changed."""

    settings: Settings
    db: Database
    allowed: Sequence[Network]
    _: KW_ONLY
    target: LoadTarget
    publish: Publish

    async def run(self, server_id: str) -> tuple[bool, bool, BaseException | None]:
        """Discover and record; (succeeded, visible capabilities changed, the failure recorded).

        The failure is None on success, and when the server is gone.
        """
        outcome: Outcome
        try:
            target = await self.db.run(lambda s: self.target(s, server_id))
        except CredentialDecryptError as exc:
            logger.warning(
                "credential does not decrypt", extra={"server_id": server_id, "fields": exc.fields}
            )
            outcome = exc
        else:
            if target is None:
                return False, False, None
            outcome = await self._discover(target)
        now = utcnow()
        retention_s = self.settings.capability_retention_s
        ok, changed, server, status_changed = await self.db.run(
            lambda s: record_outcome(s, server_id, outcome, now=now, retention_s=retention_s)
        )
        if server is not None:
            if ok and changed:
                await self.publish(ServerEventKind.CAPABILITIES_CHANGED, server)
            if status_changed:
                await self.publish(ServerEventKind.STATUS_CHANGED, server)
        failure = outcome if isinstance(outcome, BaseException) and server is not None else None
        return ok, changed, failure

    async def run_first(self, server_id: str) -> None:
        """The first discovery of a new (or re-pointed) server; a failure leaves it `status: error`."""
        ok, _, _ = await self.run(server_id)
        if not ok:
            server = await self.db.run(lambda s: mark_error(s, server_id))
            if server is not None:
                await self.publish(ServerEventKind.STATUS_CHANGED, server)

    async def _discover(self, target: UpstreamTarget) -> Outcome:
        try:
            if isinstance(target.auth, BearerAuth):  # an OAuth upstream: its owner must have authorized
                await target.auth.ensure()
            return await discover(
                target,
                self.allowed,
                connect_timeout=self.settings.discovery_connect_timeout_s,
                total_timeout=self.settings.discovery_timeout_s,
                max_answer_bytes=self.settings.max_result_bytes,
            )
        except Exception as exc:  # any upstream failure is recorded on the server, not raised
            logger.info(
                "discovery failed", extra={"server_id": target.server_id, "error": error_class_name(exc)}
            )
            return exc


def record_outcome(
    session: Session, server_id: str, outcome: Outcome, *, now: datetime, retention_s: float
) -> tuple[bool, bool, RemoteServer | None, bool]:
    """(succeeded, capabilities changed, the server or None if gone, status flipped); commits."""
    server = session.get(RemoteServer, server_id)
    if server is None:
        return False, False, None, False
    was_error = server.status != "active"  # `error`, or `pending_authorization` until a first discovery
    server.last_health_at = now
    if isinstance(outcome, AuthorizationMissing) and server.last_discovery_at is None:
        # An OAuth server nobody may discover yet: it waits for its owner's authorization (no error).
        flipped = server.status != "pending_authorization"
        server.status = "pending_authorization"
        server.last_health_status = error_class_name(outcome)
        session.add(server)
        session.commit()
        return False, False, server, flipped
    if isinstance(outcome, BaseException):
        server.last_health_status = error_class_name(outcome)
        server.consecutive_failures += 1
        server.consecutive_successes = 0
        # No retry can decrypt it: the server is unusable until the credential is set again.
        flipped = isinstance(outcome, CredentialDecryptError) and not was_error
        if flipped:
            server.status = "error"
        session.add(server)
        session.commit()
        return False, False, server, flipped
    changed = store_discovery(session, server, outcome, now=now, retention_s=retention_s)
    server.status = "active"
    server.consecutive_failures = 0
    server.consecutive_successes = 0
    server.last_health_status = "ok"
    session.add(server)
    session.commit()
    return True, changed, server, was_error


def mark_error(session: Session, server_id: str) -> RemoteServer | None:
    """`status: error` for a server whose first discovery failed; the server if it changed."""
    server = session.get(RemoteServer, server_id)
    if server is None or server.last_discovery_at is not None or server.status != "active":
        return None
    server.status = "error"
    session.add(server)
    session.commit()
    session.refresh(server)
    return server
