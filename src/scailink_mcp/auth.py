"""Identity: JWT verification, `Principal`, groups -> roles -> permissions, and the dev issuer.

Owns: checking a bearer JWT with PyJWT against a configured PEM public key or a cached JWKS, and
turning its claims into a `Principal`. Allowed algorithms come from settings only, and only
asymmetric ones; the token's header never chooses them, and a key only verifies the algorithms of
its own type. Every failure is an `Unauthorized` naming the failed check, never echoing the token.

Must not: read the environment, parse JWTs by hand, or trust the dev issuer implicitly. The dev
issuer (`generate_dev_key`, `mint_token`) lives here for `scailink dev`/`scailink token` and tests,
but verification never reads `dev_signing_key_path`: the CLI decides to configure its public key.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import anyio
import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.types import Options
from pydantic import BaseModel, ValidationError

from scailink_mcp.config import Settings
from scailink_mcp.errors import Forbidden, Unauthorized

logger = logging.getLogger(__name__)

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

# The catch-all (every scailink:* permission) belongs to these roles and to no other.
CATCH_ALL_ROLES = frozenset({"super_admin", "partner_admin", "tenant_admin"})
BUILTIN_ROLES: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        **{role: ALL_PERMISSIONS for role in sorted(CATCH_ALL_ROLES)},
        "tenant_user": frozenset({VIEW, INVOKE, REMOTE_USE, REMOTE_MANAGE_OWN}),
        "tenant_viewer": frozenset({VIEW, REMOTE_USE}),
    }
)

_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp256k1": "ES256K", "secp384r1": "ES384", "secp521r1": "ES512"}
ASYMMETRIC_ALGORITHMS = _RSA_ALGORITHMS | frozenset(_EC_ALGORITHMS.values()) | {"EdDSA"}
MIN_RSA_BITS = 2048
# Not a SPEC number: the JWKS endpoint is the operator's identity provider, so a short bound suffices.
JWKS_FETCH_TIMEOUT_S = 5.0
NUMERIC_DATE_CLAIMS = ("exp", "nbf", "iat")

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
PrivateKey = (
    rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
)
CustomRolesForTenant = Callable[[str], Mapping[str, frozenset[str]]]


@dataclass(frozen=True)
class Principal:
    """Who is calling: the verified token's subject, tenant, groups and what they may do."""

    user_id: str
    tenant_id: str
    groups: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    permissions: frozenset[str] = frozenset()
    name: str | None = None
    email: str | None = None
    # permission -> the roles granting it, for the effective-permissions endpoint.
    permission_sources: Mapping[str, Sequence[str]] = field(default_factory=dict, hash=False)
    # The token's `exp` (seconds since the epoch): long-lived connections close when it passes.
    expires_at: float | None = None

    @property
    def identity(self) -> tuple[str, str]:
        """(tenant, user): a user id is only unique inside its tenant, so identity is always both."""
        return (self.tenant_id, self.user_id)

    def has(self, permission: str) -> bool:
        return permission in self.permissions

    def require(self, permission: str) -> None:
        if permission not in self.permissions:
            raise Forbidden(f"missing permission {permission}")


def resolve_roles(
    groups: Iterable[str],
    group_role_map: Mapping[str, str],
    custom_roles: Mapping[str, frozenset[str]] | None = None,
) -> tuple[tuple[str, ...], frozenset[str], dict[str, list[str]]]:
    """Groups -> (roles, permissions, permission -> roles granting it). Pure.

    A group named exactly like a built-in or custom role grants it; `group_role_map` maps other
    group names to roles. Built-in names win over custom ones, so a custom role cannot redefine
    them. A custom role grants exactly its listed permissions; unknown names grant nothing.
    """
    custom = custom_roles or {}

    def grants(role: str) -> frozenset[str] | None:
        return BUILTIN_ROLES.get(role, custom.get(role))

    roles: list[str] = []
    for group in groups:
        for candidate in (group, group_role_map.get(group)):
            if candidate is not None and candidate not in roles and grants(candidate) is not None:
                roles.append(candidate)
    sources: dict[str, list[str]] = {}
    for role in roles:
        for permission in grants(role) or ():
            sources.setdefault(permission, []).append(role)
    return tuple(roles), frozenset(sources), dict(sorted(sources.items()))


def bearer_token(authorization_header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header."""
    if not authorization_header or not authorization_header.strip():
        raise Unauthorized("missing bearer token")
    scheme, _, value = authorization_header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or any(c.isspace() for c in value):
        raise Unauthorized("malformed authorization header")
    return value


# ---- keys --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VerificationKey:
    """A public key and the algorithms it may verify (its type's, narrowed by a JWK's `alg`)."""

    key: PublicKey
    algorithms: frozenset[str]


def _algorithms_for(key: PublicKey) -> frozenset[str]:
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_ALGORITHMS.get(key.curve.name)
        return frozenset({alg}) if alg else frozenset()
    return frozenset({"EdDSA"})


def _usable(key: object) -> PublicKey | None:
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        return None
    if isinstance(key, PublicKey):
        return key
    return None


def load_public_key(value: str) -> VerificationKey:
    """`jwt_public_key`: PEM text, or the path of a PEM file. Raises ValueError on a bad key."""
    text = value if "-----BEGIN" in value else Path(value).read_text()
    try:
        loaded = serialization.load_pem_public_key(text.encode())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"jwt_public_key is not a PEM public key ({exc})") from None
    key = _usable(loaded)
    if key is None:
        raise ValueError(f"jwt_public_key must be RSA (>= {MIN_RSA_BITS} bits), EC or Ed25519/Ed448")
    return VerificationKey(key, _algorithms_for(key))


class _JwksDocument(BaseModel):
    keys: list[dict[str, Any]]


def _parse_jwks(document: _JwksDocument) -> dict[str, VerificationKey]:
    keys: dict[str, VerificationKey] = {}
    for data in document.keys:
        kid, use, alg = data.get("kid"), data.get("use", "sig"), data.get("alg")
        if not isinstance(kid, str) or use != "sig" or kid in keys:
            continue
        try:
            key = _usable(jwt.PyJWK(data).key)
        except (jwt.PyJWTError, ValueError, KeyError, TypeError):
            key = None
        # Symmetric, private, weak or unparsable entries are skipped: they must not poison the set.
        if key is None:
            logger.warning("ignoring an unusable JWKS key", extra={"kid": kid})
            continue
        algorithms = _algorithms_for(key)
        if alg is not None:
            algorithms &= {alg}
        if algorithms:
            keys[kid] = VerificationKey(key, algorithms)
    return keys


class JwksCache:
    """The keys of a JWKS URL, kept `ttl_s`; an unknown `kid` refetches at most once per `min_interval_s`.

    The interval counts from the last fetch attempt of any kind: keys younger than it cannot be
    missing a rotation, and a flood of made-up kids costs the identity provider one request per
    interval. A failed fetch keeps serving the keys already held.
    """

    def __init__(
        self,
        url: str,
        *,
        ttl_s: float,
        min_interval_s: float,
        http_client: httpx.AsyncClient | None,
        clock: Callable[[], float],
    ) -> None:
        self.url = url
        self._ttl_s = ttl_s
        self._min_interval_s = min_interval_s
        self._http = http_client
        self._clock = clock
        self._keys: dict[str, VerificationKey] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._lock = anyio.Lock()

    def _stale(self, now: float) -> bool:
        return self._fetched_at is None or now - self._fetched_at >= self._ttl_s

    def _may_fetch(self, now: float) -> bool:
        return self._attempted_at is None or now - self._attempted_at >= self._min_interval_s

    async def get(self, kid: str) -> VerificationKey:
        key = self._keys.get(kid)
        if key is not None and not self._stale(self._clock()):
            return key
        async with self._lock:  # one fetch at a time; waiters then see its result
            now = self._clock()
            if (self._stale(now) or kid not in self._keys) and self._may_fetch(now):
                await self._refresh(now)
            key = self._keys.get(kid)
        if key is not None:
            return key
        if self._fetched_at is None:
            raise Unauthorized("signing keys unavailable")
        raise Unauthorized("unknown signing key")

    async def _refresh(self, now: float) -> None:
        self._attempted_at = now
        try:
            if self._http is not None:
                response = await self._http.get(self.url, timeout=JWKS_FETCH_TIMEOUT_S)
            else:
                async with httpx.AsyncClient(timeout=JWKS_FETCH_TIMEOUT_S) as client:
                    response = await client.get(self.url)
            response.raise_for_status()
            document = _JwksDocument.model_validate_json(response.content)
        except (httpx.HTTPError, ValidationError) as exc:
            logger.warning("JWKS fetch failed", extra={"url": self.url, "error": type(exc).__name__})
            return
        self._keys = _parse_jwks(document)
        self._fetched_at = now


# ---- verification ------------------------------------------------------------------------------


class TokenVerifier:
    """Verifies bearer JWTs and builds `Principal`s. One per app.

    The key is `jwt_public_key` when set, else the JWKS at `jwt_jwks_url`. `custom_roles` (a tenant
    id -> its custom roles) is consulted when `verify` is not given its own lookup.

    Why a cache of verified claims: every MCP message is its own HTTP request carrying the same
    bearer token, and the signature check was the largest single cost of ScaiLink's own code on the
    `tools/call` path. A token whose signature and claims checked out is remembered (bounded LRU) for
    at most `jwt_verified_cache_ttl_s`; a hit still checks `exp` against the wall clock, and roles are
    resolved from the claims on every call, so a custom-role change applies at once.
    """

    def __init__(
        self,
        settings: Settings,
        http_client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.wall_clock = wall_clock
        self._verified: OrderedDict[str, tuple[float, dict[str, Any]]] = OrderedDict()
        self.algorithms = tuple(a for a in settings.jwt_algorithms if a in ASYMMETRIC_ALGORITHMS)
        ignored = [a for a in settings.jwt_algorithms if a not in ASYMMETRIC_ALGORITHMS]
        if ignored:
            logger.warning("ignoring non-asymmetric JWT algorithms", extra={"algorithms": ignored})
        if not self.algorithms:
            raise ValueError("jwt_algorithms holds no asymmetric algorithm (RS*, PS*, ES*, EdDSA)")
        self._static_key = load_public_key(settings.jwt_public_key) if settings.jwt_public_key else None
        if self._static_key is not None and not self._static_key.algorithms & set(self.algorithms):
            logger.warning("jwt_public_key matches none of jwt_algorithms: every token will be refused")
        self._jwks = (
            JwksCache(
                settings.jwt_jwks_url,
                ttl_s=settings.jwks_cache_ttl_s,
                min_interval_s=settings.jwks_min_refetch_interval_s,
                http_client=http_client,
                clock=clock,
            )
            if settings.jwt_jwks_url and self._static_key is None
            else None
        )
        self.custom_roles: CustomRolesForTenant | None = None

    async def verify(
        self, token: str, custom_roles_for_tenant: CustomRolesForTenant | None = None
    ) -> Principal:
        if len(token.encode("utf-8", "surrogatepass")) > self.settings.jwt_max_token_bytes:
            raise Unauthorized("token too large")
        claims = self._cached_claims(token)
        if claims is None:
            claims = await self._verify_claims(token)
            self._remember(token, claims)
        return self._principal(claims, custom_roles_for_tenant or self.custom_roles)

    def _cached_claims(self, token: str) -> dict[str, Any] | None:
        hit = self._verified.get(token)
        if hit is None:
            return None
        cached_until, claims = hit
        if self.clock() >= cached_until:
            del self._verified[token]
            return None
        if self.wall_clock() > float(claims["exp"]) + self.settings.jwt_leeway_s:
            del self._verified[token]
            raise Unauthorized("token expired")
        self._verified.move_to_end(token)
        return claims

    def _remember(self, token: str, claims: dict[str, Any]) -> None:
        if self.settings.jwt_verified_cache_size <= 0 or not isinstance(claims.get("exp"), int | float):
            return
        self._verified[token] = (self.clock() + self.settings.jwt_verified_cache_ttl_s, claims)
        while len(self._verified) > self.settings.jwt_verified_cache_size:
            self._verified.popitem(last=False)

    async def _verify_claims(self, token: str) -> dict[str, Any]:
        """The full check: header, algorithm, key, signature, `aud`/`iss`/`exp`/`nbf`."""
        if not token.isascii():
            raise Unauthorized("malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthorized("malformed token") from None
        alg = header.get("alg")
        if alg not in self.algorithms:
            raise Unauthorized("token algorithm not allowed")
        key = await self._key(header.get("kid"))
        if alg not in key.algorithms:
            raise Unauthorized("token algorithm does not match the signing key")
        return self._decode(token, key.key, alg)

    async def _key(self, kid: object) -> VerificationKey:
        if self._static_key is not None:
            return self._static_key
        if self._jwks is None:
            raise Unauthorized("no token verification key is configured")
        if not isinstance(kid, str) or not kid:
            raise Unauthorized("token has no key id (kid)")
        return await self._jwks.get(kid)

    def _decode(self, token: str, key: PublicKey, alg: str) -> dict[str, Any]:
        options: Options = {"require": ["exp"]}
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.settings.jwt_audience,
                issuer=self.settings.jwt_issuer,
                leeway=self.settings.jwt_leeway_s,
                options=options,
            )
        except jwt.ExpiredSignatureError:
            raise Unauthorized("token expired") from None
        except jwt.ImmatureSignatureError:
            raise Unauthorized("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized("wrong audience") from None
        except jwt.InvalidIssuerError:
            raise Unauthorized("wrong issuer") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"token has no {exc.claim} claim") from None
        except jwt.InvalidSignatureError:
            raise Unauthorized("bad signature") from None
        except jwt.exceptions.InvalidSubjectError:
            raise Unauthorized("sub claim must be a string") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise Unauthorized("malformed token") from None
        for name in NUMERIC_DATE_CLAIMS:
            # RFC 7519 NumericDate: PyJWT also accepts a numeric string ("9999999999"); we do not.
            if name in claims and not _is_number(claims[name]):
                raise Unauthorized(f"{name} claim must be a number")
        return claims

    def _principal(
        self, claims: Mapping[str, Any], custom_roles_for_tenant: CustomRolesForTenant | None
    ) -> Principal:
        sub, tenant, groups = claims.get("sub"), claims.get("tenant_id"), claims.get("groups")
        if not isinstance(sub, str) or not sub:
            raise Unauthorized("token has no sub claim")
        if tenant is None:
            raise Unauthorized("token has no tenant_id claim")
        if not isinstance(tenant, str) or not tenant:
            raise Unauthorized("tenant_id claim must be a non-empty string")
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
            permission_sources=MappingProxyType({p: tuple(r) for p, r in sources.items()}),
            expires_at=float(claims["exp"]) if _is_number(claims.get("exp")) else None,
        )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ---- the dev issuer (local use and tests) ------------------------------------------------------


def _private_key(pem: str | bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(pem.encode() if isinstance(pem, str) else pem, password=None)
    if not isinstance(key, PrivateKey):
        raise ValueError("the signing key must be RSA, EC or Ed25519/Ed448")
    return key


def generate_dev_key(path: Path) -> None:
    """Write a new Ed25519 private key (PKCS#8 PEM) readable by its owner only (0600)."""
    pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)  # the mode of `open` applies only to a new file
        handle.write(pem)


def public_pem_from_private(path: Path) -> str:
    """The SubjectPublicKeyInfo PEM of the private key at `path` (for `jwt_public_key`)."""
    return (
        _private_key(path.read_bytes())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def mint_token(
    private_key_pem: str | bytes,
    *,
    user_id: str,
    tenant_id: str,
    groups: Sequence[str],
    audience: str = "scailink",
    issuer: str | None = None,
    ttl_s: int = 3600,
    kid: str | None = None,
    extra_claims: Mapping[str, Any] | None = None,
    algorithm: str = "EdDSA",
) -> str:
    """A signed JWT with ScaiLink's claims; `extra_claims` may add or override any of them."""
    if isinstance(groups, str):
        raise TypeError("groups must be a sequence of group names, not a string")
    now = int(time.time())
    claims: dict[str, Any] = {
        "sub": user_id,
        "tenant_id": tenant_id,
        "groups": list(groups),
        "aud": audience,
        "iat": now,
        "nbf": now,
        "exp": now + ttl_s,
    }
    if issuer:
        claims["iss"] = issuer
    claims.update(extra_claims or {})
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims, _private_key(private_key_pem), algorithm=algorithm, headers=headers)
