"""Identity: bearer JWT verification and `Principal`, who is calling and what they may do.

Owns: checking a bearer JWT with PyJWT against the key `jwks.py` provides (a configured PEM public
key or a cached JWKS), and turning its claims into a `Principal` whose roles and permissions come
from `permissions.resolve_roles`. Allowed algorithms come from settings only, and only asymmetric
ones; the token's header never chooses them, and a key only verifies the algorithms of its own type.
Every failure is an `Unauthorized` naming the failed check, never echoing the token.

Must not: read the environment, parse JWTs by hand, or trust the dev issuer implicitly
(`dev_issuer.py`: verification never reads `dev_signing_key_path`; the CLI decides to configure its
public key). The names of `permissions`, `jwks` and `dev_issuer` are re-exported here, so
`auth.VIEW`, `auth.mint_token` and the like keep working for every importer.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import httpx
import jwt
from jwt.types import Options

from scailink_mcp.config import Settings
from scailink_mcp.dev_issuer import generate_dev_key, mint_token, public_pem_from_private
from scailink_mcp.errors import Forbidden, Unauthorized
from scailink_mcp.jwks import ASYMMETRIC_ALGORITHMS, JwksCache, PublicKey, VerificationKey, load_public_key
from scailink_mcp.permissions import (
    ALL_PERMISSIONS,
    AUDIT,
    BUILTIN_ROLES,
    CATCH_ALL_ROLES,
    INVOKE,
    MANAGE,
    REMOTE_MANAGE_OWN,
    REMOTE_MANAGE_TENANT,
    REMOTE_USE,
    VIEW,
    CustomRolesForTenant,
    resolve_roles,
)

# What other modules import from here: this module's own names, and those that moved out of it.
__all__ = [
    "ALL_PERMISSIONS", "AUDIT", "BUILTIN_ROLES", "CATCH_ALL_ROLES", "INVOKE", "MANAGE", "REMOTE_MANAGE_OWN",
    "REMOTE_MANAGE_TENANT", "REMOTE_USE", "VIEW", "ClaimsDecoder", "CustomRolesForTenant", "Principal",
    "TokenVerifier", "bearer_token", "decode_claims", "generate_dev_key", "mint_token",
    "public_pem_from_private", "resolve_roles",
]  # fmt: skip

logger = logging.getLogger(__name__)

NUMERIC_DATE_CLAIMS = ("exp", "nbf", "iat")


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


def bearer_token(authorization_header: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header."""
    if not authorization_header or not authorization_header.strip():
        raise Unauthorized("missing bearer token")
    scheme, _, value = authorization_header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() != "bearer" or not value or any(c.isspace() for c in value):
        raise Unauthorized("malformed authorization header")
    return value


def decode_claims(token: str, key: PublicKey, alg: str, settings: Settings) -> dict[str, Any]:
    """PyJWT's check of `token` against one key and algorithm: signature, `aud`/`iss`/`exp`/`nbf`
    (with `jwt_leeway_s`), `exp` present, and RFC 7519 NumericDates. The costly step of a verify."""
    options: Options = {"require": ["exp"]}
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[alg],
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            leeway=settings.jwt_leeway_s,
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


# (token, key, algorithm, settings) -> the verified claims, or Unauthorized.
ClaimsDecoder = Callable[[str, PublicKey, str, Settings], dict[str, Any]]


@dataclass(eq=False, slots=True)
class _Verified:
    """A verified token's claims, until when they may be reused, and the principal last built from
    them with the tenant's custom roles it was built with."""

    until: float
    claims: dict[str, Any]
    principal: Principal | None = None
    custom: Mapping[str, frozenset[str]] | None = None


class TokenVerifier:
    """Verifies bearer JWTs and builds `Principal`s. One per app.

    The key is `jwt_public_key` when set, else the JWKS at `jwt_jwks_url`. `custom_roles` (a tenant
    id -> its custom roles) is consulted when `verify` is not given its own lookup.

    Why a cache of verified claims: every MCP message is its own HTTP request carrying the same
    bearer token, and the signature check was the largest single cost of ScaiLink's own code on the
    `tools/call` path. A token whose signature and claims checked out is remembered (bounded LRU) for
    at most `jwt_verified_cache_ttl_s`; a hit still checks `exp` against the wall clock. The `Principal`
    built from a hit is kept beside its claims and reused while the tenant's custom roles are the same
    mapping (the role store replaces a tenant's mapping on every change, never mutates it), so a
    custom-role change applies at once; resolving roles per request was ~3 % of a warm call's CPU.

    `decode` is the signature and claims check (`decode_claims`); a test may wrap it to count them.
    """

    def __init__(
        self,
        settings: Settings,
        http_client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        decode: ClaimsDecoder = decode_claims,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.wall_clock = wall_clock
        self._decode = decode
        self._verified: OrderedDict[str, _Verified] = OrderedDict()
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
        lookup = custom_roles_for_tenant or self.custom_roles
        hit = self._cached(token)
        if hit is None:
            claims = await self._verify_claims(token)
            hit = self._remember(token, claims)
            if hit is None:  # not cacheable (no numeric `exp`, or the cache is off)
                return self._principal(claims, _custom_roles(claims, lookup))
        custom = _custom_roles(hit.claims, lookup)
        if hit.principal is None or hit.custom is not custom:
            hit.principal, hit.custom = self._principal(hit.claims, custom), custom
        return hit.principal

    def _cached(self, token: str) -> _Verified | None:
        hit = self._verified.get(token)
        if hit is None:
            return None
        if self.clock() >= hit.until:
            del self._verified[token]
            return None
        if self.wall_clock() > float(hit.claims["exp"]) + self.settings.jwt_leeway_s:
            del self._verified[token]
            raise Unauthorized("token expired")
        self._verified.move_to_end(token)
        return hit

    def _remember(self, token: str, claims: dict[str, Any]) -> _Verified | None:
        if self.settings.jwt_verified_cache_size <= 0 or not isinstance(claims.get("exp"), int | float):
            return None
        hit = self._verified[token] = _Verified(self.clock() + self.settings.jwt_verified_cache_ttl_s, claims)
        while len(self._verified) > self.settings.jwt_verified_cache_size:
            self._verified.popitem(last=False)
        return hit

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
        return self._decode(token, key.key, alg, self.settings)

    async def _key(self, kid: object) -> VerificationKey:
        if self._static_key is not None:
            return self._static_key
        if self._jwks is None:
            raise Unauthorized("no token verification key is configured")
        if not isinstance(kid, str) or not kid:
            raise Unauthorized("token has no key id (kid)")
        return await self._jwks.get(kid)

    def _principal(self, claims: Mapping[str, Any], custom: Mapping[str, frozenset[str]] | None) -> Principal:
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


def _custom_roles(
    claims: Mapping[str, Any], lookup: CustomRolesForTenant | None
) -> Mapping[str, frozenset[str]] | None:
    """The custom roles of the claims' tenant (looked up once per request), None without a lookup or
    a usable tenant (the principal check then refuses the token)."""
    tenant = claims.get("tenant_id")
    return lookup(tenant) if lookup is not None and isinstance(tenant, str) and tenant else None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
