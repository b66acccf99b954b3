"""The per-server MCP endpoint (`/v1/modules/scailink/remote-servers/{server_id}/mcp`) beyond tools:
prompts, resources, resource templates, completion, `logging/setLevel` and ping, through a real SDK
client over Streamable HTTP against ScaiLink on 127.0.0.1 (`LiveApp`) with a real registered upstream.

The endpoint shows one server under its upstream names: listings are the discovered items unchanged,
reads and prompt gets are relayed with the upstream's own names and URIs, and a server id that the
caller cannot see answers exactly like an id that does not exist, without reaching the upstream.
(Tool listing and calls on this endpoint are in `tests/test_mcp_gateway.py`.)
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import mcp_types as types
import pytest
from mcp.client.session import ClientSession
from mcp.shared.exceptions import MCPError

from tests.conftest import LiveApp, TokenFactory
from tests.servers import ThreadedServer
from tests.test_mcp_gateway import REG, mcp_client, register
from tests.upstream import HttpPolicy, RequestLog, ToolSet, UpstreamServer, build_app, build_mcp_server

pytestmark = pytest.mark.anyio

INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
CALL_TIMEOUT_S = 20.0
UPSTREAM_FAILED = "SCAILINK_UPSTREAM_ERROR: upstream MCP server failed (MCPError: "
NAMES = ("Ada", "Alan", "Grace")


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer() as server:
        yield server


@dataclass
class Seen:
    """What the completing upstream was asked (written by its server thread)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    completions: list[types.CompleteRequestParams] = field(default_factory=list)
    levels: list[str] = field(default_factory=list)


class CompletingUpstream(ThreadedServer):
    """`tests/upstream.py`'s MCP server (its prompts, resources and templates, no tools) plus the
    handlers that fixture lacks: `completion/complete` and `logging/setLevel`."""

    def __init__(self) -> None:
        self.seen = Seen()
        self.log = RequestLog()
        server = build_mcp_server("completing", ToolSet(), self.log, 2, set())
        server.add_request_handler("completion/complete", types.CompleteRequestParams, self._complete)
        server.add_request_handler("logging/setLevel", types.SetLevelRequestParams, self._set_level)
        super().__init__(build_app(server, self.log, HttpPolicy(), json_response=False, stateless=False))

    @property
    def url(self) -> str:
        return f"{self.base_url}/mcp"

    async def _complete(self, ctx: Any, params: types.CompleteRequestParams) -> types.CompleteResult:
        with self.seen.lock:
            self.seen.completions.append(params)
        prefix = params.argument.value
        values = [n for n in NAMES if n.startswith(prefix)]
        if params.context is not None and params.context.arguments:
            values = [f"{v} ({params.context.arguments.get('style', '')})" for v in values]
        return types.CompleteResult(
            completion=types.Completion(values=values, total=len(values) + 10, has_more=True)
        )

    async def _set_level(self, ctx: Any, params: types.SetLevelRequestParams) -> types.EmptyResult:
        with self.seen.lock:
            self.seen.levels.append(params.level)
        return types.EmptyResult()


@pytest.fixture
def completing() -> Iterator[CompletingUpstream]:
    with CompletingUpstream() as server:
        yield server


def server_url(live: LiveApp, server_id: str) -> str:
    return f"{live.base_url}{REG}/{server_id}/mcp"


@asynccontextmanager
async def per_server(live: LiveApp, tok: str, server_id: str) -> AsyncIterator[ClientSession]:
    """An initialized SDK client on the per-server endpoint, every exchange bounded in time."""
    with anyio.fail_after(60):
        async with mcp_client(server_url(live, server_id), tok) as session:
            yield session


async def set_level(session: ClientSession, level: types.LoggingLevel) -> types.EmptyResult:
    # `ClientSession.set_logging_level` warns (logging is deprecated from 2026-07-28); the same request.
    request = types.SetLevelRequest(params=types.SetLevelRequestParams(level=level))
    return await session.send_request(request, types.EmptyResult)


def dumps(items: list[Any]) -> list[dict[str, Any]]:
    return [item.model_dump(by_alias=True, exclude_none=True, mode="json") for item in items]


async def test_prompts_list_and_get_pass_through(
    live: LiveApp, token: TokenFactory, upstream: UpstreamServer
) -> None:
    """prompts/list is every discovered prompt (all of the upstream's pages) under its upstream name,
    unchanged; prompts/get relays the upstream name and arguments and returns its answer as is."""
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="prompts", endpoint_url=upstream.url)
    async with mcp_client(upstream.url, tok) as direct, per_server(live, tok, server["id"]) as s:
        listed = (await s.list_prompts()).prompts
        assert [p.name for p in listed] == ["greet", "review", "summarize"]
        first = await direct.list_prompts()
        rest = await direct.list_prompts(params=types.PaginatedRequestParams(cursor=first.next_cursor))
        want = sorted(first.prompts + rest.prompts, key=lambda p: p.name)
        assert dumps(listed) == dumps(want)
        assert listed[0].arguments == [types.PromptArgument(name="name", required=True)]

        greet = await s.get_prompt("greet", {"name": "Ada"})
        assert greet.description == "Greet someone by name."
        assert greet.messages == [
            types.PromptMessage(role="user", content=types.TextContent(text="Hello, Ada!"))
        ]
        summary = await s.get_prompt("summarize", {"text": "long", "style": "terse"})
        assert summary.messages[0].content == types.TextContent(
            text="summarize: {'text': 'long', 'style': 'terse'}"
        )
        assert summary == await direct.get_prompt("summarize", {"text": "long", "style": "terse"})


async def test_prompt_errors_are_the_upstreams(
    live: LiveApp, token: TokenFactory, upstream: UpstreamServer
) -> None:
    """The endpoint does not judge prompt names itself (upstream names pass through): an unknown
    prompt or a missing argument is the upstream's JSON-RPC error, wrapped as SCAILINK_UPSTREAM_ERROR;
    the endpoint keeps answering afterwards."""
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="prompt-errors", endpoint_url=upstream.url)
    async with per_server(live, tok, server["id"]) as s:
        with pytest.raises(MCPError) as unknown:
            await s.get_prompt("no_such_prompt", {})
        assert unknown.value.error.code == INVALID_REQUEST
        assert unknown.value.error.message == f"{UPSTREAM_FAILED}Unknown prompt: no_such_prompt)"
        with pytest.raises(MCPError) as missing:
            await s.get_prompt("greet", {})
        assert missing.value.error.code == INVALID_REQUEST
        assert missing.value.error.message == f"{UPSTREAM_FAILED}Missing prompt arguments: name)"
        assert (await s.get_prompt("greet", {"name": "Bo"})).messages[0].content == types.TextContent(
            text="Hello, Bo!"
        )


async def test_resources_and_templates_list_pass_through(
    live: LiveApp, token: TokenFactory, upstream: UpstreamServer
) -> None:
    """resources/list and resources/templates/list are the upstream's items with their own URIs and
    URI templates (no `scailink://` namespacing, unlike `/mcp`), every page of them."""
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="resources", endpoint_url=upstream.url)
    async with per_server(live, tok, server["id"]) as s:
        resources = (await s.list_resources()).resources
        assert dumps(resources) == [
            {"name": "data.json", "uri": "file:///notes/data.json", "mimeType": "application/json"},
            {"name": "readme.md", "uri": "file:///notes/readme.md", "mimeType": "text/markdown"},
            {"name": "todo.md", "uri": "file:///notes/todo.md", "mimeType": "text/markdown"},
        ]
        templates = (await s.list_resource_templates()).resource_templates
        assert dumps(templates) == [
            {"name": "daily_log", "uriTemplate": "file:///logs/{day}.log", "mimeType": "text/plain"},
            {"name": "note", "uriTemplate": "file:///notes/{name}", "mimeType": "text/markdown"},
        ]


async def test_read_resource_passes_contents_through(
    live: LiveApp, token: TokenFactory, upstream: UpstreamServer
) -> None:
    """resources/read sends the upstream URI unchanged and returns the upstream's contents: a listed
    resource, and a URI only a template names (not in the listing, still the upstream's to answer)."""
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="reads", endpoint_url=upstream.url)
    async with mcp_client(upstream.url, tok) as direct, per_server(live, tok, server["id"]) as s:
        readme = await s.read_resource("file:///notes/readme.md")
        assert readme.contents == [
            types.TextResourceContents(
                uri="file:///notes/readme.md", mime_type="text/markdown", text="# Notes\n\nRead me first.\n"
            )
        ]
        templated = await s.read_resource("file:///notes/ideas.md")
        assert templated.contents[0].text == "# ideas.md\n\n(an empty note)\n"  # type: ignore[union-attr]
        for uri in ("file:///notes/data.json", "file:///notes/ideas.md"):
            assert await s.read_resource(uri) == await direct.read_resource(uri), uri


async def test_read_unknown_resource_is_the_upstreams_error(
    live: LiveApp, token: TokenFactory, upstream: UpstreamServer
) -> None:
    """An unknown URI is not refused locally: the upstream's "Resource not found" (-32002) comes back,
    wrapped as SCAILINK_UPSTREAM_ERROR, with the URI the client asked for."""
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="unknown-read", endpoint_url=upstream.url)
    async with per_server(live, tok, server["id"]) as s:
        with pytest.raises(MCPError) as err:
            await s.read_resource("file:///elsewhere/secret.txt")
        assert err.value.error.code == INVALID_REQUEST
        uri = "file:///elsewhere/secret.txt"
        assert err.value.error.message == f"{UPSTREAM_FAILED}Resource not found: {uri})"


async def test_completion_and_log_level_reach_the_upstream(
    live: LiveApp, token: TokenFactory, completing: CompletingUpstream
) -> None:
    """completion/complete relays the reference, argument and context unchanged and returns the
    upstream's completion as is; logging/setLevel reaches the upstream with the level asked for."""
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="completing", endpoint_url=completing.url)
    assert server["status"] == "active", server["last_health_status"]
    async with per_server(live, tok, server["id"]) as s:
        assert s.server_capabilities is not None and s.server_capabilities.completions is not None
        result = await s.complete(types.PromptReference(name="greet"), {"name": "name", "value": "A"})
        assert result.completion == types.Completion(values=["Ada", "Alan"], total=12, has_more=True)
        template = types.ResourceTemplateReference(uri="file:///notes/{name}")
        styled = await s.complete(template, {"name": "name", "value": "G"}, {"style": "formal"})
        assert styled.completion.values == ["Grace (formal)"]
        assert await set_level(s, "warning") == types.EmptyResult()
        assert await set_level(s, "debug") == types.EmptyResult()
    with completing.seen.lock:
        asked = [c.model_dump(by_alias=True, exclude_none=True) for c in completing.seen.completions]
        levels = list(completing.seen.levels)
    assert asked == [
        {"ref": {"type": "ref/prompt", "name": "greet"}, "argument": {"name": "name", "value": "A"}},
        {
            "ref": {"type": "ref/resource", "uri": "file:///notes/{name}"},
            "argument": {"name": "name", "value": "G"},
            "context": {"arguments": {"style": "formal"}},
        },
    ]
    assert levels == ["warning", "debug"]


async def test_completion_and_log_level_unsupported_upstream(
    live: LiveApp, token: TokenFactory, upstream: UpstreamServer
) -> None:
    """An upstream without completion or logging answers "Method not found"; the endpoint passes that
    on (wrapped) instead of inventing an empty completion or a silent success."""
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="no-completion", endpoint_url=upstream.url)
    async with per_server(live, tok, server["id"]) as s:
        with pytest.raises(MCPError) as completion:
            await s.complete(types.PromptReference(name="greet"), {"name": "name", "value": "A"})
        assert completion.value.error.code == INVALID_REQUEST
        assert completion.value.error.message == f"{UPSTREAM_FAILED}Method not found)"
        with pytest.raises(MCPError) as level:
            await set_level(s, "info")
        assert level.value.error.message == f"{UPSTREAM_FAILED}Method not found)"


async def test_ping_is_answered_locally(live: LiveApp, token: TokenFactory, upstream: UpstreamServer) -> None:
    """ping is answered by ScaiLink itself: no upstream request, and an empty result."""
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="ping", endpoint_url=upstream.url)
    async with per_server(live, tok, server["id"]) as s:
        before = upstream.request_count
        for _ in range(3):
            assert await s.send_ping() == types.EmptyResult()
        assert upstream.request_count == before


async def test_hidden_and_unknown_servers_answer_alike(
    live: LiveApp, token: TokenFactory, upstream: UpstreamServer
) -> None:
    """Another tenant's server, another user's personal server, any server for a caller without
    `scailink:remote.use`, and an id that does not exist all answer every scoped request with the same
    -32602 "unknown server"; none of them reaches the upstream."""
    owner = token("u1", "t1", ("tenant_user",))
    server = await register(live, owner, name="private", endpoint_url=upstream.url)
    unknown_id = "0" * 32
    callers = [
        (token("u1", "t2", ("tenant_admin",)), server["id"]),  # same user id, another tenant
        (token("u2", "t1", ("tenant_user",)), server["id"]),  # same tenant, not shared with u2
        (token("u1", "t1", ("some-group",)), server["id"]),  # the owner's id, no permissions
        (owner, unknown_id),
    ]
    requests: list[Any] = [
        lambda s: s.list_prompts(),
        lambda s: s.get_prompt("greet", {"name": "Ada"}),
        lambda s: s.list_resources(),
        lambda s: s.list_resource_templates(),
        lambda s: s.read_resource("file:///notes/readme.md"),
        lambda s: s.complete(types.PromptReference(name="greet"), {"name": "name", "value": "A"}),
        lambda s: set_level(s, "info"),
        lambda s: s.list_tools(),
    ]
    before = upstream.request_count
    for tok, server_id in callers:
        async with per_server(live, tok, server_id) as s:
            for send in requests:
                with pytest.raises(MCPError) as err:
                    await send(s)
                assert (err.value.error.code, err.value.error.message) == (INVALID_PARAMS, "unknown server")
            assert await s.send_ping() == types.EmptyResult(), "the session itself stays usable"
    assert upstream.request_count == before, "nothing was relayed for a server the caller cannot see"


async def test_locked_server_is_not_available(
    live: LiveApp, token: TokenFactory, upstream: UpstreamServer
) -> None:
    """A `locked` server exists for its owner but serves nothing: every scoped request says so."""
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="locked", endpoint_url=upstream.url, consent_tier="locked")
    before = upstream.request_count
    async with per_server(live, tok, server["id"]) as s:
        requests: list[Any] = [
            lambda: s.list_prompts(),
            lambda: s.read_resource("file:///notes/readme.md"),
            lambda: s.complete(types.PromptReference(name="greet"), {"name": "name", "value": "A"}),
        ]
        for send in requests:
            with pytest.raises(MCPError) as err:
                await send()
            assert err.value.error.code == INVALID_PARAMS
            assert err.value.error.message == "server is not available (status active, locked)"
    assert upstream.request_count == before
