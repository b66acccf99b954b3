"""Fields the SDK does not know arrive unchanged (issue 14): in a `tools/call` result, in a content
item, in `_meta`, through `/mcp` in both protocol eras, through the per-server endpoint and through
REST invoke.

The upstream is a hand-written MCP server over real HTTP on 127.0.0.1 (`RawUpstream`): an SDK server
would itself drop what its models do not know, so only a server writing its own JSON can send such
fields. The downstream side is raw HTTP too (an SDK client would drop them on its side): the test
reads the bytes ScaiLink sends. Through `/mcp` the answer must be served by the front (its gauge
moves), with the upstream's result bytes, only the JSON-RPC id rewritten.

Not covered here: unknown fields of a tool object in `tools/list` (the catalog stores tools as the
SDK's models dump them; raw tool objects are the list pages' part of issue 14).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.conftest import LiveApp, TokenFactory, auth_headers
from tests.servers import ThreadedServer
from tests.test_mcp_gateway import register

pytestmark = pytest.mark.anyio

RESULT: dict[str, Any] = {
    "content": [
        {
            "type": "text",
            "text": "hello",
            "x-vendor-item": {"kept": [1, 2, {"deep": None}]},
            "_meta": {"vendor.example/item": True},
        },
        {"type": "x-vendor-kind", "payload": "an item type newer than the SDK"},
    ],
    "isError": False,
    "x-vendor-result": {"nested": {"a": 1.5, "b": "ü"}},
    "_meta": {"vendor.example/trace": "abc", "vendor.example/n": 12345678901234567890123},
}
TOOL = {
    "name": "vendor",
    "description": "answers with fields the SDK does not know",
    "inputSchema": {"type": "object", "properties": {"q": {"type": "string"}}},
}
META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
    "io.modelcontextprotocol/clientInfo": {"name": "raw", "version": "1"},
}
ACCEPT = {"accept": "application/json, text/event-stream", "content-type": "application/json"}


class RawUpstream(ThreadedServer):
    """Speaks the handshake era by hand; `tools/call` answers `RESULT` as JSON or as one SSE event."""

    def __init__(self, *, sse: bool) -> None:
        self.sse = sse
        self.calls: list[dict[str, Any]] = []
        super().__init__(Starlette(routes=[Route("/mcp", self.endpoint, methods=["POST", "GET", "DELETE"])]))

    def answer(self, message: dict[str, Any]) -> dict[str, Any]:
        method, params = message["method"], message.get("params") or {}
        if method == "initialize":
            return {
                "protocolVersion": params["protocolVersion"],
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "raw", "version": "1"},
            }
        if method == "tools/list":
            return {"tools": [TOOL]}
        if method == "tools/call":
            self.calls.append(params)
            return RESULT
        return {}

    async def endpoint(self, request: Request) -> Response:
        if request.method != "POST":
            return Response(status_code=405)
        message = json.loads(await request.body())
        if "id" not in message:
            return Response(status_code=202)
        body = {"jsonrpc": "2.0", "id": message["id"], "result": self.answer(message)}
        headers = {"mcp-session-id": "raw-session"}
        if self.sse and message["method"] == "tools/call":
            frame = f"event: message\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"
            return Response(frame, media_type="text/event-stream", headers=headers)
        return JSONResponse(body, headers=headers)


@pytest.fixture(params=["json", "sse"])
def raw_upstream(request: pytest.FixtureRequest) -> Iterator[RawUpstream]:
    with RawUpstream(sse=request.param == "sse") as server:
        yield server


def _front_answers(text: str) -> float:
    for line in text.splitlines():
        if line.startswith("scailink_mcp_front_answers "):
            return float(line.split()[1])
    raise AssertionError("no scailink_mcp_front_answers gauge")


def _sse_message(response: httpx.Response) -> dict[str, Any]:
    assert response.headers["content-type"].startswith("text/event-stream"), response.text
    data = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    assert len(data) == 1, response.text
    message: dict[str, Any] = json.loads(data[0])
    return message


async def _handshake(c: httpx.AsyncClient, url: str, headers: dict[str, str]) -> dict[str, str]:
    init = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "1"},
        },
    }
    opened = await c.post(url, json=init, headers=headers)
    assert opened.status_code == 200, opened.text
    session = {
        **headers,
        "mcp-session-id": opened.headers["mcp-session-id"],
        "mcp-protocol-version": "2025-11-25",
    }
    done = await c.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=session)
    assert done.status_code == 202
    return session


async def test_unknown_fields_pass_through_both_eras_and_rest(
    live: LiveApp, token: TokenFactory, raw_upstream: RawUpstream
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="raw", endpoint_url=f"{raw_upstream.base_url}/mcp")
    name = f"remote.u1.{server['slug']}.vendor"
    headers = {**auth_headers(tok), **ACCEPT}
    async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as c:
        before = _front_answers((await c.get("/metrics")).text)

        # Handshake era, /mcp: an SSE answer whose result is the upstream's, field for field.
        session = await _handshake(c, "/mcp", headers)
        call = {
            "jsonrpc": "2.0",
            "id": "call-1",
            "method": "tools/call",
            "params": {"name": name, "arguments": {}},
        }
        answer = await c.post("/mcp", json=call, headers=session)
        message = _sse_message(answer)
        assert message == {"jsonrpc": "2.0", "id": "call-1", "result": RESULT}
        compact = json.dumps(RESULT, separators=(",", ":"), ensure_ascii=False)
        if not raw_upstream.sse:  # the upstream's own bytes (Starlette's JSONResponse writes them compact)
            assert f'"result":{compact}}}' in answer.text

        # 2026-07-28 era, /mcp: JSON; what the SDK adds (resultType, serverInfo) merged into `_meta`.
        modern = {
            **headers,
            "mcp-protocol-version": "2026-07-28",
            "mcp-method": "tools/call",
            "mcp-name": name,
        }
        params = {"name": name, "arguments": {"q": "x"}, "_meta": META}
        answer = await c.post(
            "/mcp", json={"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": params}, headers=modern
        )
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/json", answer.text
        result = answer.json()["result"]
        assert result.pop("resultType") == "complete"
        stamp = result["_meta"].pop("io.modelcontextprotocol/serverInfo")
        assert stamp["name"] == "scailink"
        assert result == RESULT and answer.json()["id"] == 7

        # The per-server endpoint (upstream names), handshake era.
        single = f"/v1/modules/scailink/remote-servers/{server['id']}/mcp"
        session = await _handshake(c, single, headers)
        call["params"] = {"name": "vendor", "arguments": {"q": "y"}}
        assert _sse_message(await c.post(single, json=call, headers=session))["result"] == RESULT

        assert _front_answers((await c.get("/metrics")).text) == before + 3, "the front served all three"

        # REST invoke: the same result in the envelope's data.
        rest = await c.post(
            f"/v1/modules/scailink/users/u1/tools/{name}/invoke",
            json={"arguments": {}},
            headers=auth_headers(tok),
        )
        assert rest.status_code == 200, rest.text
        assert rest.json()["data"] == RESULT
    assert [p.get("arguments") for p in raw_upstream.calls] == [{}, {"q": "x"}, {"q": "y"}, {}]
