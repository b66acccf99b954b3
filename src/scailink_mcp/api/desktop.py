"""Routes of the desktop bridge's REST side (SPEC section 4): discovery, invoke, sessions, capabilities.

`POST /users/{user_id}/tools/{tool_name}/invoke` goes through `Invoker.call`, the same path as an MCP
`tools/call`; only the caller's own catalog can be invoked (another user's id answers 404).
Sessions: the caller's by default; `?user_id=` (another user) or `?scope=tenant` needs `scailink:manage`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from scailink_mcp import auth
from scailink_mcp.api.envelope import (
    components,
    no_content,
    ok,
    page,
    parse_body,
    path_param,
    principal,
    request_id,
)
from scailink_mcp.auth import Principal
from scailink_mcp.desktop.connections import DesktopSession
from scailink_mcp.desktop.protocol import PROTOCOL_VERSIONS, Close
from scailink_mcp.errors import NotFound, ToolNotFound
from scailink_mcp.invocation import Caller
from scailink_mcp.targets import Target

BASE = "/v1/modules/scailink"


class InvokeBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    arguments: dict[str, Any] = Field(default_factory=dict)
    timeout_ms: int | None = Field(default=None, ge=1, le=300_000)


async def discover(request: Request) -> Response:
    settings = components(request).settings
    base = (settings.public_url or str(request.base_url)).rstrip("/")
    ws_base = (
        "wss://" + base.removeprefix("https://")
        if base.startswith("https://")
        else "ws://" + base.removeprefix("http://")
    )
    return JSONResponse(
        {
            "issuer": settings.jwt_issuer,
            "audience": settings.jwt_audience,
            "jwks_uri": settings.jwt_jwks_url,
            "gateway_ws": f"{ws_base}/v1/scailink/ws",
            "protocol_versions": list(PROTOCOL_VERSIONS),
        }
    )


async def invoke(request: Request) -> Response:
    who = await principal(request)
    if request.path_params["user_id"] != who.user_id:
        raise NotFound("user not found")
    parts = components(request)
    body = await parse_body(request, InvokeBody, parts.settings.max_body_bytes)
    name = path_param(request, "tool_name")
    view = parts.catalog.view(who, parts.settings.tool_name_style)
    try:
        target = view.resolve_tool(name)
    except ToolNotFound:  # routing failures are audited too
        parts.invoker.unknown(who, name, request_id(request))
        raise
    result = await parts.invoker.call(
        who,
        target,
        name,
        body.arguments,
        timeout=parts.invoker.timeout(body.timeout_ms),
        caller=Caller(request_id=request_id(request)),
    )
    return ok(request, result)


def _visible(who: Principal, session: DesktopSession) -> bool:
    if session.tenant_id != who.tenant_id:
        return False
    return session.user_id == who.user_id or who.has(auth.MANAGE)


async def list_sessions(request: Request) -> Response:
    who = await principal(request)
    registry = components(request).desktop
    user_id = request.query_params.get("user_id", who.user_id)
    tenant_wide = request.query_params.get("scope") == "tenant"
    if (tenant_wide or user_id != who.user_id) and not who.has(auth.MANAGE):
        who.require(auth.MANAGE)
    sessions = [
        s.describe()
        for s in registry.all()
        if s.tenant_id == who.tenant_id and (tenant_wide or s.user_id == user_id)
    ]
    return page(request, sorted(sessions, key=lambda s: s["session_id"]), None)


def _session(request: Request, who: Principal) -> DesktopSession:
    session = components(request).desktop.get(request.path_params["session_id"])
    if session is None or not _visible(who, session):
        raise NotFound("session not found")
    return session


async def get_session(request: Request) -> Response:
    who = await principal(request)
    return ok(request, _session(request, who).describe())


async def delete_session(request: Request) -> Response:
    who = await principal(request)
    session = _session(request, who)
    await components(request).desktop.terminate(
        session, Close.NORMAL, "session terminated through the REST API"
    )
    return no_content()


async def capabilities(request: Request) -> Response:
    who = await principal(request)
    parts = components(request)
    view = parts.catalog.view(who, parts.settings.tool_name_style)
    items: list[dict[str, Any]] = []
    for public, target in sorted(view.tool_targets.items()):
        items.append(_item("tool", public, target))
    for public, target in sorted(view.prompt_targets.items()):
        items.append(_item("prompt", public, target))
    for resource in view.resources:
        uri = str(resource["uri"])
        items.append(_item("resource", uri, view.resolve_resource(uri)))
    return page(request, items, None)


def _item(kind: str, public: str, target: Target) -> dict[str, Any]:
    return {
        "kind": kind,
        "namespaced_name": public,
        "upstream_name": target.upstream_name,
        **target.describe(),
    }


routes = [
    Route("/v1/scailink/auth/discover", discover, methods=["GET"]),
    Route(BASE + "/users/{user_id}/tools/{tool_name}/invoke", invoke, methods=["POST"]),
    Route(BASE + "/sessions", list_sessions, methods=["GET"]),
    Route(BASE + "/sessions/{session_id}", get_session, methods=["GET"]),
    Route(BASE + "/sessions/{session_id}", delete_session, methods=["DELETE"]),
    Route(BASE + "/capabilities", capabilities, methods=["GET"]),
]
