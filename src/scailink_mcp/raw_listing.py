"""Listing an MCP server's tools, prompts, resources and templates as raw JSON objects, through an
SDK `ClientSession` (remote discovery and the desktop client's local servers).

Why raw: the SDK's result models drop every field they do not know, and a proxy passes fields newer
than its SDK (or vendor `_meta`) through unchanged. A page is requested with `send_request` into a
model that keeps every member (`_RawPage`): the SDK still validates the result against the negotiated
protocol version, but nothing is re-dumped. Follows `nextCursor` (at most `MAX_PAGES`, never a
repeated cursor).
"""

from __future__ import annotations

from typing import Any

import mcp_types as types
from mcp.client.session import ClientSession
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import find_invalid_x_mcp_header
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, ConfigDict

MAX_PAGES = 1000
METHOD_NOT_FOUND = -32601

# method -> (request type, the result's member holding the items)
LISTS: dict[str, tuple[Any, str]] = {
    "tools/list": (types.ListToolsRequest, "tools"),
    "prompts/list": (types.ListPromptsRequest, "prompts"),
    "resources/list": (types.ListResourcesRequest, "resources"),
    "resources/templates/list": (types.ListResourceTemplatesRequest, "resourceTemplates"),
}


class _RawPage(BaseModel):
    """A listing's result kept as sent: every member lands in `model_extra`."""

    model_config = ConfigDict(extra="allow")


async def list_raw(session: ClientSession, method: str) -> list[dict[str, Any]]:
    """Every item of the listing `method` (one of `LISTS`), each object as the server sent it.

    A server that advertises resources may still not serve `resources/templates/list`: -32601 on the
    first page is an empty listing. 2026-07-28 sessions drop tools whose `x-mcp-header` annotations
    are invalid, as the SDK's `list_tools` does (a client MUST).
    """
    request_type, key = LISTS[method]
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    seen: set[str] = set()
    for _ in range(MAX_PAGES):
        params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
        try:
            answer = await session.send_request(request_type(params=params), _RawPage)
        except MCPError as exc:
            if exc.error.code == METHOD_NOT_FOUND and not items:
                return []
            raise
        page = answer.model_extra or {}
        listed = page.get(key)
        if isinstance(listed, list):
            items.extend(item for item in listed if isinstance(item, dict))
        next_cursor = page.get("nextCursor")
        cursor = next_cursor if isinstance(next_cursor, str) else None
        if not cursor or cursor in seen:
            break
        seen.add(cursor)
    if method == "tools/list" and session.protocol_version in MODERN_PROTOCOL_VERSIONS:
        items = [t for t in items if find_invalid_x_mcp_header(t.get("inputSchema")) is None]
    return items


def text_of(item: dict[str, Any], key: str) -> str | None:
    value = item.get(key)
    return value if isinstance(value, str) else None
