"""The one adapter to private parts of the SDK (mcp 2.3) that ScaiLink needs.

1. The session table of `StreamableHTTPSessionManager`.

Why private attributes: mcp 2.3 caps sessions only globally (`max_sessions`) and offers no public way
to count or close the sessions of one owner. ScaiLink needs both for the per-principal cap
(`mcp_guard.py`). The table is `_server_instances` (session id -> transport, in creation order) and
`_session_owners` (session id -> the owner's `AuthorizationContext`); `_discard_session` forgets a
session and terminates its transport the way the manager itself does.

2. The connection behind a handler's `ctx.session`. `ctx.session` is a per-request proxy; the
`Connection` behind it lives as long as the downstream MCP session, so it is what the list_changed
registry (notifier.py) and resource subscriptions key on. The SDK exposes no public accessor.

Keep every such access here.
"""

from __future__ import annotations

from mcp.server.auth.middleware.bearer_auth import AuthorizationContext
from mcp.server.connection import Connection
from mcp.server.session import ServerSession
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager


def sessions_of(manager: StreamableHTTPSessionManager, owner: AuthorizationContext) -> list[str]:
    """Session ids of `owner`, oldest first."""
    owners = manager._session_owners
    return [sid for sid in manager._server_instances if owners.get(sid) == owner]


async def evict_oldest(
    manager: StreamableHTTPSessionManager, owner: AuthorizationContext, *, keep: int
) -> int:
    """Close `owner`'s oldest sessions until at most `keep` remain; the number closed."""
    ids = sessions_of(manager, owner)
    closed = 0
    for sid in ids[: max(0, len(ids) - keep)]:
        transport = manager._server_instances.get(sid)
        if transport is not None:
            await manager._discard_session(sid, transport)
            closed += 1
    return closed


def connection_of(session: ServerSession) -> Connection:
    """The long-lived connection behind a handler's per-request `ctx.session`."""
    connection: Connection = session._connection
    return connection
