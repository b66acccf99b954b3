"""The era bridge's other direction (issue 15): an upstream's own `input_required`, answered on behalf
of a handshake-era client by asking that client over its session's back-channel.

- An upstream that speaks only 2026-07-28 (it refuses `initialize`): discovery lists its tools, and a
  handshake-era client through ScaiLink's `/mcp` gets its sampling, elicitation (two rounds) and
  roots requests as server-to-client requests of its own call; the final result is the upstream's.
- An upstream that speaks both eras and answers `input_required` even in the handshake era: the
  same rounds, on the warm handshake-era session.
- A client that did not declare the capability gets a tool error naming it; an upstream that never
  stops asking is ended after the round limit. Neither is a 500 or a hang.
- A 2026-07-28 client through the same 2026-07-28-only upstream gets its `input_required` unchanged.

Real ScaiLink (`LiveApp`), real upstreams over HTTP on 127.0.0.1, the real Python SDK client.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import httpx2
import mcp_types as types
import pytest
from mcp.client.session import ClientRequestContext, ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import UNSUPPORTED_PROTOCOL_VERSION
from starlette.types import ASGIApp, Receive, Scope, Send

from scailink_mcp.era_reverse import MAX_INPUT_REQUESTS
from tests.conftest import LiveApp, TokenFactory, auth_headers
from tests.servers import ThreadedServer
from tests.test_era_bridge import modern_client
from tests.test_mcp_front import answered as front_answers
from tests.test_mcp_gateway import register

pytestmark = pytest.mark.anyio

MODERN = "2026-07-28"
ToolAnswer = types.CallToolResult | types.InputRequiredResult


def _form(message: str) -> types.ElicitRequest:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    return types.ElicitRequest(params=types.ElicitRequestFormParams(message=message, requested_schema=schema))


def _text(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=text)])


def _mrtr_server() -> MCPServer:
    """Asks for its client's input the 2026-07-28 way (`input_required`), in either era."""
    server = MCPServer("mrtr-only-upstream")

    @server.tool()
    async def ask_llm(question: str, ctx: Context) -> ToolAnswer:
        """Asks the client's LLM (one round of sampling)."""
        got = (ctx.input_responses or {}).get("llm")
        if got is None:
            message = types.SamplingMessage(role="user", content=types.TextContent(text=question))
            request = types.CreateMessageRequest(
                params=types.CreateMessageRequestParams(messages=[message], max_tokens=20)
            )
            return types.InputRequiredResult(input_requests={"llm": request}, request_state="asked-llm")
        assert ctx.request_state == "asked-llm"  # the upstream's own state came back unchanged
        return _text(f"llm said: {getattr(getattr(got, 'content', None), 'text', '')}")

    @server.tool()
    async def ask_user(ctx: Context) -> ToolAnswer:
        """Asks the user twice, one question per round (two rounds of elicitation)."""
        got, state = ctx.input_responses or {}, ctx.request_state or ""
        if state.startswith("2:") and "second" in got:  # each retry brings only its round's answers
            second = (getattr(got["second"], "content", None) or {}).get("name")
            return _text(f"user said: {state[2:]} / {second}")
        if state == "1" and "first" in got:
            first = (getattr(got["first"], "content", None) or {}).get("name")
            return types.InputRequiredResult(
                input_requests={"second": _form("Your name, again?")}, request_state=f"2:{first}"
            )
        return types.InputRequiredResult(input_requests={"first": _form("Your name?")}, request_state="1")

    @server.tool()
    async def list_my_roots(ctx: Context) -> ToolAnswer:
        """Lists the client's roots."""
        got = (ctx.input_responses or {}).get("roots")
        if got is None:
            return types.InputRequiredResult(input_requests={"roots": types.ListRootsRequest()})
        return _text("roots: " + ",".join(str(r.uri) for r in getattr(got, "roots", [])))

    @server.tool()
    async def never_done(ctx: Context) -> ToolAnswer:
        """Asks again every round, forever."""
        rounds = int(ctx.request_state or "0") + 1
        return types.InputRequiredResult(
            input_requests={"again": types.ListRootsRequest()}, request_state=str(rounds)
        )

    @server.tool()
    async def ask_too_much(ctx: Context) -> ToolAnswer:
        """One round of more input requests than ScaiLink relays."""
        many = {f"root_{i}": types.ListRootsRequest() for i in range(MAX_INPUT_REQUESTS + 1)}
        return types.InputRequiredResult(input_requests=many, request_state="many")

    @server.prompt()
    def framed(ctx: Context) -> str | types.InputRequiredResult:
        """A prompt whose topic the user names first (a prompt's own round)."""
        got = (ctx.input_responses or {}).get("topic")
        if got is None:
            return types.InputRequiredResult(input_requests={"topic": _form("Topic?")})
        return f"about {(getattr(got, 'content', None) or {}).get('name')}"

    @server.resource("note://{topic}")
    def note(topic: str, ctx: Context) -> str | types.InputRequiredResult:
        """A note whose author the user names first (a read's own round)."""
        got = (ctx.input_responses or {}).get("author")
        if got is None:
            return types.InputRequiredResult(input_requests={"author": _form("Author?")})
        return f"{topic} by {(getattr(got, 'content', None) or {}).get('name')}"

    return server


class _ModernOnly:
    """An upstream of the 2026-07-28 era only: anything without that era's version header (the
    `initialize` handshake, its GET stream) is refused, HTTP 400 with -32022 "Unsupported protocol
    version" naming the era it serves."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.refused = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or []) if scope["type"] == "http" else {}
        if scope["type"] == "http" and headers.get(b"mcp-protocol-version") != MODERN.encode():
            self.refused += 1
            error = {"code": UNSUPPORTED_PROTOCOL_VERSION, "message": "Unsupported protocol version"}
            error["data"] = {"supported": [MODERN], "requested": "2025-11-25"}
            body = json.dumps({"jsonrpc": "2.0", "id": None, "error": error}).encode()
            head = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 400, "headers": head})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


@pytest.fixture
def modern_only() -> Iterator[tuple[str, _ModernOnly]]:
    app = _ModernOnly(_mrtr_server().streamable_http_app())
    with ThreadedServer(app, timeout_graceful_shutdown=1) as server:
        yield f"{server.base_url}/mcp", app


@pytest.fixture
def dual_era() -> Iterator[str]:
    with ThreadedServer(_mrtr_server().streamable_http_app(), timeout_graceful_shutdown=1) as server:
        yield f"{server.base_url}/mcp"


asked: list[str] = []


async def _sampling(context: ClientRequestContext, params: types.CreateMessageRequestParams) -> Any:
    asked.append("sampling")
    text = params.messages[0].content.text  # type: ignore[union-attr]
    return types.CreateMessageResult(
        role="assistant", content=types.TextContent(text=f"echo {text}"), model="test-model"
    )


async def _elicitation(context: ClientRequestContext, params: Any) -> Any:
    asked.append(f"elicitation:{params.message}")
    return types.ElicitResult(
        action="accept", content={"name": "Ada" if "again" not in params.message else "Lovelace"}
    )


async def _roots(context: ClientRequestContext) -> Any:
    asked.append("roots")
    return types.ListRootsResult(roots=[types.Root(uri="file:///home/ada/project")])


@asynccontextmanager
async def handshake_session(url: str, tok: str, **callbacks: Any) -> AsyncIterator[ClientSession]:
    """A handshake-era `ClientSession` (it declares what it has callbacks for)."""
    with anyio.fail_after(60):
        async with (
            httpx2.AsyncClient(headers=auth_headers(tok), timeout=httpx2.Timeout(30, read=60)) as http,
            streamable_http_client(url, http_client=http) as (read, write),
            ClientSession(read, write, **callbacks) as session,
        ):
            await session.initialize()
            assert session.protocol_version not in (None, MODERN)
            yield session


ALL = {"sampling_callback": _sampling, "elicitation_callback": _elicitation, "list_roots_callback": _roots}


def _only_text(result: types.CallToolResult) -> str:
    assert not result.is_error, result
    block = result.content[0]
    assert isinstance(block, types.TextContent), result
    return block.text


def _error_code(result: types.CallToolResult) -> str:
    assert result.is_error, result
    code: str = (result.meta or {})["scailink/error"]["code"]
    return code


async def test_modern_only_upstream_asks_a_handshake_client_over_its_session(
    live: LiveApp, token: TokenFactory, modern_only: tuple[str, _ModernOnly]
) -> None:
    url, upstream = modern_only
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="mrtr-only", endpoint_url=url)
    ns = f"remote.u1.{server['slug']}"
    asked.clear()
    async with handshake_session(live.mcp_url, tok, **ALL) as s:
        # Discovery used the 2026-07-28 era: every tool of the upstream is listed.
        names = {t.name for t in (await s.list_tools()).tools}
        assert {f"{ns}.{n}" for n in ("ask_llm", "ask_user", "list_my_roots", "never_done")} <= names
        result = await s.call_tool(f"{ns}.ask_llm", {"question": "capital of France?"})
        assert _only_text(result) == "llm said: echo capital of France?"
        result = await s.call_tool(f"{ns}.ask_user", {})
        assert _only_text(result) == "user said: Ada / Lovelace"
        result = await s.call_tool(f"{ns}.list_my_roots", {})
        assert _only_text(result) == "roots: file:///home/ada/project"
    assert asked[:4] == ["sampling", "elicitation:Your name?", "elicitation:Your name, again?", "roots"]
    single = f"{live.base_url}/v1/modules/scailink/remote-servers/{server['id']}/mcp"
    async with handshake_session(single, tok, **ALL) as s:  # the per-server endpoint: upstream names
        assert _only_text(await s.call_tool("ask_user", {})) == "user said: Ada / Lovelace"
        prompt = await s.get_prompt("framed")
        block = prompt.messages[0].content
        assert isinstance(block, types.TextContent) and block.text == "about Ada"
    assert upstream.refused >= 1  # the handshake was tried and refused: the era was not assumed
    assert await live.parts.health.check(server["id"]) == "ok"  # no ping in that era: discover is the check


async def test_dual_era_upstream_is_called_in_the_caller_s_era(
    live: LiveApp, token: TokenFactory, dual_era: str
) -> None:
    """An upstream that speaks both eras serves a handshake-era caller in the handshake era (its warm
    session, its back-channel relayed live): what the caller gets is what it gets directly. Its
    `input_required`-only tool fails there directly too (the SDK refuses to send that result in the
    handshake era), and through ScaiLink it is an upstream error, never a 500 or a hang."""
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="dual", endpoint_url=dual_era)
    async with handshake_session(dual_era, tok, **ALL) as direct:
        with pytest.raises(MCPError) as err:
            await direct.call_tool("ask_llm", {"question": "q"})
        assert "invalid result" in err.value.error.message
    async with handshake_session(live.mcp_url, tok, **ALL) as s:
        result = await s.call_tool(f"remote.u1.{server['slug']}.ask_llm", {"question": "q"})
        assert _error_code(result) == "SCAILINK_UPSTREAM_ERROR"
        assert "invalid result" in str(result.content[0])
    # The same upstream through a 2026-07-28 caller is called in that era: its rounds pass through.
    async with modern_client(live.mcp_url, tok, **ALL) as c:
        result = await c.call_tool(f"remote.u1.{server['slug']}.ask_llm", {"question": "q"})
        assert _only_text(result) == "llm said: echo q"


async def test_client_without_the_capability_gets_a_clear_tool_error(
    live: LiveApp, token: TokenFactory, modern_only: tuple[str, _ModernOnly]
) -> None:
    url, _ = modern_only
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="mrtr-only", endpoint_url=url)
    ns = f"remote.u1.{server['slug']}"
    async with handshake_session(live.mcp_url, tok, sampling_callback=_sampling) as s:
        result = await s.call_tool(f"{ns}.ask_user", {})
        assert _error_code(result) == "SCAILINK_CLIENT_CAPABILITY_MISSING"
        text = result.content[0]
        assert isinstance(text, types.TextContent) and "elicitation" in text.text
        assert (result.meta or {})["scailink/error"]["message"].count("elicitation") >= 1
        # What it did declare still works on the same session.
        assert _only_text(await s.call_tool(f"{ns}.ask_llm", {"question": "q"})) == "llm said: echo q"
    # A client declaring none of them (its calls served by the `/mcp` front, not the SDK): the same.
    async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as metrics:
        before = await front_answers(metrics)
        async with handshake_session(live.mcp_url, tok) as s:
            result = await s.call_tool(f"{ns}.ask_llm", {"question": "q"})
        assert await front_answers(metrics) == before + 1
    assert _error_code(result) == "SCAILINK_CLIENT_CAPABILITY_MISSING"
    assert (result.meta or {})["scailink/error"]["message"].startswith(
        "the upstream needs the client's sampling"
    )
    # REST invoke has no back-channel at all: the same clear error, never a 500.
    async with httpx2.AsyncClient(base_url=live.base_url, timeout=30) as c:
        resp = await c.post(
            f"/v1/modules/scailink/users/u1/tools/{ns}.list_my_roots/invoke",
            json={"arguments": {}},
            headers=auth_headers(tok),
        )
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "SCAILINK_CLIENT_CAPABILITY_MISSING" and error["details"] == {
        "missing": ["roots"]
    }


async def test_an_upstream_that_never_stops_asking_is_ended(
    live: LiveApp, token: TokenFactory, modern_only: tuple[str, _ModernOnly]
) -> None:
    url, _ = modern_only
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="mrtr-only", endpoint_url=url)
    bridge = live.parts.invoker.backends.bridge
    assert bridge is not None and bridge.reverse.max_rounds == 8
    asked.clear()
    async with handshake_session(live.mcp_url, tok, **ALL) as s:
        result = await s.call_tool(f"remote.u1.{server['slug']}.never_done", {})
        assert _error_code(result) == "SCAILINK_UPSTREAM_ERROR"
        text = result.content[0]
        assert isinstance(text, types.TextContent) and "more than 8 rounds" in text.text
    assert asked == ["roots"] * 8  # asked once per round, then ended


async def test_a_round_of_too_many_input_requests_is_refused_before_asking(
    live: LiveApp, token: TokenFactory, modern_only: tuple[str, _ModernOnly]
) -> None:
    url, _ = modern_only
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="mrtr-only", endpoint_url=url)
    asked.clear()
    async with handshake_session(live.mcp_url, tok, **ALL) as s:
        result = await s.call_tool(f"remote.u1.{server['slug']}.ask_too_much", {})
        assert _error_code(result) == "SCAILINK_UPSTREAM_ERROR"
        text = result.content[0]
        assert isinstance(text, types.TextContent) and f"at most {MAX_INPUT_REQUESTS}" in text.text
    assert asked == []  # nothing was asked of the client


async def test_modern_client_through_a_modern_only_upstream_passes_through(
    live: LiveApp, token: TokenFactory, modern_only: tuple[str, _ModernOnly]
) -> None:
    url, _ = modern_only
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="mrtr-only", endpoint_url=url)
    async with modern_client(live.mcp_url, tok, **ALL) as c:  # the SDK client drives the rounds
        result = await c.call_tool(f"remote.u1.{server['slug']}.ask_user", {})
        assert _only_text(result) == "user said: Ada / Lovelace"


async def test_resource_read_rounds_of_a_modern_client_pass_through(
    live: LiveApp, token: TokenFactory, modern_only: tuple[str, _ModernOnly], dual_era: str
) -> None:
    """`resources/read` of a 2026-07-28 client: the upstream's `input_required` passes through (the
    SDK client drives the rounds) and the answer's URI is the one asked for."""
    tok = token("u1", "t1", ("tenant_user",))
    for name, url in (("mrtr-only", modern_only[0]), ("dual", dual_era)):
        server = await register(live, tok, name=name, endpoint_url=url)
        async with modern_client(live.mcp_url, tok, **ALL) as c:
            templates = (await c.list_resource_templates()).resource_templates
            public = next(t.uri_template for t in templates if server["slug"] in t.uri_template)
            uri = public.replace("{topic}", "ideas")
            result = await c.read_resource(uri)
            block = result.contents[0]
            assert isinstance(block, types.TextResourceContents), result
            assert block.text == "ideas by Ada" and str(block.uri) == uri
        single = f"{live.base_url}/v1/modules/scailink/remote-servers/{server['id']}/mcp"
        async with modern_client(single, tok, **ALL) as c:  # the per-server endpoint: upstream URIs
            block = (await c.read_resource("note://plans")).contents[0]
            assert isinstance(block, types.TextResourceContents) and block.text == "plans by Ada"


async def test_prompt_and_read_rounds_asked_of_a_handshake_client(
    live: LiveApp, token: TokenFactory, modern_only: tuple[str, _ModernOnly]
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="mrtr-only", endpoint_url=modern_only[0])
    asked.clear()
    async with handshake_session(live.mcp_url, tok, **ALL) as s:
        prompt = await s.get_prompt(f"remote.u1.{server['slug']}.framed")
        block = prompt.messages[0].content
        assert isinstance(block, types.TextContent) and block.text == "about Ada"
        templates = (await s.list_resource_templates()).resource_templates
        public = next(t.uri_template for t in templates if server["slug"] in t.uri_template)
        uri = public.replace("{topic}", "ideas")
        result = await s.read_resource(uri)
        text = result.contents[0]
        assert isinstance(text, types.TextResourceContents) and text.text == "ideas by Ada"
        assert str(text.uri) == uri
    assert asked == ["elicitation:Topic?", "elicitation:Author?"]
    async with handshake_session(live.mcp_url, tok, sampling_callback=_sampling) as s:
        with pytest.raises(MCPError) as err:  # prompts/get answers errors as JSON-RPC errors
            await s.get_prompt(f"remote.u1.{server['slug']}.framed")
        assert "SCAILINK_CLIENT_CAPABILITY_MISSING" in err.value.error.message
        assert "elicitation" in err.value.error.message
