"""`Dashboard`: what the dashboard's pages share for the app's life (built once by `create_dashboard`).

It holds the app's `Components` (the same parts the REST routes use), the session table, the one-time
sign-in tickets and the Jinja2 environment (autoescaping on, undefined names are errors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse

from scailink_mcp.dashboard.sessions import LoginTickets, SessionStore

if TYPE_CHECKING:
    from scailink_mcp.app import Components


@dataclass(frozen=True)
class DashboardOptions:
    """The dashboard's own knobs (none of them is a SPEC number)."""

    page_size: int = 20
    ticket_ttl_s: float = 600.0
    max_sessions: int = 10_000


def _when(value: object) -> str:
    """A time as people read it, in UTC."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return str(value)
    if isinstance(value, int | float):
        value = datetime.fromtimestamp(value, UTC)
    if not isinstance(value, datetime):
        return "" if value is None else str(value)
    aware = value if value.tzinfo else value.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pretty(value: object) -> str:
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


class Dashboard:
    def __init__(self, parts: Components, options: DashboardOptions | None = None) -> None:
        self.parts = parts
        self.options = options or DashboardOptions()
        self.sessions = SessionStore(max_sessions=self.options.max_sessions)
        self.tickets = LoginTickets(ttl_s=self.options.ticket_ttl_s)
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("scailink_mcp.dashboard", "templates"),
            autoescape=jinja2.select_autoescape(["html"]),
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["when"] = _when
        self.env.filters["pretty"] = _pretty

    def render(self, request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        base = str(request.scope.get("root_path", "")).rstrip("/")
        values: dict[str, Any] = {
            "base": base,
            "path": request.url.path,
            "who": None,
            "csrf_token": "",
            "flashes": [],
            "request_id": str(request.scope.get("state", {}).get("request_id", "")),
        }
        values.update(context)
        html = self.env.get_template(template).render(values)
        return HTMLResponse(html, status_code=status_code)
