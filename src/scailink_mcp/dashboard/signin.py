"""Sign-in and sign-out (SPEC section 11).

`GET /login` shows a form with one field, `token` (a JWT, as for REST). `GET /login?ticket=...` (the
one-time link of `scailink dev`) shows a button that POSTs that ticket: a GET never signs anyone in,
so a link scanner or a prefetch cannot use up the ticket. The sign-in form carries its own CSRF value,
double-submitted in a short-lived cookie (there is no session yet). `POST /logout` ends the session.
"""

from __future__ import annotations

import hmac
import secrets

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from scailink_mcp.dashboard.web import (
    CSRF_FIELD,
    LOGIN_COOKIE,
    CsrfRejected,
    base_path,
    check_same_origin,
    dashboard_of,
    end_session,
    is_https,
    read_form,
    signed_in,
    start_session,
)
from scailink_mcp.errors import Unauthorized

LOGIN_FORM_TTL_S = 900


def _safe_next(request: Request, raw: str) -> str:
    """Only a path inside the dashboard (no open redirect)."""
    base = base_path(request)
    if raw.startswith(base + "/") and not raw.startswith("//") and "\\" not in raw and "://" not in raw:
        return raw
    return base + "/"


def _login_page(request: Request, status_code: int = 200, error: str | None = None) -> Response:
    dash = dashboard_of(request)
    nonce = request.cookies.get(LOGIN_COOKIE) or secrets.token_urlsafe(32)
    response = dash.render(
        request,
        "login.html",
        status_code,
        csrf_token=nonce,
        ticket=request.query_params.get("ticket", ""),
        next=_safe_next(request, request.query_params.get("next", "")),
        error=error,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        nonce,
        max_age=LOGIN_FORM_TTL_S,
        path=base_path(request) or "/",
        secure=is_https(request),
        httponly=True,
        samesite="strict",
    )
    return response


async def login_form(request: Request) -> Response:
    return _login_page(request)


async def login(request: Request) -> Response:
    check_same_origin(request)
    dash = dashboard_of(request)
    form = await read_form(request, dash.parts.settings.jwt_max_token_bytes + 4096)
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    if not nonce or not hmac.compare_digest(nonce.encode(), form.get(CSRF_FIELD).encode()):
        raise CsrfRejected()
    ticket = form.get("ticket").strip()
    token = dash.tickets.redeem(ticket) if ticket else form.get("token").strip()
    if not token:
        reason = "this sign-in link was already used or has expired" if ticket else "paste a token"
        return _login_page(request, 401, reason)
    try:
        who = await dash.parts.verifier.verify(token)
    except Unauthorized as err:
        return _login_page(request, 401, f"token refused: {err.message}")
    return start_session(request, token, who, _safe_next(request, form.get("next")))


async def logout(request: Request) -> Response:
    visit = await signed_in(request)
    await visit.form()  # the CSRF check: nobody else can sign a user out
    return end_session(request, RedirectResponse(visit.base + "/login", status_code=303))
