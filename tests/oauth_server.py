"""A real OAuth 2.1 authorization server and an MCP server that accepts only its tokens (test fixtures).

`AuthServer`: authlib's `AuthorizationServer` (RFC 6749 grants: authorization code with PKCE S256,
refresh token with rotation, client credentials; RFC 9207 `iss` on every authorization response)
behind a small Starlette adapter, served by uvicorn on 127.0.0.1. It publishes RFC 8414 metadata,
takes dynamic client registrations (RFC 7591, minimal: any client metadata is accepted and a
client id and secret issued) and revocations (RFC 7009). The "browser"
step is automatic: `/authorize` approves the user named by the `as_user` cookie, as a signed-in
browser session would, and refuses when there is none. Every access token records the `resource`
(RFC 8707) it was issued for; `access_ttl_s` sets the lifetime of the next tokens.

`ProtectedUpstream`: the SDK's `MCPServer` with its resource-server auth (`AuthSettings` and a
`TokenVerifier` asking the authorization server's token table): a request without a valid token
answers 401 with `WWW-Authenticate: Bearer ... resource_metadata=...` (RFC 9728), and the tool
`whoami` answers the token's subject, so a test sees whose token reached the upstream.

Must not: import ScaiLink. Tests reach both only over HTTP, as a gateway would.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
from authlib.oauth2 import AuthorizationServer
from authlib.oauth2.rfc6749 import ClientMixin, OAuth2Payload, OAuth2Request, grants
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oauth2.rfc9207 import IssuerParameter
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from pydantic import AnyHttpUrl
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.servers import ThreadedServer


@dataclass
class Client(ClientMixin):  # type: ignore[misc]
    client_id: str
    client_secret: str | None
    redirect_uris: list[str]
    grant_types: list[str]
    scope: str = "mcp"
    auth_method: str = "client_secret_basic"

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        return self.redirect_uris[0] if self.redirect_uris else None

    def get_allowed_scope(self, scope: str) -> str:
        allowed = set(self.scope.split())
        return " ".join(s for s in (scope or "").split() if s in allowed)

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret: str) -> bool:
        return self.client_secret is not None and secrets.compare_digest(self.client_secret, client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == self.auth_method or (self.client_secret is not None and method != "none")

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code"

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.grant_types


@dataclass
class Code:
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    subject: str
    code_challenge: str | None
    code_challenge_method: str | None
    resource: str | None
    expires_at: float

    def get_redirect_uri(self) -> str:
        return self.redirect_uri

    def get_scope(self) -> str:
        return self.scope


@dataclass
class Token:
    access_token: str
    refresh_token: str | None
    client_id: str
    subject: str | None
    scope: str
    resource: str | None
    expires_at: float
    revoked: bool = False

    def check_client(self, client: Client) -> bool:
        return client.client_id == self.client_id

    def get_scope(self) -> str:
        return self.scope

    def get_expires_in(self) -> int:
        return max(0, int(self.expires_at - time.time()))

    def is_expired(self) -> bool:
        return False  # a refresh token lives until it is revoked or used

    def is_revoked(self) -> bool:
        return self.revoked


class _Payload(OAuth2Payload):  # type: ignore[misc]
    def __init__(self, values: list[tuple[str, str]]) -> None:
        self._values = values

    @property
    def data(self) -> dict[str, str]:
        return dict(self._values)

    @property
    def datalist(self) -> defaultdict[str, list[str]]:
        out: defaultdict[str, list[str]] = defaultdict(list)
        for key, value in self._values:
            out[key].append(value)
        return out


class _Request(OAuth2Request):  # type: ignore[misc]
    """authlib's request over a Starlette request whose body was already read (authlib is sync)."""

    def __init__(self, request: Request, body: bytes) -> None:
        super().__init__(method=request.method, uri=str(request.url), headers=request.headers)
        self._query = list(request.query_params.multi_items())
        self._form = parse_qsl(body.decode(), keep_blank_values=True) if body else []
        self.payload = _Payload(self._query + self._form)

    @property
    def args(self) -> dict[str, str]:
        return dict(self._query)

    @property
    def form(self) -> dict[str, str]:
        return dict(self._form)


class _AuthorizationCodeGrant(grants.AuthorizationCodeGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "none"]

    def save_authorization_code(self, code: str, request: OAuth2Request) -> None:
        data = request.payload.data
        world: AuthServer = self.server.world
        world.codes[code] = Code(
            code=code,
            client_id=request.client.client_id,
            redirect_uri=data.get("redirect_uri", ""),
            scope=request.payload.scope or "",
            subject=request.user,
            code_challenge=data.get("code_challenge"),
            code_challenge_method=data.get("code_challenge_method"),
            resource=data.get("resource"),
            expires_at=time.time() + 300,
        )

    def query_authorization_code(self, code: str, client: Client) -> Code | None:
        item: Code | None = self.server.world.codes.get(code)
        if item and item.client_id == client.client_id and item.expires_at > time.time():
            return item
        return None

    def delete_authorization_code(self, authorization_code: Code) -> None:
        self.server.world.codes.pop(authorization_code.code, None)

    def authenticate_user(self, authorization_code: Code) -> str:
        self.request.resource = authorization_code.resource
        return authorization_code.subject


class _RefreshTokenGrant(grants.RefreshTokenGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "none"]
    INCLUDE_NEW_REFRESH_TOKEN = True  # rotation: every refresh hands out a new refresh token

    def authenticate_refresh_token(self, refresh_token: str) -> Token | None:
        world: AuthServer = self.server.world
        for token in world.tokens.values():
            if token.refresh_token == refresh_token and not token.revoked:
                return token
        return None

    def authenticate_user(self, refresh_token: Token) -> str | None:
        self.request.resource = refresh_token.resource
        return refresh_token.subject

    def revoke_old_credential(self, refresh_token: Token) -> None:
        refresh_token.revoked = True
        self.server.world.refreshes += 1


class _ClientCredentialsGrant(grants.ClientCredentialsGrant):  # type: ignore[misc]
    TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]


class _Issuer(IssuerParameter):  # type: ignore[misc]
    def __init__(self, issuer: str) -> None:
        self.issuer = issuer

    def get_issuer(self) -> str:
        return self.issuer


class _Redirect(Response):
    """A Starlette response with the `location` attribute authlib's RFC 9207 extension rewrites."""

    @property
    def location(self) -> str | None:
        return self.headers.get("location")

    @location.setter
    def location(self, value: str) -> None:
        self.headers["location"] = value


class _Server(AuthorizationServer):  # type: ignore[misc]
    def __init__(self, world: AuthServer) -> None:
        super().__init__(scopes_supported=["mcp", "offline_access"])
        self.world = world
        self.register_token_generator(
            "default",
            BearerTokenGenerator(
                access_token_generator=lambda **_: secrets.token_urlsafe(24),
                refresh_token_generator=lambda **_: secrets.token_urlsafe(32),
                expires_generator=lambda client, grant_type: world.access_ttl_s,
            ),
        )
        self.register_grant(_AuthorizationCodeGrant, [CodeChallenge(required=True)])
        self.register_grant(_RefreshTokenGrant)
        self.register_grant(_ClientCredentialsGrant)

    def query_client(self, client_id: str) -> Client | None:
        return self.world.clients.get(client_id)

    def save_token(self, token: dict[str, Any], request: OAuth2Request) -> None:
        resource = getattr(request, "resource", None) or request.payload.data.get("resource")
        item = Token(
            access_token=token["access_token"],
            refresh_token=token.get("refresh_token"),
            client_id=request.client.client_id,
            subject=request.user or None,
            scope=token.get("scope", ""),
            resource=resource,
            expires_at=time.time() + int(token.get("expires_in", 3600)),
        )
        self.world.tokens[item.access_token] = item
        self.world.issued.append(item)

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass

    def create_oauth2_request(self, request: Any) -> OAuth2Request:
        return request  # the routes build `_Request`s themselves (the body is read asynchronously)

    def create_json_request(self, request: Any) -> Any:
        return request

    def handle_response(self, status: int, body: Any, headers: Any) -> Response:
        if isinstance(body, dict):
            return JSONResponse(body, status_code=status, headers=dict(headers))
        return _Redirect(body or "", status_code=status, headers=dict(headers))


class AuthServer(ThreadedServer):
    """The authorization server; `clients`, `tokens` and `issued` are its state (tests read them)."""

    def __init__(self) -> None:
        self.clients: dict[str, Client] = {}
        self.codes: dict[str, Code] = {}
        self.tokens: dict[str, Token] = {}
        self.issued: list[Token] = []
        self.access_ttl_s = 3600
        self.refreshes = 0
        self.registrations = 0
        self.registered: list[dict[str, Any]] = []  # the RFC 7591 request bodies, in order
        self.grant_requests: Counter[str] = Counter()  # token requests by grant_type
        self.token_failure: int | None = None  # answer every token request with this status
        self.token_delay_s = 0.0  # how long each token request takes (a slow authorization server)
        self.send_iss = True
        self._lock = threading.Lock()
        self._as = _Server(self)
        app = Starlette(
            routes=[
                Route("/.well-known/oauth-authorization-server", self._metadata),
                Route("/authorize", self._authorize),
                Route("/token", self._token, methods=["POST"]),
                Route("/register", self._register, methods=["POST"]),
                Route("/revoke", self._revoke, methods=["POST"]),
            ]
        )
        super().__init__(app, lifespan="off")
        self.issuer = self.base_url
        self._issuer_ext = _Issuer(self.issuer)
        self._as.register_extension(self._issuer_ext)

    def add_client(
        self, redirect_uri: str, *, grants_: tuple[str, ...] = ("authorization_code", "refresh_token")
    ) -> Client:
        client = Client(
            client_id=f"client-{secrets.token_hex(4)}",
            client_secret=secrets.token_urlsafe(24),
            redirect_uris=[redirect_uri],
            grant_types=list(grants_),
        )
        self.clients[client.client_id] = client
        return client

    def revoke_refresh_tokens(self, subject: str) -> int:
        """What an admin's "sign out everywhere" does at the authorization server."""
        doomed = [t for t in self.tokens.values() if t.subject == subject and t.refresh_token]
        for token in doomed:
            token.revoked = True
        return len(doomed)

    def expire_access_tokens(self, subject: str) -> int:
        """The access tokens of `subject` stop working now (as a revocation or a clock skew would);
        its refresh tokens still work."""
        live = [t for t in self.tokens.values() if t.subject == subject and t.expires_at > time.time()]
        for item in live:
            item.expires_at = time.time() - 1
        return len(live)

    def valid(self, access_token: str) -> Token | None:
        token = self.tokens.get(access_token)
        if token is None or token.revoked or token.expires_at <= time.time():
            return None
        return token

    async def _metadata(self, request: Request) -> Response:
        base = self.issuer
        return JSONResponse(
            {
                "issuer": base,
                "authorization_endpoint": f"{base}/authorize",
                "token_endpoint": f"{base}/token",
                "registration_endpoint": f"{base}/register",
                "revocation_endpoint": f"{base}/revoke",
                "response_types_supported": ["code"],
                "grant_types_supported": ["authorization_code", "refresh_token", "client_credentials"],
                "code_challenge_methods_supported": ["S256"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
                "scopes_supported": ["mcp", "offline_access"],
                "authorization_response_iss_parameter_supported": True,
            }
        )

    async def _authorize(self, request: Request) -> Response:
        user = request.cookies.get("as_user")
        req = _Request(request, b"")
        grant = self._as.get_consent_grant(req)
        with self._lock:
            response = self._as.create_authorization_response(req, grant_user=user or None, grant=grant)
        if not self.send_iss and isinstance(response, Response) and "location" in response.headers:
            parts = urlsplit(response.headers["location"])
            kept = [(k, v) for k, v in parse_qsl(parts.query) if k != "iss"]
            response.headers["location"] = urlunsplit(parts._replace(query=urlencode(kept)))
        return response  # type: ignore[no-any-return]

    async def _token(self, request: Request) -> Response:
        req = _Request(request, await request.body())
        self.grant_requests[req.form.get("grant_type", "")] += 1
        if self.token_delay_s:
            await anyio.sleep(self.token_delay_s)
        if self.token_failure is not None:
            return JSONResponse({"error": "temporarily_unavailable"}, status_code=self.token_failure)
        with self._lock:
            return self._as.create_token_response(req)  # type: ignore[no-any-return]

    async def _register(self, request: Request) -> Response:
        body = await request.json()
        self.registrations += 1
        self.registered.append(body)
        client = Client(
            client_id=f"dyn-{secrets.token_hex(4)}",
            client_secret=secrets.token_urlsafe(24),
            redirect_uris=list(body.get("redirect_uris") or []),
            grant_types=list(body.get("grant_types") or ["authorization_code", "refresh_token"]),
            auth_method=body.get("token_endpoint_auth_method") or "client_secret_basic",
        )
        self.clients[client.client_id] = client
        return JSONResponse(
            {
                "client_id": client.client_id,
                "client_secret": client.client_secret,
                "redirect_uris": client.redirect_uris,
                "grant_types": client.grant_types,
                "token_endpoint_auth_method": client.auth_method,
            },
            status_code=201,
        )

    async def _revoke(self, request: Request) -> Response:
        form = dict(parse_qsl((await request.body()).decode()))
        value = form.get("token", "")
        for token in self.tokens.values():
            if value in (token.access_token, token.refresh_token):
                token.revoked = True
        return Response(status_code=200)


@dataclass
class _Verifier:
    world: AuthServer
    seen: list[str] = field(default_factory=list)

    async def verify_token(self, token: str) -> AccessToken | None:
        item = self.world.valid(token)
        if item is None:
            self.seen.append("rejected")
            return None
        self.seen.append(item.subject or item.client_id)
        return AccessToken(
            token=token,
            client_id=item.client_id,
            scopes=item.scope.split(),
            expires_at=int(item.expires_at),
            resource=item.resource,
            subject=item.subject,
        )


class ProtectedUpstream(ThreadedServer):
    """An MCP server at `/mcp` (or `/sse`) that answers 401 (RFC 9728 pointer) without a token of `world`.

    `whoami` answers the subject of the token that reached it (the client id for a client
    credentials token); `verifier.seen` lists who each request came from ("rejected" for a refusal).
    """

    def __init__(self, world: AuthServer, *, transport: str = "streamable_http") -> None:
        self.verifier = _Verifier(world)
        self._port_holder: dict[str, str] = {}
        holder = self._port_holder

        async def lazy(scope: Any, receive: Any, send: Any) -> None:
            await holder_app["app"](scope, receive, send)

        holder_app: dict[str, Any] = {}
        super().__init__(lazy, lifespan="on", timeout_graceful_shutdown=2)
        # The legacy SSE transport (`/sse` and `/messages/`) when asked, else Streamable HTTP (`/mcp`).
        self.mcp_url = f"{self.base_url}/sse" if transport == "sse" else f"{self.base_url}/mcp"
        server = MCPServer(
            "protected-upstream",
            token_verifier=self.verifier,
            auth=AuthSettings(
                issuer_url=AnyHttpUrl(world.issuer),
                resource_server_url=AnyHttpUrl(self.mcp_url),
                required_scopes=["mcp"],
                validate_token_resource=True,
            ),
        )

        @server.tool()
        def whoami() -> str:
            """Who the bearer token belongs to."""
            token = get_access_token()
            return "anonymous" if token is None else (token.subject or f"client:{token.client_id}")

        holder_app["app"] = (
            server.sse_app(host="127.0.0.1")
            if transport == "sse"
            else server.streamable_http_app(host="127.0.0.1")
        )
        holder["url"] = self.mcp_url
