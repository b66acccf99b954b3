"""One-time, expiring values bound to (tenant, user, server): authorization `state`s and authorize tickets.

A stamp is `<claims>.<mac>`: the claims (kind, tenant, user, server, expiry, a random nonce, for a state
the redirect base, and what a ticket's flow carries to its callback: the elicitation id of a URL-mode
elicitation and the dashboard page to return to) in base64url JSON, and an HMAC-SHA256 over them with a
key derived from the primary KEK (HKDF, its own `info`), so every replica can check a stamp another one
made and nothing needs storing when one is made (an auth-required answer writes nothing). Using one
inserts the hash of its nonce into `oauth_nonce`: the primary key refuses a second use, on every replica.
The PKCE verifier of a state is derived from the state with the same key, so it is never stored either.

Must not: accept a stamp of another kind, an expired one, or one whose MAC does not verify; nor
log a stamp (a state in the hands of another is half an authorization).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import TypeAdapter
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete

from scailink_mcp.crypto import Keyring
from scailink_mcp.errors import ValidationFailed
from scailink_mcp.models import OAuthNonce

STATE = "state"
TICKET = "ticket"


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class Stamp:
    kind: str
    tenant_id: str
    user_id: str
    server_id: str
    expires_at: float
    nonce: str
    base: str = ""  # a state's redirect base (the callback must use the same redirect URI)
    elicitation: str = ""  # the URL-mode elicitation a state's flow completes (its ticket's nonce)
    back: str = ""  # a dashboard path the callback sends the browser back to ("" = a JSON answer)


# Each field of a stamp and its claim: one letter, since a stamp travels in URLs.
CLAIMS = {
    "kind": "k",
    "tenant_id": "t",
    "user_id": "u",
    "server_id": "s",
    "expires_at": "e",
    "nonce": "n",
    "base": "b",
    "elicitation": "x",
    "back": "r",
}
_STAMP = TypeAdapter(Stamp)  # checks the claims' types (pydantic: a claim of the wrong type is refused)


def refused(field: str, reason: str) -> ValidationFailed:
    return ValidationFailed(f"invalid {field}", details=[{"field": field, "reason": reason}])


def same_origin_path(path: str) -> bool:
    """A path on this gateway (never `//host` or a scheme): where a callback may send a browser."""
    return path.startswith("/") and not path.startswith("//") and "\\" not in path and ":" not in path


def new_nonce() -> str:
    return secrets.token_urlsafe(16)


class Stamps:
    def __init__(self, keyring: Keyring, *, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        kek = keyring.key(keyring.primary_id)
        self._key = HKDF(algorithm=SHA256(), length=32, salt=None, info=b"scailink/oauth-stamps/v1").derive(
            kek
        )
        self.ttl_s = ttl_s
        self.clock = clock

    def _mac(self, text: str) -> str:
        return _b64(hmac.new(self._key, text.encode(), hashlib.sha256).digest())

    def mint(
        self,
        kind: str,
        *,
        tenant_id: str,
        user_id: str,
        server_id: str,
        base: str = "",
        nonce: str | None = None,
        elicitation: str = "",
        back: str = "",
    ) -> str:
        expires_at = round(self.clock() + self.ttl_s, 3)
        stamp = Stamp(
            kind, tenant_id, user_id, server_id, expires_at, nonce or new_nonce(), base, elicitation, back
        )
        claims = {CLAIMS[name]: value for name, value in asdict(stamp).items()}
        text = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{text}.{self._mac(text)}"

    def check(self, kind: str, value: str) -> Stamp:
        """The stamp's claims; `ValidationFailed` (field = kind) when forged, of another kind or expired."""
        text, dot, mac = value.partition(".")
        if not dot or len(value) > 4096 or not hmac.compare_digest(mac.encode(), self._mac(text).encode()):
            raise refused(kind, "not issued by this gateway")
        try:
            claims = json.loads(_unb64(text))
            values = {name: claims[claim] for name, claim in CLAIMS.items() if claim in claims}
            stamp = _STAMP.validate_python(values)
        except (ValueError, KeyError, TypeError):  # ValidationError is a ValueError
            raise refused(kind, "not issued by this gateway") from None
        if stamp.kind != kind:
            raise refused(kind, f"not a {kind}")
        if stamp.expires_at <= self.clock():
            raise refused(kind, "expired")
        return stamp

    def consume(self, session: Session, stamp: Stamp) -> None:
        """Record the stamp as used (commits); `ValidationFailed` when it was used before."""
        digest = hashlib.sha256(f"{stamp.kind}:{stamp.nonce}".encode()).hexdigest()
        session.execute(
            delete(OAuthNonce).where(col(OAuthNonce.expires_at) < datetime.now(UTC)),
            execution_options={"synchronize_session": False},
        )
        session.add(OAuthNonce(id=digest, expires_at=datetime.fromtimestamp(stamp.expires_at, UTC)))
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            raise refused(stamp.kind, "already used") from None

    def verifier(self, state: str) -> str:
        """The PKCE code verifier of a state (RFC 7636: 43 characters of base64url)."""
        return _b64(hmac.new(self._key, f"pkce:{state}".encode(), hashlib.sha256).digest())

    def challenge(self, state: str) -> str:
        """The PKCE S256 code challenge of a state's verifier (RFC 7636 section 4.2)."""
        return _b64(hashlib.sha256(self.verifier(state).encode()).digest())
