"""A local header-injecting reverse proxy: the conformance suite sends no token, so it talks to this,
which adds `Authorization: Bearer <token>` and streams everything else through unchanged (Host and
Origin included, so ScaiLink's own DNS-rebinding checks still apply). Auth is never weakened.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length"}


def build(target_base: str, token: str) -> Starlette:
    client = httpx.AsyncClient(base_url=target_base, timeout=httpx.Timeout(30, read=None))

    async def forward(request: Request) -> StreamingResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["authorization"] = f"Bearer {token}"
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        upstream = await client.send(
            client.build_request(request.method, path, headers=headers, content=await request.body()),
            stream=True,
        )

        async def body() -> AsyncIterator[bytes]:
            async for chunk in upstream.aiter_raw():
                yield chunk

        out = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        return StreamingResponse(body(), status_code=upstream.status_code, headers=out,
                                 background=BackgroundTask(upstream.aclose))  # fmt: skip

    return Starlette(
        routes=[Route("/{path:path}", forward, methods=["GET", "POST", "DELETE", "PUT", "PATCH"])]
    )
