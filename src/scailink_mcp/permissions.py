"""Permissions and roles: the `scailink:*` permission names, the built-in roles, groups -> roles.

Owns: the permission constants, which built-in role grants what (the catch-all only for the admin
roles), and `resolve_roles`, the pure mapping of a token's groups (plus the configured group map and
a tenant's custom roles) to roles and permissions.

Must not: know about tokens, the database or HTTP. Custom roles are stored by `iam.py` and handed
in; `auth.py` builds a `Principal` from what `resolve_roles` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

VIEW = "scailink:view"
INVOKE = "scailink:invoke"
MANAGE = "scailink:manage"
AUDIT = "scailink:audit"
REMOTE_USE = "scailink:remote.use"
REMOTE_MANAGE_OWN = "scailink:remote.manage_own"
REMOTE_MANAGE_TENANT = "scailink:remote.manage_tenant"
ALL_PERMISSIONS = frozenset(
    {VIEW, INVOKE, MANAGE, AUDIT, REMOTE_USE, REMOTE_MANAGE_OWN, REMOTE_MANAGE_TENANT}
)

# The catch-all (every scailink:* permission) belongs to these roles and to no other.
CATCH_ALL_ROLES = frozenset({"super_admin", "partner_admin", "tenant_admin"})
BUILTIN_ROLES: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        **{role: ALL_PERMISSIONS for role in sorted(CATCH_ALL_ROLES)},
        "tenant_user": frozenset({VIEW, INVOKE, REMOTE_USE, REMOTE_MANAGE_OWN}),
        "tenant_viewer": frozenset({VIEW, REMOTE_USE}),
    }
)

# A tenant id -> that tenant's custom roles (role name -> the permissions it grants).
CustomRolesForTenant = Callable[[str], Mapping[str, frozenset[str]]]


def resolve_roles(
    groups: Iterable[str],
    group_role_map: Mapping[str, str],
    custom_roles: Mapping[str, frozenset[str]] | None = None,
) -> tuple[tuple[str, ...], frozenset[str], dict[str, list[str]]]:
    """Groups -> (roles, permissions, permission -> roles granting it). Pure.

    A group named exactly like a built-in or custom role grants it; `group_role_map` maps other
    group names to roles. Built-in names win over custom ones, so a custom role cannot redefine
    them. A custom role grants exactly its listed permissions; unknown names grant nothing.
    """
    custom = custom_roles or {}

    def grants(role: str) -> frozenset[str] | None:
        return BUILTIN_ROLES.get(role, custom.get(role))

    roles: list[str] = []
    for group in groups:
        for candidate in (group, group_role_map.get(group)):
            if candidate is not None and candidate not in roles and grants(candidate) is not None:
                roles.append(candidate)
    sources: dict[str, list[str]] = {}
    for role in roles:
        for permission in grants(role) or ():
            sources.setdefault(permission, []).append(role)
    return tuple(roles), frozenset(sources), dict(sorted(sources.items()))
