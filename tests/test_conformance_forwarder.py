"""`conformance/forwarder.py`, the token-injecting proxy the conformance suite talks to: headers pass
through as the bytes that arrived (trailing whitespace of any kind never answers 500), our token is
added, and a target that is gone answers 502. Against a real ScaiLink (`LiveApp`) with a real
registered upstream, with the SDK client in both eras and raw HTTP/1.1 requests."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import anyio
import httpx2
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from conformance.forwarder import build
from tests.conftest import LiveApp, TokenFactory
from tests.servers import HOST, ThreadedServer
from tests.test_mcp_gateway import register
from tests.test_protocol_fidelity import ERAS, Era
from tests.upstream import UpstreamServer

pytestmark = pytest.mark.anyio

NBSP = "\u00a0".encode()
IDEOGRAPHIC_SPACE = "\u3000".encode()


def raw_request(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """One HTTP/1.1 request written byte for byte (clients refuse to send such headers)."""
    with socket.create_connection((HOST, port), timeout=20) as sock:
        sock.sendall(head + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head_out, _, body = data.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head_out.lower():
        chunks, rest = [], body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            chunks.append(rest[: int(size, 16)])
            rest = rest[int(size, 16) + 2 :]
        body = b"".join(chunks)
    return int(data.split(b" ", 2)[1]), body


class EchoTarget(ThreadedServer):
    """Answers every request with the raw headers it received (latin-1 text, as bytes arrived)."""

    def __init__(self) -> None:
        async def echo(request: Request) -> JSONResponse:
            return JSONResponse([[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.headers.raw])

        super().__init__(Starlette(routes=[Route("/{path:path}", echo, methods=["GET", "POST"])]))


@pytest.fixture
def echo() -> Iterator[EchoTarget]:
    with EchoTarget() as server:
        yield server


def test_headers_pass_byte_for_byte(echo: EchoTarget) -> None:
    with ThreadedServer(build(echo.base_url, "the-token")) as front:
        status, body = raw_request(
            front.port,
            b"POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer not-this-one\r\n"
            b"X-Ascii: value \t \r\nX-Nbsp: value" + NBSP + b"\r\nX-Wide: v" + IDEOGRAPHIC_SPACE + b" \r\n",
        )
    assert status == 200, body
    seen = dict(json.loads(body))
    assert seen["x-ascii"] == "value"
    assert seen["x-nbsp"].encode("latin-1") == b"value" + NBSP
    assert seen["x-wide"].encode("latin-1") == b"v" + IDEOGRAPHIC_SPACE
    assert seen["authorization"] == "Bearer the-token" and seen["host"] == "127.0.0.1"


def test_a_target_that_is_gone_answers_502() -> None:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        closed_port = sock.getsockname()[1]  # bound, never listening: connections are refused
        with ThreadedServer(build(f"http://{HOST}:{closed_port}", "t")) as front:
            status, body = raw_request(front.port, b"GET /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    assert status == 502 and b"unreachable" in body


@pytest.mark.parametrize("era", ERAS)
async def test_scailink_through_the_forwarder_in_both_eras(
    live: LiveApp, token: TokenFactory, era: Era
) -> None:
    """The SDK client sends a header ending in a no-break space; ScaiLink answers through the proxy."""
    tok = token("u1", "t1", ("tenant_user",))
    with UpstreamServer() as upstream, ThreadedServer(build(live.base_url, tok)) as front:
        server = await register(live, tok, name="fwd", endpoint_url=upstream.url)
        headers = {"x-client-note": b"note" + NBSP}
        with anyio.fail_after(60):
            async with (
                httpx2.AsyncClient(headers=headers, timeout=30) as http,
                streamable_http_client(f"{front.base_url}/mcp", http_client=http) as (read, write),
                ClientSession(read, write) as s,
            ):
                await (s.discover() if era == "2026-07-28" else s.initialize())
                result = await s.call_tool(f"remote.u1.{server['slug']}.echo", {"text": "via proxy"})
                assert result.content[0].text == "via proxy"  # type: ignore[union-attr]
        # the same ping written by hand, with ASCII trailing whitespace on a header
        ping = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}).encode()
        status, body = raw_request(
            front.port,
            b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json \t\r\n"
            b"Accept: application/json, text/event-stream  \r\nMCP-Protocol-Version: 2025-11-25 \r\n"
            b"X-Note: a" + NBSP + b"\r\n",
            ping,
        )
        assert status != 500, body
