"""The `/mcp` front (issue 14) against a real ScaiLink and a real upstream over HTTP on 127.0.0.1, read
as raw HTTP: which requests it answers itself (the `scailink_mcp_front_answers` gauge), that what it
leaves to the SDK gets the SDK's answer (unknown or foreign session: 404), that it answers in the SDK's
framing, and that a `notifications/cancelled` of a call it serves cancels that call.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest

from tests.conftest import LiveApp, TokenFactory, auth_headers
from tests.test_mcp_gateway import register
from tests.upstream import UpstreamServer

pytestmark = pytest.mark.anyio

ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
NOT_FOUND = {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Session not found"}}


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer() as server:
        yield server


async def answered(c: httpx.AsyncClient) -> float:
    for line in (await c.get("/metrics")).text.splitlines():
        if line.startswith("scailink_mcp_front_answers "):
            return float(line.split()[1])
    raise AssertionError("no scailink_mcp_front_answers gauge")


async def open_session(
    c: httpx.AsyncClient, headers: dict[str, str], capabilities: Any = None
) -> dict[str, str]:
    params = {
        "protocolVersion": "2025-11-25",
        "capabilities": capabilities or {},
        "clientInfo": {"name": "t", "version": "1"},
    }
    opened = await c.post(
        "/mcp", json={"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params}, headers=headers
    )
    assert opened.status_code == 200, opened.text
    return {
        **headers,
        "mcp-session-id": opened.headers["mcp-session-id"],
        "mcp-protocol-version": "2025-11-25",
    }


def call(request_id: Any, name: str, arguments: dict[str, Any], **params: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": request_id,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments, **params},
    }


def frames(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[len("data: ") :]) for line in text.splitlines() if line.startswith("data: ")]


async def test_what_the_front_answers_and_what_it_leaves_to_the_sdk(
    live: LiveApp, token: TokenFactory, upstream: UpstreamServer
) -> None:
    alice, bob = token("u1", "t1", ("tenant_user",)), token("u2", "t1", ("tenant_user",))
    server = await register(live, alice, name="up", endpoint_url=upstream.url)
    echo = f"remote.u1.{server['slug']}.echo"
    headers = {**auth_headers(alice), **ACCEPT}
    async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as c:
        session = await open_session(c, headers)
        before = await answered(c)

        # Served by the front, in the SDK's SSE framing and headers.
        reply = await c.post("/mcp", json=call(1, echo, {"text": "hi"}), headers=session)
        assert reply.status_code == 200
        assert reply.headers["content-type"] == "text/event-stream"
        assert reply.headers["mcp-session-id"] == session["mcp-session-id"]
        assert reply.text.startswith("event: message\r\ndata: ") and reply.text.endswith("\r\n\r\n")
        assert frames(reply.text) == [
            {
                "jsonrpc": "2.0",
                "id": 1,
                "result": {"content": [{"type": "text", "text": "hi"}], "isError": False},
            }
        ]
        assert await answered(c) == before + 1

        # Left to the SDK: an unknown name (-32602), a progress token, an unknown session, another
        # principal's session (the same 404 as an unknown one).
        unknown = await c.post("/mcp", json=call("u", "remote.u1.nope.echo", {}), headers=session)
        assert frames(unknown.text)[0]["error"]["code"] == -32602
        with_progress = call(2, echo, {"text": "p"}, _meta={"progressToken": "t1"})
        assert frames((await c.post("/mcp", json=with_progress, headers=session)).text)[-1]["id"] == 2
        gone = await c.post(
            "/mcp", json=call(3, echo, {"text": "x"}), headers={**session, "mcp-session-id": "f" * 32}
        )
        assert (gone.status_code, gone.json()) == (404, NOT_FOUND)
        foreign = {**session, **auth_headers(bob)}
        stolen = await c.post("/mcp", json=call(4, echo, {"text": "x"}), headers=foreign)
        assert (stolen.status_code, stolen.json()) == (404, NOT_FOUND)
        assert await answered(c) == before + 1

        # A client that declared sampling is served by the SDK (the upstream may ask it something).
        capable = await open_session(c, headers, {"sampling": {}})
        assert (
            frames((await c.post("/mcp", json=call(5, echo, {"text": "s"}), headers=capable)).text)[0]["id"]
            == 5
        )
        assert await answered(c) == before + 1


async def test_a_cancelled_call_of_the_front_is_cancelled(
    live: LiveApp, token: TokenFactory, upstream: UpstreamServer
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="up", endpoint_url=upstream.url)
    ns = f"remote.u1.{server['slug']}"
    async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as c:
        session = await open_session(c, {**auth_headers(tok), **ACCEPT})
        got: dict[str, Any] = {}

        async def slow() -> None:
            got["reply"] = await c.post(
                "/mcp", json=call("slow", f"{ns}.sleep_ms", {"ms": 20_000}), headers=session
            )

        with anyio.fail_after(10):  # well before the 20 s the call would take
            async with anyio.create_task_group() as tg:
                tg.start_soon(slow)
                while not upstream._in_flight:  # noqa: ASYNC110  (another thread's state: the call runs there)
                    await anyio.sleep(0.01)
                note = {
                    "jsonrpc": "2.0",
                    "method": "notifications/cancelled",
                    "params": {"requestId": "slow"},
                }
                ack = await c.post("/mcp", json=note, headers=session)
                assert ack.status_code == 202
        cancelled = frames(got["reply"].text)
        assert cancelled == [
            {"jsonrpc": "2.0", "id": "slow", "error": {"code": -32800, "message": "Request cancelled"}}
        ]
        # The session goes on.
        after = await c.post("/mcp", json=call(9, f"{ns}.echo", {"text": "still here"}), headers=session)
        assert frames(after.text)[0]["result"]["content"][0]["text"] == "still here"
