"""`mcp_server.build_server` handlers driven in-process through the SDK's in-memory transport
(`mcp.Client(server)`), no HTTP on ScaiLink's side: the real `Components` of `build_components`
over a real (SQLite) database whose catalog rows are written the way discovery writes them.

The caller's identity: handlers read the `Principal` from the SDK's auth context
(`mcp.server.auth.middleware.auth_context.auth_context_var`, which `AuthContextMiddleware` sets for an
HTTP request). The in-memory transport carries the sender's context with every message, so setting
that variable around the client (to what `McpTokenVerifier` makes of a real token) is enough.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp import Client
from mcp.server.auth.middleware.auth_context import auth_context_var
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.shared.exceptions import MCPError

from scailink_mcp.app import Components, build_components
from scailink_mcp.catalog import PAGE_MAX_ITEMS
from scailink_mcp.config import Settings
from scailink_mcp.db import Database
from scailink_mcp.mcp_auth import McpTokenVerifier
from scailink_mcp.mcp_server import build_server
from scailink_mcp.models import RemoteServer, new_id, utcnow
from scailink_mcp.naming import slugify
from scailink_mcp.remote.discovery import DiscoveredItem, DiscoveryResult, store_discovery
from tests.conftest import TokenFactory

pytestmark = pytest.mark.anyio

INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
TIMEOUT_S = 30.0
ERAS = ["legacy", "2026-07-28"]  # the initialize handshake; the per-request era
TOOL = {"name": "echo", "description": "Echo.", "inputSchema": {"type": "object", "properties": {}}}
PROMPT = {"name": "greet", "description": "Greet.", "arguments": [{"name": "name", "required": True}]}
RESOURCE = {"name": "readme", "uri": "file:///notes/readme.md", "mimeType": "text/markdown"}
TEMPLATE = {"name": "note", "uriTemplate": "file:///notes/{name}", "mimeType": "text/markdown"}


@pytest.fixture
def closed_port_url() -> Iterator[str]:
    """An upstream URL on 127.0.0.1 that refuses connections at once (bound, never listening)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"


@asynccontextmanager
async def components(settings: Settings) -> AsyncIterator[Components]:
    """`build_components` on a migrated database, with the upstream pool running (as the lifespan runs
    it); the audit queue is flushed by the test that reads it."""
    db = Database(settings.effective_database_url)
    db.migrate()
    parts = build_components(settings, db)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(parts.pool.run)
            yield parts
            tg.cancel_scope.cancel()
    finally:
        db.dispose()


@pytest.fixture
async def parts(settings_factory: Callable[..., Settings]) -> AsyncIterator[Components]:
    async with components(settings_factory()) as built:
        yield built


@dataclass(frozen=True)
class Seeded:
    id: str
    slug: str

    @property
    def namespace(self) -> str:
        return f"remote.u1.{self.slug}"


async def seed(
    parts: Components,
    name: str,
    endpoint_url: str,
    *,
    tools: list[dict[str, Any]] | None = None,
    prompts: list[dict[str, Any]] | None = None,
    resources: list[dict[str, Any]] | None = None,
    templates: list[dict[str, Any]] | None = None,
) -> Seeded:
    """u1's personal server in tenant t1, with what a discovery saw, stored as discovery stores it;
    then the in-memory directory re-reads it (as on a registry event)."""
    items = [DiscoveredItem("tool", t["name"], t.get("description"), t) for t in tools or [TOOL]]
    items += [DiscoveredItem("prompt", p["name"], p.get("description"), p) for p in prompts or []]
    items += [DiscoveredItem("resource", r["uri"], None, r) for r in resources or []]
    items += [DiscoveredItem("resource_template", t["uriTemplate"], None, t) for t in templates or []]
    server_id = new_id()
    server = RemoteServer(
        id=server_id,
        tenant_id="t1",
        owner_user_id="u1",
        owner_scope="user:u1",
        name=name,
        slug=slugify(name, tenant_id="t1", owner_user_id="u1", server_id=server_id),
        endpoint_url=endpoint_url,
    )
    with parts.db.session() as session:
        session.add(server)
        session.flush()
        store_discovery(session, server, DiscoveryResult(items), now=utcnow(), retention_s=3600)
        session.commit()
    await parts.directory.refresh_server(server.id, server.tenant_id)
    return Seeded(server.id, server.slug)


@contextmanager
def signed_in(access: AccessToken | None) -> Iterator[None]:
    """The SDK's auth context set as `AuthContextMiddleware` sets it for an authenticated request
    (None: as for a request without a user)."""
    reset = auth_context_var.set(AuthenticatedUser(access) if access is not None else None)
    try:
        yield
    finally:
        auth_context_var.reset(reset)


@asynccontextmanager
async def client_as(
    parts: Components, tok: str | None, *, single: bool = False, era: str = "legacy"
) -> AsyncIterator[Client]:
    """An SDK client on a fresh handler set, in process, as the holder of `tok` (None: nobody).

    `era` "legacy" is the in-memory JSON-RPC transport with the initialize handshake; a modern
    version ("2026-07-28") is the SDK's direct per-request dispatch, without a handshake."""
    server = build_server(parts.mcp, single=single)
    access = await McpTokenVerifier(parts.verifier).verify_token(tok) if tok is not None else None
    assert tok is None or access is not None, "the test token must verify"
    with anyio.fail_after(TIMEOUT_S), signed_in(access):
        async with Client(server, mode=era, cache=None) as client:
            yield client


async def subscribe(client: Client, uri: str) -> types.EmptyResult:
    # `Client.subscribe_resource` warns (removed from 2026-07-28 on); the same request.
    request = types.SubscribeRequest(params=types.SubscribeRequestParams(uri=uri))
    return await client.session.send_request(request, types.EmptyResult)


async def all_tools(client: Client) -> tuple[list[str], int]:
    """Every tool name, following `nextCursor`, and how many pages that took."""
    names: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        page = await client.list_tools(cursor=cursor)
        pages += 1
        names += [t.name for t in page.tools]
        cursor = page.next_cursor
        if not cursor:
            return names, pages


async def test_no_authenticated_user_is_refused(parts: Components, closed_port_url: str) -> None:
    """Without a principal in the auth context every scoped request is -32600 "not authenticated"."""
    await seed(parts, "refused", closed_port_url)
    async with client_as(parts, None) as client:
        requests: list[Callable[[], Any]] = [
            client.list_tools,
            client.list_prompts,
            client.list_resources,
            lambda: client.call_tool("remote.u1.refused.echo", {}),
        ]
        for send in requests:
            with pytest.raises(MCPError) as err:
                await send()
            assert (err.value.error.code, err.value.error.message) == (INVALID_REQUEST, "not authenticated")


@pytest.mark.parametrize("era", ERAS)
async def test_the_catalog_is_namespaced_per_principal(
    parts: Components, token: TokenFactory, closed_port_url: str, era: str
) -> None:
    """The aggregate lists u1's server under `remote.u1.<slug>` (tools, prompts) and `scailink://`
    URIs (resources, templates, the template's `{}` kept); another user of the tenant sees none of it."""
    server = await seed(
        parts, "Notes", closed_port_url, prompts=[PROMPT], resources=[RESOURCE], templates=[TEMPLATE]
    )
    ns = server.namespace
    async with client_as(parts, token("u1", "t1", ("tenant_user",)), era=era) as client:
        tools = (await client.list_tools()).tools
        assert [t.model_dump(by_alias=True, exclude_none=True) for t in tools] == [
            {**TOOL, "name": f"{ns}.echo"}
        ]
        prompts = (await client.list_prompts()).prompts
        assert [p.model_dump(by_alias=True, exclude_none=True) for p in prompts] == [
            {**PROMPT, "name": f"{ns}.greet"}
        ]
        resources = (await client.list_resources()).resources
        assert [str(r.uri) for r in resources] == [f"scailink://{ns}/file%3A%2F%2F%2Fnotes%2Freadme.md"]
        templates = (await client.list_resource_templates()).resource_templates
        assert [t.uri_template for t in templates] == [f"scailink://{ns}/file%3A%2F%2F%2Fnotes%2F{{name}}"]
    async with client_as(parts, token("u2", "t1", ("tenant_user",)), era=era) as other:
        assert (await other.list_tools()).tools == []
        assert (await other.list_prompts()).prompts == []
        assert (await other.list_resources()).resources == []
        assert (await other.list_resource_templates()).resource_templates == []


async def test_tools_list_pages_and_cursors(
    parts: Components, token: TokenFactory, closed_port_url: str
) -> None:
    """More tools than one page holds: pages of PAGE_MAX_ITEMS in name order joined by `nextCursor`;
    a forged cursor is -32602 "invalid cursor", a cursor past the last page an empty page."""
    count = 2 * PAGE_MAX_ITEMS + 7
    tools = [{**TOOL, "name": f"t{i:04d}"} for i in range(count)]
    server = await seed(parts, "many", closed_port_url, tools=tools)
    async with client_as(parts, token("u1", "t1", ("tenant_user",))) as client:
        names, pages = await all_tools(client)
        assert pages == 3
        assert names == [f"{server.namespace}.t{i:04d}" for i in range(count)]
        first = await client.list_tools()
        assert len(first.tools) == PAGE_MAX_ITEMS and first.next_cursor
        for forged in ("not base64!", "eDE=", "cC0x", "cA=="):  # garbage, b"x1", b"p-1", b"p"
            with pytest.raises(MCPError) as err:
                await client.list_tools(cursor=forged)
            assert (err.value.error.code, err.value.error.message) == (INVALID_PARAMS, "invalid cursor")
        past = await client.list_tools(cursor="cDk5")  # b"p99": a well-formed cursor past the end
        assert past.tools == [] and past.next_cursor is None


async def test_unknown_names_are_invalid_params(
    parts: Components, token: TokenFactory, closed_port_url: str
) -> None:
    """The aggregate resolves names itself: an unknown tool, prompt or resource URI (another
    namespace, or not a `scailink://` URI at all) is -32602 without any upstream; the unknown tool
    call is audited as SCAILINK_TOOL_NOT_FOUND."""
    server = await seed(parts, "known", closed_port_url, prompts=[PROMPT], resources=[RESOURCE])
    ns = server.namespace
    async with client_as(parts, token("u1", "t1", ("tenant_user",))) as client:
        cases: list[tuple[Callable[[], Any], str]] = [
            (lambda: client.call_tool(f"{ns}.nope", {}), f"Unknown tool: {ns}.nope"),
            (lambda: client.get_prompt(f"{ns}.nope"), f"Unknown prompt: {ns}.nope"),
            (lambda: client.get_prompt("greet"), "Unknown prompt: greet"),  # the upstream name alone
            (
                lambda: client.read_resource("scailink://remote.u9.x/y"),
                "Unknown resource: scailink://remote.u9.x/y",
            ),
            (
                lambda: client.read_resource("file:///notes/readme.md"),
                "Unknown resource: file:///notes/readme.md",
            ),
            (lambda: subscribe(client, "scailink://nope/z"), "Unknown resource: scailink://nope/z"),
        ]
        for send, message in cases:
            with pytest.raises(MCPError) as err:
                await send()
            assert (err.value.error.code, err.value.error.message) == (INVALID_PARAMS, message)
    await parts.audit.flush()
    entries, _ = await parts.audit.query("t1", event="tool_call")
    assert [(e["target"], e["outcome"], e["error_code"]) for e in entries] == [
        (f"{ns}.nope", "error", "SCAILINK_TOOL_NOT_FOUND")
    ]


@pytest.mark.parametrize("era", ERAS)
async def test_calls_check_permission_before_the_upstream(
    parts: Components, token: TokenFactory, closed_port_url: str, era: str
) -> None:
    """A viewer (no `scailink:invoke`) sees the tool but its call is an isError SCAILINK_FORBIDDEN
    result, decided before any connection; a user who may invoke reaches the (refusing) upstream and
    gets SCAILINK_UPSTREAM_ERROR instead. From 2026-07-28 on a result says `resultType: complete`."""
    server = await seed(parts, "guarded", closed_port_url)
    name = f"{server.namespace}.echo"
    async with client_as(parts, token("u1", "t1", ("tenant_viewer",)), era=era) as viewer:
        assert [t.name for t in (await viewer.list_tools()).tools] == [name]
        denied = await viewer.call_tool(name, {"text": "x"})
    assert denied.is_error
    assert denied.content == [
        types.TextContent(text="SCAILINK_FORBIDDEN: missing permission scailink:invoke")
    ]
    assert (denied.meta or {})["scailink/error"] == {
        "code": "SCAILINK_FORBIDDEN",
        "message": "missing permission scailink:invoke",
    }
    async with client_as(parts, token("u1", "t1", ("tenant_user",)), era=era) as user:
        failed = await user.call_tool(name, {"text": "x"})
    assert failed.is_error
    if era != "legacy":
        assert (denied.result_type, failed.result_type) == ("complete", "complete")
    assert (failed.meta or {})["scailink/error"]["code"] == "SCAILINK_UPSTREAM_ERROR"


async def test_upstream_failures_of_reads_and_prompts_are_json_rpc_errors(
    parts: Components, token: TokenFactory, closed_port_url: str
) -> None:
    """resources/read and prompts/get of a known item whose upstream refuses connections are
    -32600 errors carrying SCAILINK_UPSTREAM_ERROR (not isError results: those are for tools)."""
    server = await seed(parts, "down", closed_port_url, prompts=[PROMPT], resources=[RESOURCE])
    ns = server.namespace
    async with client_as(parts, token("u1", "t1", ("tenant_user",))) as client:
        requests: list[Callable[[], Any]] = [
            lambda: client.read_resource(f"scailink://{ns}/file%3A%2F%2F%2Fnotes%2Freadme.md"),
            lambda: client.get_prompt(f"{ns}.greet", {"name": "Ada"}),
        ]
        for send in requests:
            with pytest.raises(MCPError) as err:
                await send()
            assert err.value.error.code == INVALID_REQUEST
            assert err.value.error.message.startswith(
                "SCAILINK_UPSTREAM_ERROR: cannot connect to the upstream MCP server"
            ), err.value.error.message


async def test_the_per_server_handlers_need_the_request_path(
    parts: Components, token: TokenFactory, closed_port_url: str
) -> None:
    """The per-server handler set takes its server id from the HTTP route; without a request (here,
    in memory) no server is in scope, so even the owner gets -32602 "unknown server", never a default."""
    await seed(parts, "pathless", closed_port_url, prompts=[PROMPT])
    async with client_as(parts, token("u1", "t1", ("tenant_user",)), single=True) as client:
        requests: list[Callable[[], Any]] = [client.list_tools, client.list_prompts, client.list_resources]
        for send in requests:
            with pytest.raises(MCPError) as err:
                await send()
            assert (err.value.error.code, err.value.error.message) == (INVALID_PARAMS, "unknown server")
        assert client.server_capabilities.completions is not None, "completion is offered per server"
