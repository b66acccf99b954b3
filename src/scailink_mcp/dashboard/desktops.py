"""Desktop sessions: list (the caller's; another user's or the whole tenant's with `scailink:manage`)
and terminate, with the rules of `GET/DELETE /sessions` (api/desktop.py): a session of another tenant,
or of another user without manage, is "not found"."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from scailink_mcp import auth
from scailink_mcp.auth import Principal
from scailink_mcp.dashboard import pagination
from scailink_mcp.dashboard.web import Visit, signed_in
from scailink_mcp.desktop.connections import DesktopSession
from scailink_mcp.desktop.protocol import Close
from scailink_mcp.errors import NotFound

MAX_USER_ID = 128


def visible(who: Principal, session: DesktopSession) -> bool:
    """The REST rule: same tenant, and one's own session or `scailink:manage`."""
    if session.tenant_id != who.tenant_id:
        return False
    return session.user_id == who.user_id or who.has(auth.MANAGE)


def listed(visit: Visit, user_id: str, tenant_wide: bool) -> list[dict[str, Any]]:
    who = visit.who
    if tenant_wide or user_id != who.user_id:
        who.require(auth.MANAGE)
    return [
        s.describe()
        for s in visit.parts.desktop.all()
        if s.tenant_id == who.tenant_id and (tenant_wide or s.user_id == user_id)
    ]


async def list_sessions(request: Request) -> Response:
    visit = await signed_in(request)
    user_id = request.query_params.get("user_id", "").strip()[:MAX_USER_ID] or visit.who.user_id
    tenant_wide = request.query_params.get("scope") == "tenant"
    sessions = listed(visit, user_id, tenant_wide)
    page = pagination.after_key(
        sessions,
        lambda s: str(s["session_id"]),
        request.query_params.get("cursor"),
        visit.dash.options.page_size,
    )
    return visit.render(
        "desktops.html",
        sessions=page.items,
        next_cursor=page.next_cursor,
        user_id=user_id,
        tenant_wide=tenant_wide,
        can_manage=visit.who.has(auth.MANAGE),
    )


async def terminate(request: Request) -> Response:
    visit = await signed_in(request)
    await visit.form()
    session = visit.parts.desktop.get(request.path_params["session_id"])
    if session is None or not visible(visit.who, session):
        raise NotFound("session not found")
    await visit.parts.desktop.terminate(session, Close.NORMAL, "session terminated from the dashboard")
    return visit.redirect("/desktops", f"{session.device_name}: session terminated")
