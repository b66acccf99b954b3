"""ScaiLink as an OAuth client of an upstream's authorization server (the wire side, SPEC section 12).

Owns the requests ScaiLink sends to an authorization server and how their answers are judged:
finding the server from the upstream's 401 (RFC 9728 protected-resource metadata, then RFC 8414
metadata, with its issuer checked), dynamic client registration (RFC 7591), the token endpoint
(authorization code with the PKCE verifier, refresh token, client credentials; each with the RFC 8707
`resource`) and revocation (RFC 7009). The protocol pieces are the MCP SDK's client auth helpers
(`mcp.client.auth.utils`, `mcp.shared.auth`): the URL lists to try, the metadata and token models,
issuer comparison and registration parsing. Every request goes through the SSRF-guarded HTTP client
(`netguard`), like the upstream's own traffic, with redirects never followed.

Must not: store or log a token, a secret or a code (answers are parsed into `OAuthToken`; errors
name the status and the RFC 6749 `error` code only), or know about users and tables.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

import httpx2
from mcp.client.auth.exceptions import OAuthFlowError
from mcp.client.auth.utils import (
    build_oauth_authorization_server_metadata_discovery_urls,
    build_protected_resource_metadata_discovery_urls,
    create_client_registration_request,
    extract_resource_metadata_from_www_auth,
    handle_auth_metadata_response,
    handle_protected_resource_response,
    handle_registration_response,
    issuers_match,
)
from mcp.shared.auth import OAuthClientInformationFull, OAuthClientMetadata, OAuthMetadata, OAuthToken
from mcp.shared.auth_utils import check_resource_allowed, resource_url_from_server_url
from pydantic import AnyUrl, ValidationError

from scailink_mcp.errors import UpstreamError
from scailink_mcp.remote.netguard import GuardedTransport
from scailink_mcp.remote.upstream import Network

# The upstream is asked once without a token; an MCP `initialize` is what any client would send first.
_PROBE = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "scailink-mcp", "version": "0.1.0"},
    },
}
MAX_ANSWER_BYTES = 256 * 1024


class OAuthFailed(UpstreamError):
    """The authorization server could not be found, or refused or garbled a request (502)."""


class GrantRefused(OAuthFailed):
    """The token endpoint refused the grant (`invalid_grant`: a revoked or expired refresh token, a
    used code): the user must authorize again."""


@dataclass(frozen=True)
class AuthServer:
    """What discovery found: the authorization server's metadata and the resource to ask for."""

    metadata: OAuthMetadata
    resource: str

    @property
    def issuer(self) -> str:
        return str(self.metadata.issuer)


@dataclass(frozen=True)
class ClientIdentity:
    client_id: str
    client_secret: str | None

    def __repr__(self) -> str:  # the secret never reaches a log line through a repr
        return f"ClientIdentity(client_id={self.client_id!r})"


class OAuthHttp:
    """One per app: requests to authorization servers through the SSRF guard, bounded in time."""

    def __init__(self, allowed: Sequence[Network], *, timeout_s: float) -> None:
        self.allowed = allowed
        self.timeout_s = timeout_s

    def _client(self) -> httpx2.AsyncClient:
        return httpx2.AsyncClient(
            transport=GuardedTransport(self.allowed),
            timeout=httpx2.Timeout(self.timeout_s),
            follow_redirects=False,
            trust_env=False,
        )

    async def discover(self, endpoint_url: str, transport: str = "streamable_http") -> AuthServer:
        """The upstream's authorization server, from its 401 (RFC 9728, then RFC 8414)."""
        async with self._client() as client:
            try:
                return await _discover(client, endpoint_url, transport)
            except (httpx2.HTTPError, OSError) as exc:  # OSError: a host that does not resolve
                raise OAuthFailed(f"cannot reach the authorization server ({type(exc).__name__})") from None

    async def challenged(self, endpoint_url: str, transport: str = "streamable_http") -> None:
        """A health check of a per-user server (no user's token is sent): the upstream must answer an
        unauthenticated request with 401 and a Bearer challenge (RFC 6750; RFC 9728's pointer where
        given). Anything else raises (`OAuthFailed`, or the transport's error)."""
        async with self._client() as client:
            probe = await _unauthenticated(client, endpoint_url, transport)
        challenge = probe.headers.get("www-authenticate", "")
        if probe.status_code != 401 or not challenge.lower().startswith("bearer"):
            raise OAuthFailed(f"the upstream did not ask for authorization (HTTP {probe.status_code})")

    async def register(self, server: AuthServer, redirect_uri: str, scopes: Sequence[str]) -> ClientIdentity:
        """Dynamic client registration (RFC 7591); the caller checked the issuer is allowed."""
        metadata = OAuthClientMetadata(
            redirect_uris=[AnyUrl(redirect_uri)],
            client_name="ScaiLink MCP",
            grant_types=["authorization_code", "refresh_token"],
            token_endpoint_auth_method="client_secret_basic",
            scope=" ".join(scopes) or None,
            application_type="web",
        )
        async with self._client() as client:
            try:
                request = create_client_registration_request(server.metadata, metadata, server.issuer)
                info: OAuthClientInformationFull = await handle_registration_response(
                    await client.send(request)
                )
            except (httpx2.HTTPError, OSError, OAuthFlowError) as exc:
                raise OAuthFailed(f"dynamic client registration failed ({type(exc).__name__})") from None
        return ClientIdentity(info.client_id or "", info.client_secret)

    async def token(self, server: AuthServer, client: ClientIdentity, form: dict[str, str]) -> OAuthToken:
        """One token request (`form` holds the grant's fields); the client authenticates with HTTP
        Basic when it has a secret the server accepts that way, else in the body."""
        data = dict(form, resource=server.resource)
        methods = server.metadata.token_endpoint_auth_methods_supported or ["client_secret_basic"]
        auth: httpx2.Auth = httpx2.Auth()  # the base class sends the request as it is
        if client.client_secret and "client_secret_basic" in methods:
            auth = httpx2.BasicAuth(client.client_id, client.client_secret)
        else:
            data["client_id"] = client.client_id
            if client.client_secret:
                data["client_secret"] = client.client_secret
        async with self._client() as http:
            try:
                response = await http.post(str(server.metadata.token_endpoint), data=data, auth=auth)
                body = await _bounded(response)
            except (httpx2.HTTPError, OSError) as exc:  # OSError: a host that does not resolve
                raise OAuthFailed(f"the token endpoint is unreachable ({type(exc).__name__})") from None
        if response.status_code != 200:
            code = _error_code(body)
            if code == "invalid_grant":
                raise GrantRefused("the authorization server refused the grant (invalid_grant)")
            raise OAuthFailed(
                f"the token endpoint answered HTTP {response.status_code} ({code or 'no error code'})"
            )
        try:
            return OAuthToken.model_validate_json(body)
        except ValidationError:
            raise OAuthFailed("the token endpoint answered something that is not a token response") from None

    async def revoke(self, server: AuthServer, client: ClientIdentity, token: str) -> None:
        """RFC 7009, best effort: a disconnect succeeds locally whatever the server answers."""
        endpoint = server.metadata.revocation_endpoint
        if endpoint is None:
            return
        auth: httpx2.Auth = httpx2.Auth()  # the base class sends the request as it is
        data = {"token": token, "client_id": client.client_id}
        if client.client_secret:
            auth, data = httpx2.BasicAuth(client.client_id, client.client_secret), {"token": token}
        async with self._client() as http:
            with contextlib.suppress(httpx2.HTTPError, OSError):
                await http.post(str(endpoint), data=data, auth=auth)


async def _bounded(response: httpx2.Response) -> bytes:
    body = b""
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > MAX_ANSWER_BYTES:
            raise OAuthFailed("the authorization server's answer is too large")
    return body


def _error_code(body: bytes) -> str | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    code = parsed.get("error") if isinstance(parsed, dict) else None
    return code if isinstance(code, str) and code.isascii() and len(code) <= 64 else None


async def _unauthenticated(client: httpx2.AsyncClient, endpoint_url: str, transport: str) -> httpx2.Response:
    """The upstream asked as a client would first, without a token; the answer's body is not read.

    Streamable HTTP: POST an `initialize`. Legacy SSE: GET the event stream (its endpoint takes no
    POST), closed as soon as the status is in (an upstream that opened the stream answered no 401)."""
    if transport == "sse":
        async with client.stream("GET", endpoint_url, headers={"accept": "text/event-stream"}) as probe:
            return probe
    probe = await client.post(
        endpoint_url, json=_PROBE, headers={"accept": "application/json, text/event-stream"}
    )
    await probe.aclose()
    return probe


async def _discover(client: httpx2.AsyncClient, endpoint_url: str, transport: str) -> AuthServer:
    probe = await _unauthenticated(client, endpoint_url, transport)
    if probe.status_code != 401:
        raise OAuthFailed(f"the upstream did not ask for authorization (HTTP {probe.status_code})")
    pointer = extract_resource_metadata_from_www_auth(probe)
    prm = None
    for url in build_protected_resource_metadata_discovery_urls(pointer, endpoint_url):
        prm = await handle_protected_resource_response(await client.get(url))
        if prm is not None:
            break
    if prm is None or not prm.authorization_servers:
        raise OAuthFailed(
            "the upstream publishes no protected-resource metadata naming an authorization server"
        )
    resource = resource_url_from_server_url(endpoint_url)
    if prm.resource and check_resource_allowed(resource, str(prm.resource)):
        resource = str(prm.resource)
    elif prm.resource:
        raise OAuthFailed("the upstream's protected-resource metadata names another resource")
    issuer = str(prm.authorization_servers[0])
    for url in build_oauth_authorization_server_metadata_discovery_urls(issuer, endpoint_url):
        go_on, metadata = await handle_auth_metadata_response(await client.get(url))
        if metadata is not None:
            if not issuers_match(str(metadata.issuer), issuer):
                raise OAuthFailed("the authorization server's metadata names another issuer")
            if "S256" not in (metadata.code_challenge_methods_supported or ["S256"]):
                raise OAuthFailed("the authorization server does not support PKCE S256")
            return AuthServer(metadata=metadata, resource=resource)
        if not go_on:
            break
    raise OAuthFailed("the authorization server publishes no RFC 8414 metadata")
