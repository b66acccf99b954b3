"""`create_dashboard(parts)`: the dashboard as an ASGI app of its own, mounted at `/dashboard` by the
main app, with the security headers on every answer and errors rendered as pages.

Errors: a `ScaiLinkError` becomes a page with its message and details (its HTTP status kept); a page
that needs a session sends the browser to sign in; anything else is a plain "internal error" page
with the request id (the traceback goes to the log only).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scailink_mcp.api.middleware import MethodNotAllowed
from scailink_mcp.dashboard import (
    access,
    audit,
    connections,
    desktops,
    overview,
    server_actions,
    servers,
    signin,
    tools,
)
from scailink_mcp.dashboard.state import Dashboard, DashboardOptions
from scailink_mcp.dashboard.web import SESSION_COOKIE, SignInRequired, base_path, dashboard_of
from scailink_mcp.errors import NotFound, ScaiLinkError

if TYPE_CHECKING:
    from scailink_mcp.app import Components

logger = logging.getLogger(__name__)

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),  # the one-time sign-in link never leaves in a Referer
    (b"cross-origin-opener-policy", b"same-origin"),
]


class SecurityHeaders:
    """Pure ASGI: the CSP (no inline script) and friends on every answer; pages are never cached."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith(str(scope.get("root_path", "")) + "/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in SECURITY_HEADERS} | {b"cache-control"}
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                headers += SECURITY_HEADERS
                headers.append((b"cache-control", b"public, max-age=3600" if static else b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _error_page(request: Request, err: ScaiLinkError) -> Response:
    dash = dashboard_of(request)
    if isinstance(err, SignInRequired):
        if request.method == "GET":
            target = f"{base_path(request)}/login?{urlencode({'next': request.url.path})}"
            response: Response = RedirectResponse(target, status_code=303)
        else:
            response = dash.render(request, "error.html", 401, error=err, details=[])
        response.delete_cookie(SESSION_COOKIE, path=base_path(request) or "/")
        return response
    details = [d for d in err.details if isinstance(d, dict)] if isinstance(err.details, list) else []
    response = dash.render(request, "error.html", err.status, error=err, details=details)
    if err.retry_after is not None:
        response.headers["Retry-After"] = str(max(1, round(err.retry_after)))
    return response


async def scailink_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ScaiLinkError)
    return _error_page(request, exc)


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return _error_page(request, MethodNotAllowed())
    return _error_page(request, NotFound("no such page") if exc.status_code == 404 else ScaiLinkError())


async def internal_error(request: Request, exc: Exception) -> Response:
    logger.error("dashboard request failed", exc_info=exc, extra={"path": request.url.path})
    return _error_page(request, ScaiLinkError())


async def home_redirect(request: Request) -> Response:
    """`GET /` of the main app."""
    return RedirectResponse("/dashboard/", status_code=307)


def dashboard_routes() -> list[BaseRoute]:
    get, post = ["GET"], ["POST"]
    return [
        Route("/", overview.overview, methods=get, name="overview"),
        Route("/login", signin.login_form, methods=get, name="login"),
        Route("/login", signin.login, methods=post),
        Route("/logout", signin.logout, methods=post, name="logout"),
        Route("/servers", servers.list_servers, methods=get, name="servers"),
        Route("/servers", servers.register, methods=post),
        Route("/servers/new", servers.new_server, methods=get),
        Route("/servers/{server_id}", servers.show_server, methods=get),
        Route("/servers/{server_id}/edit", servers.edit_form, methods=get),
        Route("/servers/{server_id}/edit", servers.edit, methods=post),
        Route("/servers/{server_id}/refresh", server_actions.refresh, methods=post),
        Route("/servers/{server_id}/delete", server_actions.confirm_delete, methods=get),
        Route("/servers/{server_id}/delete", server_actions.delete, methods=post),
        Route("/servers/{server_id}/credentials", server_actions.rotate_credential, methods=post),
        Route("/servers/{server_id}/connect", connections.connect, methods=get),
        Route("/servers/{server_id}/disconnect", connections.disconnect, methods=post),
        Route(
            "/servers/{server_id}/credentials/{field}/delete", server_actions.remove_credential, methods=post
        ),
        Route("/tools", tools.list_tools, methods=get, name="tools"),
        Route("/tools/call", tools.playground, methods=get),
        Route("/tools/call", tools.call, methods=post),
        Route("/desktops", desktops.list_sessions, methods=get, name="desktops"),
        Route("/desktops/{session_id}/terminate", desktops.terminate, methods=post),
        Route("/audit", audit.audit_log, methods=get, name="audit"),
        Route("/access", access.access, methods=get, name="access"),
        Mount("/static", app=StaticFiles(packages=[("scailink_mcp.dashboard", "static")]), name="static"),
    ]


def create_dashboard(parts: Components, options: DashboardOptions | None = None) -> Starlette:
    app = Starlette(
        routes=dashboard_routes(),
        exception_handlers={
            ScaiLinkError: scailink_error,
            HTTPException: http_error,
            Exception: internal_error,
        },
    )
    app.state.dashboard = Dashboard(parts, options)
    app.add_middleware(SecurityHeaders)
    return app


def find_dashboard(app: Starlette) -> Dashboard:
    """The `Dashboard` of a main app built by `create_app` (the CLI adds the dev sign-in ticket)."""
    for route in app.routes:
        if isinstance(route, Mount) and route.name == "dashboard" and isinstance(route.app, Starlette):
            found: Dashboard = route.app.state.dashboard
            return found
    raise LookupError("this app has no dashboard mounted")
