"""Routes of the audit log (SPEC section 7): tenant-wide (`scailink:audit`) and per user (self, or
`scailink:audit`). Both only ever read the caller's tenant: another tenant's user simply has no events.

Filters: `since` (inclusive) and `until` (exclusive) as ISO-8601 times with an offset, `event`,
`outcome`, `user_id`, `target` (exact matches); `limit` and `cursor` as everywhere.
"""

from __future__ import annotations

from datetime import datetime

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from scailink_mcp import auth
from scailink_mcp.api.envelope import (
    components,
    decode_cursor,
    page,
    page_limit,
    path_param,
    principal,
)
from scailink_mcp.audit import OUTCOMES, Cursor
from scailink_mcp.auth import Principal
from scailink_mcp.errors import ValidationFailed

BASE = "/v1/modules/scailink"
# Longest accepted exact-match filter per parameter (the column sizes).
TEXT_FILTERS = {"event": 64, "user_id": 128, "target": 1024}


def _invalid(field: str, reason: str) -> ValidationFailed:
    return ValidationFailed("invalid filter", details=[{"field": field, "reason": reason}])


def _time(request: Request, name: str) -> datetime | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        raise _invalid(name, "not an ISO-8601 time") from None
    if value.tzinfo is None:
        raise _invalid(name, "needs a UTC offset (e.g. 2026-01-31T12:00:00Z)")
    return value


def _text(request: Request, name: str) -> str | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if not raw or len(raw) > TEXT_FILTERS[name]:
        raise _invalid(name, f"must be 1 to {TEXT_FILTERS[name]} characters")
    if "\x00" in raw:  # nothing stored holds NUL (PostgreSQL text cannot)
        raise _invalid(name, "must not contain NUL")
    return raw


def _cursor(request: Request) -> Cursor | None:
    raw = decode_cursor(request, 2)
    if raw is None:
        return None
    try:
        ts = datetime.fromisoformat(raw[0])
    except ValueError:
        raise _invalid("cursor", "not a cursor from this API") from None
    return ts, raw[1]


async def _query(request: Request, who: Principal, user_id: str | None) -> Response:
    parts = components(request)
    audit = parts.audit
    outcome = request.query_params.get("outcome")
    if outcome is not None and outcome not in OUTCOMES:
        raise _invalid("outcome", "one of " + ", ".join(OUTCOMES))
    since, until = _time(request, "since"), _time(request, "until")
    if since is not None and until is not None and until <= since:
        raise _invalid("until", "must be after since")
    limit = page_limit(request)
    items, next_cursor = await audit.query(
        who.tenant_id,
        user_id=user_id if user_id is not None else _text(request, "user_id"),
        since=since,
        until=until,
        event=_text(request, "event"),
        outcome=outcome,
        target=_text(request, "target"),
        limit=limit,
        after=_cursor(request),
    )
    return page(request, list(items), (next_cursor[0].isoformat(), next_cursor[1]) if next_cursor else None)


async def tenant_audit(request: Request) -> Response:
    who = await principal(request)
    who.require(auth.AUDIT)
    return await _query(request, who, None)


async def user_audit(request: Request) -> Response:
    who = await principal(request)
    user_id = path_param(request, "user_id")
    if user_id != who.user_id:
        who.require(auth.AUDIT)
    return await _query(request, who, user_id)


routes = [
    Route(BASE + "/audit", tenant_audit, methods=["GET"]),
    Route(BASE + "/users/{user_id}/audit", user_audit, methods=["GET"]),
]
