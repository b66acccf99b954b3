"""A real MCP server over Streamable HTTP on 127.0.0.1 that answers with raw JSON it is given.

Why not `tests/upstream.py`: an SDK server validates and re-dumps its own results per protocol version,
so it can never send a field the SDK does not know. This one speaks the handshake era (initialize,
session id, notifications answered 202) with `application/json` answers and lists exactly the objects
of `RawUpstream.listing`, so a test can show that fields newer than the SDK (unknown keys in a tool,
a prompt, a resource, vendor `_meta`) arrive unchanged through ScaiLink. `tools/call` answers
`RawUpstream.call_result` as is.

The objects and the answers are `tests/raw_mcp.py`'s (which also serves them over stdio).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.raw_mcp import LISTINGS, answer
from tests.servers import ThreadedServer


class RawUpstream(ThreadedServer):
    def __init__(self) -> None:
        self.listing = {key: list(items) for key, items in LISTINGS.items()}
        self.call_result: dict[str, Any] = {"content": [{"type": "text", "text": "ok"}]}
        self.sessions: set[str] = set()
        app = Starlette(routes=[Route("/mcp", self._endpoint, methods=["GET", "POST", "DELETE"])])
        super().__init__(app)
        self.url = f"{self.base_url}/mcp"

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
        return JSONResponse(answer(message, self.listing, self.call_result), headers=headers)
