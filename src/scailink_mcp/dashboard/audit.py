"""The audit log page: the REST filters (`since`, `until`, `event`, `outcome`, `user_id`, `target`),
cursor pagination, newest first (SPEC section 7). With `scailink:audit` the whole tenant; without it,
the caller's own events only (as `GET /users/{self}/audit`): filtering on another user is refused.

Times are ISO-8601; one typed without an offset (as a browser's date-time field sends it) is UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime

from starlette.requests import Request
from starlette.responses import Response

from scailink_mcp import auth
from scailink_mcp.api.audit import TEXT_FILTERS
from scailink_mcp.audit import OUTCOMES
from scailink_mcp.dashboard import pagination
from scailink_mcp.dashboard.forms import FieldErrors
from scailink_mcp.dashboard.web import signed_in

FILTERS = ("since", "until", "event", "outcome", "user_id", "target")


def _time(raw: str, name: str, errors: FieldErrors) -> datetime | None:
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw)
    except ValueError:
        errors.add(name, "not an ISO-8601 time (e.g. 2026-01-31T12:00:00Z)")
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _text(raw: str, name: str, errors: FieldErrors) -> str | None:
    if not raw:
        return None
    if len(raw) > TEXT_FILTERS[name] or "\x00" in raw:
        errors.add(name, f"must be 1 to {TEXT_FILTERS[name]} characters")
        return None
    return raw


async def audit_log(request: Request) -> Response:
    visit = await signed_in(request)
    who = visit.who
    raw = {name: request.query_params.get(name, "").strip() for name in FILTERS}
    errors = FieldErrors()
    since, until = _time(raw["since"], "since", errors), _time(raw["until"], "until", errors)
    if since is not None and until is not None and until <= since:
        errors.add("until", "must be after since")
    if raw["outcome"] and raw["outcome"] not in OUTCOMES:
        errors.add("outcome", "one of " + ", ".join(OUTCOMES))
    texts = {name: _text(raw[name], name, errors) for name in ("event", "user_id", "target")}
    tenant_wide = who.has(auth.AUDIT)
    if not tenant_wide and texts["user_id"] not in (None, who.user_id):
        errors.add("user_id", f"other users' events need {auth.AUDIT}")
    cursor = pagination.decode(request.query_params.get("cursor"), 2)
    after = None
    if cursor:
        try:
            after = (datetime.fromisoformat(cursor[0]), cursor[1])
        except ValueError:
            errors.add(None, "not a cursor of this page")
    items: list[object] = []
    next_cursor = None
    if not errors:
        entries, last = await visit.parts.audit.query(
            who.tenant_id,
            user_id=texts["user_id"] if tenant_wide else who.user_id,
            since=since,
            until=until,
            event=texts["event"],
            outcome=raw["outcome"] or None,
            target=texts["target"],
            limit=visit.dash.options.page_size,
            after=after,
        )
        items = list(entries)
        next_cursor = pagination.encode([last[0].isoformat(), last[1]]) if last else None
    return visit.render_checked(
        "audit.html",
        errors,
        events=items,
        next_cursor=next_cursor,
        filters=raw,
        outcomes=OUTCOMES,
        tenant_wide=tenant_wide,
    )
