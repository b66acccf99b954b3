"""Token verification keys: a configured PEM public key, or the keys of a JWKS URL kept in a cache.

Owns: which keys may verify tokens at all (asymmetric only: RSA of at least 2048 bits, EC on a
named curve, Ed25519/Ed448) and which algorithms each may verify (its type's, narrowed by a JWK's
`alg`); loading `jwt_public_key`; fetching, parsing and caching a JWKS with a bounded refetch.

Must not: verify tokens (`auth.py` does) or let a token choose anything: the `kid` only picks among
keys already fetched. A JWKS entry that is symmetric, private, weak or unparsable is skipped, never
fatal to the set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from pydantic import BaseModel, ValidationError

from scailink_mcp.errors import Unauthorized

logger = logging.getLogger(__name__)

_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp256k1": "ES256K", "secp384r1": "ES384", "secp521r1": "ES512"}
ASYMMETRIC_ALGORITHMS = _RSA_ALGORITHMS | frozenset(_EC_ALGORITHMS.values()) | {"EdDSA"}
MIN_RSA_BITS = 2048
# Not a SPEC number: the JWKS endpoint is the operator's identity provider, so a short bound suffices.
JWKS_FETCH_TIMEOUT_S = 5.0

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey


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
