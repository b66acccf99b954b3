"""Connect and disconnect the signed-in user's upstream OAuth authorization (SPEC sections 11, 12).

"Connect" (an `authorization_code` server the caller sees, not connected yet or whose token was
revoked) sends the browser to the absolute `authorize_url` of an auth-required answer: a one-time
ticket bound to (tenant, user, server) that also names the server's dashboard page, where the
callback sends the browser back. It is a link (GET), not a form: the dashboard's CSP has
`form-action 'self'`, which browsers apply to the redirects after a form submission, and the flow
leaves for the authorization server. Nothing changes until the callback, which the `state` guards.
"Disconnect" is a form (CSRF checked) that forgets the caller's token exactly as
`DELETE .../oauth/token` does (the authorization server is asked to revoke it).

Must not: render or log a ticket, a state or a token; offer either action to a caller without
`scailink:remote.use`, or for a server the caller cannot see (the registry's "not found").
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from scailink_mcp import auth
from scailink_mcp.dashboard.servers import registry_of
from scailink_mcp.dashboard.web import signed_in
from scailink_mcp.errors import ValidationFailed
from scailink_mcp.remote.access import register_permission
from scailink_mcp.remote.oauth_config import AUTHORIZATION_CODE


async def connect(request: Request) -> Response:
    visit = await signed_in(request)
    visit.who.require(auth.REMOTE_USE)
    registry = registry_of(visit)
    server = await registry.get(visit.who, request.path_params["server_id"])  # "not found" if not visible
    if server.oauth is None or server.oauth.grant != AUTHORIZATION_CODE:
        raise ValidationFailed(
            "this server has nothing for a user to authorize",
            details=[{"field": "oauth.grant", "reason": "not authorization_code"}],
        )
    config = await registry.oauth.config(server.id)
    url = registry.oauth.authorize_url(
        config,
        visit.who.user_id,
        back=f"{visit.base}/servers/{server.id}",
        # As the REST authorize route: SCAILINK_PUBLIC_URL, else the origin this browser reached.
        base=visit.parts.settings.public_url or f"{request.url.scheme}://{request.url.netloc}",
    )
    return RedirectResponse(url, status_code=303, headers={"Cache-Control": "no-store"})


async def disconnect(request: Request) -> Response:
    visit = await signed_in(request)
    await visit.form()
    visit.who.require(auth.REMOTE_USE)
    registry = registry_of(visit)
    server = await registry.get(visit.who, request.path_params["server_id"])
    await registry.oauth.disconnect(visit.who, server.id, may_manage=visit.who.has(register_permission(True)))
    return visit.redirect(f"/servers/{server.id}", f"{server.name}: disconnected (your token is forgotten)")
