"""The HTTP client of the warm call path: one aiohttp session per pooled upstream session.

Why a second HTTP client beside httpx2 (the SDK's): measured on the 2-core machine, a loop of warm
`tools/call` POSTs with SSE answers against the bench upstream cost 1.0 ms of client CPU per call
through httpx2 (h11's pure-Python HTTP/1.1 state machine, httpcore's pool bookkeeping, several layers
of async iterators over the body) and 0.35 ms through aiohttp (llhttp's C parser, one protocol object
per connection); the upstream leg was ~70 % of ScaiLink's CPU per warm call (bench/README.md, issue
14). Only the lean path's POSTs (`wire.Wire.request`) use it; the handshake, the GET stream,
discovery, health checks and OAuth stay on httpx2.

The guarantees of the httpx2 client (`upstream.limited_http_client`), kept here:
- connections go only to addresses `netguard` checked at connect time (`GuardedResolver`; an IP
  literal is checked once, here, because aiohttp does not resolve literals);
- no redirects (a 3xx raises `netguard.RedirectRefused`), no proxies, no environment, no cookies;
- `identity` encoding only (a compressed answer raises `AnswerRefused`);
- every body is read through the session's `AnswerLimit`: a JSON body as a whole (a `Content-Length`
  over it fails before anything is read), an SSE body per event;
- failures are raised as httpx2's exception classes, so the pool's one mapping of upstream failures
  (`pool.UpstreamPool._failed`, `upstream.error_class_name`) sees the same errors whichever client
  carried the call.
"""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager

import aiohttp
import httpx2
from aiohttp.abc import AbstractResolver, ResolveResult

from scailink_mcp.remote.answers import AnswerLimit, AnswerRefused
from scailink_mcp.remote.netguard import (
    Network,
    RedirectRefused,
    parse_ip_literal,
    resolve_checked,
)

# One SSE line end: CRLF, LF or CR (a CR at the end of a chunk waits for the next one).
_LINE_END = re.compile(rb"\r\n|\n|\r")


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver that answers only addresses `netguard.resolve_checked` allowed (every
    address of a name must be allowed, as for the httpx2 client); it never caches."""

    def __init__(self, allowed: Sequence[Network]) -> None:
        self._allowed = list(allowed)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        addresses = await resolve_checked(host, port, self._allowed)
        return [
            ResolveResult(
                hostname=host,
                host=str(address),
                port=port,
                family=socket.AF_INET6 if address.version == 6 else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        return None


class LeanResponse:
    """One answer, read through the session's `AnswerLimit`."""

    def __init__(self, response: aiohttp.ClientResponse, limit: AnswerLimit) -> None:
        self._response = response
        self._limit = limit
        self.status = response.status
        self.content_type = response.headers.get("content-type", "").lower()

    async def read(self) -> bytes:
        """The whole body; past the limit the read stops at the first chunk over it."""
        declared = self._response.content_length
        if declared is not None and declared > self._limit.max_bytes:
            raise self._limit.trip()
        body = bytearray()
        async for chunk in self._response.content.iter_any():
            body += chunk
            if len(body) > self._limit.max_bytes:
                raise self._limit.trip()
        return bytes(body)

    async def events(self) -> AsyncGenerator[bytes, None]:
        """The `data` of each SSE event (its data lines joined by LF; events without data skipped);
        one event's bytes on the wire past the limit stop the read. Other fields are not needed by
        the call path (`id`, `event`, `retry`, comments)."""
        pending = bytearray()  # bytes of the line still open
        data: list[bytes] = []
        size = 0  # bytes of the event still open, line ends included
        chunks = self._response.content.iter_any()
        eof = False
        while not eof:
            try:
                pending += await anext(chunks)
            except StopAsyncIteration:
                eof = True  # a CR at the very end is a whole line end
            start = 0
            for end in _LINE_END.finditer(pending):
                if not eof and end.group() == b"\r" and end.end() == len(pending):
                    break  # maybe the first half of a CRLF
                line = bytes(pending[start : end.start()])
                size += end.end() - start
                start = end.end()
                if size > self._limit.max_bytes:
                    raise self._limit.trip()
                if line:
                    if line.startswith(b"data:"):
                        data.append(line[6:] if line.startswith(b"data: ") else line[5:])
                    continue
                if data:
                    yield b"\n".join(data)
                data, size = [], 0
            del pending[:start]
            if size + len(pending) > self._limit.max_bytes:
                raise self._limit.trip()

    async def drain(self) -> None:
        """Read what is left of the body, so the connection can serve the next call."""
        async for _ in self._response.content.iter_any():
            pass


class LeanHTTP:
    """The warm call's POSTs of one pooled session: `post` yields a `LeanResponse`."""

    def __init__(
        self, url: str, allowed: Sequence[Network], limit: AnswerLimit, timeout: httpx2.Timeout
    ) -> None:
        self._url = url
        self._allowed = list(allowed)
        self._limit = limit
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def _open(self) -> aiohttp.ClientSession:
        """The aiohttp session, made on first use (it needs the running loop)."""
        parsed = httpx2.URL(self._url)
        if parse_ip_literal(parsed.host) is not None:  # aiohttp connects to a literal without resolving
            await resolve_checked(parsed.host, parsed.port or 0, self._allowed)
        tls: ssl.SSLContext | bool = (
            httpx2.create_ssl_context(verify=True, trust_env=False) if parsed.scheme == "https" else False
        )
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(self._allowed), use_dns_cache=False, ssl=tls, limit=100
        )
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self._timeout.connect,
            sock_read=self._timeout.read,
        )
        return aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=False,
        )

    @asynccontextmanager
    async def post(self, headers: Mapping[str, str], body: bytes) -> AsyncIterator[LeanResponse]:
        if self._session is None:
            self._session = await self._open()
        try:
            async with self._session.post(
                self._url, data=body, headers=headers, allow_redirects=False
            ) as sent:
                if 300 <= sent.status < 400:
                    location = sent.headers.get("location", "")
                    raise RedirectRefused.of(sent.status, httpx2.URL(self._url), location)
                encoding = sent.headers.get("content-encoding")  # None (identity) on the warm path
                refusal = AnswerRefused.unless_identity(encoding) if encoding is not None else None
                if refusal is not None:
                    raise refusal
                yield LeanResponse(sent, self._limit)
        except aiohttp.ConnectionTimeoutError as exc:
            raise httpx2.ConnectTimeout(str(exc) or "connecting to the upstream timed out") from exc
        except aiohttp.ServerTimeoutError as exc:
            raise httpx2.ReadTimeout(str(exc) or "the upstream did not answer in time") from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx2.ConnectError(str(exc)) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
            raise httpx2.RemoteProtocolError(str(exc) or type(exc).__name__) from exc
        except aiohttp.ClientError as exc:
            raise httpx2.TransportError(str(exc) or type(exc).__name__) from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
