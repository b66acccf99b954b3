"""The overview: servers by status, desktop sessions online, tool calls and errors of the last hour,
and where to point an MCP client. Each figure covers only what the caller may read through REST:
servers they can list (`remote.use`), sessions they can list (their own; the tenant's with manage),
audit events they can read (their own; the tenant's with `scailink:audit`)."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

from sqlalchemy import func
from sqlmodel import Session, col, select
from starlette.requests import Request
from starlette.responses import Response

from scailink_mcp import auth
from scailink_mcp.dashboard.web import Visit, signed_in
from scailink_mcp.models import AuditEvent, utcnow

WINDOW = timedelta(hours=1)


async def call_counts(visit: Visit) -> dict[str, int]:
    """Tool calls of the last hour by outcome (the tenant's with `scailink:audit`, else the caller's)."""
    who = visit.who
    since = utcnow() - WINDOW

    def count(session: Session) -> dict[str, int]:
        query = (
            select(AuditEvent.outcome, func.count())
            .where(col(AuditEvent.tenant_id) == who.tenant_id, col(AuditEvent.event) == "tool_call")
            .where(col(AuditEvent.ts) >= since)
        )
        if not who.has(auth.AUDIT):
            query = query.where(col(AuditEvent.user_id) == who.user_id)
        return {
            str(outcome): int(n) for outcome, n in session.exec(query.group_by(col(AuditEvent.outcome))).all()
        }

    return await visit.parts.db.run(count)


def server_counts(visit: Visit) -> dict[str, int] | None:
    """Visible servers by status, from the in-memory directory; None when the caller cannot list them."""
    who = visit.who
    if visit.parts.keyring is None or not who.has(auth.REMOTE_USE):
        return None
    servers = [s for s in visit.parts.directory.for_tenant(who.tenant_id) if s.visible_to(who)]
    return dict(Counter(s.status for s in servers))


def session_counts(visit: Visit) -> dict[str, int]:
    who = visit.who
    tenant_wide = who.has(auth.MANAGE)
    sessions = [
        s
        for s in visit.parts.desktop.all()
        if s.tenant_id == who.tenant_id and (tenant_wide or s.user_id == who.user_id)
    ]
    return dict(Counter(s.state for s in sessions))


def mcp_url(visit: Visit) -> str:
    base = visit.parts.settings.public_url or str(visit.request.base_url)
    return base.rstrip("/") + "/mcp"


async def overview(request: Request) -> Response:
    visit = await signed_in(request)
    calls = await call_counts(visit)
    return visit.render(
        "overview.html",
        servers=server_counts(visit),
        registry_enabled=visit.parts.keyring is not None,
        sessions=session_counts(visit),
        calls=calls,
        total_calls=sum(calls.values()),
        tenant_wide_audit=visit.who.has(auth.AUDIT),
        mcp_url=mcp_url(visit),
    )
