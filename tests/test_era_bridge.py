"""The era bridge (issue 15): a 2026-07-28 client through ScaiLink's `/mcp` and per-server endpoint.

- A handshake-era upstream (it refuses the 2026-07-28 era, as SDK 1.x servers do) asks for sampling,
  elicitation and roots mid-call over its back-channel; the 2026-07-28 client gets `input_required`
  and its retry completes the pending upstream call (the real SDK `Client` drives the rounds).
- An upstream that speaks 2026-07-28 and answers `input_required` itself: passed through unchanged,
  its `requestState` included, and its own refusal of a tampered state comes back as its JSON-RPC error.
- A bad, forged, expired or foreign `requestState` is -32602, never a 500 or a hang.

Real ScaiLink (`LiveApp`), real upstreams over HTTP on 127.0.0.1, the real Python SDK client.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp.client import Client
from mcp.client.session import ClientRequestContext, ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel
from starlette.types import ASGIApp, Receive, Scope, Send

from scailink_mcp.era_bridge import STATE_PREFIX
from tests.conftest import LiveApp, TokenFactory, auth_headers
from tests.servers import ThreadedServer
from tests.test_mcp_gateway import register

pytestmark = pytest.mark.anyio

MODERN = "2026-07-28"


class _Name(BaseModel):
    name: str


def _asking_server() -> MCPServer:
    server = MCPServer("asking-upstream")

    @server.tool()
    async def ask_llm(question: str, ctx: Context) -> str:
        """Asks the client's LLM (sampling)."""
        result = await ctx.session.create_message(
            messages=[types.SamplingMessage(role="user", content=types.TextContent(text=question))],
            max_tokens=20,
            related_request_id=ctx.request_id,
        )
        return f"llm said: {result.content.text}"  # type: ignore[union-attr]

    @server.tool()
    async def ask_user(ctx: Context) -> str:
        """Asks the user twice (two rounds of elicitation)."""
        first = await ctx.elicit("Your name?", schema=_Name)
        second = await ctx.elicit("Your name, again?", schema=_Name)
        return f"user said: {getattr(first, 'data', None)} / {getattr(second, 'data', None)}"

    @server.tool()
    async def list_my_roots(ctx: Context) -> str:
        """Lists the client's roots."""
        roots = await ctx.session.list_roots()
        return "roots: " + ",".join(str(r.uri) for r in roots.roots)

    @server.prompt()
    async def sampled_prompt(ctx: Context) -> str:
        """A prompt whose text the client's LLM writes."""
        result = await ctx.session.create_message(
            messages=[types.SamplingMessage(role="user", content=types.TextContent(text="a prompt"))],
            max_tokens=20,
            related_request_id=ctx.request_id,
        )
        return f"prompt: {result.content.text}"  # type: ignore[union-attr]

    return server


class _HandshakeOnly:
    """An upstream of the handshake era only: a 2026-07-28 request is refused as SDK 1.x servers do
    (HTTP 400, JSON-RPC -32600 "Unsupported protocol version")."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers") or []) if scope["type"] == "http" else {}
        if headers.get(b"mcp-protocol-version") == MODERN.encode():
            body = json.dumps(
                {
                    "jsonrpc": "2.0",
                    "id": "server-error",
                    "error": {
                        "code": -32600,
                        "message": f"Bad Request: Unsupported protocol version: {MODERN}",
                    },
                }
            ).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 400,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def _mrtr_server() -> MCPServer:
    """Speaks 2026-07-28 and asks for input the way that era does: `input_required`."""
    server = MCPServer("mrtr-upstream")

    @server.tool()
    async def greet(ctx: Context) -> types.CallToolResult | types.InputRequiredResult:
        answer = (ctx.input_responses or {}).get("who")
        if answer is None:
            return types.InputRequiredResult(
                input_requests={
                    "who": types.ElicitRequest(
                        params=types.ElicitRequestFormParams(
                            message="Who are you?",
                            requested_schema={"type": "object", "properties": {"name": {"type": "string"}}},
                        )
                    )
                },
                request_state="round-1",
            )
        assert ctx.request_state == "round-1"
        content = getattr(answer, "content", None) or {}
        return types.CallToolResult(content=[types.TextContent(text=f"hello {content.get('name')}")])

    @server.tool()
    async def chatty(ctx: Context) -> str:
        await ctx.info("working")
        return "talked"

    @server.tool()
    async def steps(ctx: Context) -> str:
        for step in (1, 2):
            await ctx.report_progress(step, 2, f"step {step}")
        return "stepped"

    @server.prompt()
    def framed(ctx: Context) -> str | types.InputRequiredResult:
        answer = (ctx.input_responses or {}).get("topic")
        if answer is None:
            form = types.ElicitRequestFormParams(
                message="Topic?",
                requested_schema={"type": "object", "properties": {"name": {"type": "string"}}},
            )
            return types.InputRequiredResult(input_requests={"topic": types.ElicitRequest(params=form)})
        return f"about {(getattr(answer, 'content', None) or {}).get('name')}"

    return server


@pytest.fixture
def handshake_upstream() -> Iterator[str]:
    app = _HandshakeOnly(_asking_server().streamable_http_app())
    with ThreadedServer(app, timeout_graceful_shutdown=1) as server:
        yield f"{server.base_url}/mcp"


@pytest.fixture
def mrtr_upstream() -> Iterator[str]:
    with ThreadedServer(_mrtr_server().streamable_http_app(), timeout_graceful_shutdown=1) as server:
        yield f"{server.base_url}/mcp"


async def _sampling(context: ClientRequestContext, params: types.CreateMessageRequestParams) -> Any:
    text = params.messages[0].content.text  # type: ignore[union-attr]
    return types.CreateMessageResult(
        role="assistant", content=types.TextContent(text=f"echo {text}"), model="test-model"
    )


async def _elicitation(context: ClientRequestContext, params: Any) -> Any:
    return types.ElicitResult(action="accept", content={"name": "Ada"})


async def _roots(context: ClientRequestContext) -> Any:
    return types.ListRootsResult(roots=[types.Root(uri="file:///home/ada/project")])


@asynccontextmanager
async def modern_client(url: str, tok: str, **callbacks: Any) -> AsyncIterator[Client]:
    """The SDK's high-level `Client` pinned to 2026-07-28: it drives `input_required` rounds itself."""
    with anyio.fail_after(60):
        async with (
            httpx2.AsyncClient(headers=auth_headers(tok), timeout=httpx2.Timeout(30, read=60)) as http,
            Client(streamable_http_client(url, http_client=http), mode=MODERN, **callbacks) as client,
        ):
            assert client.protocol_version == MODERN
            yield client


@asynccontextmanager
async def modern_session(url: str, tok: str) -> AsyncIterator[ClientSession]:
    """A 2026-07-28 `ClientSession` that returns `input_required` to the test (rounds by hand)."""
    with anyio.fail_after(60):
        async with (
            httpx2.AsyncClient(headers=auth_headers(tok), timeout=httpx2.Timeout(30, read=60)) as http,
            streamable_http_client(url, http_client=http) as (read, write),
            ClientSession(
                read, write, sampling_callback=_sampling, elicitation_callback=_elicitation
            ) as session,
        ):
            await session.discover()
            yield session


def _text(result: types.CallToolResult) -> str:
    block = result.content[0]
    assert isinstance(block, types.TextContent), result
    return block.text


async def test_sampling_elicitation_roots_become_input_required(
    live: LiveApp, token: TokenFactory, handshake_upstream: str
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="asking", endpoint_url=handshake_upstream)
    ns = f"remote.u1.{server['slug']}"
    async with modern_client(
        live.mcp_url,
        tok,
        sampling_callback=_sampling,
        elicitation_callback=_elicitation,
        list_roots_callback=_roots,
    ) as c:
        result = await c.call_tool(f"{ns}.ask_llm", {"question": "capital of France?"})
        assert _text(result) == "llm said: echo capital of France?"
        result = await c.call_tool(f"{ns}.ask_user", {})  # two rounds
        assert _text(result) == "user said: name='Ada' / name='Ada'"
        result = await c.call_tool(f"{ns}.list_my_roots", {})
        assert _text(result) == "roots: file:///home/ada/project"
    assert live.parts.invoker.backends.bridge is not None
    assert live.parts.invoker.backends.bridge.pending_count() == 0  # nothing left parked
    # The per-server endpoint (upstream names) bridges the same way.
    single = f"{live.base_url}/v1/modules/scailink/remote-servers/{server['id']}/mcp"
    async with modern_client(single, tok, sampling_callback=_sampling) as c:
        assert _text(await c.call_tool("ask_llm", {"question": "q"})) == "llm said: echo q"


async def test_input_required_by_hand_and_bad_states(
    live: LiveApp, token: TokenFactory, handshake_upstream: str
) -> None:
    """The rounds on the wire: keys, the sealed state, a missing answer asked again; then every kind
    of bad state is -32602 with the SDK's message."""
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="asking", endpoint_url=handshake_upstream)
    name = f"remote.u1.{server['slug']}.ask_llm"
    args = {"question": "q1"}
    async with modern_session(live.mcp_url, tok) as s:
        first = await s.call_tool(name, args, allow_input_required=True)
        assert isinstance(first, types.InputRequiredResult), first
        assert list(first.input_requests) == ["sampling_1"]
        assert first.input_requests["sampling_1"].method == "sampling/createMessage"
        state = first.request_state
        assert state is not None and state.startswith(STATE_PREFIX)
        # A retry without the answer: asked again (a new state, the same request).
        again = await s.call_tool(
            name, args, request_state=state, input_responses={}, allow_input_required=True
        )
        assert isinstance(again, types.InputRequiredResult) and list(again.input_requests) == ["sampling_1"]
        assert again.request_state != state
        bad = [
            state + "x",  # tampered
            STATE_PREFIX + "v1.AAAA",  # forged
            "not-ours",  # for an upstream that speaks no 2026-07-28
        ]
        for wrong in bad:
            with pytest.raises(MCPError) as err:
                await s.call_tool(name, args, request_state=wrong, allow_input_required=True)
            assert err.value.error.code == -32602 and "requestState" in err.value.error.message
        # Bound to the call: other arguments with a valid state are refused too.
        with pytest.raises(MCPError) as err:
            await s.call_tool(
                name, {"question": "other"}, request_state=again.request_state, allow_input_required=True
            )
        assert err.value.error.code == -32602
        answer = types.CreateMessageResult(
            role="assistant", content=types.TextContent(text="Paris"), model="m"
        )
        done = await s.call_tool(
            name,
            args,
            request_state=again.request_state,
            input_responses={"sampling_1": answer},
            allow_input_required=True,
        )
        assert isinstance(done, types.CallToolResult) and _text(done) == "llm said: Paris"
        # The finished call's state is spent.
        with pytest.raises(MCPError) as err:
            await s.call_tool(name, args, request_state=again.request_state, allow_input_required=True)
        assert err.value.error.code == -32602
    # Another user cannot use alice's state.
    other = token("u2", "t1", ("tenant_user",))
    async with modern_session(live.mcp_url, tok) as s:
        pending = await s.call_tool(name, args, allow_input_required=True)
        assert isinstance(pending, types.InputRequiredResult)
    async with modern_session(live.mcp_url, other) as s:
        with pytest.raises(MCPError) as err:
            await s.call_tool(name, args, request_state=pending.request_state, allow_input_required=True)
        assert err.value.error.code == -32602


async def test_expired_state_is_refused(live: LiveApp, token: TokenFactory, handshake_upstream: str) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="asking", endpoint_url=handshake_upstream)
    bridge = live.parts.invoker.backends.bridge
    assert bridge is not None
    bridge.state_ttl_s = -1.0  # every state minted from now on is already expired
    name = f"remote.u1.{server['slug']}.ask_llm"
    async with modern_session(live.mcp_url, tok) as s:
        first = await s.call_tool(name, {"question": "q"}, allow_input_required=True)
        assert isinstance(first, types.InputRequiredResult)
        with pytest.raises(MCPError) as err:
            await s.call_tool(
                name, {"question": "q"}, request_state=first.request_state, allow_input_required=True
            )
        assert err.value.error.code == -32602 and err.value.error.message == "Invalid or expired requestState"


async def test_client_without_the_capability_is_not_asked(
    live: LiveApp, token: TokenFactory, handshake_upstream: str
) -> None:
    """A request for a capability the 2026-07-28 client did not declare is refused to the upstream
    (as for a handshake-era client), and the upstream's answer to that comes back."""
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="asking", endpoint_url=handshake_upstream)
    async with modern_client(live.mcp_url, tok) as c:  # no callbacks: no capabilities declared
        result = await c.call_tool(f"remote.u1.{server['slug']}.ask_llm", {"question": "q"})
        assert result.is_error, result


async def test_upstream_input_required_passes_through(
    live: LiveApp, token: TokenFactory, mrtr_upstream: str
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="mrtr", endpoint_url=mrtr_upstream)
    name = f"remote.u1.{server['slug']}.greet"
    async with modern_session(live.mcp_url, tok) as s:
        first = await s.call_tool(name, {}, allow_input_required=True)
        assert isinstance(first, types.InputRequiredResult), first
        assert list(first.input_requests) == ["who"]
        state = first.request_state
        assert state is not None and not state.startswith(STATE_PREFIX)  # the upstream's own, sealed by it
        with pytest.raises(MCPError) as err:  # the upstream's own refusal of a tampered state
            await s.call_tool(name, {}, request_state=state + "-TAMPERED", allow_input_required=True)
        assert err.value.error.code == -32602
        answer = types.ElicitResult(action="accept", content={"name": "Ada"})
        done = await s.call_tool(
            name, {}, request_state=state, input_responses={"who": answer}, allow_input_required=True
        )
        assert isinstance(done, types.CallToolResult) and _text(done) == "hello Ada"
    seen: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, total, message))

    async with modern_client(live.mcp_url, tok, elicitation_callback=_elicitation) as c:
        assert _text(await c.call_tool(name, {})) == "hello Ada"
        steps = await c.call_tool(f"remote.u1.{server['slug']}.steps", {}, progress_callback=on_progress)
        assert _text(steps) == "stepped" and seen == [(1.0, 2.0, "step 1"), (2.0, 2.0, "step 2")]
        prompt = await c.get_prompt(f"remote.u1.{server['slug']}.framed")  # the prompt's own rounds
        block = prompt.messages[0].content
        assert isinstance(block, types.TextContent) and block.text == "about Ada"
    logs: list[Any] = []

    async def on_log(params: types.LoggingMessageNotificationParams) -> None:
        logs.append(params.data)

    # The caller's `_meta` logLevel reaches the upstream, and its log messages the caller.
    async with modern_client(live.mcp_url, tok, log_level="info", logging_callback=on_log) as c:
        assert _text(await c.call_tool(f"remote.u1.{server['slug']}.chatty", {})) == "talked"
    assert logs == ["working"]


async def test_prompt_of_a_handshake_upstream_is_bridged(
    live: LiveApp, token: TokenFactory, handshake_upstream: str
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="asking", endpoint_url=handshake_upstream)
    async with modern_client(live.mcp_url, tok, sampling_callback=_sampling) as c:
        prompt = await c.get_prompt(f"remote.u1.{server['slug']}.sampled_prompt")
        block = prompt.messages[0].content
        assert isinstance(block, types.TextContent) and block.text == "prompt: echo a prompt"


# --- several replicas (SPEC section 10) ------------------------------------------------------------


async def test_retry_on_another_replica_completes_the_call(
    settings_factory: Any, token: TokenFactory, handshake_upstream: str
) -> None:
    """Two replicas on one database and the real Redis: the first round on A parks the upstream call
    there; the retry lands on B, which checks the state and forwards it to A over Redis."""
    from tests.cluster import REDIS_URL, require_redis

    require_redis()
    prefix = f"scailink-test-{uuid.uuid4().hex[:12]}"
    settings = settings_factory(redis_url=REDIS_URL, redis_prefix=prefix)
    tok = token("u1", "t1", ("tenant_user",))
    with LiveApp(settings) as a, LiveApp(settings) as b:
        bridges = [live.parts.invoker.backends.bridge for live in (a, b)]
        assert all(x is not None and x.cluster is not None for x in bridges)
        with anyio.fail_after(10):
            while not all(x.cluster.health() == "ok" for x in bridges if x and x.cluster):  # noqa: ASYNC110
                await anyio.sleep(0.02)
        server = await register(a, tok, name="asking", endpoint_url=handshake_upstream)
        name = f"remote.u1.{server['slug']}.ask_llm"
        with anyio.fail_after(10):  # B's catalog hears of the registration through Redis
            while True:
                async with modern_session(b.mcp_url, tok) as s:
                    if name in {t.name for t in (await s.list_tools()).tools}:
                        break
                await anyio.sleep(0.05)
        async with modern_session(a.mcp_url, tok) as on_a:
            first = await on_a.call_tool(name, {"question": "q"}, allow_input_required=True)
            assert isinstance(first, types.InputRequiredResult)
        answer = types.CreateMessageResult(
            role="assistant", content=types.TextContent(text="from B"), model="m"
        )
        async with modern_session(b.mcp_url, tok) as on_b:
            done = await on_b.call_tool(
                name,
                {"question": "q"},
                request_state=first.request_state,
                input_responses={"sampling_1": answer},
                allow_input_required=True,
            )
            assert isinstance(done, types.CallToolResult) and _text(done) == "llm said: from B"
            assert bridges[1] is not None and bridges[1].cluster is not None
            assert bridges[1].cluster.forwarded == 1
            # A forged state is refused on B before anything is forwarded.
            with pytest.raises(MCPError) as err:
                await on_b.call_tool(
                    name, {"question": "q"}, request_state=STATE_PREFIX + "v1.x", allow_input_required=True
                )
            assert err.value.error.code == -32602


async def test_consent_of_a_modern_client_is_not_asked_on_a_back_channel(
    live: LiveApp, token: TokenFactory
) -> None:
    """A `confirm` server called by a 2026-07-28 client that declares elicitation: there is no
    back-channel to elicit on, so the desktop is asked (none here: denied), never a failed request."""
    from tests.upstream import UpstreamServer

    tok = token("u1", "t1", ("tenant_user",))
    with UpstreamServer() as upstream:
        server = await register(live, tok, name="confirm", endpoint_url=upstream.url, consent_tier="confirm")
        async with modern_client(live.mcp_url, tok, elicitation_callback=_elicitation) as c:
            result = await c.call_tool(f"remote.u1.{server['slug']}.echo", {"text": "x"})
    assert result.is_error and (result.meta or {})["scailink/error"]["code"] == "SCAILINK_CONSENT_DENIED", (
        result
    )


async def test_parked_calls_per_user_are_bounded(
    live: LiveApp, token: TokenFactory, handshake_upstream: str
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="asking", endpoint_url=handshake_upstream)
    bridge = live.parts.invoker.backends.bridge
    assert bridge is not None
    bridge.max_pending = 1
    name = f"remote.u1.{server['slug']}.ask_llm"
    async with modern_session(live.mcp_url, tok) as s:
        first = await s.call_tool(name, {"question": "q"}, allow_input_required=True)
        assert isinstance(first, types.InputRequiredResult)
        second = await s.call_tool(name, {"question": "q2"}, allow_input_required=True)
        assert isinstance(second, types.CallToolResult) and second.is_error
        assert (second.meta or {})["scailink/error"]["code"] == "SCAILINK_RATE_LIMITED"
    other = token("u2", "t1", ("tenant_user",))  # another user is not held up by u1's parked call
    mine = await register(live, other, name="asking", endpoint_url=handshake_upstream)
    async with modern_session(live.mcp_url, other) as s:
        theirs = await s.call_tool(
            f"remote.u2.{mine['slug']}.ask_llm", {"question": "q"}, allow_input_required=True
        )
        assert isinstance(theirs, types.InputRequiredResult)
