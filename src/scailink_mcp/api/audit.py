"""Routes of the audit log: tenant-wide (`scailink:audit`) and per user (self, or `scailink:audit`)."""

from __future__ import annotations

from datetime import datetime

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from scailink_mcp import auth
from scailink_mcp.api.envelope import decode_cursor, encode_cursor, page, page_limit, principal
from scailink_mcp.errors import ValidationFailed

BASE = "/v1/modules/scailink"
OUTCOMES = ("ok", "error", "denied")


def _time(request: Request, name: str) -> datetime | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise ValidationFailed(
            "invalid filter", details=[{"field": name, "reason": "not an ISO-8601 time"}]
        ) from None
    if value.tzinfo is None:
        raise ValidationFailed("invalid filter", details=[{"field": name, "reason": "needs a UTC offset"}])
    return value


async def _query(request: Request, user_id: str | None) -> Response:
    parts = request.app.state.scailink
    who = await principal(request)
    outcome = request.query_params.get("outcome")
    if outcome is not None and outcome not in OUTCOMES:
        raise ValidationFailed(
            "invalid filter", details=[{"field": "outcome", "reason": f"one of {OUTCOMES}"}]
        )
    limit = page_limit(request, parts.settings.page_limit_default, parts.settings.page_limit_max)
    after = decode_cursor(request, 2)
    items, next_cursor = await parts.audit.query(
        who.tenant_id,
        user_id=user_id or request.query_params.get("user_id"),
        since=_time(request, "since"),
        until=_time(request, "until"),
        event=request.query_params.get("event"),
        outcome=outcome,
        target=request.query_params.get("target"),
        limit=limit,
        after=(after[0], after[1]) if after else None,
    )
    return page(request, items, encode_cursor(next_cursor) if next_cursor else None)


async def tenant_audit(request: Request) -> Response:
    who = await principal(request)
    who.require(auth.AUDIT)
    return await _query(request, None)


async def user_audit(request: Request) -> Response:
    who = await principal(request)
    user_id = request.path_params["user_id"]
    if user_id != who.user_id:
        who.require(auth.AUDIT)
    return await _query(request, user_id)


routes = [
    Route(BASE + "/audit", tenant_audit, methods=["GET"]),
    Route(BASE + "/users/{user_id}/audit", user_audit, methods=["GET"]),
]
