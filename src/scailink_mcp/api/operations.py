"""`/healthz` (process alive), `/readyz` (database reachable and migrated) and the served OpenAPI."""

from __future__ import annotations

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    db = request.app.state.scailink.db
    checks: dict[str, str] = {}
    try:
        migrated = await anyio.to_thread.run_sync(db.is_migrated)
        checks["database"] = "ok" if migrated else "migrations pending"
    except Exception as exc:
        checks["database"] = f"unreachable ({type(exc).__name__})"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ready else "unavailable", "checks": checks}, 200 if ready else 503)


async def openapi(request: Request) -> Response:
    from scailink_mcp.openapi import build_openapi

    return JSONResponse(build_openapi())


routes = [
    Route("/v1/modules/scailink/openapi.json", openapi, methods=["GET"]),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
]
