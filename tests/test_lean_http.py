"""The warm call's own HTTP client (remote/lean_http.py) against a real HTTP server on 127.0.0.1: it
keeps every guarantee of the httpx2 client it stands in for (checked addresses, no redirects,
identity bodies only, every body bounded: JSON as a whole, SSE per event) and raises httpx2's
exception classes, so the pool maps its failures as before. `tests/test_wire.py` runs every scripted
answer through both clients; `open_session` picks this one for every upstream but an OAuth one."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from scailink_mcp.errors import EndpointForbidden
from scailink_mcp.remote.answers import AnswerLimit, AnswerRefused, AnswerTooLarge
from scailink_mcp.remote.lean_http import LeanHTTP
from scailink_mcp.remote.netguard import RedirectRefused
from scailink_mcp.remote.upstream import UpstreamTarget, open_session, parse_networks
from tests.servers import ThreadedServer
from tests.upstream import UpstreamServer

pytestmark = pytest.mark.anyio

LOOPBACK = parse_networks(["127.0.0.0/8", "::1/128"])
Answer = Callable[[], Response]


class Canned(ThreadedServer):
    """POST /mcp answers with `answer()`, whatever was asked."""

    def __init__(self) -> None:
        self.answer: Answer = lambda: Response(b"{}", media_type="application/json")
        super().__init__(Starlette(routes=[Route("/mcp", self._mcp, methods=["POST"])]), lifespan="off")

    @property
    def url(self) -> str:
        return f"{self.base_url}/mcp"

    async def _mcp(self, request: Request) -> Response:
        await request.body()
        return self.answer()


@pytest.fixture
def canned() -> Iterator[Canned]:
    with Canned() as server:
        yield server


def chunked(*chunks: bytes, media_type: str = "text/event-stream", fail: bool = False) -> Answer:
    """A streamed answer, chunk by chunk (no Content-Length); `fail` drops the connection after them."""

    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk
            await anyio.sleep(0.01)  # separate writes, so the client really reads chunk by chunk
        if fail:
            raise RuntimeError("the server fails mid-body")

    return lambda: StreamingResponse(body(), media_type=media_type)


async def post(
    url: str, *, max_bytes: int = 1000, allowed: Any = LOOPBACK
) -> tuple[int, str, bytes, AnswerLimit]:
    limit = AnswerLimit(max_bytes)
    lean = LeanHTTP(url, allowed, limit, httpx2.Timeout(5))
    try:
        async with lean.post({"content-type": "application/json"}, b"{}") as answer:
            body = await answer.read()
            return answer.status, answer.content_type, body, limit
    finally:
        await lean.aclose()


async def events(url: str, *, max_bytes: int = 1000) -> list[bytes]:
    lean = LeanHTTP(url, LOOPBACK, AnswerLimit(max_bytes), httpx2.Timeout(5))
    try:
        async with lean.post({}, b"{}") as answer:
            return [data async for data in answer.events()]
    finally:
        await lean.aclose()


async def test_sse_events_are_decoded_however_the_chunks_cut_them(canned: Canned) -> None:
    stream = (
        b": a comment\r\n\r\n"  # a comment alone is no event
        b"id: 1\r\n\r\n"  # an event without data (a priming event) is skipped
        b'event: message\r\ndata: {"a":1}\r\n\r\n'
        b"data:no-space\ndata: two lines\n\n"  # LF line ends; data lines are joined by LF
        b"data: cr\r\r"  # CR line ends
    )
    expected = [b'{"a":1}', b"no-space\ntwo lines", b"cr"]
    for size in (1, 2, 5, len(stream)):  # a CRLF split between two chunks is one line end
        canned.answer = chunked(*[stream[i : i + size] for i in range(0, len(stream), size)])
        assert await events(canned.url) == expected, size


async def test_one_sse_event_over_the_limit_stops_the_read(canned: Canned) -> None:
    small = b"data: " + b"x" * 40 + b"\r\n\r\n"
    canned.answer = chunked(*[small] * 60)  # 3 KB of small events under a 100-byte bound pass
    assert len(await events(canned.url, max_bytes=100)) == 60
    for chunks in ([small, b"data: " + b"y" * 200 + b"\n\n", small], [b"data: " + b"z" * 150, b"\n\n"]):
        canned.answer = chunked(*chunks)
        with pytest.raises(AnswerTooLarge):
            await events(canned.url, max_bytes=100)


async def test_json_bodies_are_bounded_whole(canned: Canned) -> None:
    canned.answer = chunked(b"1" * 60, b"1" * 60, media_type="application/json")
    with pytest.raises(AnswerTooLarge):
        await post(canned.url, max_bytes=100)
    canned.answer = chunked(b"1" * 50, b"1" * 50, media_type="application/json")
    status, content_type, body, limit = await post(canned.url, max_bytes=100)
    assert (status, content_type, body, limit.tripped) == (200, "application/json", b"1" * 100, 0)
    # a declared length over the bound fails before reading
    canned.answer = lambda: Response(b"2" * 500, media_type="application/json")
    with pytest.raises(AnswerTooLarge):
        await post(canned.url, max_bytes=100)


async def test_compressed_answers_and_redirects_are_refused(canned: Canned) -> None:
    canned.answer = lambda: Response(
        b"\x1f\x8b", media_type="application/json", headers={"content-encoding": "gzip"}
    )
    with pytest.raises(AnswerRefused, match="identity"):
        await post(canned.url)
    canned.answer = lambda: Response(
        status_code=307, headers={"location": "http://user:pw@elsewhere.test/x?key=1"}
    )
    with pytest.raises(RedirectRefused) as refused:
        await post(canned.url)
    assert "pw" not in str(refused.value) and "key=1" not in str(refused.value)


async def test_only_checked_addresses_are_contacted(canned: Canned) -> None:
    nowhere: list[Any] = []
    with pytest.raises(EndpointForbidden):  # an IP literal, checked by LeanHTTP itself
        await post(canned.url, allowed=nowhere)
    with pytest.raises(EndpointForbidden):  # a name, checked by the resolver at connect time
        await post(f"http://localhost:{canned.port}/mcp", allowed=nowhere)
    status, *_ = await post(f"http://localhost:{canned.port}/mcp")
    assert status == 200


async def test_failures_are_httpx2_errors(canned: Canned) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    with pytest.raises(httpx2.ConnectError):
        await post(f"http://127.0.0.1:{port}/mcp")
    canned.answer = chunked(b"1" * 10, media_type="application/json", fail=True)
    with pytest.raises(httpx2.TransportError):
        await post(canned.url)


async def test_open_session_uses_it_except_for_oauth_upstreams() -> None:
    with UpstreamServer() as upstream:
        with anyio.fail_after(30):
            plain = UpstreamTarget("s1", upstream.url, "streamable_http")
            async with open_session(plain, LOOPBACK, connect_timeout=5, read_timeout=10) as session:
                assert session.wire is not None and session.wire.lean is not None
                result = await session.wire.call_tool({"name": "echo", "arguments": {"text": "lean"}})
                assert result["content"] == [{"type": "text", "text": "lean"}]
            oauth = UpstreamTarget("s1", upstream.url, "streamable_http", auth=httpx2.Auth())
            async with open_session(oauth, LOOPBACK, connect_timeout=5, read_timeout=10) as session:
                assert session.wire is not None and session.wire.lean is None
                result = await session.wire.call_tool({"name": "echo", "arguments": {"text": "httpx2"}})
                assert result["content"] == [{"type": "text", "text": "httpx2"}]
