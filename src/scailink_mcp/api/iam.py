"""IAM routes: effective permissions and custom roles (SPEC section 1).

`GET /v1/iam/users/{user_id}/permissions`: for oneself, computed from the caller's token. ScaiLink
stores no users, so for another user of the tenant (needs `scailink:manage`) the caller passes that
user's groups as `?groups=a,b` and gets what a token with those groups would be granted.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from scailink_mcp import auth
from scailink_mcp.api.envelope import no_content, ok, page, parse_body, principal
from scailink_mcp.errors import ValidationFailed
from scailink_mcp.iam import RoleBody

BASE = "/v1/iam"


async def permissions(request: Request) -> Response:
    who = await principal(request)
    parts = request.app.state.scailink
    user_id = request.path_params["user_id"]
    if user_id == who.user_id and "groups" not in request.query_params:
        roles, sources = list(who.roles), who.permission_sources
    else:
        who.require(auth.MANAGE)
        raw = request.query_params.get("groups")
        if raw is None:
            reason = "ScaiLink stores no users: pass the user's groups to evaluate them"
            raise ValidationFailed("groups required", details=[{"field": "groups", "reason": reason}])
        groups = [g.strip() for g in raw.split(",") if g.strip()]
        role_tuple, _, sources = auth.resolve_roles(
            groups, parts.settings.group_role_map, parts.roles.roles_for(who.tenant_id)
        )
        roles = list(role_tuple)
    data = {
        "user_id": user_id,
        "tenant_id": who.tenant_id,
        "roles": roles,
        "permissions": {perm: list(granted_by) for perm, granted_by in sorted(sources.items())},
    }
    return ok(request, data)


async def list_roles(request: Request) -> Response:
    who = await principal(request)
    who.require(auth.MANAGE)
    return page(request, await request.app.state.scailink.roles.list(who.tenant_id), None)


async def get_role(request: Request) -> Response:
    who = await principal(request)
    who.require(auth.MANAGE)
    return ok(request, await request.app.state.scailink.roles.get(who.tenant_id, request.path_params["name"]))


async def put_role(request: Request) -> Response:
    who = await principal(request)
    who.require(auth.MANAGE)
    parts = request.app.state.scailink
    body = await parse_body(request, RoleBody, parts.settings.registry_max_body_bytes)
    return ok(request, await parts.roles.put(who.tenant_id, request.path_params["name"], body))


async def delete_role(request: Request) -> Response:
    who = await principal(request)
    who.require(auth.MANAGE)
    await request.app.state.scailink.roles.delete(who.tenant_id, request.path_params["name"])
    return no_content()


routes = [
    Route(BASE + "/users/{user_id}/permissions", permissions, methods=["GET"]),
    Route(BASE + "/roles", list_roles, methods=["GET"]),
    Route(BASE + "/roles/{name}", get_role, methods=["GET"]),
    Route(BASE + "/roles/{name}", put_role, methods=["PUT"]),
    Route(BASE + "/roles/{name}", delete_role, methods=["DELETE"]),
]
