"""How the `/mcp` front (`mcp_front.py`) writes an answer: byte for byte what the SDK's server writes.

- Handshake era (`Mcp-Session-Id`): the SDK's Streamable HTTP transport answers a request POST with an
  SSE stream (ScaiLink runs it in SSE mode, not JSON-response mode): status 200, the headers below,
  one `event: message` frame per message (CRLF line ends, `sse_starlette`'s framing), the answer last,
  and a `: ping - <time>` comment every 15 s while the request runs.
- 2026-07-28 era: the SDK's single-exchange entry answers `application/json` when the handler is done
  within 15 s without a notification, else commits to `text/event-stream` (its own headers, `: ping`
  comments every 15 s) and ends with the answer frame.

The JSON-RPC envelope is assembled around the result's bytes (`envelope`): only the id is the
caller's, the result is the upstream's bytes when the call path kept them (`remote/wire.py`). A
2026-07-28 result gets what the SDK's serializer adds (`resultType`, the `serverInfo` stamp in
`_meta`), spliced in when the result has neither, else merged on the parsed dict.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from mcp_types import SERVER_INFO_META_KEY, ErrorData, RequestId
from starlette.types import Send

from scailink_mcp.remote.wire import dumps

PING_INTERVAL_S = 15.0
REQUEST_CANCELLED = -32800  # the SDK's code for a handshake-era request cancelled before its answer

_HANDSHAKE_SSE_HEADERS = [
    (b"cache-control", b"no-cache, no-transform"),
    (b"connection", b"keep-alive"),
    (b"content-type", b"text/event-stream"),
]
_MODERN_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"connection", b"keep-alive"),
    (b"x-accel-buffering", b"no"),
]


@dataclass(frozen=True, slots=True)
class Reply:
    """A JSON-RPC `result` as bytes (one JSON object, no line break) and the names of its members;
    or, with `error_code`, the JSON-RPC `error` object as bytes."""

    raw: bytes
    keys: Collection[str]
    error_code: int | None = None

    @classmethod
    def of(cls, result: dict[str, Any]) -> Reply:
        return cls(dumps(result), result.keys())

    @classmethod
    def failure(cls, error: ErrorData) -> Reply:
        return cls(dumps(error.model_dump(by_alias=True, mode="json", exclude_none=True)), (), error.code)


def envelope(request_id: RequestId, result: bytes, *, member: bytes = b"result") -> bytes:
    return b'{"jsonrpc":"2.0","id":' + dumps(request_id) + b',"' + member + b'":' + result + b"}"


def error_envelope(request_id: RequestId, code: int, message: str) -> bytes:
    error = {"code": code, "message": message}
    return b'{"jsonrpc":"2.0","id":' + dumps(request_id) + b',"error":' + dumps(error) + b"}"


def modern_result(reply: Reply, server_info: dict[str, Any]) -> bytes:
    """The result as the SDK serializes it from 2026-07-28 on: `resultType` (default `complete`) and
    the server's identity in `_meta` (a value the result already has wins)."""
    if "_meta" not in reply.keys and "resultType" not in reply.keys:
        body = reply.raw.rstrip()
        extra = b'"resultType":"complete","_meta":{"' + SERVER_INFO_META_KEY.encode() + b'":'
        return body[:-1] + (b"," if reply.keys else b"") + extra + dumps(server_info) + b"}}"
    result = json.loads(reply.raw)
    result.setdefault("resultType", "complete")
    meta = result.get("_meta")
    if meta is None:
        result["_meta"] = {SERVER_INFO_META_KEY: server_info}
    elif isinstance(meta, dict) and meta.get(SERVER_INFO_META_KEY) is None:
        result["_meta"] = {**meta, SERVER_INFO_META_KEY: server_info}
    return dumps(result)


def sse_frame(message: bytes) -> bytes:
    return b"event: message\r\ndata: " + message + b"\r\n\r\n"


class Answer:
    """The HTTP answer of one request the front owns; nothing is sent before the first frame."""

    def __init__(self, send: Send, *, modern: bool, session_id: str | None) -> None:
        self.send = send
        self.modern = modern
        self.session_id = session_id
        self.committed = False
        self.done = False

    async def _commit(self) -> None:
        if self.committed:
            return
        self.committed = True
        if self.modern:
            headers = _MODERN_SSE_HEADERS
        else:
            headers = [*_HANDSHAKE_SSE_HEADERS]
            if self.session_id is not None:
                headers.append((b"mcp-session-id", self.session_id.encode()))
            headers.append((b"x-accel-buffering", b"no"))
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})

    async def _body(self, chunk: bytes, *, more: bool) -> None:
        if self.done:
            return
        await self._commit()
        self.done = not more
        await self.send({"type": "http.response.body", "body": chunk, "more_body": more})

    async def event(self, message: bytes) -> None:
        """A message of the request before its answer (a log message relayed from the upstream)."""
        await self._body(sse_frame(message), more=True)

    async def ping(self) -> None:
        """The keep-alive comment of a request still running (commits the 2026-07-28 answer to SSE)."""
        comment = b": ping\r\n\r\n" if self.modern else f": ping - {datetime.now(UTC)}\r\n\r\n".encode()
        await self._body(comment, more=True)

    async def finish(self, message: bytes, status: int = 200) -> None:
        """The answer: a JSON body in the 2026-07-28 era when nothing was streamed yet (`status`: the
        SDK's status for an error code), else a frame."""
        if self.modern and not self.committed:
            self.committed = self.done = True
            length = str(len(message)).encode()
            headers = [(b"content-length", length), (b"content-type", b"application/json")]
            await self.send({"type": "http.response.start", "status": status, "headers": headers})
            await self.send({"type": "http.response.body", "body": message, "more_body": False})
            return
        await self._body(sse_frame(message), more=False)
