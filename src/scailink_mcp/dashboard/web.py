"""Request plumbing shared by every dashboard page: the signed-in visit, form bodies with their CSRF
check, rendering, redirects and the session cookie.

A `Visit` exists only after the session cookie named a live session whose token still verifies with
the app's `TokenVerifier`; the resulting `Principal` is what every page hands to the same business
functions the REST routes call, so the permission rules stay where they are.

Must not: put a token or a credential value into a template context, a cookie or a log line.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from scailink_mcp.api.envelope import read_body
from scailink_mcp.auth import Principal
from scailink_mcp.errors import Forbidden, Unauthorized, ValidationFailed

if TYPE_CHECKING:
    from scailink_mcp.app import Components
    from scailink_mcp.dashboard.forms import FieldErrors
    from scailink_mcp.dashboard.sessions import WebSession
    from scailink_mcp.dashboard.state import Dashboard

logger = logging.getLogger(__name__)

SESSION_COOKIE = "scailink_session"
LOGIN_COOKIE = "scailink_login"  # double-submit value of the sign-in form (login CSRF)
CSRF_FIELD = "csrf_token"


class SignInRequired(Unauthorized):
    """No session, an ended one, or a token that no longer verifies: the browser goes to sign-in."""


class CsrfRejected(Forbidden):
    default_message = "the form's CSRF token is missing or wrong: reload the page and try again"


def dashboard_of(request: Request) -> Dashboard:
    dash: Dashboard = request.app.state.dashboard
    return dash


def base_path(request: Request) -> str:
    """Where the dashboard is mounted (`/dashboard`)."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


def is_https(request: Request) -> bool:
    public = request.app.state.dashboard.parts.settings.public_url or ""
    return request.url.scheme == "https" or public.startswith("https://")


class Form:
    """An `application/x-www-form-urlencoded` body, in order (a name may repeat)."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs

    def get(self, name: str, default: str = "") -> str:
        for key, value in self.pairs:
            if key == name:
                return value
        return default

    def getlist(self, name: str) -> list[str]:
        return [value for key, value in self.pairs if key == name]


async def read_form(request: Request, limit: int) -> Form:
    """The body as a form, refusing more than `limit` bytes (even without Content-Length); any other
    body is read as an empty form."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return Form([])  # no form, so no CSRF token either: the caller refuses it
    body = await read_body(request, limit)
    try:
        text = body.decode("ascii")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False, errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise ValidationFailed("invalid form", details=[{"field": "body", "reason": "not a form"}]) from None
    if any("\x00" in k or "\x00" in v for k, v in pairs):
        raise ValidationFailed("invalid form", details=[{"field": "body", "reason": "holds NUL"}])
    return Form(pairs)


def check_same_origin(request: Request) -> None:
    """Defence in depth behind the CSRF token: a browser's cross-site POST is refused outright."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise CsrfRejected("cross-site request refused")
    origin = request.headers.get("origin")
    if origin and origin != "null":
        public = dashboard_of(request).parts.settings.public_url  # behind a proxy: the URL people see
        own = {_origin(str(request.url))} | ({_origin(public)} if public else set())
        if _origin(origin) not in own:
            raise CsrfRejected("cross-origin request refused")


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


@dataclass
class Visit:
    """One signed-in request."""

    request: Request
    dash: Dashboard
    who: Principal
    session: WebSession

    @property
    def parts(self) -> Components:
        return self.dash.parts

    @property
    def base(self) -> str:
        return base_path(self.request)

    async def form(self, limit: int | None = None) -> Form:
        """The POSTed form, after the same-origin and CSRF checks (every state change goes here)."""
        check_same_origin(self.request)
        form = await read_form(self.request, limit or self.parts.settings.registry_max_body_bytes)
        if not self.session.csrf_matches(form.get(CSRF_FIELD) or None):
            raise CsrfRejected()
        return form

    def render(self, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        return self.dash.render(
            self.request,
            template,
            status_code,
            who=self.who,
            csrf_token=self.session.csrf,
            flashes=self.session.take_flashes(),
            **context,
        )

    def render_checked(self, template: str, errors: FieldErrors, **context: Any) -> HTMLResponse:
        """A page whose query was checked: 422 if any check failed, each error beside its field."""
        return self.render(template, 422 if errors else 200, errors=errors, **context)

    def redirect(self, path: str, flash: str | None = None, kind: str = "ok") -> RedirectResponse:
        if flash:
            self.session.flash(kind, flash)
        return RedirectResponse(self.base + path, status_code=303)


async def signed_in(request: Request) -> Visit:
    """The visit of a live session (the token re-verified now), or `SignInRequired`."""
    dash = dashboard_of(request)
    session = dash.sessions.get(request.cookies.get(SESSION_COOKIE))
    if session is None:
        raise SignInRequired("sign in first")
    try:
        who = await dash.parts.verifier.verify(session.token)
    except Unauthorized as err:
        dash.sessions.end(request.cookies.get(SESSION_COOKIE))
        raise SignInRequired(f"signed out: {err.message}") from None
    await dash.parts.limiter.admit(f"{who.tenant_id}/{who.user_id}")  # the REST per-user rate, shared
    return Visit(request, dash, who, session)


def start_session(request: Request, token: str, who: Principal, target: str) -> Response:
    """Sign in: a new session for `token`, its cookie (expiring with the token) and a redirect."""
    dash = dashboard_of(request)
    expires_at = who.expires_at or (time.time() + 3600)
    sid, _ = dash.sessions.create(token, expires_at=expires_at, user_id=who.user_id, tenant_id=who.tenant_id)
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        sid,
        max_age=max(1, int(expires_at - time.time())),
        path=base_path(request) or "/",
        secure=is_https(request),
        httponly=True,
        samesite="strict",
    )
    response.delete_cookie(LOGIN_COOKIE, path=base_path(request) or "/")
    logger.info("dashboard sign-in", extra={"user_id": who.user_id, "tenant_id": who.tenant_id})
    return response


def end_session(request: Request, response: Response) -> Response:
    dashboard_of(request).sessions.end(request.cookies.get(SESSION_COOKIE))
    response.delete_cookie(SESSION_COOKIE, path=base_path(request) or "/")
    return response
