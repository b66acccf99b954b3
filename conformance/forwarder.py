"""A local header-injecting reverse proxy: the conformance suite sends no token, so it talks to this,
which adds `Authorization: Bearer <token>` and streams everything else through unchanged (Host and
Origin included, so ScaiLink's own DNS-rebinding checks still apply). Auth is never weakened.

Headers pass as the bytes that arrived (trimmed of the whitespace HTTP allows around a value), never
re-encoded: a value with bytes outside ASCII (a trailing no-break space, say) used to fail the
re-encoding and answer 500. A request the outgoing client still refuses to send answers 400, and a
target that cannot be reached 502, each with a plain-text reason; nothing here answers 500.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}
# What HTTP calls optional whitespace around a field value (RFC 9110 section 5.5): space and tab.
OWS = b" \t"


def forwarded_headers(raw: list[tuple[bytes, bytes]], token: str) -> list[tuple[bytes, bytes]]:
    """The request's headers as they arrived, minus hop-by-hop ones and any Authorization, plus ours."""
    kept = [
        (name, value.strip(OWS))
        for name, value in raw
        if name.lower().decode("latin-1") not in HOP_BY_HOP and name.lower() != b"authorization"
    ]
    return [*kept, (b"authorization", f"Bearer {token}".encode())]


def build(target_base: str, token: str) -> Starlette:
    client = httpx.AsyncClient(base_url=target_base, timeout=httpx.Timeout(30, read=None))

    async def forward(request: Request) -> Response:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        try:
            outgoing = client.build_request(
                request.method,
                path,
                headers=forwarded_headers(request.headers.raw, token),
                content=await request.body(),
            )
            upstream = await client.send(outgoing, stream=True)
        except (httpx.LocalProtocolError, httpx.InvalidURL, ValueError) as exc:
            return PlainTextResponse(f"forwarder: request not forwardable ({exc})", status_code=400)
        except httpx.TransportError as exc:
            return PlainTextResponse(f"forwarder: target unreachable ({type(exc).__name__})", status_code=502)

        async def body() -> AsyncIterator[bytes]:
            async for chunk in upstream.aiter_raw():
                yield chunk

        response = StreamingResponse(body(), status_code=upstream.status_code,
                                     background=BackgroundTask(upstream.aclose))  # fmt: skip
        response.raw_headers = [
            (name, value)
            for name, value in upstream.headers.raw
            if name.lower().decode("latin-1") not in HOP_BY_HOP
        ]
        return response

    return Starlette(
        routes=[Route("/{path:path}", forward, methods=["GET", "POST", "DELETE", "PUT", "PATCH"])]
    )
