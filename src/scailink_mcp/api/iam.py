"""IAM routes: effective permissions and custom roles (SPEC section 1).

`GET /v1/iam/users/{user_id}/permissions`
  - For oneself: computed from the caller's own token (its groups, the tenant's current custom roles).
  - For anyone else (needs `scailink:manage`): ScaiLink stores no users and cannot know another
    user's groups, so the caller passes them as `?groups=a,b` and gets what a token of that user with
    those groups would be granted in the caller's tenant. Without `groups` the answer is 422 (the
    details say why), never a guess. Only the caller's tenant is ever considered: another tenant's
    users and roles are invisible. Oneself with `?groups=` is an evaluation too (needs manage).

Roles (`scailink:manage`): list, get, PUT (create or replace, 200), DELETE (204). A caller cannot
grant a permission they do not hold (403, details list them).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from scailink_mcp import auth
from scailink_mcp.api.envelope import (
    components,
    no_content,
    ok,
    parse_body,
    path_param,
    principal,
    sorted_page,
)
from scailink_mcp.errors import Forbidden, ValidationFailed
from scailink_mcp.iam import RoleBody, RoleStore, ungrantable

BASE = "/v1/iam"
MAX_GROUPS = 100
MAX_GROUP_LENGTH = 256


def _roles(request: Request) -> RoleStore:
    store = components(request).roles
    return store


def _groups(request: Request) -> list[str]:
    raw = request.query_params.get("groups")
    if raw is None:
        reason = "ScaiLink stores no users: pass the user's groups (comma-separated) to evaluate them"
        raise ValidationFailed("groups required", details=[{"field": "groups", "reason": reason}])
    groups = [g.strip() for g in raw.split(",") if g.strip()]
    if len(groups) > MAX_GROUPS or any(len(g) > MAX_GROUP_LENGTH for g in groups):
        reason = f"at most {MAX_GROUPS} groups of at most {MAX_GROUP_LENGTH} characters"
        raise ValidationFailed("invalid groups", details=[{"field": "groups", "reason": reason}])
    return groups


async def permissions(request: Request) -> Response:
    who = await principal(request)
    parts = components(request)
    user_id = path_param(request, "user_id")
    if user_id == who.user_id and "groups" not in request.query_params:
        roles, sources = who.roles, who.permission_sources
    else:
        who.require(auth.MANAGE)
        roles, _, sources = auth.resolve_roles(
            _groups(request), parts.settings.group_role_map, _roles(request).roles_for(who.tenant_id)
        )
    data = {
        "user_id": user_id,
        "tenant_id": who.tenant_id,
        "roles": list(roles),
        "permissions": {perm: list(granted_by) for perm, granted_by in sorted(sources.items())},
    }
    return ok(request, data)


async def list_roles(request: Request) -> Response:
    who = await principal(request)
    who.require(auth.MANAGE)
    return sorted_page(request, await _roles(request).list(who.tenant_id), key=lambda view: view["name"])


async def get_role(request: Request) -> Response:
    who = await principal(request)
    who.require(auth.MANAGE)
    return ok(request, await _roles(request).get(who.tenant_id, path_param(request, "name")))


async def put_role(request: Request) -> Response:
    who = await principal(request)
    who.require(auth.MANAGE)
    body = await parse_body(request, RoleBody, components(request).settings.registry_max_body_bytes)
    missing = ungrantable(who.permissions, body.permissions)
    if missing:
        raise Forbidden(
            "cannot grant permissions you do not hold",
            details=[{"field": "permissions", "reason": f"not held: {p}"} for p in missing],
        )
    return ok(request, await _roles(request).put(who.tenant_id, path_param(request, "name"), body))


async def delete_role(request: Request) -> Response:
    who = await principal(request)
    who.require(auth.MANAGE)
    await _roles(request).delete(who.tenant_id, path_param(request, "name"))
    return no_content()


routes = [
    Route(BASE + "/users/{user_id}/permissions", permissions, methods=["GET"]),
    Route(BASE + "/roles", list_roles, methods=["GET"]),
    Route(BASE + "/roles/{name}", get_role, methods=["GET"]),
    Route(BASE + "/roles/{name}", put_role, methods=["PUT"]),
    Route(BASE + "/roles/{name}", delete_role, methods=["DELETE"]),
]
