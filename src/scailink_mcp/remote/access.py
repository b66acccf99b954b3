"""Who may see and manage a registered remote server.

Owns the visibility rule (same tenant, and tenant-shared or personal to the caller; anything else is
"not found", never "forbidden", so the existence of another user's server does not leak), the owner
scope a new row is stored under, and the manage permission a change needs.

Must not: decrypt, publish, or commit; these are reads and checks inside the caller's transaction.
"""

from __future__ import annotations

from sqlalchemy import and_, or_
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col, select

from scailink_mcp import auth
from scailink_mcp.auth import Principal
from scailink_mcp.errors import NotFound
from scailink_mcp.models import RemoteServer


def owner_scope(principal_user_id: str, is_tenant_shared: bool) -> str:
    return "tenant" if is_tenant_shared else f"user:{principal_user_id}"


def manage_permission(server: RemoteServer) -> str:
    return register_permission(server.is_tenant_shared)


def register_permission(is_tenant_shared: bool) -> str:
    """The permission to create (or manage) a server of this sharing."""
    return auth.REMOTE_MANAGE_TENANT if is_tenant_shared else auth.REMOTE_MANAGE_OWN


def visible_filter(principal: Principal) -> ColumnElement[bool]:
    """Same tenant and (shared, or personal to the caller)."""
    return _visible_to(principal.tenant_id, principal.user_id)


def _visible_to(tenant_id: str, user_id: str) -> ColumnElement[bool]:
    return and_(
        col(RemoteServer.tenant_id) == tenant_id,
        or_(col(RemoteServer.is_tenant_shared).is_(True), col(RemoteServer.owner_user_id) == user_id),
    )


def load_visible(session: Session, principal: Principal, server_id: str) -> RemoteServer:
    """The server if the caller may see it, else `NotFound`."""
    return load_visible_to(session, server_id, tenant_id=principal.tenant_id, user_id=principal.user_id)


def load_visible_to(session: Session, server_id: str, *, tenant_id: str, user_id: str) -> RemoteServer:
    """`load_visible` for a (tenant, user) known without a token (an OAuth state or ticket)."""
    server = session.exec(
        select(RemoteServer).where(RemoteServer.id == server_id, _visible_to(tenant_id, user_id))
    ).first()
    if server is None:
        raise NotFound("remote server not found")
    return server


def load_for_manage(session: Session, principal: Principal, server_id: str) -> RemoteServer:
    """The server if the caller may see it (`NotFound`) and change it (`Forbidden`)."""
    server = load_visible(session, principal, server_id)
    principal.require(manage_permission(server))
    return server
