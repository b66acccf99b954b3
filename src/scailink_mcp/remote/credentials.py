"""A registered server's stored credentials: sealing a value into a row, and opening them into a target.

Owns the rows of `Credential` (one per field, each sealed with its own DEK and bound by AAD to its
tenant, server and field: `crypto.py`), and the one place a server's credentials are decrypted into
outbound headers (`decrypt_target`), which only opening an upstream connection asks for.

A stored credential that does not decrypt (moved to another row, tampered with, an unknown KEK) is
that server's failure: `decrypt_target` raises `CredentialDecryptError` naming the fields, never a value.

Must not: commit, publish or check permissions (the registry does, around these), nor log a value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

from cryptography.exceptions import InvalidTag
from sqlmodel import Session, select

from scailink_mcp.crypto import DecryptionError, Keyring, SealedSecret, open_sealed, seal, sealed_from_row
from scailink_mcp.errors import NotFound, ValidationFailed
from scailink_mcp.models import Credential, RemoteServer, utcnow
from scailink_mcp.remote.schemas import check_credential_field
from scailink_mcp.remote.upstream import UpstreamTarget, upstream_headers


class CredentialDecryptError(Exception):
    """Stored credential fields of one server do not decrypt. Names the fields, never a value."""

    def __init__(self, server_id: str, fields: Sequence[str]) -> None:
        self.server_id = server_id
        self.fields = list(fields)
        super().__init__(f"credential fields {', '.join(self.fields)} do not decrypt")


def _sealed(keyring: Keyring, server: RemoteServer, field_name: str, value: str) -> SealedSecret:
    return seal(keyring, tenant_id=server.tenant_id, server_id=server.id, field=field_name, plaintext=value)


def credential_row(keyring: Keyring, server: RemoteServer, field_name: str, value: str) -> Credential:
    """A new row holding `value` sealed for this server and field."""
    sealed = _sealed(keyring, server, field_name, value)
    return Credential(server_id=server.id, tenant_id=server.tenant_id, field=field_name, **asdict(sealed))


def _stored(session: Session, server: RemoteServer, field_name: str) -> Credential | None:
    return session.exec(
        select(Credential).where(Credential.server_id == server.id, Credential.field == field_name)
    ).first()


def store(session: Session, keyring: Keyring, server: RemoteServer, field_name: str, value: str) -> None:
    """Set one field (a new row, or the existing one sealed again); `ValidationFailed` for a field the
    server's auth type does not take."""
    reason = check_credential_field(server.auth_type, field_name)
    if reason:
        raise ValidationFailed("invalid credential field", details=[{"field": field_name, "reason": reason}])
    existing = _stored(session, server, field_name)
    if existing is None:
        session.add(credential_row(keyring, server, field_name, value))
        return
    for attr, sealed in asdict(_sealed(keyring, server, field_name, value)).items():
        setattr(existing, attr, sealed)
    existing.updated_at = utcnow()
    session.add(existing)


def remove(session: Session, server: RemoteServer, field_name: str) -> None:
    """Delete one field; `NotFound` if the server has none by that name."""
    row = _stored(session, server, field_name)
    if row is None:
        raise NotFound("credential field not found")
    session.delete(row)


def decrypt_target(keyring: Keyring, session: Session, server: RemoteServer) -> UpstreamTarget:
    """Decrypt the server's credentials into outbound headers (only for opening a connection)."""
    creds = session.exec(select(Credential).where(Credential.server_id == server.id)).all()
    values: dict[str, str] = {}
    broken: list[str] = []
    for c in creds:
        try:
            values[c.field] = open_sealed(
                keyring,
                tenant_id=server.tenant_id,
                server_id=server.id,
                field=c.field,
                sealed=sealed_from_row(c),
            )
        except (DecryptionError, InvalidTag, ValueError):  # ValueError: a malformed nonce or text
            broken.append(c.field)
    if broken:
        raise CredentialDecryptError(server.id, sorted(broken))
    return UpstreamTarget(
        server_id=server.id,
        endpoint_url=server.endpoint_url,
        transport=server.transport,
        headers=upstream_headers(server.auth_type, values),
    )
