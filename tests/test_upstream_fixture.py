"""The upstream fixture (`tests/upstream.py`) against the real SDK client, over real HTTP.

Proves what ScaiLink's tests rely on: both transports answer, listings paginate, credential headers
arrive, the HTTP policy (401, 307) applies, stop refuses and restart serves the same URL, tool-set
changes show in the next listing, and stopping never waits on open streams.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp.client.session import ClientSession, MessageHandlerFnT
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from tests.upstream import ToolCall, UpstreamServer, text_result

CREDENTIALS = {"Authorization": "Bearer upstream-token", "X-Api-Key": "k-123"}
TIMEOUT_S = 15


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer(extra_tools=5) as server:
        yield server


@asynccontextmanager
async def streamable_session(
    url: str, headers: dict[str, str] | None = None, message_handler: MessageHandlerFnT | None = None
) -> AsyncIterator[ClientSession]:
    async with (
        httpx2.AsyncClient(headers=headers or {}, timeout=httpx2.Timeout(5, read=30)) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write, message_handler=message_handler) as session,
    ):
        await session.initialize()
        yield session


@asynccontextmanager
async def sse_session(
    url: str, headers: dict[str, str] | None = None, message_handler: MessageHandlerFnT | None = None
) -> AsyncIterator[ClientSession]:
    async with (
        sse_client(url, headers=headers, timeout=5, sse_read_timeout=30) as (read, write),
        ClientSession(read, write, message_handler=message_handler) as session,
    ):
        await session.initialize()
        yield session


def connect(server: UpstreamServer, transport: str, **kw: Any) -> Any:
    return (
        streamable_session(server.url, **kw)
        if transport == "streamable"
        else sse_session(server.sse_url, **kw)
    )


def leaves(exc: BaseException) -> list[BaseException]:
    """The leaf exceptions of (nested) exception groups: the SDK's transports raise from task groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaves(inner)]
    return [exc]


async def connect_error(server: UpstreamServer, transport: str, **kw: Any) -> list[BaseException]:
    """Connect expecting failure; returns the root causes."""
    with anyio.fail_after(TIMEOUT_S):
        try:
            async with connect(server, transport, **kw):
                pass
        except Exception as exc:
            return leaves(exc)
    raise AssertionError("connecting succeeded")


async def list_pages(
    fetch: Callable[[types.PaginatedRequestParams | None], Awaitable[Any]], field: str
) -> list[list[str]]:
    """Every page of a listing, following `nextCursor`, as lists of names."""
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        result = await fetch(types.PaginatedRequestParams(cursor=cursor) if cursor else None)
        pages.append([getattr(item, "name") for item in getattr(result, field)])  # noqa: B009
        cursor = result.next_cursor
        if cursor is None:
            return pages


def names(pages: list[list[str]]) -> list[str]:
    return [name for page in pages for name in page]


@pytest.mark.anyio
async def test_streamable_http_paginates_every_listing(upstream: UpstreamServer) -> None:
    with anyio.fail_after(TIMEOUT_S):
        async with streamable_session(upstream.url) as session:
            tools = await list_pages(lambda p: session.list_tools(params=p), "tools")
            resources = await list_pages(lambda p: session.list_resources(params=p), "resources")
            templates = await list_pages(
                lambda p: session.list_resource_templates(params=p), "resource_templates"
            )
            prompts = await list_pages(lambda p: session.list_prompts(params=p), "prompts")

            with pytest.raises(MCPError) as bad_cursor:
                await session.list_tools(params=types.PaginatedRequestParams(cursor="not-a-cursor"))

    assert len(tools) == 5 and all(len(page) == 2 for page in tools)
    assert names(tools) == ["echo", "add", "echo_headers", "sleep_ms", "fail"] + [
        f"gen_{i}" for i in range(5)
    ]
    assert names(tools) == upstream.tool_names()
    assert resources == [["readme.md", "todo.md"], ["data.json"]]
    assert templates == [["note", "daily_log"]]
    assert prompts == [["greet", "summarize"], ["review"]]
    assert bad_cursor.value.code == types.INVALID_PARAMS


@pytest.mark.anyio
async def test_tools_resources_and_prompts_answer(upstream: UpstreamServer) -> None:
    with anyio.fail_after(TIMEOUT_S):
        async with streamable_session(upstream.url) as session:
            echo = await session.call_tool("echo", {"text": "hello"})
            add = await session.call_tool("add", {"a": 2, "b": 40})
            fail = await session.call_tool("fail", {})
            slept = await session.call_tool("sleep_ms", {"ms": 10})
            invalid = await session.call_tool("add", {"a": "two"})
            generated = await session.call_tool("gen_0", {"query": "bug", "limit": 5})
            readme = await session.read_resource("file:///notes/readme.md")
            templated = await session.read_resource("file:///notes/ideas.md")
            greeting = await session.get_prompt("greet", {"name": "Ada"})
            with pytest.raises(MCPError) as unknown:
                await session.call_tool("no_such_tool", {})

    assert isinstance(echo, types.CallToolResult) and echo.content[0].text == "hello"  # type: ignore[union-attr]
    assert isinstance(add, types.CallToolResult) and add.structured_content == {"sum": 42}
    assert isinstance(fail, types.CallToolResult) and fail.is_error
    assert isinstance(slept, types.CallToolResult) and not slept.is_error
    assert isinstance(invalid, types.CallToolResult) and invalid.is_error
    assert isinstance(generated, types.CallToolResult)
    assert json.loads(generated.content[0].text) == {  # type: ignore[union-attr]
        "tool": "gen_0",
        "arguments": {"query": "bug", "limit": 5},
    }
    assert readme.contents[0].text.startswith("# Notes")  # type: ignore[union-attr]
    assert "ideas.md" in templated.contents[0].text  # type: ignore[union-attr]
    assert greeting.messages[0].content.text == "Hello, Ada!"  # type: ignore[union-attr]
    assert unknown.value.code == types.INVALID_PARAMS


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["streamable", "sse"])
async def test_credential_headers_reach_the_upstream(upstream: UpstreamServer, transport: str) -> None:
    with anyio.fail_after(TIMEOUT_S):
        async with connect(upstream, transport, headers=CREDENTIALS) as session:
            tools = await list_pages(lambda p: session.list_tools(params=p), "tools")
            echo = await session.call_tool("echo", {"text": transport})
            seen = await session.call_tool("echo_headers", {})

    assert len(tools) > 1
    assert isinstance(echo, types.CallToolResult) and echo.content[0].text == transport  # type: ignore[union-attr]
    headers = json.loads(seen.content[0].text)
    assert headers["authorization"] == "Bearer upstream-token"
    assert headers["x-api-key"] == "k-123"
    assert upstream.last_headers["x-api-key"] == "k-123"


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["streamable", "sse"])
async def test_required_headers_refuse_requests_without_them(transport: str) -> None:
    with UpstreamServer(required_headers={"X-Api-Key": "k-123"}) as server:
        async with httpx2.AsyncClient(timeout=5) as http:
            refused = await http.post(server.url, json={})
        errors = await connect_error(server, transport, headers={"X-Api-Key": "wrong"})
        assert server.initialize_count == 0

        with anyio.fail_after(TIMEOUT_S):
            async with connect(server, transport, headers={"X-Api-Key": "k-123"}) as session:
                echo = await session.call_tool("echo", {"text": "in"})

    assert refused.status_code == 401
    if transport == "sse":
        assert any(isinstance(e, httpx2.HTTPStatusError) and e.response.status_code == 401 for e in errors)
    else:  # the SDK reports a refused initialize POST as an internal error, without the status
        assert any(isinstance(e, MCPError) for e in errors)
    assert isinstance(echo, types.CallToolResult) and not echo.is_error
    assert server.initialize_count == 1


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["streamable", "sse"])
async def test_redirect_is_answered_and_not_followed(transport: str) -> None:
    elsewhere = "http://127.0.0.1:9/mcp"  # another origin (port): the SDK must not follow it
    with UpstreamServer(redirect_to=elsewhere) as server:
        async with httpx2.AsyncClient(timeout=5) as http:
            answer = await http.post(server.url, json={})
        errors = await connect_error(server, transport)

    assert answer.status_code == 307 and answer.headers["location"] == elsewhere
    assert not any(isinstance(e, httpx2.ConnectError) for e in errors)  # nothing tried port 9
    assert any("307" in str(e) or "not followed" in str(e) for e in errors)
    assert server.initialize_count == 0


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["streamable", "sse"])
async def test_stop_refuses_and_restart_serves_the_same_url(upstream: UpstreamServer, transport: str) -> None:
    url, port = upstream.url, upstream.port
    with anyio.fail_after(TIMEOUT_S):
        async with connect(upstream, transport) as session:
            await session.call_tool("echo", {"text": "before"})
    assert upstream.initialize_count == 1

    await anyio.to_thread.run_sync(upstream.stop)
    errors = await connect_error(upstream, transport)
    assert any(isinstance(e, httpx2.ConnectError) for e in errors)
    assert upstream.initialize_count == 1

    await anyio.to_thread.run_sync(upstream.restart)  # stop is a no-op when stopped; start rebinds
    assert (upstream.url, upstream.port) == (url, port)
    with anyio.fail_after(TIMEOUT_S):
        async with connect(upstream, transport) as session:
            again = await session.call_tool("echo", {"text": "after"})
    assert isinstance(again, types.CallToolResult) and again.content[0].text == "after"  # type: ignore[union-attr]
    assert upstream.initialize_count == 2

    for _ in range(3):  # restarts in a row keep the port, even right after traffic
        await anyio.to_thread.run_sync(upstream.restart)
        with anyio.fail_after(TIMEOUT_S):
            async with connect(upstream, transport) as session:
                await session.send_ping()
    assert upstream.port == port and upstream.initialize_count == 5


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["streamable", "sse"])
async def test_stop_does_not_wait_for_open_streams(upstream: UpstreamServer, transport: str) -> None:
    entered = threading.Event()

    async def block(call: ToolCall) -> types.CallToolResult:
        entered.set()
        await anyio.sleep(60)
        return text_result("too late")

    upstream.add_tool("block", block)
    outcome: list[BaseException] = []

    async def call_block(session: ClientSession) -> None:
        try:
            await session.call_tool("block", {})
        except Exception as exc:
            outcome.append(exc)

    with anyio.fail_after(TIMEOUT_S):
        try:
            async with connect(upstream, transport) as session, anyio.create_task_group() as tg:
                tg.start_soon(call_block, session)
                assert await anyio.to_thread.run_sync(entered.wait, 5)
                started = time.monotonic()
                await anyio.to_thread.run_sync(upstream.stop)
                elapsed = time.monotonic() - started
        except Exception as exc:  # the SDK's streamable transport raises its connect error on exit
            outcome.append(exc)

    # uvicorn's own grace period is 1 s: well under it means the streams were dropped, not awaited.
    assert elapsed < 1.0
    assert outcome, "the call in flight must fail when the upstream stops"
    assert not upstream.running


@pytest.mark.anyio
async def test_tool_set_changes_show_in_the_next_listing(upstream: UpstreamServer) -> None:
    with anyio.fail_after(TIMEOUT_S):
        async with streamable_session(upstream.url) as session:
            before = names(await list_pages(lambda p: session.list_tools(params=p), "tools"))
            upstream.remove_tool("echo")
            upstream.add_tool("fresh")
            after = names(await list_pages(lambda p: session.list_tools(params=p), "tools"))
            with pytest.raises(MCPError):
                await session.call_tool("echo", {"text": "gone"})
            fresh = await session.call_tool("fresh", {"text": "x"})

    assert "echo" in before and "fresh" not in before
    assert "echo" not in after and after[-1] == "fresh"
    assert json.loads(fresh.content[0].text) == {"tool": "fresh", "arguments": {"text": "x"}}  # type: ignore[union-attr]


@pytest.mark.anyio
@pytest.mark.parametrize("transport", ["streamable", "sse"])
async def test_notify_tools_changed_reaches_initialized_sessions(
    upstream: UpstreamServer, transport: str
) -> None:
    changed = anyio.Event()

    async def on_message(message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.set()

    with anyio.fail_after(TIMEOUT_S):
        async with connect(upstream, transport, message_handler=on_message) as session:
            assert session.initialize_result is not None
            assert session.initialize_result.capabilities.tools is not None
            assert session.initialize_result.capabilities.tools.list_changed
            # Streamable HTTP delivers on the GET stream the client opens after initialize: until it
            # is open a notification is dropped, so repeat until one arrives.
            while not changed.is_set():
                assert await anyio.to_thread.run_sync(upstream.notify_tools_changed) == 1
                with anyio.move_on_after(0.2):
                    await changed.wait()
