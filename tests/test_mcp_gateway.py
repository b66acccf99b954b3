"""The aggregating MCP server end to end: real ScaiLink on 127.0.0.1 (uvicorn), real upstream MCP
servers, real SDK clients over Streamable HTTP."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import httpx2
import mcp_types as types
import pytest
from mcp.client.session import ClientSession, IncomingMessage
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from sqlalchemy import event

from tests.conftest import LiveApp, TokenFactory, auth_headers
from tests.upstream import ToolCall, UpstreamServer

pytestmark = pytest.mark.anyio

REG = "/v1/modules/scailink/remote-servers"


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer() as server:
        yield server


@asynccontextmanager
async def mcp_client(
    url: str, tok: str, *, on_message: Any = None, query: str = ""
) -> AsyncIterator[ClientSession]:
    async with (
        httpx2.AsyncClient(headers=auth_headers(tok), timeout=httpx2.Timeout(30, read=60)) as http,
        streamable_http_client(url + query, http_client=http) as (read, write),
        ClientSession(read, write, message_handler=on_message) as session,
    ):
        await session.initialize()
        yield session


async def register(live: LiveApp, tok: str, **body: Any) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as c:
        resp = await c.post(REG, json=body, headers=auth_headers(tok))
    assert resp.status_code == 201, resp.text
    data: dict[str, Any] = resp.json()["data"]
    return data


async def list_all_tools(session: ClientSession) -> list[types.Tool]:
    tools: list[types.Tool] = []
    cursor: str | None = None
    while True:
        page = await session.list_tools(
            params=types.PaginatedRequestParams(cursor=cursor) if cursor else None
        )
        tools += page.tools
        cursor = page.next_cursor
        if not cursor:
            return tools


async def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110  (a deadline-bounded poll of another thread's state)
            await anyio.sleep(0.02)


async def test_missing_token_is_401_with_resource_metadata(live: LiveApp) -> None:
    async with httpx.AsyncClient(base_url=live.base_url) as c:
        resp = await c.post("/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
        assert resp.status_code == 401
        assert "resource_metadata=" in resp.headers["www-authenticate"]
        assert "/.well-known/oauth-protected-resource" in resp.headers["www-authenticate"]
        meta = await c.get("/.well-known/oauth-protected-resource/mcp")
        assert meta.status_code == 200 and meta.json()["resource"].endswith("/mcp")
        bad = await c.post("/mcp", json={}, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401


async def test_catalog_visibility(live: LiveApp, token: TokenFactory, upstream: UpstreamServer) -> None:
    u1 = token("u1", "t1", ("tenant_user",))
    admin = token("admin", "t1", ("tenant_admin",))
    mine = await register(live, u1, name="mine", endpoint_url=upstream.url)
    shared = await register(live, admin, name="shared", endpoint_url=upstream.url, is_tenant_shared=True)
    personal_echo = f"remote.u1.{mine['slug']}.echo"
    shared_echo = f"remote.tenant.{shared['slug']}.echo"

    async with mcp_client(live.mcp_url, u1) as s:
        names = {t.name for t in await list_all_tools(s)}
        assert {personal_echo, shared_echo} <= names
        result = await s.call_tool(personal_echo, {"text": "hi"})
        assert not result.is_error and result.content[0].text == "hi"  # type: ignore[union-attr]
    async with mcp_client(live.mcp_url, token("u2", "t1", ("tenant_user",))) as s:
        names = {t.name for t in await list_all_tools(s)}
        assert shared_echo in names and personal_echo not in names
        with pytest.raises(MCPError) as err:
            await s.call_tool(personal_echo, {"text": "x"})
        assert err.value.error.code == -32602
    async with mcp_client(live.mcp_url, token("u1", "t2", ("tenant_admin",))) as s:
        assert await list_all_tools(s) == []
    async with mcp_client(live.mcp_url, token("u1", "t1", ("some-group",))) as s:
        assert await list_all_tools(s) == []


def _image_tool(upstream: UpstreamServer) -> None:
    async def image(call: ToolCall) -> types.CallToolResult:
        return types.CallToolResult(
            content=[
                types.ImageContent(type="image", data="iVBORw0KGgo=", mime_type="image/png"),
                types.TextContent(type="text", text="caption"),
            ],
            structured_content={"ok": True},
        )

    upstream.add_tool(
        types.Tool(name="image", description="an image", input_schema={"type": "object", "properties": {}}),
        image,
    )


async def test_parity_with_direct_calls(live: LiveApp, token: TokenFactory, upstream: UpstreamServer) -> None:
    _image_tool(upstream)
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="parity", endpoint_url=upstream.url)
    ns = f"remote.u1.{server['slug']}"
    cases: list[tuple[str, dict[str, Any]]] = [
        ("echo", {"text": "hello"}),
        ("echo", {"text": "x" * 200_000}),
        ("add", {"a": 2, "b": 40}),
        ("fail", {}),
        ("image", {}),
        ("echo", {"wrong": 1}),
    ]
    async with (
        mcp_client(upstream.url, tok) as direct,
        mcp_client(live.mcp_url, tok) as through,
    ):
        direct_tools = {t.name: t for t in await list_all_tools(direct)}
        proxied = {t.name: t for t in await list_all_tools(through)}
        for name, tool in direct_tools.items():
            # upstream fields pass through unchanged except the name
            assert proxied[f"{ns}.{name}"].model_dump(exclude={"name"}) == tool.model_dump(exclude={"name"})
        for name, args in cases:
            want = await direct.call_tool(name, args)
            got = await through.call_tool(f"{ns}.{name}", args)
            assert got.content == want.content, name
            assert got.structured_content == want.structured_content, name
            assert got.is_error == want.is_error, name


async def test_warm_calls_one_handshake_no_db(
    live: LiveApp, token: TokenFactory, upstream: UpstreamServer
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="warm", endpoint_url=upstream.url)
    name = f"remote.u1.{server['slug']}.echo"
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # The audit writer's batched inserts run in their own background task, off the call path.
        if not statement.lstrip().upper().startswith(("INSERT INTO AUDIT_EVENT", "BEGIN", "COMMIT")):
            statements.append(statement)

    async with mcp_client(live.mcp_url, tok) as s:
        await s.call_tool(name, {"text": "warm-up"})
        before = upstream.initialize_count
        event.listen(live.parts.db.engine, "before_cursor_execute", count)
        try:
            for i in range(100):
                result = await s.call_tool(name, {"text": str(i)})
                assert result.content[0].text == str(i)  # type: ignore[union-attr]
            await s.list_tools()
        finally:
            event.remove(live.parts.db.engine, "before_cursor_execute", count)
    assert upstream.initialize_count == before, "a warm call must not handshake"
    assert statements == [], "a warm call must not query the database"
    # a second user never shares the first user's upstream session
    other = token("u2", "t1", ("tenant_admin",))
    shared = await register(live, other, name="shared-warm", endpoint_url=upstream.url, is_tenant_shared=True)
    shared_name = f"remote.tenant.{shared['slug']}.echo"
    before = upstream.initialize_count
    for who in (tok, other):
        async with mcp_client(live.mcp_url, who) as s:
            await s.call_tool(shared_name, {"text": "x"})
    assert upstream.initialize_count == before + 2


async def test_rotation_applies_to_next_call(
    live: LiveApp, token: TokenFactory, upstream: UpstreamServer
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    upstream.required_headers = {"x-api-key": "old"}
    server = await register(
        live,
        tok,
        name="rot",
        endpoint_url=upstream.url,
        auth_type="api_key_header",
        credentials={"x-api-key": "old"},
    )
    name = f"remote.u1.{server['slug']}.echo"
    async with mcp_client(live.mcp_url, tok) as s:
        assert not (await s.call_tool(name, {"text": "1"})).is_error
        upstream.required_headers = {"x-api-key": "new"}
        async with httpx.AsyncClient(base_url=live.base_url) as c:
            resp = await c.put(
                f"{REG}/{server['id']}/credentials/x-api-key",
                json={"value": "new"},
                headers=auth_headers(tok),
            )
            assert resp.status_code == 200
        result = await s.call_tool(name, {"text": "2"})
        assert not result.is_error, result
        assert upstream.last_headers.get("x-api-key") == "new"


async def test_list_changed_on_registry_changes(
    live: LiveApp, token: TokenFactory, upstream: UpstreamServer
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    changed: list[str] = []

    async def on_message(message: IncomingMessage) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.append("tools")

    async with mcp_client(live.mcp_url, tok, on_message=on_message) as s:
        assert await list_all_tools(s) == []
        server = await register(live, tok, name="late", endpoint_url=upstream.url)
        await wait_for(lambda: len(changed) >= 1)
        names = {t.name for t in await list_all_tools(s)}
        assert f"remote.u1.{server['slug']}.echo" in names
        # an upstream's own list_changed (over the pooled session a call opened): the new tool is listed
        await s.call_tool(f"remote.u1.{server['slug']}.echo", {"text": "open the pooled session"})
        upstream.add_tool("brand_new")
        with anyio.fail_after(10):
            while len(changed) < 2:  # the upstream's GET stream may open after its first notification
                upstream.notify_tools_changed()
                await anyio.sleep(0.2)
        names = {t.name for t in await list_all_tools(s)}
        assert f"remote.u1.{server['slug']}.brand_new" in names
        # status flip to error removes the tools
        upstream.stop()
        for _ in range(3):
            await live.parts.health.run_once()
        await wait_for(lambda: len(changed) >= 3)
        assert await list_all_tools(s) == []
        upstream.start()
        async with httpx.AsyncClient(base_url=live.base_url) as c:
            await c.post(f"{REG}/{server['id']}/refresh", headers=auth_headers(tok))
            await wait_for(lambda: len(changed) >= 4)
            assert await list_all_tools(s)
            # deletion
            assert (await c.delete(f"{REG}/{server['id']}", headers=auth_headers(tok))).status_code == 204
        await wait_for(lambda: len(changed) >= 5)
        assert await list_all_tools(s) == []


async def test_compat_names(live: LiveApp, token: TokenFactory, upstream: UpstreamServer) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    upstream.add_tool("a_tool_with_a_quite_long_name_that_pushes_the_total_over_the_limit")
    server = await register(live, tok, name="cs", endpoint_url=upstream.url)
    async with mcp_client(live.mcp_url, tok, query="?names=compat") as s:
        tools = await list_all_tools(s)
        assert tools
        for tool in tools:
            assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", tool.name), tool.name
        echo = next(t.name for t in tools if t.name.endswith("__echo"))
        assert (await s.call_tool(echo, {"text": "c"})).content[0].text == "c"  # type: ignore[union-attr]
        long_one = next(t.name for t in tools if "quite" in t.name)
        assert len(long_one) == 64
        assert not (await s.call_tool(long_one, {})).is_error
    assert echo == f"remote__u1__{server['slug']}__echo"
    # stable: a new connection (and a rebuilt catalog) gives the same names
    live.parts.catalog._views.clear()
    async with mcp_client(live.mcp_url, tok, query="?names=compat") as s:
        assert [t.name for t in await list_all_tools(s)] == [t.name for t in tools]


async def test_consent_tiers(live: LiveApp, token: TokenFactory, upstream: UpstreamServer) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    locked = await register(live, tok, name="locked", endpoint_url=upstream.url, consent_tier="locked")
    confirm = await register(live, tok, name="confirm", endpoint_url=upstream.url, consent_tier="confirm")
    async with mcp_client(live.mcp_url, tok) as s:
        names = {t.name for t in await list_all_tools(s)}
        assert not any(locked["slug"] in n for n in names)
        result = await s.call_tool(f"remote.u1.{confirm['slug']}.echo", {"text": "x"})
        assert result.is_error
        assert (result.meta or {})["scailink/error"]["code"] == "SCAILINK_CONSENT_DENIED"
        with pytest.raises(MCPError):
            await s.call_tool(f"remote.u1.{locked['slug']}.echo", {"text": "x"})


async def test_upstream_failure_and_timeout_are_clean(
    live: LiveApp, token: TokenFactory, upstream: UpstreamServer
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="flaky", endpoint_url=upstream.url)
    ns = f"remote.u1.{server['slug']}"
    async with mcp_client(live.mcp_url, tok) as s:
        with anyio.fail_after(10):
            result = await s.call_tool(f"{ns}.sleep_ms", {"ms": 5000}, meta={"scailink/timeout_ms": 500})
        assert result.is_error and result.meta["scailink/error"]["code"] == "SCAILINK_UPSTREAM_TIMEOUT"  # type: ignore[index]
        upstream.stop()
        with anyio.fail_after(20):
            result = await s.call_tool(f"{ns}.echo", {"text": "x"})
        assert result.is_error and result.meta["scailink/error"]["code"] == "SCAILINK_UPSTREAM_ERROR"  # type: ignore[index]
        upstream.start()
        result = await s.call_tool(f"{ns}.echo", {"text": "back"})
        assert not result.is_error and result.content[0].text == "back"  # type: ignore[union-attr]


async def test_single_server_endpoint(live: LiveApp, token: TokenFactory, upstream: UpstreamServer) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="single", endpoint_url=upstream.url)
    url = f"{live.base_url}{REG}/{server['id']}/mcp"
    async with mcp_client(url, tok) as s:
        names = {t.name for t in await list_all_tools(s)}
        assert "echo" in names and "add" in names
        assert (await s.call_tool("echo", {"text": "plain"})).content[0].text == "plain"  # type: ignore[union-attr]
        prompts = await s.list_prompts()
        assert prompts.prompts
    async with mcp_client(url, token("u9", "t2", ("tenant_admin",))) as s:
        with pytest.raises(MCPError):
            await s.list_tools()


async def test_federation_two_instances(
    live: LiveApp, settings_factory: Any, token: TokenFactory, upstream: UpstreamServer, tmp_path: Any
) -> None:
    """Instance A's `/mcp` registered as a remote server of instance B (bearer token): A's tools
    appear in B, under 64 characters with compat names, and calls round-trip."""
    tok = token("u1", "t1", ("tenant_user",))
    first = await register(live, tok, name="origin", endpoint_url=upstream.url)
    b_settings = settings_factory(database_url=f"sqlite:///{tmp_path / 'b.db'}")
    with LiveApp(b_settings) as second:
        fed = await register(
            second,
            tok,
            name="scailink-a",
            endpoint_url=live.mcp_url + "?names=compat",
            auth_type="bearer",
            credentials={"authorization": tok},
        )
        assert fed["status"] == "active", fed["last_health_status"]
        inner = f"remote__u1__{first['slug']}__echo"
        assert inner in [t["name"] for t in fed["capabilities"]["tools"]]
        async with mcp_client(second.mcp_url, tok, query="?names=compat") as s:
            tools = await list_all_tools(s)
            assert all(len(t.name) <= 64 for t in tools)
            name = f"remote__u1__{fed['slug']}__{inner}"
            assert name in [t.name for t in tools]
            result = await s.call_tool(name, {"text": "across two gateways"})
            assert not result.is_error and result.content[0].text == "across two gateways"  # type: ignore[union-attr]


async def test_legacy_sse_transport(live: LiveApp, token: TokenFactory, upstream: UpstreamServer) -> None:
    from mcp.client.sse import sse_client

    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="via-sse", endpoint_url=upstream.url)
    async with (
        sse_client(f"{live.base_url}/sse", headers=auth_headers(tok)) as (read, write),
        ClientSession(read, write) as s,
    ):
        await s.initialize()
        names = {t.name for t in await list_all_tools(s)}
        assert f"remote.u1.{server['slug']}.echo" in names
        result = await s.call_tool(f"remote.u1.{server['slug']}.echo", {"text": "sse"})
        assert result.content[0].text == "sse"  # type: ignore[union-attr]
    async with httpx.AsyncClient(base_url=live.base_url) as c:
        assert (await c.get("/sse")).status_code == 401


async def test_dns_rebinding_protection(live: LiveApp, token: TokenFactory) -> None:
    params = {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"},
    }
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": params}
    headers = {**auth_headers(token()), "Accept": "application/json, text/event-stream"}
    async with httpx.AsyncClient(base_url=live.base_url) as c:
        forged_host = await c.post("/mcp", json=body, headers={**headers, "Host": "evil.example:80"})
        assert forged_host.status_code in (403, 421)
        forged_origin = await c.post("/mcp", json=body, headers={**headers, "Origin": "http://evil.example"})
        assert forged_origin.status_code in (403, 421)
        fine = await c.post("/mcp", json=body, headers=headers)
        assert fine.status_code == 200


async def test_modern_per_request_era(live: LiveApp, token: TokenFactory, upstream: UpstreamServer) -> None:
    """The 2026-07-28 era (`server/discover`, no handshake, one request per exchange) on the same `/mcp`."""
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="modern", endpoint_url=upstream.url)
    async with (
        httpx2.AsyncClient(headers=auth_headers(tok), timeout=30) as http,
        streamable_http_client(live.mcp_url, http_client=http) as (read, write),
        ClientSession(read, write) as s,
    ):
        discovered = await s.discover()
        assert "2026-07-28" in discovered.supported_versions
        assert s.protocol_version == "2026-07-28"
        names = {t.name for t in await list_all_tools(s)}
        assert f"remote.u1.{server['slug']}.echo" in names
        result = await s.call_tool(f"remote.u1.{server['slug']}.echo", {"text": "modern"})
        assert result.content[0].text == "modern"  # type: ignore[union-attr]


async def test_modern_era_listen_delivers_list_changed(
    live: LiveApp, token: TokenFactory, upstream: UpstreamServer
) -> None:
    """2026-07-28: change notifications only travel over `subscriptions/listen`, per principal."""
    from mcp.client.subscriptions import listen

    tok = token("u1", "t1", ("tenant_user",))
    other = token("u2", "t2", ("tenant_user",))
    async with (
        httpx2.AsyncClient(headers=auth_headers(tok), timeout=30) as http,
        streamable_http_client(live.mcp_url, http_client=http) as (read, write),
        ClientSession(read, write) as s,
        httpx2.AsyncClient(headers=auth_headers(other), timeout=30) as http2,
        streamable_http_client(live.mcp_url, http_client=http2) as (read2, write2),
        ClientSession(read2, write2) as s2,
    ):
        discovered = await s.discover()
        assert discovered.capabilities.tools is not None and discovered.capabilities.tools.list_changed
        await s2.discover()
        async with (
            listen(s, tools_list_changed=True) as mine,
            listen(s2, tools_list_changed=True) as theirs,
        ):
            server = await register(live, tok, name="modern-listen", endpoint_url=upstream.url)
            with anyio.fail_after(10):
                event = await mine.__anext__()
            assert type(event).__name__ == "ToolsListChanged"
            names = {t.name for t in await list_all_tools(s)}
            assert f"remote.u1.{server['slug']}.echo" in names
            with anyio.move_on_after(1) as quiet:
                await theirs.__anext__()
            assert quiet.cancelled_caught, "another tenant's stream gets nothing"
