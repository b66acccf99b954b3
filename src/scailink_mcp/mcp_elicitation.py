"""URL-mode elicitation of an upstream authorization (SPEC section 12, MCP 2025-11-25).

A `tools/call` that meets `SCAILINK_UPSTREAM_AUTH_REQUIRED` answers a handshake-era client that
declared `capabilities.elicitation.url` with the JSON-RPC error -32042 (URLElicitationRequiredError)
carrying one URL elicitation: the absolute `authorize_url` (with its one-time ticket) and an
`elicitationId` (the ticket's nonce, so the flow it starts names it up to the callback). This is the
answer the MCP spec gives for exactly this case (a third-party authorization the request needs); the
server does not wait for the user. When that flow's callback succeeds (`UpstreamAuthorized`, on
whichever replica it lands: the event crosses replicas on Redis), the session that got the error
hears `notifications/elicitation/complete` on its standalone stream, so it may retry. Best effort, as
the spec says: the session may be gone, or its standalone stream held by another replica.

Other clients keep the `isError` result with `_meta["scailink/error"]`: clients without the
capability, and every 2026-07-28 client (-32042 and `notifications/elicitation/complete` are retired
in that revision; its input-required round trip is not built, see README).

Must not: hold a session alive (weak references), or grow without bound (capped, expiring entries).
"""

from __future__ import annotations

import logging
import secrets
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import UrlElicitationRequiredError
from mcp_types import ElicitRequestURLParams
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from scailink_mcp.errors import UpstreamAuthRequired
from scailink_mcp.events import UpstreamAuthorized
from scailink_mcp.sdk_sessions import connection_of

logger = logging.getLogger(__name__)

COMPLETE = "notifications/elicitation/complete"
MESSAGE = "Authorize ScaiLink for this server in your browser, then try again."


def supports_url_elicitation(ctx: ServerRequestContext[Any, Any]) -> bool:
    """A handshake-era session whose client declared URL-mode elicitation."""
    if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        return False
    caps = ctx.session.client_capabilities
    return caps is not None and caps.elicitation is not None and caps.elicitation.url is not None


class UrlElicitations:
    """The elicitations answered with -32042 and not completed yet: id -> (connection, expiry)."""

    def __init__(
        self, *, ttl_s: float, max_pending: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self.max_pending = max_pending
        self.clock = clock
        self._pending: OrderedDict[str, tuple[weakref.ref[Connection], float]] = OrderedDict()
        self.completed = 0  # notifications sent (tests, logs)

    def __len__(self) -> int:
        return len(self._pending)

    def holds(self, connection: Connection) -> bool:
        """The connection waits for a completion (it is not parked: `session_park.py`)."""
        return any(ref() is connection for ref, _ in self._pending.values())

    def required(
        self, ctx: ServerRequestContext[Any, Any], err: UpstreamAuthRequired
    ) -> UrlElicitationRequiredError:
        """The -32042 error for `err`; its completion is sent to this session later."""
        now = self.clock()
        while self._pending:  # the oldest first: drop the expired ones, and the oldest beyond the cap
            oldest, (_, expires) = next(iter(self._pending.items()))
            if expires > now and len(self._pending) < self.max_pending:
                break
            del self._pending[oldest]
        # Every raise site names the ticket's nonce; an id is required on the wire all the same.
        elicitation_id = err.elicitation_id or secrets.token_urlsafe(16)
        self._pending[elicitation_id] = (weakref.ref(connection_of(ctx.session)), now + self.ttl_s)
        return UrlElicitationRequiredError(
            [ElicitRequestURLParams(message=MESSAGE, url=err.authorize_url, elicitation_id=elicitation_id)],
            message=f"{err.code}: {err.message}",
        )

    async def on_authorized(self, event: UpstreamAuthorized) -> None:
        """Subscribed to the event bus: tell the waiting session, if this replica holds it."""
        entry = self._pending.pop(event.elicitation_id, None)
        if entry is None:
            return
        connection, expires = entry[0](), entry[1]
        if connection is None or expires <= self.clock():
            return
        await connection.notify(COMPLETE, {"elicitationId": event.elicitation_id})
        self.completed += 1
        logger.info("URL elicitation completed", extra={"server_id": event.server_id})
