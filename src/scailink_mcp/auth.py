"""Identity: JWT verification (PyJWT; a PEM key or a JWKS URL), `Principal`, groups -> roles -> permissions.

Allowed algorithms come from settings only (asymmetric ones; never the token's header). Every failure
is an `Unauthorized` naming the failed check, never echoing the token. The dev issuer (`mint_token`,
`generate_dev_key`) lives here too, but nothing in verification ever trusts it implicitly: the CLI
decides to configure its public key.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from scailink_mcp.config import Settings
from scailink_mcp.errors import Forbidden, Unauthorized

VIEW = "scailink:view"
INVOKE = "scailink:invoke"
MANAGE = "scailink:manage"
AUDIT = "scailink:audit"
REMOTE_USE = "scailink:remote.use"
REMOTE_MANAGE_OWN = "scailink:remote.manage_own"
REMOTE_MANAGE_TENANT = "scailink:remote.manage_tenant"
ALL_PERMISSIONS = frozenset(
    {VIEW, INVOKE, MANAGE, AUDIT, REMOTE_USE, REMOTE_MANAGE_OWN, REMOTE_MANAGE_TENANT}
)

CATCH_ALL_ROLES = frozenset({"super_admin", "partner_admin", "tenant_admin"})
BUILTIN_ROLES: Mapping[str, frozenset[str]] = {
    "super_admin": ALL_PERMISSIONS,
    "partner_admin": ALL_PERMISSIONS,
    "tenant_admin": ALL_PERMISSIONS,
    "tenant_user": frozenset({VIEW, INVOKE, REMOTE_USE, REMOTE_MANAGE_OWN}),
    "tenant_viewer": frozenset({VIEW, REMOTE_USE}),
}
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"}
)


@dataclass(frozen=True)
class Principal:
    user_id: str
    tenant_id: str
    groups: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    permissions: frozenset[str] = frozenset()
    name: str | None = None
    email: str | None = None
    permission_sources: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def has(self, permission: str) -> bool:
        return permission in self.permissions

    def require(self, permission: str) -> None:
        if permission not in self.permissions:
            raise Forbidden(f"missing permission {permission}")


def resolve_roles(
    groups: Iterable[str],
    group_role_map: Mapping[str, str],
    custom_roles: Mapping[str, frozenset[str]] | None = None,
) -> tuple[tuple[str, ...], frozenset[str], dict[str, tuple[str, ...]]]:
    """Groups -> (roles, permissions, permission -> roles granting it). Pure.

    A group named like a built-in or custom role grants it; `group_role_map` adds mappings. The
    catch-all (every `scailink:*`) belongs to the admin roles only; custom roles get exactly their list.
    """
    custom = custom_roles or {}
    roles: list[str] = []
    for group in groups:
        for role in (group, group_role_map.get(group)):
            if role and (role in BUILTIN_ROLES or role in custom) and role not in roles:
                roles.append(role)
    sources: dict[str, list[str]] = {}
    for role in roles:
        perms = BUILTIN_ROLES[role] if role in BUILTIN_ROLES else custom[role]
        for perm in perms:
            sources.setdefault(perm, []).append(role)
    return tuple(roles), frozenset(sources), {p: tuple(r) for p, r in sorted(sources.items())}


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("missing bearer token")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip() or " " in value.strip():
        raise Unauthorized("malformed authorization header")
    return value.strip()


def _load_pem(value: str) -> str:
    if "-----BEGIN" in value:
        return value
    return Path(value).read_text()


class TokenVerifier:
    """Verifies bearer JWTs and builds `Principal`s. One per app; caches the JWKS."""

    def __init__(
        self,
        settings: Settings,
        http_client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.algorithms = [a for a in settings.jwt_algorithms if a in ASYMMETRIC_ALGORITHMS]
        self._static_key = _load_pem(settings.jwt_public_key) if settings.jwt_public_key else None
        self._http = http_client
        self._clock = clock
        self._jwks: dict[str, jwt.PyJWK] = {}
        self._jwks_fetched_at: float | None = None
        self._lock = anyio.Lock()
        # Custom roles of a tenant (see iam.RoleStore.roles_for); consulted on every verification.
        self.custom_roles: Callable[[str], Mapping[str, frozenset[str]]] | None = None

    async def _fetch_jwks(self) -> None:
        url = self.settings.jwt_jwks_url
        assert url is not None
        try:
            if self._http is not None:
                resp = await self._http.get(url, timeout=5.0)
            else:
                async with httpx.AsyncClient(timeout=5.0) as client:
                    resp = await client.get(url)
            resp.raise_for_status()
            keys: dict[str, jwt.PyJWK] = {}
            for data in resp.json().get("keys", []):
                try:
                    key = jwt.PyJWK(data)
                except jwt.PyJWTError:
                    continue  # an unusable key in the set does not poison the others
                if key.key_id:
                    keys[key.key_id] = key
        except (httpx.HTTPError, ValueError, AttributeError) as exc:
            raise Unauthorized(f"signing keys unavailable ({type(exc).__name__})") from None
        finally:
            self._jwks_fetched_at = self._clock()
        self._jwks = keys

    async def _jwks_key(self, kid: str | None) -> Any:
        if not kid:
            raise Unauthorized("token has no key id (kid)")
        async with self._lock:
            now = self._clock()
            stale = (
                self._jwks_fetched_at is None or now - self._jwks_fetched_at >= self.settings.jwks_cache_ttl_s
            )
            if stale:
                await self._fetch_jwks()
            elif kid not in self._jwks:
                # An unknown kid may be a rotated key: refetch, but at most once per interval.
                assert self._jwks_fetched_at is not None
                if now - self._jwks_fetched_at >= self.settings.jwks_min_refetch_interval_s:
                    await self._fetch_jwks()
            key = self._jwks.get(kid)
        if key is None:
            raise Unauthorized("unknown signing key")
        return key.key

    async def verify(
        self,
        token: str,
        custom_roles_for_tenant: Callable[[str], Mapping[str, frozenset[str]]] | None = None,
    ) -> Principal:
        if len(token.encode()) > self.settings.jwt_max_token_bytes:
            raise Unauthorized("token too large")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("malformed token") from None
        if header.get("alg") not in self.algorithms:
            raise Unauthorized("token algorithm not allowed")
        if self._static_key is not None:
            key: Any = self._static_key
        elif self.settings.jwt_jwks_url:
            key = await self._jwks_key(header.get("kid"))
        else:
            raise Unauthorized("no token verification key is configured")
        options: Any = {"require": ["exp", "sub"]}
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=self.algorithms,
                audience=self.settings.jwt_audience,
                issuer=self.settings.jwt_issuer,
                leeway=self.settings.jwt_leeway_s,
                options=options,
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("token not yet valid") from None
        except (jwt.InvalidAudienceError, jwt.MissingRequiredClaimError) as exc:
            if isinstance(exc, jwt.MissingRequiredClaimError) and exc.claim != "aud":
                raise Unauthorized(f"token has no {exc.claim} claim") from None
            raise Unauthorized("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("wrong issuer") from None
        except jwt.InvalidSignatureError:
            raise Unauthorized("bad signature") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise Unauthorized("malformed token") from None
        return self._principal(claims, custom_roles_for_tenant or self.custom_roles)

    def _principal(
        self,
        claims: Mapping[str, Any],
        custom_roles_for_tenant: Callable[[str], Mapping[str, frozenset[str]]] | None,
    ) -> Principal:
        sub, tenant = claims.get("sub"), claims.get("tenant_id")
        if not isinstance(sub, str) or not sub:
            raise Unauthorized("token has no sub claim")
        if not isinstance(tenant, str) or not tenant:
            raise Unauthorized("token has no tenant_id claim")
        groups = claims.get("groups")
        if groups is None:
            raise Unauthorized("token has no groups claim")
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise Unauthorized("groups claim must be a list of strings")
        custom = custom_roles_for_tenant(tenant) if custom_roles_for_tenant else None
        roles, permissions, sources = resolve_roles(groups, self.settings.group_role_map, custom)
        name, email = claims.get("name"), claims.get("email")
        return Principal(
            user_id=sub,
            tenant_id=tenant,
            groups=tuple(groups),
            roles=roles,
            permissions=permissions,
            name=name if isinstance(name, str) else None,
            email=email if isinstance(email, str) else None,
            permission_sources=sources,
        )


# ---- the dev issuer (local use and tests) ---------------------------------------------------------


def generate_dev_key(path: Path) -> None:
    """Write a new Ed25519 private key (PEM, mode 0600)."""
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)


def public_pem_from_private(path: Path) -> str:
    private = serialization.load_pem_private_key(path.read_bytes(), password=None)
    return (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def mint_token(
    private_key_pem: str | bytes,
    *,
    user_id: str,
    tenant_id: str,
    groups: list[str],
    audience: str = "scailink",
    issuer: str | None = None,
    ttl_s: int = 3600,
    kid: str | None = None,
    extra_claims: Mapping[str, Any] | None = None,
    algorithm: str = "EdDSA",
) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": user_id,
        "tenant_id": tenant_id,
        "groups": groups,
        "aud": audience,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_s,
    }
    if issuer:
        claims["iss"] = issuer
    claims.update(extra_claims or {})
    key = private_key_pem.encode() if isinstance(private_key_pem, str) else private_key_pem
    private = serialization.load_pem_private_key(key, password=None)
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims, private, algorithm=algorithm, headers=headers)  # type: ignore[arg-type]
