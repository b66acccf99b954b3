"""Routes of upstream OAuth (SPEC section 12): authorize, callback, disconnect.

`GET .../remote-servers/{id}/oauth/authorize` redirects to the upstream's authorization server; it
takes the caller's bearer token, or (from a browser, which has none) the one-time `ticket` of an
auth-required answer. `GET /v1/modules/scailink/oauth/callback` is public: the `state` it carries is
the proof; it answers JSON, or, for a flow started from the dashboard's "Connect", a small page that
sends the browser back to the dashboard (a same-site navigation from this page, so the dashboard's
`SameSite=Strict` cookie goes with it, which a redirect straight from the authorization server's site
would not carry). The rules are `remote/oauth.py`'s; these only translate HTTP.
"""

from __future__ import annotations

import html

from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from scailink_mcp import auth
from scailink_mcp.api.envelope import components, no_content, ok, path_param, principal
from scailink_mcp.errors import ValidationFailed
from scailink_mcp.remote.access import register_permission
from scailink_mcp.remote.oauth import CALLBACK_PATH, OAuth
from scailink_mcp.remote.oauth_stamps import same_origin_path

MAX_PARAM_CHARS = 4096


def _oauth(request: Request) -> OAuth:
    registry = components(request).registry
    registry.ensure_enabled()
    return registry.oauth


def _param(request: Request, name: str, *, required: bool = False) -> str | None:
    value = request.query_params.get(name)
    if value is not None and len(value) > MAX_PARAM_CHARS:
        raise ValidationFailed(f"invalid {name}", details=[{"field": name, "reason": "too long"}])
    if required and not value:
        raise ValidationFailed(f"missing {name}", details=[{"field": name, "reason": "required"}])
    return value


def _base(request: Request) -> str:
    """Where the callback is reached: `SCAILINK_PUBLIC_URL`, else this request's own origin."""
    public = components(request).settings.public_url
    return (public or str(request.base_url)).rstrip("/")


async def authorize(request: Request) -> Response:
    server_id = path_param(request, "server_id")
    ticket = _param(request, "ticket")
    if ticket is not None:
        url = await _oauth(request).start(server_id, base=_base(request), ticket=ticket)
    else:
        who = await principal(request)
        who.require(auth.REMOTE_USE)
        url = await _oauth(request).start(server_id, base=_base(request), principal=who)
    return RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})


async def callback(request: Request) -> Response:
    oauth = _oauth(request)
    stamp = await oauth.callback(
        state=_param(request, "state", required=True) or "",
        code=_param(request, "code"),
        iss=_param(request, "iss"),
        error=_param(request, "error"),
    )
    if stamp.back and same_origin_path(stamp.back):
        return _back_page(stamp.back)
    response = ok(request, {"server_id": stamp.server_id, "connected": True})
    response.headers["Cache-Control"] = "no-store"
    return response


def _back_page(path: str) -> HTMLResponse:
    target = html.escape(path, quote=True)
    page = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="0;url={target}"><title>Connected</title></head>'
        f'<body><p>Connected. <a href="{target}">Back to the dashboard</a></p></body></html>'
    )
    headers = {
        "Cache-Control": "no-store",
        "Content-Security-Policy": "default-src 'none'; base-uri 'none'; frame-ancestors 'none'",
        "Referrer-Policy": "no-referrer",  # the callback URL holds the code and the state
    }
    return HTMLResponse(page, headers=headers)


async def disconnect(request: Request) -> Response:
    who = await principal(request)
    who.require(auth.REMOTE_USE)
    may_manage = who.has(register_permission(True))
    await _oauth(request).disconnect(who, path_param(request, "server_id"), may_manage=may_manage)
    return no_content()


BASE = "/v1/modules/scailink/remote-servers/{server_id}/oauth"

routes = [
    Route(BASE + "/authorize", authorize, methods=["GET"]),
    Route(BASE + "/token", disconnect, methods=["DELETE"]),
    Route(CALLBACK_PATH, callback, methods=["GET"]),
]
