"""A real MCP server over Streamable HTTP on 127.0.0.1 that answers with raw JSON it is given.

Why not `tests/upstream.py`: an SDK server validates and re-dumps its own results per protocol version,
so it can never send a field the SDK does not know. This one speaks the handshake era (initialize,
session id, notifications answered 202) with `application/json` answers and lists exactly the objects
of `RawUpstream.listing`, so a test can show that fields newer than the SDK (unknown keys in a tool,
a prompt, a resource, vendor `_meta`) arrive unchanged through ScaiLink. `tools/call` answers
`RawUpstream.call_result` as is.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.servers import ThreadedServer

PROTOCOL_VERSION = "2025-11-25"
METHOD_NOT_FOUND = -32601

# A tool with what a newer revision (or a vendor) might add: unknown top-level keys, unknown keys in
# known objects (`annotations`, `execution`), vendor `_meta`, an `x-` keyword in the schema.
NEWER_TOOL: dict[str, Any] = {
    "name": "future_tool",
    "title": "Future tool",
    "description": "Has fields the SDK does not know.",
    "inputSchema": {"type": "object", "properties": {"q": {"type": "string"}}, "x-vendor-hint": 3},
    "annotations": {"readOnlyHint": True, "x-sandbox": "strict"},
    "execution": {"taskSupport": "optional", "futureKnob": [1, 2]},
    "_meta": {"com.example/cost": {"tokens": 12}, "io.example/tags": ["a", "b"]},
    "deprecation": {"since": "2027-01-01", "replacement": "future_tool_v2"},
    "scopes": ["read:docs"],
}
PLAIN_TOOL: dict[str, Any] = {"name": "plain", "inputSchema": {"type": "object"}}
NEWER_PROMPT: dict[str, Any] = {
    "name": "future_prompt",
    "arguments": [{"name": "topic", "required": True, "x-widget": "textarea"}],
    "_meta": {"com.example/prompt": True},
    "category": "writing",
}
NEWER_RESOURCE: dict[str, Any] = {
    "uri": "file:///docs/a.md",
    "name": "a",
    "mimeType": "text/markdown",
    "_meta": {"com.example/etag": "abc"},
    "freshness": {"maxAgeS": 60},
}
NEWER_TEMPLATE: dict[str, Any] = {
    "uriTemplate": "file:///docs/{name}",
    "name": "doc",
    "_meta": {"com.example/kind": "doc"},
    "completionHint": "name",
}


class RawUpstream(ThreadedServer):
    def __init__(self) -> None:
        self.listing: dict[str, list[dict[str, Any]]] = {
            "tools": [NEWER_TOOL, PLAIN_TOOL],
            "prompts": [NEWER_PROMPT],
            "resources": [NEWER_RESOURCE],
            "resourceTemplates": [NEWER_TEMPLATE],
        }
        self.call_result: dict[str, Any] = {"content": [{"type": "text", "text": "ok"}]}
        self.sessions: set[str] = set()
        app = Starlette(routes=[Route("/mcp", self._endpoint, methods=["GET", "POST", "DELETE"])])
        super().__init__(app)
        self.url = f"{self.base_url}/mcp"

    def _answer(self, message: dict[str, Any]) -> dict[str, Any]:
        method, rid = message.get("method"), message.get("id")
        lists = {
            "tools/list": "tools",
            "prompts/list": "prompts",
            "resources/list": "resources",
            "resources/templates/list": "resourceTemplates",
        }
        if method == "initialize":
            result: dict[str, Any] = {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {"tools": {}, "prompts": {}, "resources": {}},
                "serverInfo": {"name": "raw-upstream", "version": "1.0"},
            }
        elif method in lists:
            result = {lists[method]: self.listing[lists[method]]}
        elif method == "tools/call":
            result = self.call_result
        elif method == "ping":
            result = {}
        else:
            error = {"code": METHOD_NOT_FOUND, "message": f"no method {method}"}
            return {"jsonrpc": "2.0", "id": rid, "error": error}
        return {"jsonrpc": "2.0", "id": rid, "result": result}

    async def _endpoint(self, request: Request) -> Response:
        if request.method == "GET":
            return Response(status_code=405)  # no standalone stream
        if request.method == "DELETE":
            self.sessions.discard(request.headers.get("mcp-session-id", ""))
            return Response(status_code=200)
        message = json.loads(await request.body())
        if "id" not in message:
            return Response(status_code=202)  # a notification
        headers: dict[str, str] = {}
        if message.get("method") == "initialize":
            session_id = uuid.uuid4().hex
            self.sessions.add(session_id)
            headers["mcp-session-id"] = session_id
        elif request.headers.get("mcp-session-id") not in self.sessions:
            return Response(status_code=404)
        return JSONResponse(self._answer(message), headers=headers)
