"""Roles and effective permissions: "what can user X with groups G do" (SPEC section 1).

The rules of `GET /v1/iam/users/{id}/permissions` and `GET /v1/iam/roles`: one's own permissions come
from one's own token; evaluating anyone else (or oneself with other groups) needs `scailink:manage`
and the groups (ScaiLink stores no users); the roles list needs `scailink:manage`. The evaluation is
`auth.resolve_roles` with the tenant's current custom roles, exactly what a token would get.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from starlette.requests import Request
from starlette.responses import Response

from scailink_mcp import auth
from scailink_mcp.api.iam import MAX_GROUP_LENGTH, MAX_GROUPS
from scailink_mcp.dashboard import pagination
from scailink_mcp.dashboard.forms import FieldErrors
from scailink_mcp.dashboard.web import Visit, signed_in

MAX_USER_ID = 128


def _evaluate(
    visit: Visit, user_id: str, raw_groups: str, errors: FieldErrors
) -> tuple[Sequence[str], Mapping[str, Sequence[str]]] | None:
    who = visit.who
    if user_id == who.user_id and not raw_groups:
        return who.roles, who.permission_sources
    if not who.has(auth.MANAGE):
        errors.add("user_id", f"evaluating other users or groups needs {auth.MANAGE}")
        return None
    groups = [g.strip() for g in raw_groups.split(",") if g.strip()]
    if not groups:
        errors.add("groups", "ScaiLink stores no users: give the user's groups (comma-separated)")
        return None
    if len(groups) > MAX_GROUPS or any(len(g) > MAX_GROUP_LENGTH for g in groups):
        errors.add("groups", f"at most {MAX_GROUPS} groups of at most {MAX_GROUP_LENGTH} characters")
        return None
    roles, _, sources = auth.resolve_roles(
        groups, visit.parts.settings.group_role_map, visit.parts.roles.roles_for(who.tenant_id)
    )
    return roles, sources


async def access(request: Request) -> Response:
    visit = await signed_in(request)
    who = visit.who
    user_id = request.query_params.get("user_id", "").strip()[:MAX_USER_ID] or who.user_id
    raw_groups = request.query_params.get("groups", "").strip()
    errors = FieldErrors()
    evaluated = _evaluate(visit, user_id, raw_groups, errors)
    roles_page = None
    if who.has(auth.MANAGE):
        views = await visit.parts.roles.list(who.tenant_id)
        roles_page = pagination.after_key(
            views, lambda v: str(v["name"]), request.query_params.get("cursor"), visit.dash.options.page_size
        )
    return visit.render_checked(
        "access.html",
        errors,
        user_id=user_id,
        groups=raw_groups,
        roles=evaluated[0] if evaluated else (),
        permissions=sorted(evaluated[1].items()) if evaluated else [],
        all_permissions=sorted(auth.ALL_PERMISSIONS),
        roles_page=roles_page,
    )
