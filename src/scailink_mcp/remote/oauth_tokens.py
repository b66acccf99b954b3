"""OAuth tokens of upstream servers: sealed rows, the in-memory copy the hot path reads, refreshing.

Owns the `OAuthToken` rows (one per (server, user); the empty user for a `client_credentials`
server's one token), sealed with the envelope encryption of `crypto.py` under the associated data
(tenant, server, `oauth_token:<user>`, DEK id): a row copied to another user or server does not open.
The decrypted token is kept in memory with its expiry (`Held`), so a warm call reads no table. A
token is refreshed before it expires (once less than `oauth_refresh_skew_s`, at most half its
lifetime, is left) and when the upstream answers 401 (`BearerAuth`), one refresh at a time per
token: an asyncio lock in this process and, with several replicas, a lease in Redis
(`leases.RedisLease`) around re-reading the row and refreshing, so a rotated refresh token is never
spent twice. A refresh the authorization server refuses deletes the token: the user authorizes
again (`AuthorizationMissing`).

Must not: log, audit or return a token (`Held` hides it from repr), or decide who may use a server
(the caller resolved that).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import anyio
import httpx2
from cryptography.exceptions import InvalidTag
from mcp.shared.auth import OAuthToken
from sqlmodel import Session, col, delete, select

from scailink_mcp.config import Settings
from scailink_mcp.crypto import (
    DecryptionError,
    Keyring,
    open_sealed,
    rotate_credentials,
    seal,
    sealed_from_row,
)
from scailink_mcp.db import Database
from scailink_mcp.leases import Lease
from scailink_mcp.models import OAuthToken as TokenRow
from scailink_mcp.models import utcnow
from scailink_mcp.remote.oauth_client import GrantRefused

logger = logging.getLogger(__name__)

LEASE_WAIT_S = 15.0  # how long a replica waits for another one's refresh of the same token
LEASE_POLL_S = 0.1


class AuthorizationMissing(Exception):
    """No usable token for (server, user): never authorized, disconnected, or its refresh failed."""

    def __init__(self, server_id: str, user_id: str, reason: str = "not authorized") -> None:
        self.server_id = server_id
        self.user_id = user_id
        super().__init__(reason)


@dataclass(frozen=True)
class TokenOwner:
    """Whose token: a server (and its tenant) and a user key ("" for the server's one token)."""

    server_id: str
    tenant_id: str
    user_key: str

    @property
    def field(self) -> str:
        return f"oauth_token:{self.user_key}"

    @property
    def lock_name(self) -> str:
        return f"oauth-refresh:{self.server_id}:{self.user_key}"


@dataclass(frozen=True)
class Held:
    """A decrypted token as memory keeps it; `version` is the row's (part of the pool key)."""

    version: int
    access_token: str = field(repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    expires_at: float | None = None  # seconds since the epoch
    lifetime_s: float | None = None

    def fresh(self, now: float, skew_s: float) -> bool:
        if self.expires_at is None:
            return True
        margin = min(skew_s, (self.lifetime_s or skew_s * 2) / 2)
        return now < self.expires_at - margin


# Obtains a new token for an owner (the caller holds the refresh lock): a refresh with `current`'s
# refresh token, or a client-credentials grant when `current` is None. Raises `GrantRefused` when
# the user must authorize again.
Renew = Callable[[TokenOwner, Held | None], Awaitable[OAuthToken | None]]


def _plain(token: OAuthToken, previous: Held | None) -> str:
    # RFC 6749 section 6: a refresh answer may omit the refresh token (not rotated): keep the old one.
    refresh = token.refresh_token or (previous.refresh_token if previous else None)
    return json.dumps(
        {"access_token": token.access_token, "refresh_token": refresh, "lifetime_s": token.expires_in}
    )


def _aware(ts: datetime | None) -> datetime | None:
    return None if ts is None else ts if ts.tzinfo else ts.replace(tzinfo=UTC)


class TokenStore:
    """The rows, their in-memory copies and the single-flight refresh (one per app)."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        keyring: Keyring | None,
        *,
        lease: Lease | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.db = db
        self.keyring = keyring
        self.lease = lease or Lease()
        self.clock = clock
        self._held: dict[TokenOwner, Held] = {}
        self._locks: dict[TokenOwner, anyio.Lock] = {}
        # The newest version an upstream refused (401): the row holds it too, so it must be renewed.
        self._rejected: dict[TokenOwner, int] = {}
        self.refreshes = 0  # tokens obtained by refresh or client credentials (for metrics and tests)

    # ---- rows --------------------------------------------------------------------------------------

    def _keys(self) -> Keyring:
        if self.keyring is None:
            raise AuthorizationMissing("", "", "the registry is disabled")
        return self.keyring

    def _open(self, owner: TokenOwner, row: TokenRow) -> Held | None:
        sealed = sealed_from_row(row)
        try:
            plain = json.loads(
                open_sealed(
                    self._keys(),
                    tenant_id=owner.tenant_id,
                    server_id=owner.server_id,
                    field=owner.field,
                    sealed=sealed,
                )
            )
        except (DecryptionError, InvalidTag, ValueError):
            logger.warning("an OAuth token does not decrypt", extra={"server_id": owner.server_id})
            return None
        expires = _aware(row.expires_at)
        return Held(
            version=row.version,
            access_token=str(plain["access_token"]),
            refresh_token=plain.get("refresh_token"),
            expires_at=expires.timestamp() if expires else None,
            lifetime_s=plain.get("lifetime_s"),
        )

    def _row(self, session: Session, owner: TokenOwner) -> TokenRow | None:
        return session.exec(
            select(TokenRow).where(TokenRow.server_id == owner.server_id, TokenRow.user_id == owner.user_key)
        ).first()

    def _load(self, owner: TokenOwner) -> Held | None:
        with self.db.session() as session:
            row = self._row(session, owner)
            return None if row is None else self._open(owner, row)

    def _save(self, owner: TokenOwner, token: OAuthToken, previous: Held | None) -> Held:
        sealed = seal(
            self._keys(),
            tenant_id=owner.tenant_id,
            server_id=owner.server_id,
            field=owner.field,
            plaintext=_plain(token, previous),
        )
        expires = utcnow() + timedelta(seconds=token.expires_in) if token.expires_in else None
        with self.db.session() as session:
            row = self._row(session, owner)
            if row is None:
                row = TokenRow(
                    server_id=owner.server_id,
                    tenant_id=owner.tenant_id,
                    user_id=owner.user_key,
                    version=0,
                    dek_id=sealed.dek_id,
                    kek_id=sealed.kek_id,
                    wrapped_dek=sealed.wrapped_dek,
                    nonce=sealed.nonce,
                    ciphertext=sealed.ciphertext,
                )
            for name in ("dek_id", "kek_id", "wrapped_dek", "nonce", "ciphertext"):
                setattr(row, name, getattr(sealed, name))
            row.version += 1
            row.expires_at = expires
            row.updated_at = utcnow()
            session.add(row)
            session.commit()
            held = self._open(owner, row)
        if held is None:  # pragma: no cover  (just sealed with the primary KEK)
            raise AuthorizationMissing(owner.server_id, owner.user_key, "the token could not be stored")
        return held

    def _delete(self, owner: TokenOwner) -> bool:
        with self.db.session() as session:
            result = session.execute(
                delete(TokenRow).where(
                    col(TokenRow.server_id) == owner.server_id, col(TokenRow.user_id) == owner.user_key
                )
            )
            session.commit()
            return bool(result.rowcount)  # type: ignore[attr-defined]

    # ---- what callers use --------------------------------------------------------------------------

    def cached(self, owner: TokenOwner) -> Held | None:
        """The in-memory token if it is fresh (the hot path: no table, no lock)."""
        held = self._held.get(owner)
        if held is not None and held.fresh(self.clock(), self.settings.oauth_refresh_skew_s):
            return held
        return None

    async def store(self, owner: TokenOwner, token: OAuthToken) -> Held:
        """A token just obtained by an authorization; replaces what the owner had."""
        held = await self.db.run(lambda _s: self._save(owner, token, None))
        self._held[owner] = held
        return held

    async def current(self, owner: TokenOwner, renew: Renew) -> Held:
        """A fresh token: memory, else the row (another replica may have refreshed it), else renewed.

        Raises `AuthorizationMissing` when there is none and none can be obtained without the user.
        """
        held = self.cached(owner)
        if held is not None:
            return held
        lock = self._locks.setdefault(owner, anyio.Lock())
        async with lock:
            held = self.cached(owner)
            if held is not None:
                return held
            return await self._renew_exclusively(owner, renew)

    async def _renew_exclusively(self, owner: TokenOwner, renew: Renew) -> Held:
        skew = self.settings.oauth_refresh_skew_s
        with anyio.fail_after(LEASE_WAIT_S + self.settings.oauth_http_timeout_s):
            # Another replica is refreshing this token: its lease is in Redis, so there is no event
            # to wait on here; poll it (bounded by the deadline above).
            while not await self.lease.acquire(owner.lock_name, LEASE_WAIT_S):  # noqa: ASYNC110
                await anyio.sleep(LEASE_POLL_S)
        try:
            stored = await self.db.run(lambda _s: self._load(owner))
            refused = self._rejected.get(owner, 0)
            if stored is not None and stored.fresh(self.clock(), skew) and stored.version > refused:
                self._held[owner] = stored
                return stored
            if stored is not None and stored.refresh_token is None and owner.user_key:
                raise AuthorizationMissing(owner.server_id, owner.user_key, "the token expired")
            try:
                token = await renew(owner, stored)
            except GrantRefused:
                await self.forget(owner)
                raise AuthorizationMissing(
                    owner.server_id, owner.user_key, "the refresh was refused"
                ) from None
            if token is None:
                raise AuthorizationMissing(owner.server_id, owner.user_key)
            held = await self.db.run(lambda _s: self._save(owner, token, stored))
            self.refreshes += 1
            self._held[owner] = held
            return held
        finally:
            await self.lease.release(owner.lock_name)

    def stale(self, owner: TokenOwner, version: int) -> None:
        """The upstream refused this version (401): the next `current` renews it."""
        self._rejected[owner] = max(version, self._rejected.get(owner, 0))
        held = self._held.get(owner)
        if held is not None and held.version == version:
            self._held[owner] = Held(held.version, held.access_token, held.refresh_token, expires_at=0.0)

    async def forget(self, owner: TokenOwner) -> Held | None:
        """Delete the owner's token (row and memory); what it held, for a revocation."""
        held = self._held.pop(owner, None) or await self.db.run(lambda _s: self._load(owner))
        await self.db.run(lambda _s: self._delete(owner))
        return held

    async def connected(self, owner: TokenOwner) -> bool:
        if owner in self._held:
            return True
        return await self.db.run(lambda s: self._row(s, owner) is not None)

    def drop_server(self, server_id: str) -> None:
        for owner in [o for o in self._held if o.server_id == server_id]:
            self._held.pop(owner, None)


def rotate_tokens(
    db: Database,
    keyring: Keyring,
    *,
    batch_size: int = 100,
    after_batch: Callable[[int], None] | None = None,
) -> int:
    """`scailink kek rotate` for the sealed `oauth_token` rows: re-wrap every DEK not under the primary
    KEK (resumable, safe while replicas run: `crypto.rotate_credentials`'s compare-and-update; a token
    refreshed meanwhile has a new DEK and is left as it is). Returns how many rows were re-wrapped."""
    return rotate_credentials(db, keyring, batch_size=batch_size, after_batch=after_batch, table=TokenRow)


class BearerAuth(httpx2.Auth):
    """Adds the owner's current token to every request to the upstream; on a 401, renews it and sends
    the request once more (MCP requests carry byte bodies, so a retry is safe)."""

    requires_request_body = True

    def __init__(
        self, current: Callable[[], Awaitable[Held]], stale: Callable[[int], Awaitable[None]]
    ) -> None:
        self._current = current
        self._stale = stale

    async def ensure(self) -> Held:
        return await self._current()

    async def async_auth_flow(
        self, request: httpx2.Request
    ) -> AsyncGenerator[httpx2.Request, httpx2.Response]:
        held = await self._current()
        request.headers["Authorization"] = f"Bearer {held.access_token}"
        response = yield request
        if response.status_code == 401:
            await self._stale(held.version)
            held = await self._current()
            request.headers["Authorization"] = f"Bearer {held.access_token}"
            yield request
