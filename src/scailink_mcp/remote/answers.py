"""The bound on every answer read from an upstream, on every client that reads one.

One JSON body, or one SSE event, may be at most `AnswerLimit.max_bytes` bytes as they arrive on the
wire; the read stops at the first chunk past it (nothing more is buffered) and the connection is
dropped. Compressed bodies are never accepted (they could not be bounded before inflating): requests
ask for `identity` and a compressed answer is refused. `LimitedTransport` enforces this under the
SDK's httpx2 transports, `lean_http.LeanResponse` on the warm call path.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx2

from scailink_mcp.errors import ResultTooLarge


class AnswerTooLarge(httpx2.SSEError, httpx2.StreamError):
    """An upstream answer (a JSON body or one SSE event) went past the session's `AnswerLimit`.

    Both an `SSEError` and a `StreamError`: the SDK's Streamable HTTP transport then resolves the
    request that was reading with an error (a JSON-RPC error for that request) instead of crashing the
    whole session; the lean path and the pool map it to `errors.ResultTooLarge`.
    """


class AnswerRefused(httpx2.SSEError, httpx2.StreamError):
    """An upstream answered with a compressed body although ScaiLink asked for `identity`."""

    @classmethod
    def unless_identity(cls, content_encoding: str) -> AnswerRefused | None:
        """The refusal of an answer with this `Content-Encoding` header, or None for identity."""
        encoding = content_encoding.strip().lower()
        if encoding in ("", "identity"):
            return None
        return cls(f"the upstream sent a {encoding!r}-encoded answer; only identity is accepted")


@dataclass
class AnswerLimit:
    """The bound of one session's answers; `tripped` counts reads it stopped (read by the pool)."""

    max_bytes: int
    tripped: int = 0

    def describe(self) -> str:
        return f"the upstream answer is larger than {self.max_bytes} bytes; the read was stopped there"

    def trip(self) -> AnswerTooLarge:
        self.tripped += 1
        return AnswerTooLarge(f"{ResultTooLarge.code}: {self.describe()}")

    def error(self) -> ResultTooLarge:
        return ResultTooLarge(self.describe(), details={"max_bytes": self.max_bytes})


# A blank line ends an SSE event; lines end with CRLF, LF or CR (CRLF CRLF contains LF CR).
_EVENT_END = re.compile(rb"\n\n|\r\r|\n\r")
_EVENT_ENDS = {b"\n\n", b"\r\r", b"\n\r"}


class _BoundedStream(httpx2.AsyncByteStream):
    """A response body that raises `AnswerTooLarge` at the first chunk past the limit.

    `per_event`: the count restarts at every blank line (an SSE event boundary), so a long-lived
    stream of small events is fine while one oversized event is not.
    """

    def __init__(self, inner: httpx2.AsyncByteStream, limit: AnswerLimit, max_bytes: int, *, per_event: bool):
        self._inner = inner
        self._limit = limit
        self._max = max_bytes
        self._per_event = per_event

    async def __aiter__(self) -> AsyncIterator[bytes]:
        count = 0  # bytes of the body, or of the SSE event still open
        previous = b""  # the last byte of the previous chunk (an event end may span two chunks)
        async for chunk in self._inner:
            start = 0  # where the open event's bytes begin in this chunk
            if self._per_event:
                if previous + chunk[:1] in _EVENT_ENDS:
                    self._check(count + 1)
                    count, start = 0, 1
                for end in _EVENT_END.finditer(chunk, start):
                    self._check(count + end.end() - start)  # the event this blank line ends
                    count, start = 0, end.end()
                previous = chunk[-1:]
            count += len(chunk) - start
            self._check(count)
            yield chunk

    def _check(self, size: int) -> None:
        if size > self._max:
            raise self._limit.trip()

    async def aclose(self) -> None:
        await self._inner.aclose()


class _RefusedStream(httpx2.AsyncByteStream):
    def __init__(self, inner: httpx2.AsyncByteStream, refusal: AnswerRefused) -> None:
        self._inner = inner
        self._refusal = refusal

    async def __aiter__(self) -> AsyncIterator[bytes]:
        raise self._refusal
        yield b""  # pragma: no cover  (makes this an async generator)

    async def aclose(self) -> None:
        await self._inner.aclose()


class LimitedTransport(httpx2.AsyncBaseTransport):
    """Wraps the guarded transport: every response body is read through an `AnswerLimit`.

    JSON (and any other non-SSE) bodies are bounded as a whole, `text/event-stream` bodies per event.
    A `Content-Length` over the limit fails on the first read.
    """

    def __init__(self, inner: httpx2.AsyncBaseTransport, limit: AnswerLimit) -> None:
        self._inner = inner
        self._limit = limit

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        request.headers["accept-encoding"] = "identity"
        response = await self._inner.handle_async_request(request)
        stream = response.stream
        if not isinstance(stream, httpx2.AsyncByteStream):  # pragma: no cover  (an async transport's)
            return response
        refusal = AnswerRefused.unless_identity(response.headers.get("content-encoding", ""))
        content_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
        if refusal is not None:
            response.stream = _RefusedStream(stream, refusal)
        elif content_type == "text/event-stream":
            response.stream = _BoundedStream(stream, self._limit, self._limit.max_bytes, per_event=True)
        else:
            declared = response.headers.get("content-length", "")
            bound = self._limit.max_bytes
            if declared.isdigit() and int(declared) > bound:
                bound = -1  # fails on the first chunk, before anything is buffered
            response.stream = _BoundedStream(stream, self._limit, bound, per_event=False)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()
