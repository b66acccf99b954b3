"""The lean `tools/call` path (remote/wire.py) against a real upstream on 127.0.0.1: warm calls share
one kept-alive TCP connection (the SDK client's path opens one per call), a call given up on is
cancelled upstream, and upstream JSON-RPC errors surface as errors. Then every kind of answer a call
can get (SSE with other messages, malformed bodies, JSON-RPC errors, HTTP statuses, an expired
session), each from a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from anyio.streams.memory import MemoryObjectReceiveStream
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from scailink_mcp.errors import UpstreamError, UpstreamTimeout
from scailink_mcp.remote.answers import AnswerLimit
from scailink_mcp.remote.lean_http import LeanHTTP
from scailink_mcp.remote.upstream import UpstreamTarget, open_session
from scailink_mcp.remote.wire import DRAIN_TIMEOUT_S, SessionGone, UpstreamHTTPError, Wire
from tests.servers import ThreadedServer
from tests.test_pool_unit import ALLOWED, KEY, echo, running_pool
from tests.test_pool_unit import upstream as upstream  # the fixture
from tests.upstream import UpstreamServer

pytestmark = pytest.mark.anyio


def sockets_to(port: int) -> int:
    """Client sockets (any state, TIME_WAIT included) whose remote end is 127.0.0.1:`port`."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        remote = line.split()[2]
        if remote == f"0100007F:{port:04X}":
            count += 1
    return count


def port_of(server: UpstreamServer) -> int:
    return int(server.url.rsplit(":", 1)[1].split("/", 1)[0])


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="counts sockets through /proc/net/tcp")
async def test_warm_calls_reuse_one_connection(upstream: UpstreamServer) -> None:
    # (The SDK client's own path, `lean_calls=False`, opens 14 to 30 connections for the same calls,
    # depending on timing; that is the SDK's behaviour, not ScaiLink's, so it is not asserted here.)
    async with running_pool(upstream, lean_calls=True) as pool:
        await echo(pool)
        before = sockets_to(port_of(upstream))
        for i in range(30):
            assert await echo(pool, text=str(i)) == str(i)
        opened = sockets_to(port_of(upstream)) - before
    assert opened <= 3, f"30 warm calls opened {opened} connections"


async def test_a_call_given_up_is_cancelled_upstream(upstream: UpstreamServer) -> None:
    async with running_pool(upstream) as pool:
        await echo(pool)
        with pytest.raises(UpstreamTimeout):
            await pool.call_tool(KEY, "sleep_ms", {"ms": 20_000}, timeout=0.5)
        with anyio.fail_after(10):
            while upstream._in_flight:  # noqa: ASYNC110  (polled with a deadline)
                await anyio.sleep(0.05)
        assert await echo(pool, text="after") == "after"


async def test_upstream_protocol_errors_surface(upstream: UpstreamServer) -> None:
    async with running_pool(upstream) as pool:
        with pytest.raises(UpstreamError, match="Unknown tool"):
            await pool.call_tool(KEY, "no_such_tool", {}, timeout=5)
        assert await echo(pool, text="next") == "next", "the next call opens a fresh session"


# --- the answers a call can get, one branch of wire.py each --------------------------------------------
#
# `Scripted` is a real HTTP server on 127.0.0.1 that answers each POST the way the test says (a real
# MCP server does not send malformed answers on demand); `Wire` is driven directly, as the pool does.

FIRST_ID = "scailink-1"  # the id of a Wire's first call
SESSION = "session-abc"
VERSION = "2025-11-25"
ECHO_RESULT = {"content": [{"type": "text", "text": "hi"}], "isError": False}


def sse(*events: str) -> bytes:
    """A `text/event-stream` body of `events` (each the lines of one event, without the blank line)."""
    return "".join(f"{event}\n\n" for event in events).encode()


def data(message: object) -> str:
    return f"event: message\ndata: {json.dumps(message)}"


def answer(result: object = None, *, id: object = FIRST_ID, **fields: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": id, **({"result": result} if result is not None else {}), **fields}


Respond = Callable[[dict[str, Any]], Response]


class Scripted(ThreadedServer):
    """POST /mcp: `respond(body)` answers; `requests` keeps every (headers, body) received. `client`:
    which HTTP client the test's `Wire` sends with (each scripted test runs with both)."""

    def __init__(self, client: str = "httpx2") -> None:
        self.client = client
        self.respond: Respond = lambda body: JSONResponse(answer(ECHO_RESULT, id=body.get("id")))
        self.requests: list[tuple[dict[str, str], dict[str, Any]]] = []
        super().__init__(Starlette(routes=[Route("/mcp", self._mcp, methods=["POST"])]), lifespan="off")

    @property
    def url(self) -> str:
        return f"{self.base_url}/mcp"

    async def _mcp(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append((dict(request.headers), body))
        return self.respond(body)


@pytest.fixture(params=["httpx2", "aiohttp"])
def scripted(request: pytest.FixtureRequest) -> Iterator[Scripted]:
    """httpx2: the SDK session's client (an OAuth upstream's calls); aiohttp: `lean_http.LeanHTTP`."""
    with Scripted(request.param) as server:
        yield server


def reply(status: int = 200, body: bytes = b"", content_type: str | None = None) -> Respond:
    return lambda _: Response(body, status_code=status, media_type=content_type)


def streamed(*chunks: bytes, then_wait: float = 0.0) -> Respond:
    """An SSE answer sent chunk by chunk; `then_wait` keeps the stream open after the last one."""

    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk
        await anyio.sleep(then_wait)

    return lambda _: StreamingResponse(body(), media_type="text/event-stream")


Inbox = MemoryObjectReceiveStream[SessionMessage | Exception]


def lean_client(server: Scripted, max_bytes: int = 1024 * 1024) -> LeanHTTP | None:
    if server.client != "aiohttp":
        return None
    return LeanHTTP(server.url, ALLOWED, AnswerLimit(max_bytes), httpx2.Timeout(5))


@asynccontextmanager
async def wire_to(server: Scripted, *, max_bytes: int = 1024 * 1024) -> AsyncIterator[tuple[Wire, Inbox]]:
    """A `Wire` as `open_session` leaves it (session id and version known) and the SDK inbox it feeds,
    sending with the server's `client`."""
    inbox, received = anyio.create_memory_object_stream[SessionMessage | Exception](16)
    lean = lean_client(server, max_bytes)
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(5)) as http, inbox, received:
        wire = Wire(
            http, server.url, inbox, 4 * max_bytes, session_id=SESSION, protocol_version=VERSION, lean=lean
        )
        try:
            yield wire, received
        finally:
            await wire.aclose()


def drained(received: Inbox) -> list[dict[str, Any]]:
    """Everything handed to the SDK session so far, as wire dicts."""
    out: list[dict[str, Any]] = []
    while True:
        try:
            item = received.receive_nowait()
        except anyio.WouldBlock:
            return out
        assert isinstance(item, SessionMessage)
        out.append(item.message.model_dump(by_alias=True, exclude_none=True, mode="json"))


async def test_sse_answer_others_go_to_the_session(scripted: Scripted) -> None:
    """On an SSE answer, priming and id-only events are skipped, the server's other messages (a log
    notification, a server-to-client request, an answer to another id) reach the SDK session in order,
    a non-JSON-RPC object is dropped, the call's answer is returned unchanged, and what follows it on
    the stream is read and dropped. The POST carries the session id, the version and the params as
    given."""
    log = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "x"}}
    roots = {"jsonrpc": "2.0", "id": 7, "method": "roots/list", "params": {}}
    other = answer({"x": 1}, id="someone-else")
    result = {"content": [{"type": "text", "text": "done"}], "structuredContent": {"n": 1}, "extra": [1]}
    scripted.respond = streamed(
        sse("id: 0", "retry: 100", data(log), data(roots), data({"not": "json-rpc"}), data(other)),
        sse(data(answer(result)), data(log), "id: 9"),
    )
    params = {"name": "echo", "arguments": {"text": "hi"}, "_meta": {"progressToken": "p"}}
    async with wire_to(scripted) as (wire, received):
        assert await wire.call_tool(params) == result
        assert drained(received) == [log, roots, other]  # not the log sent after the answer
    headers, body = scripted.requests[0]
    assert body == {"jsonrpc": "2.0", "id": FIRST_ID, "method": "tools/call", "params": params}
    assert headers["mcp-session-id"] == SESSION and headers["mcp-protocol-version"] == VERSION
    assert headers["accept"] == "application/json, text/event-stream"


async def test_sse_messages_go_to_the_callers_sink(scripted: Scripted) -> None:
    """With `on_message`, every other message of the call's stream goes there (nothing is validated
    or dropped), and none to the SDK session."""
    progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progressToken": "p"}}
    scripted.respond = streamed(sse(data(progress), data({"odd": True}), data(answer(ECHO_RESULT))))
    seen: list[dict[str, Any]] = []

    async def sink(message: dict[str, Any]) -> None:
        seen.append(message)

    async with wire_to(scripted) as (wire, received):
        assert await wire.call_tool({"name": "echo"}, sink) == ECHO_RESULT
        assert drained(received) == []
    assert seen == [progress, {"odd": True}]


async def test_a_stream_held_open_after_the_answer_does_not_hold_the_caller(scripted: Scripted) -> None:
    """After the answer the rest of the stream is read for at most DRAIN_TIMEOUT_S, not to its end."""
    scripted.respond = streamed(sse(data(answer(ECHO_RESULT))), then_wait=30)
    async with wire_to(scripted) as (wire, _):
        started = anyio.current_time()
        with anyio.fail_after(10):
            assert await wire.call_tool({"name": "echo"}) == ECHO_RESULT
        assert anyio.current_time() - started < DRAIN_TIMEOUT_S + 2


async def test_a_stream_without_the_answer_is_an_error(scripted: Scripted) -> None:
    """A stream that ends without the call's answer fails the call; what it did carry is delivered."""
    log = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "x"}}
    scripted.respond = streamed(sse(data(log), data(answer(ECHO_RESULT, id="scailink-999"))))
    async with wire_to(scripted) as (wire, received):
        with pytest.raises(UpstreamHTTPError, match="closed the call's stream without an answer"):
            await wire.call_tool({"name": "echo"})
        assert drained(received) == [log, answer(ECHO_RESULT, id="scailink-999")]


@pytest.mark.parametrize(
    ("respond", "error"),
    [
        (reply(body=b"{not json", content_type="application/json"), "not JSON"),
        (reply(body=json.dumps([answer(ECHO_RESULT)]).encode(), content_type="application/json"), "batch"),
        (reply(body=b'"a string"', content_type="application/json"), "non-object"),
        (streamed(sse("data: {not json")), "not JSON"),
        (streamed(sse("data: 42")), "non-object"),
        (reply(body=b"<html>hi</html>", content_type="text/html"), "unexpected content type text/html"),
        (reply(body=b"no type"), "unexpected content type none"),
    ],
    ids=["json-garbage", "json-batch", "json-scalar", "sse-garbage", "sse-scalar", "html", "no-type"],
)
async def test_malformed_answers_are_errors(scripted: Scripted, respond: Respond, error: str) -> None:
    """Bodies that are not one JSON-RPC object, or of a type that is neither JSON nor SSE."""
    scripted.respond = respond
    async with wire_to(scripted) as (wire, _):
        with pytest.raises(UpstreamHTTPError, match=error):
            await wire.call_tool({"name": "echo"})


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (answer(ECHO_RESULT, id="scailink-2"), "answered another request"),
        (answer(ECHO_RESULT, id=None), "answered another request"),
        (answer(), "no result object"),
        (answer(["not", "an", "object"]), "no result object"),
        (answer(error="boom"), "no result object"),  # an `error` that is not an object is no error
    ],
    ids=["other-id", "null-id", "no-result", "list-result", "string-error"],
)
async def test_answers_of_the_wrong_shape_are_errors(
    scripted: Scripted, message: dict[str, Any], error: str
) -> None:
    """A JSON answer must be the call's own (same id) and carry a result object."""
    scripted.respond = lambda _: JSONResponse(message)
    async with wire_to(scripted) as (wire, _):
        with pytest.raises(UpstreamHTTPError, match=error):
            await wire.call_tool({"name": "echo"})


@pytest.mark.parametrize("status", [200, 400, 500])
@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ({"code": -32602, "message": "bad arguments", "data": {"field": "text"}}, (-32602, "bad arguments")),
        ({"code": "E1", "message": 12}, (-32603, "upstream error")),
        ({}, (-32603, "upstream error")),
    ],
    ids=["complete", "malformed-code-and-message", "empty"],
)
async def test_json_rpc_errors_are_raised_as_such(
    scripted: Scripted, status: int, error: dict[str, Any], expected: tuple[int, str]
) -> None:
    """A JSON-RPC error answer is an `MCPError` with the upstream's code, message and data (a code or
    message of the wrong type falls back to -32603 "upstream error"), whatever the HTTP status; at an
    error status its id may be null."""
    message = answer(id=FIRST_ID if status == 200 else None, error=error)
    scripted.respond = lambda _: JSONResponse(message, status_code=status)
    async with wire_to(scripted) as (wire, _):
        with pytest.raises(MCPError) as err:
            await wire.call_tool({"name": "echo"})
    assert (err.value.error.code, err.value.error.message) == expected
    assert err.value.error.data == error.get("data")


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [
        (202, b"", None),
        (503, b"try later", "text/plain"),
        (500, b"{not json", "application/json"),
        (400, b"[1, 2]", "application/json"),
        (400, b'{"jsonrpc": "2.0", "id": null}', "application/json"),
    ],
    ids=["accepted", "unavailable", "json-garbage", "json-list", "json-without-error"],
)
async def test_http_statuses_without_a_json_rpc_error_are_http_errors(
    scripted: Scripted, status: int, body: bytes, content_type: str | None
) -> None:
    """202 (no answer will come on this POST) and any error status whose body carries no JSON-RPC
    error raise `UpstreamHTTPError` naming the status."""
    scripted.respond = reply(status, body, content_type)
    async with wire_to(scripted) as (wire, _):
        with pytest.raises(UpstreamHTTPError, match=f"^upstream answered HTTP {status}$"):
            await wire.call_tool({"name": "echo"})


@pytest.mark.parametrize("content_type", [None, "application/json"])
async def test_a_404_to_our_session_is_session_gone(scripted: Scripted, content_type: str | None) -> None:
    """A 404 to a request carrying a session id means the upstream forgot the session, whatever the
    body says (the SDK's server sends a JSON-RPC error with it)."""
    body = b'{"jsonrpc": "2.0", "id": null, "error": {"code": -32600, "message": "Session not found"}}'
    scripted.respond = reply(404, body if content_type else b"", content_type)
    async with wire_to(scripted) as (wire, _):
        with pytest.raises(SessionGone):
            await wire.call_tool({"name": "echo"})


async def test_an_expired_session_is_the_upstreams_404(upstream: UpstreamServer) -> None:
    """A real upstream that forgot the session (restarted) answers 404; the lean path raises
    `SessionGone` at once (the pool then opens a new session and sends the call again)."""
    target = UpstreamTarget("s1", upstream.url, "streamable_http")
    with anyio.fail_after(30):
        async with open_session(target, ALLOWED, connect_timeout=5, read_timeout=10) as session:
            assert session.wire is not None and session.wire.session_id
            result = await session.wire.call_tool({"name": "echo", "arguments": {"text": "before"}})
            assert result["content"] == [{"type": "text", "text": "before"}]
            await anyio.to_thread.run_sync(upstream.restart)
            with pytest.raises(SessionGone):
                await session.wire.call_tool({"name": "echo", "arguments": {"text": "after"}})


async def test_a_sessionless_wire_sends_no_session_headers(scripted: Scripted) -> None:
    """Without a session id (a stateless upstream) or a negotiated version, neither header is sent."""
    inbox, received = anyio.create_memory_object_stream[SessionMessage | Exception](1)
    async with httpx2.AsyncClient(timeout=httpx2.Timeout(5)) as http, inbox, received:
        wire = Wire(http, scripted.url, inbox, 1024 * 1024, lean=lean_client(scripted))
        assert await wire.call_tool({"name": "echo"}) == ECHO_RESULT
        await wire.aclose()
    headers, _ = scripted.requests[0]
    assert "mcp-session-id" not in headers and "mcp-protocol-version" not in headers


async def test_a_stateless_upstream_works_without_a_session_id() -> None:
    """A real stateless upstream assigns no session id; lean calls go through all the same."""
    with UpstreamServer(stateless=True) as stateless:
        target = UpstreamTarget("s1", stateless.url, "streamable_http")
        with anyio.fail_after(30):
            async with open_session(target, ALLOWED, connect_timeout=5, read_timeout=10) as session:
                assert session.wire is not None and session.wire.session_id is None
                for text in ("one", "two"):
                    result = await session.wire.call_tool({"name": "echo", "arguments": {"text": text}})
                    assert result["content"] == [{"type": "text", "text": text}]
