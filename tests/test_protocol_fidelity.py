"""Protocol fidelity through `/mcp` (issue 15): what an agent gets through ScaiLink equals what it gets
from the upstream directly, in both eras: the handshake era (2025-11-25, `initialize`) and the
per-request era (2026-07-28, `server/discover`). Real ScaiLink on 127.0.0.1 (`LiveApp`), real
upstream MCP servers (`tests/upstream.py`), the real SDK client over Streamable HTTP.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.lowlevel import Server
from mcp.shared.exceptions import MCPError

from scailink_mcp import __version__
from tests.conftest import LiveApp, TokenFactory, auth_headers
from tests.servers import ThreadedServer
from tests.test_desktop_bridge import ECHO, device, serve_tools
from tests.test_mcp_gateway import list_all_tools, register
from tests.test_single_server_handlers import CompletingUpstream, set_level
from tests.upstream import HttpPolicy, RequestLog, ToolCall, UpstreamServer, build_app

pytestmark = pytest.mark.anyio

Era = Literal["2025-11-25", "2026-07-28"]
ERAS: tuple[Era, ...] = ("2025-11-25", "2026-07-28")
COMPAT = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer() as server:
        yield server


@pytest.fixture(params=ERAS)
def era(request: pytest.FixtureRequest) -> Era:
    value: Era = request.param
    return value


@asynccontextmanager
async def client(
    url: str, tok: str, era: Era, *, query: str = "", on_message: Any = None, **options: Any
) -> AsyncIterator[ClientSession]:
    """An SDK client of `url` in `era`: `initialize()` (2025-11-25) or `discover()` (2026-07-28)."""
    with anyio.fail_after(60):
        async with (
            httpx2.AsyncClient(headers=auth_headers(tok), timeout=httpx2.Timeout(30, read=60)) as http,
            streamable_http_client(url + query, http_client=http) as (read, write),
            ClientSession(read, write, message_handler=on_message, **options) as session,
        ):
            if era == "2026-07-28":
                await session.discover()
            else:
                await session.initialize()
            assert session.protocol_version == era
            yield session


# --- 1. compat names ------------------------------------------------------------------------------

LONG_OWN_NAME = "create_review_comment_reply"  # fits alone, not after the long prefix
TOO_LONG_OWN_NAME = "a_tool_with_a_quite_long_name_that_pushes_the_total_over_the_limit"  # 67 chars


async def test_compat_names_keep_the_tools_own_name(
    live: LiveApp, token: TokenFactory, upstream: UpstreamServer, era: Era
) -> None:
    """A compat name over 64 chars gives up part of its namespace (an 8-char hash stands for it), never
    the tool's own name unless that alone is too long; every name is callable, and stable."""
    tok = token("u1", "t1", ("tenant_user",))
    upstream.add_tool(LONG_OWN_NAME)
    upstream.add_tool(TOO_LONG_OWN_NAME)
    server = await register(live, tok, name="a server with a rather long name", endpoint_url=upstream.url)
    prefix = f"remote__u1__{server['slug']}__"
    assert len(prefix) + len(LONG_OWN_NAME) > 64
    async with client(live.mcp_url, tok, era, query="?names=compat") as s:
        tools = {t.name: t for t in await list_all_tools(s)}
        assert all(COMPAT.match(name) for name in tools), list(tools)
        assert f"{prefix}echo" in tools
        long_one = next(name for name in tools if LONG_OWN_NAME in name)
        assert long_one.endswith(f"__{LONG_OWN_NAME}") and len(long_one) == 64, long_one
        assert long_one.startswith("remote__u1__a-server-with")
        hashed = long_one[: -len(LONG_OWN_NAME) - 2].rpartition("_")[2]
        assert re.fullmatch("[a-z2-7]{8}", hashed), long_one
        too_long = next(name for name in tools if "quite" in name)
        assert len(too_long) == 64 and too_long.endswith(TOO_LONG_OWN_NAME[:54])
        for name in (long_one, too_long):
            result = await s.call_tool(name, {"text": "t"})
            assert not result.is_error, result
            called = json.loads(result.content[0].text)  # type: ignore[union-attr]
            assert called["tool"] in (LONG_OWN_NAME, TOO_LONG_OWN_NAME)
    live.parts.catalog._views.clear()  # a rebuilt catalog gives the same names
    async with client(live.mcp_url, tok, era, query="?names=compat") as s:
        assert sorted(t.name for t in await list_all_tools(s)) == sorted(tools)


async def test_compat_names_of_desktop_tools(live: LiveApp, token: TokenFactory, era: Era) -> None:
    """A desktop device's prefix is short (its slug's readable part is at most 16 chars), so an
    ordinary tool name stays plain: `desktop__u1__ada-s-laptop-xxxxxx__read_multiple_files`."""
    tok = token("u1", "t1", ("tenant_user",))
    tool = {**ECHO, "name": "read_multiple_files_at_once"}
    results: dict[str, Any] = {}
    async with (
        device(live, tok, device_name="Ada's Laptop Computer (work)", capabilities={"tools": [tool]}) as (
            ws,
            ack,
        ),
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(serve_tools, ws, results)
        assert re.fullmatch(r"desktop\.u1\.ada-s-laptop-[0-9a-f]{6}", ack["namespace"]), ack["namespace"]
        async with client(live.mcp_url, tok, era, query="?names=compat") as s:
            names = [t.name for t in await list_all_tools(s)]
            plain = ack["namespace"].replace(".", "__") + "__read_multiple_files_at_once"
            assert names == [plain] and len(plain) < 64
            result = await s.call_tool(plain, {"text": "from a desktop"})
            assert not result.is_error and results["calls"] == ["read_multiple_files_at_once"]
        tg.cancel_scope.cancel()


# --- 3. one server name -----------------------------------------------------------------------------


async def test_both_endpoints_name_themselves_scailink(
    live: LiveApp, token: TokenFactory, upstream: UpstreamServer, era: Era
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="named", endpoint_url=upstream.url)
    infos = []
    for url in (live.mcp_url, f"{live.base_url}/v1/modules/scailink/remote-servers/{server['id']}/mcp"):
        async with client(url, tok, era) as s:
            assert s.server_info is not None
            infos.append(s.server_info)
    assert [i.name for i in infos] == ["scailink", "scailink"]
    assert [i.version for i in infos] == [__version__, __version__]
    assert infos[0].title != infos[1].title


# --- 4. completions and logging on /mcp -------------------------------------------------------------

ARG_A = {"name": "name", "value": "A"}
ARG_G = {"name": "name", "value": "G"}


@pytest.fixture
def completing() -> Iterator[CompletingUpstream]:
    with CompletingUpstream() as server:
        yield server


async def test_completion_and_log_level_through_mcp(
    live: LiveApp, token: TokenFactory, completing: CompletingUpstream, era: Era
) -> None:
    """`/mcp` advertises both; a completion is routed by the namespaced prompt name or the scailink://
    template URI and reaches the upstream with its own name/URI; a log level reaches the caller's
    upstreams and is set again on a session the pool reopens."""
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="completing", endpoint_url=completing.url)
    ns = f"remote.u1.{server['slug']}"
    async with client(live.mcp_url, tok, era) as s:
        caps = s.server_capabilities
        assert caps is not None and caps.completions is not None and caps.logging is not None
        prompt_ref = types.PromptReference(name=f"{ns}.greet")
        answer = await s.complete(prompt_ref, ARG_A)
        assert answer.completion.values == ["Ada", "Alan"] and answer.completion.has_more
        template = next(t for t in (await s.list_resource_templates()).resource_templates if t.name == "note")
        assert template.uri_template.startswith(f"scailink://{ns}/")
        answer = await s.complete(types.ResourceTemplateReference(uri=template.uri_template), ARG_G)
        assert answer.completion.values == ["Grace"]
        with completing.seen.lock:
            refs = [c.ref for c in completing.seen.completions]
        assert refs == [
            types.PromptReference(name="greet"),
            types.ResourceTemplateReference(uri="file:///notes/{name}"),
        ]
        with pytest.raises(MCPError) as unknown:
            await s.complete(types.PromptReference(name="remote.u1.nope-000000.greet"), ARG_A)
        assert unknown.value.error.code == -32602

        if era == "2026-07-28":  # no such method in this era (a request carries its own log level)
            with pytest.raises(MCPError) as gone:
                await set_level(s, "debug")
            assert gone.value.error.code == -32601 and completing.seen.levels == []
            return
        await set_level(s, "debug")
        assert completing.seen.levels == ["debug"]
        assert await live.parts.pool.close_server(server["id"]) == 1
        await s.complete(prompt_ref, ARG_A)  # a new pooled session, told the level again
        assert completing.seen.levels == ["debug", "debug"]


# --- 5. resource URIs both ways ---------------------------------------------------------------------


def _linking_tool(upstream: UpstreamServer) -> None:
    async def links(call: ToolCall) -> types.CallToolResult:
        return types.CallToolResult(
            content=[
                types.TextContent(text="two notes"),
                types.ResourceLink(name="readme", uri="file:///notes/readme.md", mime_type="text/markdown"),
                types.EmbeddedResource(
                    resource=types.TextResourceContents(uri="file:///notes/todo.md", text="inline copy")
                ),
            ]
        )

    upstream.add_tool(
        types.Tool(name="links", description="links", input_schema={"type": "object", "properties": {}}),
        links,
    )


async def test_every_resource_uri_reads_back_through_mcp(
    live: LiveApp, token: TokenFactory, upstream: UpstreamServer, era: Era
) -> None:
    """resources/read answers with the scailink:// URI asked; resource links and embedded resources of
    a tool result carry scailink:// URIs that read back through /mcp to the upstream's content."""
    _linking_tool(upstream)
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="linking", endpoint_url=upstream.url)
    ns = f"remote.u1.{server['slug']}"
    async with client(live.mcp_url, tok, era) as s:
        listed = {str(r.uri) for r in (await s.list_resources()).resources}
        readme = next(uri for uri in listed if uri.endswith("readme.md"))
        read = await s.read_resource(readme)
        assert [str(c.uri) for c in read.contents] == [readme]
        result = await s.call_tool(f"{ns}.links", {})
        link, embedded = result.content[1], result.content[2]
        assert isinstance(link, types.ResourceLink) and isinstance(embedded, types.EmbeddedResource)
        assert str(link.uri) == readme
        assert str(embedded.resource.uri) in listed and str(embedded.resource.uri).startswith("scailink://")
        todo = await s.read_resource(str(embedded.resource.uri))
        assert [str(c.uri) for c in todo.contents] == [str(embedded.resource.uri)]
        assert todo.contents[0].text.startswith("- [ ] write tests")  # type: ignore[union-attr]
    per_server = f"{live.base_url}/v1/modules/scailink/remote-servers/{server['id']}/mcp"
    async with client(per_server, tok, era) as s:  # upstream URIs unchanged there
        result = await s.call_tool("links", {})
        assert str(result.content[1].uri) == "file:///notes/readme.md"  # type: ignore[union-attr]
        read = await s.read_resource("file:///notes/readme.md")
        assert [str(c.uri) for c in read.contents] == ["file:///notes/readme.md"]


# --- 6. the client capabilities ScaiLink declares upstream --------------------------------------------


class GatedUpstream(ThreadedServer):
    """Offers `always` to everyone and `needs_<capability>` only to clients declaring that capability
    (as `@modelcontextprotocol/server-everything` does); calling a tool not offered is "Unknown tool"."""

    GATES = ("sampling", "elicitation", "roots")

    def __init__(self) -> None:
        server: Server[Any] = Server("gated", on_list_tools=self._list, on_call_tool=self._call)
        super().__init__(build_app(server, RequestLog(), HttpPolicy(), json_response=False, stateless=False))

    @property
    def url(self) -> str:
        return f"{self.base_url}/mcp"

    def offered(self, ctx: Any) -> list[types.Tool]:
        caps = ctx.session.client_capabilities
        names = ["always"] + [f"needs_{g}" for g in self.GATES if caps is not None and getattr(caps, g)]
        return [types.Tool(name=n, input_schema={"type": "object", "properties": {}}) for n in names]

    async def _list(self, ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        return types.ListToolsResult(tools=self.offered(ctx))

    async def _call(self, ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        if params.name not in {t.name for t in self.offered(ctx)}:
            raise MCPError(types.INVALID_PARAMS, f"Unknown tool: {params.name}")
        return types.CallToolResult(content=[types.TextContent(text=f"called {params.name}")])


async def _never(*args: Any) -> Any:
    raise AssertionError("not asked")


async def test_discovery_lists_what_a_capable_client_is_offered(
    live: LiveApp, token: TokenFactory, era: Era
) -> None:
    """Discovery and pooled sessions declare sampling, elicitation and roots: ScaiLink lists exactly
    the tools the upstream offers a client declaring the same, and each of them is callable."""
    tok = token("u1", "t1", ("tenant_user",))
    with GatedUpstream() as gated:
        capable = {"sampling_callback": _never, "elicitation_callback": _never, "list_roots_callback": _never}
        async with client(gated.url, tok, "2025-11-25", **capable) as direct:
            offered = sorted(t.name for t in (await direct.list_tools()).tools)
        async with client(gated.url, tok, "2025-11-25") as bare:
            assert [t.name for t in (await bare.list_tools()).tools] == ["always"]  # the gate is real
        assert offered == ["always", "needs_elicitation", "needs_roots", "needs_sampling"]
        server = await register(live, tok, name="gated", endpoint_url=gated.url)
        ns = f"remote.u1.{server['slug']}"
        # 2026-07-28 has no session: an upstream that speaks it is called in that era with the calling
        # client's own capabilities (era_bridge.py), so a client calls what it would be offered directly.
        caller = capable if era == "2026-07-28" else {}
        async with client(live.mcp_url, tok, era, **caller) as s:
            through = sorted(t.name for t in await list_all_tools(s))
            assert through == [f"{ns}.{name}" for name in offered]
            for name in offered:
                result = await s.call_tool(f"{ns}.{name}", {})
                assert not result.is_error and result.content[0].text == f"called {name}"  # type: ignore[union-attr]
        if era == "2026-07-28":  # a client declaring nothing gets what it gets directly: "Unknown tool"
            async with client(gated.url, tok, era) as direct, client(live.mcp_url, tok, era) as bare:
                for name in ("needs_sampling", "needs_elicitation", "needs_roots"):
                    with pytest.raises(MCPError) as directly:
                        await direct.call_tool(name, {})
                    with pytest.raises(MCPError) as through_scailink:
                        await bare.call_tool(f"{ns}.{name}", {})
                    assert through_scailink.value.error == directly.value.error


# --- 7. desktop progress and resource templates -------------------------------------------------------


async def test_desktop_progress_and_templates(live: LiveApp, token: TokenFactory, era: Era) -> None:
    """The reference desktop client over a real WebSocket, with a real stdio server: a tool's progress
    reaches the caller's progressToken (`scailink/progress` frames), and the device's resource
    templates are listed under scailink:// URIs that expand and read back through the device."""
    from scailink_mcp.desktop.client import DesktopClient
    from tests.test_desktop_client import live_ws_url, local, running

    tok = token("u1", "t1", ("tenant_user",))
    device_client = DesktopClient(
        live_ws_url(live), tok, {"local": local()}, device_name="Ada", device_id=f"dev-progress-{era}"
    )
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with running(device_client) as run:
        with anyio.fail_after(30):
            await device_client.connected.wait()
        ns = device_client.namespace
        async with client(live.mcp_url, tok, era) as s:
            result = await s.call_tool(f"{ns}.count", {"n": 3}, progress_callback=on_progress)
            assert not result.is_error and result.content[0].text == "counted to 3"  # type: ignore[union-attr]
            assert seen == [(1.0, 3.0, "step 1"), (2.0, 3.0, "step 2"), (3.0, 3.0, "step 3")]
            plain = await s.call_tool(f"{ns}.count", {"n": 2})  # no token: no progress asked
            assert not plain.is_error and len(seen) == 3

            templates = (await s.list_resource_templates()).resource_templates
            assert [t.uri_template for t in templates] == [f"scailink://{ns}/note%3A%2F%2Flocal%2F{{name}}"]
            assert templates[0].name == "notes" and templates[0].mime_type == "text/plain"
            uri = templates[0].uri_template.replace("{name}", "ideas")
            read = await s.read_resource(uri)
            assert [str(c.uri) for c in read.contents] == [uri]
            assert read.contents[0].text == "note ideas from local"  # type: ignore[union-attr]
            with pytest.raises(MCPError):  # the device's server refuses what no template or resource has
                await s.read_resource(f"scailink://{ns}/other%3A%2F%2Fx")
        await device_client.stop()
    assert run.error is None
