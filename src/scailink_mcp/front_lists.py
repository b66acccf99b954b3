"""The list methods on the `/mcp` front (`mcp_front.py`): `tools/list`, `prompts/list`,
`resources/list` and `resources/templates/list` answered with the pre-serialized page of the caller's
listing (`list_pages.py`): no validation, no serialization per request, every field the upstream sent.

A request the page cannot answer (a cursor that is not ours, an unknown or unlisted server) is
declined: the SDK's handler raises the same `MCPError` and answers it as a JSON-RPC error, as ever.
A handshake-era session that lists is tracked for list_changed, as the SDK's handlers track it.
"""

from __future__ import annotations

from mcp.shared.exceptions import MCPError

from scailink_mcp import list_pages
from scailink_mcp.front_answer import Reply
from scailink_mcp.mcp_front import Call, Exchange, Handler
from scailink_mcp.mcp_server import McpSurface


def list_methods(surface: McpSurface, *, single: bool) -> dict[str, Handler]:
    """The front's handlers of the list methods of one endpoint (`single`: the per-server endpoint)."""

    def handle(exchange: Exchange) -> Call | None:
        method, modern = exchange.method, exchange.modern
        try:
            server_id = exchange.server_id if single else None
            listing = surface.listing(exchange.principal, names=exchange.names, server_id=server_id)
            cursor = list_pages.cursor_of(exchange.params)
            reply = Reply(
                list_pages.page_bytes(listing, method, cursor, modern=modern),
                list_pages.page_keys(listing, method, cursor, modern=modern),
            )
        except MCPError:
            return None
        if exchange.session is not None:
            connection, principal = exchange.session.connection, exchange.principal
            if single:
                surface.notifier.track_connection(
                    connection, principal, "dotted", server_id=exchange.server_id
                )
            else:
                surface.notifier.track_connection(connection, principal, surface.style_of(exchange.names))

        async def run() -> Reply:
            return reply

        return run

    return {method: handle for method in list_pages.LIST_METHODS}
