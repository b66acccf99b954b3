"""Upstream OAuth as the registry and the call path use it (SPEC section 12): one object per app.

Owns the flow's order and its rules: who may start an authorization (a caller who sees the server,
or the holder of a one-time ticket from an auth-required answer), the authorization request (PKCE
S256, a one-time `state` bound to (tenant, user, server), the RFC 8707 `resource`), the callback
(state checked and used once, the server re-checked against the state's tenant and user, the RFC
9207 `iss` checked, the code exchanged), disconnecting, the client identity (given at registration,
or registered dynamically for issuers on `oauth_dcr_allowed_issuers`), and what a call needs: the
pool key of the caller's current token (`pool_key`, memory only on a warm call) and the bearer auth
of an upstream connection (`bearer`). Tokens themselves are `oauth_tokens.py`'s, the wire
`oauth_client.py`'s, the stamps `oauth_stamps.py`'s. Audits authorize, refresh failure and disconnect.

Must not: put a token, a code or a secret in an answer, a log line or an audit row.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from urllib.parse import urlencode

from mcp.client.auth.exceptions import OAuthFlowError
from mcp.client.auth.utils import validate_authorization_response_iss
from mcp.shared.auth import OAuthToken

from scailink_mcp.audit import AuditLog, AuditRecord
from scailink_mcp.auth import Principal
from scailink_mcp.config import Settings
from scailink_mcp.crypto import Keyring
from scailink_mcp.db import Database
from scailink_mcp.errors import (
    NotFound,
    RegistryDisabled,
    UpstreamAuthRequired,
    ValidationFailed,
)
from scailink_mcp.events import ServerEvent
from scailink_mcp.leases import Lease
from scailink_mcp.models import OAuthClient, RemoteServer
from scailink_mcp.remote.access import load_visible_to
from scailink_mcp.remote.oauth_client import AuthServer, ClientIdentity, OAuthFailed, OAuthHttp
from scailink_mcp.remote.oauth_config import (
    AUTHORIZATION_CODE,
    CLIENT_CREDENTIALS,
    ClientConfig,
    client_secret,
    config_of,
    pin_issuer,
    save_client,
)
from scailink_mcp.remote.oauth_stamps import (
    STATE,
    TICKET,
    Stamp,
    Stamps,
    new_nonce,
    refused,
    same_origin_path,
)
from scailink_mcp.remote.oauth_tokens import AuthorizationMissing, BearerAuth, Held, TokenOwner, TokenStore
from scailink_mcp.remote.upstream import Network

logger = logging.getLogger(__name__)

CALLBACK_PATH = "/v1/modules/scailink/oauth/callback"
AUTHORIZE_PATH = "/v1/modules/scailink/remote-servers/{server_id}/oauth/authorize"


class OAuth:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        keyring: Keyring | None,
        allowed: list[Network],
        *,
        lease: Lease | None,
        audit: AuditLog | None,
    ) -> None:
        # Built by the registry only, which always hands on its lease and audit log (no defaults).
        self.settings = settings
        self.db = db
        self.keyring = keyring
        self.http = OAuthHttp(allowed, timeout_s=settings.oauth_http_timeout_s)
        self.tokens = TokenStore(settings, db, keyring, lease=lease)
        self.audit = audit
        self.stamps = Stamps(keyring, ttl_s=settings.oauth_state_ttl_s) if keyring else None
        self._configs: dict[str, ClientConfig] = {}
        self._servers: dict[str, AuthServer] = {}
        # Set by the registry: discovery of a pending server once its owner has authorized.
        self.on_connected: Callable[[str], Awaitable[None]] | None = None
        # Set by the registry: every completed authorization (URL-mode elicitations hear of it).
        self.on_authorized: Callable[[Stamp], Awaitable[None]] | None = None

    # ---- configuration (cold path) -----------------------------------------------------------------

    def _stamps(self) -> Stamps:
        if self.stamps is None:
            raise RegistryDisabled()
        return self.stamps

    async def config(self, server_id: str) -> ClientConfig:
        found = self._configs.get(server_id)
        if found is None:
            found = await self.db.run(lambda s: config_of(s, server_id))
            if found is None:  # the caller checked the server exists: it is not an oauth2 one
                raise ValidationFailed(
                    "this server does not use OAuth",
                    details=[{"field": "auth_type", "reason": "not oauth2"}],
                )
            self._configs[server_id] = found
        return found

    async def on_event(self, event: ServerEvent) -> None:
        """A changed endpoint or credential means a new authorization server or client: look again."""
        if event.closes_sessions:
            self._configs.pop(event.server_id, None)
            self._servers.pop(event.server_id, None)
        if event.kind.value == "deleted":
            self.tokens.drop_server(event.server_id)

    async def auth_server(self, config: ClientConfig) -> AuthServer:
        found = self._servers.get(config.server_id)
        if found is not None:
            return found
        found = await self.http.discover(config.endpoint_url, config.transport)
        if config.issuer is not None and found.issuer != config.issuer:
            raise OAuthFailed("the upstream now names another authorization server than at first use")
        if config.issuer is None:
            await self.db.run(lambda s: pin_issuer(s, config.server_id, found.issuer))
            self._configs.pop(config.server_id, None)
        self._servers[config.server_id] = found
        return found

    async def client(
        self, config: ClientConfig, auth_server: AuthServer, redirect_uri: str
    ) -> ClientIdentity:
        """The client identity: the registered one, else a dynamic registration if the issuer is allowed."""
        server_id = config.server_id
        if config.client_id is not None:
            secret = await self.db.run(lambda s: client_secret(s, self.keyring, server_id))
            return ClientIdentity(config.client_id, secret)
        if auth_server.issuer not in self.settings.oauth_dcr_allowed_issuers:
            raise ValidationFailed(
                "this server has no OAuth client id and its issuer is not allowed for dynamic registration",
                details=[
                    {
                        "field": "oauth.client_id",
                        "reason": "required (issuer not in SCAILINK_OAUTH_DCR_ALLOWED_ISSUERS)",
                    }
                ],
            )
        identity = await self.http.register(auth_server, redirect_uri, config.scopes)
        await self.db.run(lambda s: save_client(s, self.keyring, server_id, identity))
        self._configs.pop(server_id, None)
        return identity

    # ---- the call path -----------------------------------------------------------------------------

    def public_base(self) -> str:
        return (self.settings.public_url or f"http://{self.settings.host}:{self.settings.port}").rstrip("/")

    def authorize_url(
        self,
        config: ClientConfig,
        user_id: str,
        *,
        nonce: str | None = None,
        back: str = "",
        base: str | None = None,
    ) -> str:
        """An absolute URL with a one-time ticket; `back`: the dashboard page the callback returns to;
        `base`: the origin a browser reached this gateway at (default: `public_base()`)."""
        if back and not same_origin_path(back):
            raise ValueError("a callback returns only to a page of this gateway")
        ticket = self._stamps().mint(
            TICKET,
            tenant_id=config.tenant_id,
            user_id=user_id,
            server_id=config.server_id,
            nonce=nonce,
            back=back,
        )
        path = AUTHORIZE_PATH.format(server_id=config.server_id)
        return f"{(base or self.public_base()).rstrip('/')}{path}?{urlencode({'ticket': ticket})}"

    async def current(self, config: ClientConfig, user_id: str) -> Held:
        """The caller's fresh token (memory on a warm call); `UpstreamAuthRequired` when there is none."""
        owner = config.owner(user_id)
        held = self.tokens.cached(owner)
        if held is not None:
            return held
        try:
            return await self.tokens.current(owner, lambda o, h: self._renew(config, o, h))
        except AuthorizationMissing as exc:
            if config.grant == CLIENT_CREDENTIALS:
                raise OAuthFailed(f"no client-credentials token for this server ({exc})") from None
            nonce = new_nonce()  # the ticket's, and the id of a URL-mode elicitation of it
            raise UpstreamAuthRequired(
                authorize_url=self.authorize_url(config, user_id, nonce=nonce), elicitation_id=nonce
            ) from None

    async def _renew(self, config: ClientConfig, owner: TokenOwner, held: Held | None) -> OAuthToken | None:
        if config.grant != CLIENT_CREDENTIALS and (held is None or held.refresh_token is None):
            return None  # only the user can get a first token
        auth_server = await self.auth_server(config)
        identity = await self.client(config, auth_server, self.public_base() + CALLBACK_PATH)
        if config.grant == CLIENT_CREDENTIALS:
            form = {"grant_type": CLIENT_CREDENTIALS}
            if config.scopes:
                form["scope"] = " ".join(config.scopes)
            return await self.http.token(auth_server, identity, form)
        if held is None or held.refresh_token is None:
            return None
        try:
            return await self.http.token(
                auth_server, identity, {"grant_type": "refresh_token", "refresh_token": held.refresh_token}
            )
        except OAuthFailed as exc:
            self._audit(
                config.tenant_id, owner.user_key, "oauth.refresh", "error", config.server_id, exc.code
            )
            raise

    async def version(self, server_id: str, user_id: str) -> int:
        """The version of the caller's current token (the pool key's part); raises like `current`."""
        held = await self.current(await self.config(server_id), user_id)
        return held.version

    def bearer(self, server_id: str, user_id: str) -> BearerAuth:
        """The auth of one upstream connection on behalf of `user_id` (the token is read per request)."""

        async def current() -> Held:
            config = await self.config(server_id)
            try:
                return await self.current(config, user_id)
            except UpstreamAuthRequired:
                raise AuthorizationMissing(server_id, user_id) from None

        async def stale(version: int) -> None:
            self.tokens.stale((await self.config(server_id)).owner(user_id), version)

        return BearerAuth(current, stale)

    async def per_user(self, server_id: str) -> bool:
        """Whether the server is an oauth2 one whose tokens are each user's (`authorization_code`)."""
        found = await self.db.run(lambda s: s.get(OAuthClient, server_id))
        return found is not None and found.grant == AUTHORIZATION_CODE

    async def connected(self, server: RemoteServer, user_id: str) -> bool:
        grant = (await self.config(server.id)).grant
        key = "" if grant == CLIENT_CREDENTIALS else user_id
        return await self.tokens.connected(TokenOwner(server.id, server.tenant_id, key))

    # ---- the authorization flow --------------------------------------------------------------------

    async def start(
        self, server_id: str, *, base: str, principal: Principal | None = None, ticket: str | None = None
    ) -> str:
        """The authorization server's URL to send the browser to; `principal` or a one-time `ticket`."""
        stamps = self._stamps()
        elicitation = back = ""
        if principal is not None:
            tenant_id, user_id = principal.tenant_id, principal.user_id
        elif ticket is not None:
            stamp = stamps.check(TICKET, ticket)
            if stamp.server_id != server_id:
                raise refused(TICKET, "issued for another server")
            tenant_id, user_id = stamp.tenant_id, stamp.user_id
            elicitation, back = stamp.nonce, stamp.back
        else:  # pragma: no cover  (the route passes one of them)
            raise refused(TICKET, "missing")
        await self.db.run(lambda s: load_visible_to(s, server_id, tenant_id=tenant_id, user_id=user_id))
        if ticket is not None:
            await self.db.run(lambda s: stamps.consume(s, stamp))
        config = await self.config(server_id)
        if config.grant != AUTHORIZATION_CODE:
            raise ValidationFailed(
                "this server uses client credentials: there is nothing for a user to authorize",
                details=[{"field": "oauth.grant", "reason": config.grant}],
            )
        redirect_uri = base + CALLBACK_PATH
        try:
            auth_server = await self.auth_server(config)
        except OAuthFailed as exc:
            # The registered endpoint leads to no usable authorization server: the owner must fix
            # `endpoint_url` (or the upstream), like an endpoint that fails discovery.
            raise ValidationFailed(
                "no authorization server could be found for this server",
                details=[{"field": "endpoint_url", "reason": exc.message}],
            ) from None
        identity = await self.client(config, auth_server, redirect_uri)
        state = stamps.mint(
            STATE,
            tenant_id=tenant_id,
            user_id=user_id,
            server_id=server_id,
            base=base,
            elicitation=elicitation,
            back=back,
        )
        params = {
            "response_type": "code",
            "client_id": identity.client_id,
            "redirect_uri": redirect_uri,
            "state": state,
            "code_challenge": stamps.challenge(state),
            "code_challenge_method": "S256",
            "resource": auth_server.resource,
        }
        if config.scopes:
            params["scope"] = " ".join(config.scopes)
        return f"{auth_server.metadata.authorization_endpoint}?{urlencode(params)}"

    async def callback(self, *, state: str, code: str | None, iss: str | None, error: str | None) -> Stamp:
        """Finish an authorization: check and use the state, check `iss`, exchange the code, store."""
        stamps = self._stamps()
        stamp = stamps.check(STATE, state)
        await self.db.run(lambda s: stamps.consume(s, stamp))
        server = await self.db.run(
            lambda s: load_visible_to(s, stamp.server_id, tenant_id=stamp.tenant_id, user_id=stamp.user_id)
        )
        config = await self.config(server.id)
        if error is not None or not code:
            self._audit(
                stamp.tenant_id, stamp.user_id, "oauth.authorize", "denied", server.id, "access_denied"
            )
            raise ValidationFailed(
                "the authorization server did not grant access",
                details=[{"field": "error", "reason": (error or "no code")[:64]}],
            )
        auth_server = await self.auth_server(config)
        try:
            validate_authorization_response_iss(iss, auth_server.metadata)
        except OAuthFlowError:
            raise refused("iss", "not the issuer the authorization was asked of (RFC 9207)") from None
        redirect_uri = stamp.base + CALLBACK_PATH
        identity = await self.client(config, auth_server, redirect_uri)
        token = await self.http.token(
            auth_server,
            identity,
            {
                "grant_type": AUTHORIZATION_CODE,
                "code": code,
                "redirect_uri": redirect_uri,
                "code_verifier": stamps.verifier(state),
            },
        )
        await self.tokens.store(config.owner(stamp.user_id), token)
        self._audit(stamp.tenant_id, stamp.user_id, "oauth.authorize", "ok", server.id)
        if stamp.user_id == server.owner_user_id and self.on_connected is not None:
            await self.on_connected(server.id)
        if self.on_authorized is not None:
            await self.on_authorized(stamp)
        return stamp

    async def disconnect(self, principal: Principal, server_id: str, *, may_manage: bool) -> None:
        """Forget the caller's token (a client-credentials server's one token needs the manage right).

        Idempotent: a caller who is not connected (or a server without OAuth) gets the same 204."""
        server = await self.db.run(
            lambda s: load_visible_to(s, server_id, tenant_id=principal.tenant_id, user_id=principal.user_id)
        )
        if server.auth_type != "oauth2":
            return
        config = await self.config(server.id)
        if config.grant == CLIENT_CREDENTIALS and not may_manage:
            raise NotFound("server not found")
        held = await self.tokens.forget(config.owner(principal.user_id))
        if held is None:
            return
        try:
            auth_server = await self.auth_server(config)
            identity = await self.client(config, auth_server, self.public_base() + CALLBACK_PATH)
            await self.http.revoke(auth_server, identity, held.refresh_token or held.access_token)
        except (OAuthFailed, ValidationFailed):
            logger.info("token revocation skipped", extra={"server_id": server.id})
        self._audit(principal.tenant_id, principal.user_id, "oauth.disconnect", "ok", server.id)

    def _audit(
        self, tenant_id: str, user_id: str, event: str, outcome: str, server_id: str, code: str | None = None
    ) -> None:
        if self.audit is not None:
            self.audit.record(
                AuditRecord(
                    tenant_id=tenant_id,
                    user_id=user_id or "(server)",
                    event=event,
                    outcome=outcome,
                    error_code=code,
                    target=server_id,
                    detail_level=self.settings.audit_detail_level,
                )
            )
