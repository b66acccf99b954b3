"""`list_pages.py`: the pre-serialized pages list what the SDK server would have listed (for items it
knows: the same JSON, both eras), page like `tools/list` always has, and are built once per listing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from mcp.shared.exceptions import MCPError
from mcp_types import SERVER_INFO_META_KEY, methods

from scailink_mcp import list_pages
from scailink_mcp.catalog import PAGE_MAX_ITEMS, ServerScope, ServerSnapshot, build_view

STAMP = {"name": "scailink", "version": "1.0", "title": "ScaiLink"}
ERAS = ("2025-11-25", "2026-07-28")


def _server(tools: int, **items: Any) -> ServerSnapshot:
    listed = [
        {
            "name": f"tool_{i:04d}",
            "title": f"Tool {i}",
            "description": "Does a thing. " * 5,
            "inputSchema": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
            "annotations": {"readOnlyHint": True},
            "_meta": {"com.example/n": i},
        }
        for i in range(tools)
    ]
    return ServerSnapshot(
        id="s1", tenant_id="t1", owner_user_id="u1", is_tenant_shared=False, slug="srv-abcdef",
        name="srv", status="active", consent_tier="auto", credential_version=1,
        tools=tuple(listed), **items,
    )  # fmt: skip


def _sdk(method: str, era: str, result: dict[str, Any]) -> dict[str, Any]:
    """What the SDK server's outbound pipeline makes of a handler's result dict (runner._serialize)."""
    return methods.serialize_server_result(method, era, result)


def _written(page: bytes, era: str) -> dict[str, Any]:
    """A page as the answer writer sends it: from 2026-07-28 on with `resultType` and the stamp."""
    result: dict[str, Any] = json.loads(page)
    if era == "2026-07-28":
        result |= {"resultType": "complete", "_meta": {SERVER_INFO_META_KEY: STAMP}}
    return result


@pytest.mark.parametrize("era", ERAS)
def test_pages_are_what_the_sdk_would_list(era: str) -> None:
    items = {
        "prompts": ({"name": "p", "arguments": [{"name": "a", "required": True}]},),
        "resources": ({"uri": "file:///a b.md", "name": "a", "mimeType": "text/markdown"},),
        "resource_templates": ({"uriTemplate": "file:///{x}", "name": "t"},),
    }
    view = build_view([_server(3, **items)], version=1, style="dotted")
    modern = era == "2026-07-28"
    for method in list_pages.LIST_METHODS:
        page = _written(list_pages.page_bytes(view, method, None, modern=modern), era)
        handler_result = list_pages.page_result(view, method, None, modern=modern)
        if modern:  # what mcp_server's SDK handler returns, and the SDK's stamp
            handler_result["resultType"] = "complete"
        expected = _sdk(method, era, handler_result)
        if modern:
            expected["_meta"] = {SERVER_INFO_META_KEY: STAMP}
        assert page == expected, method
        assert set(page) - {"resultType", "_meta"} == set(
            list_pages.page_keys(view, method, None, modern=modern)
        )
    tools = json.loads(list_pages.page_bytes(view, "tools/list", None, modern=modern))["tools"]
    assert tools[0]["name"] == "remote.u1.srv-abcdef.tool_0000"


def test_tool_pages_follow_the_catalogs_page_bounds() -> None:
    view = build_view([_server(2 * PAGE_MAX_ITEMS + 7)], version=1, style="dotted")
    names: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        page = json.loads(list_pages.page_bytes(view, "tools/list", cursor, modern=False))
        names += [t["name"] for t in page["tools"]]
        assert len(page["tools"]) <= PAGE_MAX_ITEMS
        cursor = page.get("nextCursor")
        if cursor is None:
            break
    assert names == [t["name"] for t in view.tools] and len(names) == 2 * PAGE_MAX_ITEMS + 7
    past = list_pages.page_cursor(len(view.tool_pages) + 3)
    assert json.loads(list_pages.page_bytes(view, "tools/list", past, modern=False)) == {"tools": []}
    for bad in ("not-a-cursor", list_pages.page_cursor(0).replace("c", "d")):
        with pytest.raises(MCPError) as err:
            list_pages.page_bytes(view, "tools/list", bad, modern=False)
        assert err.value.error.code == -32602
    # prompts/resources are one page; their cursor is ignored, as it always was
    one = list_pages.page_bytes(view, "prompts/list", "anything", modern=False)
    assert json.loads(one) == {"prompts": []}


def test_pages_are_serialized_once_per_listing_and_era() -> None:
    scope = ServerScope.of(_server(5))
    first = list_pages.page_bytes(scope, "tools/list", None, modern=False)
    assert list_pages.page_bytes(scope, "tools/list", None, modern=False) is first
    modern = list_pages.page_bytes(scope, "tools/list", None, modern=True)
    assert modern is not first and json.loads(modern)["ttlMs"] == 0
    assert set(scope.pages) == {("tools/list", 0, False), ("tools/list", 0, True)}
    # a rebuilt listing (what the catalog does when the tenant's version moves) starts empty
    assert ServerScope.of(_server(5)).pages == {}
    response = json.loads(list_pages.response_bytes("abc", first))
    assert response == {"jsonrpc": "2.0", "id": "abc", "result": json.loads(first)}
