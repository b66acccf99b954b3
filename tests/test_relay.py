"""Server-to-client requests and notifications from an upstream reach the downstream caller:
sampling, elicitation, roots, logging and progress, through ScaiLink's `/mcp`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import mcp_types as types
import pytest
from mcp.client.session import ClientRequestContext, ClientSession
from mcp.server.mcpserver import Context, MCPServer
from pydantic import BaseModel

from tests.conftest import LiveApp, TokenFactory
from tests.servers import ThreadedServer
from tests.test_mcp_gateway import mcp_client, register

pytestmark = pytest.mark.anyio


def _asking_server() -> MCPServer:
    server = MCPServer("asking-upstream")

    @server.tool()
    async def ask_llm(question: str, ctx: Context) -> str:
        """Asks the client's LLM (sampling)."""
        result = await ctx.session.create_message(
            messages=[
                types.SamplingMessage(role="user", content=types.TextContent(type="text", text=question))
            ],
            max_tokens=20,
            related_request_id=ctx.request_id,
        )
        return f"llm said: {result.content.text}"  # type: ignore[union-attr]

    @server.tool()
    async def ask_user(ctx: Context) -> str:
        """Asks the user (elicitation)."""
        answer = await ctx.elicit("Your name?", schema=_Name)
        return f"user said: {answer.action} {getattr(answer, 'data', None)}"

    @server.tool()
    async def roots_and_logs(ctx: Context) -> str:
        """Lists the client's roots, logs and reports progress."""
        await ctx.info("working on it")
        await ctx.report_progress(1, 2, "half")
        roots = await ctx.session.list_roots()
        return "roots: " + ",".join(str(r.uri) for r in roots.roots)

    return server


class _Name(BaseModel):
    name: str


@pytest.fixture
def asking_upstream() -> Iterator[str]:
    with ThreadedServer(_asking_server().streamable_http_app(), timeout_graceful_shutdown=1) as server:
        yield f"{server.base_url}/mcp"


async def test_sampling_elicitation_roots_logging_progress(
    live: LiveApp, token: TokenFactory, asking_upstream: str
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="asking", endpoint_url=asking_upstream)
    ns = f"remote.u1.{server['slug']}"
    seen: dict[str, Any] = {"logs": [], "progress": []}

    async def sampling(context: ClientRequestContext, params: types.CreateMessageRequestParams) -> Any:
        seen["sampling"] = params.messages[0].content.text  # type: ignore[union-attr]
        return types.CreateMessageResult(
            role="assistant", content=types.TextContent(type="text", text="forty-two"), model="test-model"
        )

    async def elicitation(context: ClientRequestContext, params: Any) -> Any:
        seen["elicitation"] = params.message
        return types.ElicitResult(action="accept", content={"name": "Ada"})

    async def roots(context: ClientRequestContext) -> Any:
        return types.ListRootsResult(roots=[types.Root(uri="file:///home/ada/project")])

    async def logging_cb(params: types.LoggingMessageNotificationParams) -> None:
        seen["logs"].append(params.data)

    async def progress(p: float, total: float | None, message: str | None) -> None:
        seen["progress"].append((p, total, message))

    import httpx2
    from mcp.client.streamable_http import streamable_http_client

    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {tok}"}, timeout=30) as http,
        streamable_http_client(live.mcp_url, http_client=http) as (read, write),
        ClientSession(
            read,
            write,
            sampling_callback=sampling,
            elicitation_callback=elicitation,
            list_roots_callback=roots,
            logging_callback=logging_cb,
        ) as s,
    ):
        await s.initialize()
        result = await s.call_tool(f"{ns}.ask_llm", {"question": "meaning of life?"})
        assert result.content[0].text == "llm said: forty-two", result  # type: ignore[union-attr]
        assert seen["sampling"] == "meaning of life?"
        result = await s.call_tool(f"{ns}.ask_user", {})
        assert "accept" in result.content[0].text and "Ada" in result.content[0].text  # type: ignore[union-attr]
        assert seen["elicitation"] == "Your name?"
        result = await s.call_tool(f"{ns}.roots_and_logs", {}, progress_callback=progress)
        assert result.content[0].text == "roots: file:///home/ada/project"  # type: ignore[union-attr]
        assert seen["logs"] == ["working on it"]
        assert seen["progress"] == [(1.0, 2.0, "half")]


async def test_relay_refused_when_the_client_lacks_the_capability(
    live: LiveApp, token: TokenFactory, asking_upstream: str
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="asking2", endpoint_url=asking_upstream)
    async with mcp_client(live.mcp_url, tok) as s:
        result = await s.call_tool(f"remote.u1.{server['slug']}.ask_llm", {"question": "q"})
        assert result.is_error


def _subscribable_server() -> Any:
    from mcp.server.lowlevel.server import Server

    subscribed: dict[str, Any] = {}
    uri = "file:///watched.txt"

    async def list_resources(ctx: Any, params: Any) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=[types.Resource(uri=uri, name="watched")])

    async def read_resource(ctx: Any, params: Any) -> types.ReadResourceResult:
        return types.ReadResourceResult(contents=[types.TextResourceContents(uri=uri, text="v1")])

    async def subscribe(ctx: Any, params: types.SubscribeRequestParams) -> types.EmptyResult:
        subscribed[str(params.uri)] = ctx.session
        return types.EmptyResult()

    async def unsubscribe(ctx: Any, params: types.UnsubscribeRequestParams) -> types.EmptyResult:
        subscribed.pop(str(params.uri), None)
        return types.EmptyResult()

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[types.Tool(name="touch", input_schema={"type": "object"})])

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        for watched, session in list(subscribed.items()):
            await session.send_resource_updated(watched)
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=f"touched {len(subscribed)}")]
        )

    return Server(
        "subscribable",
        on_list_resources=list_resources,
        on_read_resource=read_resource,
        on_subscribe_resource=subscribe,
        on_unsubscribe_resource=unsubscribe,
        on_list_tools=list_tools,
        on_call_tool=call_tool,
    )


@pytest.fixture
def subscribable_upstream() -> Iterator[str]:
    with ThreadedServer(_subscribable_server().streamable_http_app(), timeout_graceful_shutdown=1) as server:
        yield f"{server.base_url}/mcp"


async def test_resource_subscription_relay(
    live: LiveApp, token: TokenFactory, subscribable_upstream: str
) -> None:
    import anyio

    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="subs", endpoint_url=subscribable_upstream)
    updates: list[str] = []

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ResourceUpdatedNotification):
            updates.append(str(message.params.uri))

    async with mcp_client(live.mcp_url, tok, on_message=on_message) as s:
        resources = (await s.list_resources()).resources
        public = str(resources[0].uri)
        assert public.startswith(f"scailink://remote.u1.{server['slug']}/")
        await s.subscribe_resource(public)
        touched = await s.call_tool(f"remote.u1.{server['slug']}.touch", {})
        assert touched.content[0].text == "touched 1"  # type: ignore[union-attr]
        with anyio.fail_after(10):
            while not updates:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        assert updates == [public]
        # a refresh recycles the pooled upstream session: the subscription survives the new handshake
        import httpx

        async with httpx.AsyncClient(base_url=live.base_url) as c:
            refreshed = await c.post(
                f"/v1/modules/scailink/remote-servers/{server['id']}/refresh",
                headers={"Authorization": f"Bearer {tok}"},
            )
            assert refreshed.status_code == 200
        touched = await s.call_tool(f"remote.u1.{server['slug']}.touch", {})
        assert touched.content[0].text == "touched 1"  # type: ignore[union-attr]
        with anyio.fail_after(10):
            while len(updates) < 2:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        await s.unsubscribe_resource(public)
        touched = await s.call_tool(f"remote.u1.{server['slug']}.touch", {})
        assert touched.content[0].text == "touched 0"  # type: ignore[union-attr]
