"""Envelope encryption of credentials at rest; the only module that sees plaintext credentials.

Each credential field gets its own random 256-bit data key (DEK). The value is sealed with
AES-256-GCM under the DEK, with associated data binding it to (tenant, server id, field, DEK id), so a
ciphertext copied to another row or field fails to decrypt. The DEK is wrapped (AES-256-GCM again)
under a key-encryption key (KEK) from settings, with associated data binding it to (DEK id, KEK id).
Rotating the KEK only re-wraps DEKs; ciphertexts never change.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import update
from sqlmodel import col, select

from scailink_mcp.config import Settings
from scailink_mcp.db import Database
from scailink_mcp.models import Credential, OAuthToken, same_named

# The tables of sealed rows (the same envelope columns): credential fields and OAuth tokens.
SealedRow = Credential | OAuthToken

KEY_BYTES = 32
NONCE_BYTES = 12


class DecryptionError(Exception):
    """A credential cannot be decrypted: wrong row or field, tampering, or an unknown KEK."""


def generate_kek() -> str:
    return base64.b64encode(os.urandom(KEY_BYTES)).decode()


def _decode_kek(value: str) -> bytes:
    try:
        raw = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("a KEK must be base64 of 32 bytes") from None
    if len(raw) != KEY_BYTES:
        raise ValueError(f"a KEK must be base64 of 32 bytes (got {len(raw)} bytes)")
    return raw


def kek_id(kek: bytes) -> str:
    return hashlib.sha256(b"scailink-kek-id" + kek).hexdigest()[:16]


def _aad(*parts: str) -> bytes:
    # JSON of a list is unambiguous: ("a", "bc") and ("ab", "c") encode differently.
    return json.dumps(list(parts), separators=(",", ":")).encode()


class Keyring:
    """The primary KEK (wraps new DEKs) and decrypt-only previous KEKs, by key id."""

    def __init__(self, primary_b64: str, previous_b64: Sequence[str] = ()) -> None:
        primary = _decode_kek(primary_b64)
        self.primary_id = kek_id(primary)
        self._keys: dict[str, bytes] = {self.primary_id: primary}
        for value in previous_b64:
            key = _decode_kek(value)
            self._keys.setdefault(kek_id(key), key)

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring | None:
        if settings.encryption_local_kek is None:
            return None
        previous = [s.get_secret_value() for s in settings.encryption_previous_keks]
        return cls(settings.encryption_local_kek.get_secret_value(), previous)

    def ids(self) -> list[str]:
        return list(self._keys)

    def key(self, key_id: str) -> bytes:
        try:
            return self._keys[key_id]
        except KeyError:
            raise DecryptionError(f"unknown KEK id {key_id}") from None


@dataclass(frozen=True)
class SealedSecret:
    dek_id: str
    kek_id: str
    wrapped_dek: bytes
    nonce: bytes
    ciphertext: bytes


def _wrap(keyring: Keyring, dek: bytes, dek_id: str) -> bytes:
    nonce = os.urandom(NONCE_BYTES)
    kek = keyring.key(keyring.primary_id)
    return nonce + AESGCM(kek).encrypt(nonce, dek, _aad("dek", dek_id, keyring.primary_id))


def _unwrap(keyring: Keyring, sealed: SealedSecret) -> bytes:
    kek = keyring.key(sealed.kek_id)
    nonce, body = sealed.wrapped_dek[:NONCE_BYTES], sealed.wrapped_dek[NONCE_BYTES:]
    try:
        return AESGCM(kek).decrypt(nonce, body, _aad("dek", sealed.dek_id, sealed.kek_id))
    except InvalidTag:
        raise DecryptionError("data key does not unwrap") from None


def seal(keyring: Keyring, *, tenant_id: str, server_id: str, field: str, plaintext: str) -> SealedSecret:
    dek = AESGCM.generate_key(bit_length=256)
    dek_id = uuid.uuid4().hex
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(dek).encrypt(nonce, plaintext.encode(), _aad(tenant_id, server_id, field, dek_id))
    return SealedSecret(
        dek_id=dek_id,
        kek_id=keyring.primary_id,
        wrapped_dek=_wrap(keyring, dek, dek_id),
        nonce=nonce,
        ciphertext=ciphertext,
    )


def open_sealed(keyring: Keyring, *, tenant_id: str, server_id: str, field: str, sealed: SealedSecret) -> str:
    dek = _unwrap(keyring, sealed)
    try:
        plain = AESGCM(dek).decrypt(
            sealed.nonce, sealed.ciphertext, _aad(tenant_id, server_id, field, sealed.dek_id)
        )
    except InvalidTag:
        raise DecryptionError("credential does not decrypt for this row and field") from None
    return plain.decode()


def rewrap(keyring: Keyring, sealed: SealedSecret) -> SealedSecret:
    """The same ciphertext with its DEK wrapped under the primary KEK."""
    if sealed.kek_id == keyring.primary_id:
        return sealed
    dek = _unwrap(keyring, sealed)
    return dataclasses.replace(
        sealed, kek_id=keyring.primary_id, wrapped_dek=_wrap(keyring, dek, sealed.dek_id)
    )


def sealed_from_row(row: SealedRow) -> SealedSecret:
    return SealedSecret(**same_named(row, (f.name for f in dataclasses.fields(SealedSecret))))


def rotate_credentials(
    db: Database,
    keyring: Keyring,
    *,
    batch_size: int = 100,
    max_batches: int | None = None,
    after_batch: Callable[[int], None] | None = None,
    table: type[Credential] | type[OAuthToken] = Credential,
) -> int:
    """Re-wrap every DEK of `table` not under the primary KEK, one committed batch at a time.

    Resumable: an interrupted run leaves every row decryptable (each under its old or the new KEK) and
    a second run continues with what is left. Safe while the service runs, on any number of replicas:
    a row is rewritten in one UPDATE of (`kek_id`, `wrapped_dek`) — a reader sees the old pair or the
    new one, never a mix, and either opens with a keyring holding both KEKs — and only if it still
    holds the DEK that was read (`dek_id`, new on every seal) under the KEK that was read. Comparing
    `kek_id` alone would let a credential set meanwhile by a replica still on the old primary (same
    `kek_id`, a new DEK and ciphertext) be overwritten with the old DEK's wrapping: a row nobody could
    open. Such a row is left as it is, and picked up by the next batch if it still needs re-wrapping.
    `after_batch(rewrapped)` runs after each commit (the CLI renews its cluster lock there).
    """
    done = 0
    batches = 0
    while max_batches is None or batches < max_batches:
        rewrapped = 0
        with db.session() as session:
            # A select of either table yields rows of that table (mypy sees only `SQLModel`).
            rows = cast(
                "Sequence[SealedRow]",
                session.exec(
                    select(table)
                    .where(col(table.kek_id) != keyring.primary_id)
                    .order_by(col(table.id))
                    .limit(batch_size)
                ).all(),
            )
            if not rows:
                break
            for row in rows:
                fresh = rewrap(keyring, sealed_from_row(row))
                result = session.execute(
                    update(table)
                    .where(
                        col(table.id) == row.id,
                        col(table.kek_id) == row.kek_id,
                        col(table.dek_id) == row.dek_id,
                    )
                    .values(
                        kek_id=fresh.kek_id, wrapped_dek=fresh.wrapped_dek
                    )  # updated_at is the secret's age
                )
                rewrapped += result.rowcount  # type: ignore[attr-defined]
            session.commit()
        done += rewrapped
        batches += 1
        if after_batch is not None:
            after_batch(rewrapped)
    return done
