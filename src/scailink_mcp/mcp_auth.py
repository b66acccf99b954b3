"""Identity on the MCP surface: ScaiLink's JWT verifier plugged into the SDK's resource-server auth.

`BearerAuthBackend` + `RequireAuthMiddleware` answer a missing token with 401 and `WWW-Authenticate`
pointing at the protected-resource metadata; handlers read the `Principal` from the SDK's auth
context. Also here: DNS-rebinding protection (Host/Origin) and the rate-limit key of a request.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from urllib.parse import urlsplit

from mcp.server.auth.middleware.auth_context import AuthContextMiddleware, get_access_token
from mcp.server.auth.middleware.bearer_auth import BearerAuthBackend, RequireAuthMiddleware
from mcp.server.auth.provider import AccessToken
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_REQUEST
from pydantic import AnyHttpUrl, ConfigDict
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.types import ASGIApp, Scope

from scailink_mcp.auth import Principal, TokenVerifier
from scailink_mcp.config import Settings
from scailink_mcp.errors import Unauthorized

logger = logging.getLogger(__name__)


class ScaiLinkAccessToken(AccessToken):
    """The SDK's access token carrying ScaiLink's `Principal` to the handlers."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    principal: Principal


class McpTokenVerifier:
    """Adapts `auth.TokenVerifier` to the SDK's `TokenVerifier` protocol.

    The access token (a pydantic model) made for a principal is reused while the verifier answers
    with that same `Principal` object (its cache hit: same claims, same custom roles), so a warm
    request builds no model; a different principal (roles changed, token re-verified) gets a new one.
    """

    def __init__(self, verifier: TokenVerifier) -> None:
        self.verifier = verifier
        self._made: OrderedDict[str, ScaiLinkAccessToken] = OrderedDict()

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            principal = await self.verifier.verify(token)
        except Unauthorized as exc:
            logger.info("mcp token refused", extra={"reason": exc.message})
            return None
        made = self._made.get(token)
        if made is not None and made.principal is principal:
            return made
        # The SDK ties a session (Streamable HTTP and SSE alike) to (client_id, issuer, subject) and
        # answers 404 to anyone else: both carry the tenant, since `sub` is only unique inside one.
        owner = json.dumps(principal.identity)
        made = ScaiLinkAccessToken(
            token=token,
            client_id=owner,
            scopes=sorted(principal.permissions),
            subject=owner,
            claims={"tenant_id": principal.tenant_id},
            principal=principal,
        )
        size = self.verifier.settings.jwt_verified_cache_size
        if size > 0:
            self._made[token] = made
            self._made.move_to_end(token)
            while len(self._made) > size:
                self._made.popitem(last=False)
        return made


def current_principal() -> Principal:
    token = get_access_token()
    if not isinstance(token, ScaiLinkAccessToken):
        raise MCPError(INVALID_REQUEST, "not authenticated")
    return token.principal


def scope_principal(scope: Scope) -> Principal | None:
    """The principal of an authenticated request, read in ASGI middleware (before any handler)."""
    token = getattr(scope.get("user"), "access_token", None)
    return token.principal if isinstance(token, ScaiLinkAccessToken) else None


def rate_key(scope: Scope) -> str | None:
    """The per-user rate-limit bucket of an authenticated request (the same key as REST)."""
    principal = scope_principal(scope)
    return None if principal is None else f"{principal.tenant_id}/{principal.user_id}"


def protect(
    app: ASGIApp,
    verifier: McpTokenVerifier,
    metadata_url: str,
    guard: Callable[[ASGIApp], ASGIApp] | None = None,
) -> ASGIApp:
    """Bearer auth the SDK way: 401 + `WWW-Authenticate: Bearer ... resource_metadata=...`; then
    `guard` (rate limit, body and message checks) on authenticated requests."""
    required = RequireAuthMiddleware(guard(app) if guard else app, [], AnyHttpUrl(metadata_url))
    return AuthenticationMiddleware(AuthContextMiddleware(required), backend=BearerAuthBackend(verifier))


def security_settings(settings: Settings) -> TransportSecuritySettings:
    """DNS-rebinding protection: Host/Origin must name this service."""
    hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*", *settings.mcp_allowed_hosts]
    origins = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*", *settings.mcp_allowed_origins]
    if settings.public_url:
        public = urlsplit(settings.public_url)
        hosts += [public.netloc, f"{public.hostname}:*"]
        origins.append(f"{public.scheme}://{public.netloc}")
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins
    )


def resource_url(settings: Settings) -> str:
    return (settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/") + "/mcp"
