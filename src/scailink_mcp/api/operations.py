"""`/healthz` (process alive), `/readyz` (database reachable and migrated; when Redis is configured: Redis
reachable and this worker subscribed to the other workers' events) and the served OpenAPI."""

from __future__ import annotations

import anyio.to_thread
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from scailink_mcp.redis_bus import RedisEventBus


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def _redis(url: str) -> str:
    from redis.asyncio import Redis

    client = Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        await client.ping()
        return "ok"
    except Exception as exc:
        return f"unreachable ({type(exc).__name__})"
    finally:
        await client.aclose()


async def readyz(request: Request) -> Response:
    db = request.app.state.scailink.db
    checks: dict[str, str] = {}
    try:
        migrated = await anyio.to_thread.run_sync(db.is_migrated)
        checks["database"] = "ok" if migrated else "migrations pending"
    except Exception as exc:
        checks["database"] = f"unreachable ({type(exc).__name__})"
    redis_url = request.app.state.scailink.settings.redis_url
    if redis_url:
        checks["redis"] = await _redis(redis_url)
        events = request.app.state.scailink.events
        if isinstance(events, RedisEventBus):  # subscribed now: events of the other workers arrive
            checks["redis_events"] = events.health()
        cluster = request.app.state.scailink.desktop.cluster
        if cluster is not None:  # subscribed now: desktop sessions and calls of the other workers arrive
            checks["redis_desktop"] = cluster.health()
        sessions = request.app.state.scailink.mcp_sessions
        if sessions is not None:  # subscribed now: MCP sessions ended on other replicas end here
            checks["redis_mcp_sessions"] = sessions.health()
        bridge = request.app.state.scailink.invoker.backends.bridge
        if bridge is not None and bridge.cluster is not None:  # retries of calls parked here arrive
            checks["redis_mrtr"] = bridge.cluster.health()
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
