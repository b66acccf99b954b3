"""Raw MCP answers (no SDK on the server side, so nothing drops a field the SDK does not know): the
listing of `tests/raw_upstream.py` and, run as `python tests/raw_mcp.py`, a stdio MCP server speaking
the same (one JSON message per line), the way a desktop client's local server does. Standard library
only, so it runs as a script.
"""

from __future__ import annotations

import json
import sys
from typing import Any

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


LISTINGS: dict[str, list[dict[str, Any]]] = {
    "tools": [NEWER_TOOL, PLAIN_TOOL],
    "prompts": [NEWER_PROMPT],
    "resources": [NEWER_RESOURCE],
    "resourceTemplates": [NEWER_TEMPLATE],
}
LIST_KEYS = {
    "tools/list": "tools",
    "prompts/list": "prompts",
    "resources/list": "resources",
    "resources/templates/list": "resourceTemplates",
}


def answer(
    message: dict[str, Any], listing: dict[str, list[dict[str, Any]]], call: dict[str, Any]
) -> dict[str, Any]:
    method, rid = message.get("method"), message.get("id")
    if method == "initialize":
        result: dict[str, Any] = {
            "protocolVersion": PROTOCOL_VERSION,
            "capabilities": {"tools": {}, "prompts": {}, "resources": {}},
            "serverInfo": {"name": "raw-upstream", "version": "1.0"},
        }
    elif method in LIST_KEYS:
        result = {LIST_KEYS[method]: listing[LIST_KEYS[method]]}
    elif method == "tools/call":
        result = call
    elif method == "ping":
        result = {}
    else:
        error = {"code": METHOD_NOT_FOUND, "message": f"no method {method}"}
        return {"jsonrpc": "2.0", "id": rid, "error": error}
    return {"jsonrpc": "2.0", "id": rid, "result": result}


def main() -> None:
    """Over stdio: a request per line in, its answer per line out; notifications get nothing."""
    call = {"content": [{"type": "text", "text": "ok"}]}
    for line in sys.stdin:
        if not line.strip():
            continue
        message = json.loads(line)
        if "id" in message and "method" in message:
            sys.stdout.write(json.dumps(answer(message, LISTINGS, call)) + "\n")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
