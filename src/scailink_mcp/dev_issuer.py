"""The dev issuer: a local signing key and the tokens it signs, for `scailink dev`/`token` and tests.

Owns: making an Ed25519 private key file (0600), the public PEM of such a key (what the CLI puts
into `jwt_public_key`), and minting a JWT with ScaiLink's claims.

Must not: be trusted implicitly. Verification (`auth.py`) never reads `dev_signing_key_path`; only
the CLI decides to configure the dev key's public half.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

PrivateKey = (
    rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey
)


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
