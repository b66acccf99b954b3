"""Envelope encryption: binding to row and field, tampering, KEK rotation (resumable, while serving)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from sqlmodel import select

from scailink_mcp.crypto import (
    DecryptionError,
    Keyring,
    generate_kek,
    open_sealed,
    rotate_credentials,
    seal,
    sealed_from_row,
)
from scailink_mcp.db import Database
from scailink_mcp.models import Credential, RemoteServer

A, B = generate_kek(), generate_kek()


def test_round_trip_and_fresh_randomness() -> None:
    ring = Keyring(A)
    one = seal(ring, tenant_id="t1", server_id="s1", field="authorization", plaintext="hunter2")
    two = seal(ring, tenant_id="t1", server_id="s1", field="authorization", plaintext="hunter2")
    assert one.ciphertext != two.ciphertext and one.dek_id != two.dek_id and one.nonce != two.nonce
    assert open_sealed(ring, tenant_id="t1", server_id="s1", field="authorization", sealed=one) == "hunter2"
    assert b"hunter2" not in one.ciphertext + one.wrapped_dek


@pytest.mark.parametrize(
    ("tenant", "server", "field"),
    [
        ("t2", "s1", "authorization"),
        ("t1", "s2", "authorization"),
        ("t1", "s1", "x-api-key"),
        ("t1s", "1", "authorization"),
    ],
)
def test_ciphertext_bound_to_row_and_field(tenant: str, server: str, field: str) -> None:
    ring = Keyring(A)
    sealed = seal(ring, tenant_id="t1", server_id="s1", field="authorization", plaintext="v")
    with pytest.raises(DecryptionError):
        open_sealed(ring, tenant_id=tenant, server_id=server, field=field, sealed=sealed)


def test_tampering_and_wrong_keys_fail() -> None:
    ring = Keyring(A)
    sealed = seal(ring, tenant_id="t", server_id="s", field="f", plaintext="v")
    flipped = bytes([sealed.ciphertext[0] ^ 1]) + sealed.ciphertext[1:]
    with pytest.raises(DecryptionError):
        open_sealed(
            ring,
            tenant_id="t",
            server_id="s",
            field="f",
            sealed=sealed.__class__(**{**sealed.__dict__, "ciphertext": flipped}),
        )
    with pytest.raises(DecryptionError):
        open_sealed(Keyring(B), tenant_id="t", server_id="s", field="f", sealed=sealed)
    for bad in ("", "not-base64!", base64.b64encode(b"short").decode()):
        with pytest.raises(ValueError):
            Keyring(bad)


def _seed(db: Database, count: int) -> dict[str, str]:
    ring = Keyring(A)
    plain: dict[str, str] = {}
    with db.session() as session:
        for i in range(count // 2):
            server = RemoteServer(
                tenant_id="t1", owner_user_id="u1", owner_scope="user:u1", name=f"s{i}", slug=f"s{i}-abcdef",
                endpoint_url="https://example.com/mcp",
            )  # fmt: skip
            session.add(server)
            session.flush()
            for field in ("x-a", "x-b"):
                value = f"secret-{i}-{field}"
                sealed = seal(ring, tenant_id="t1", server_id=server.id, field=field, plaintext=value)
                row = Credential(server_id=server.id, tenant_id="t1", field=field, **sealed.__dict__)
                session.add(row)
                session.flush()
                plain[row.id] = value
        session.commit()
    return plain


def _decrypt_all(db: Database, ring: Keyring) -> dict[str, str]:
    with db.session() as session:
        return {
            row.id: open_sealed(
                ring,
                tenant_id=row.tenant_id,
                server_id=row.server_id,
                field=row.field,
                sealed=sealed_from_row(row),
            )
            for row in session.exec(select(Credential)).all()
        }


def test_kek_rotation_is_resumable(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'rot.db'}")
    db.migrate()
    plain = _seed(db, 250)
    rotating = Keyring(B, [A])
    # interrupted after the first batch: mixed key ids, everything still decrypts
    assert rotate_credentials(db, rotating, batch_size=100, max_batches=1) == 100
    with db.session() as session:
        ids = {row.kek_id for row in session.exec(select(Credential)).all()}
    assert ids == {Keyring(A).primary_id, rotating.primary_id}
    assert _decrypt_all(db, rotating) == plain
    # run again: finishes the rest, then nothing is left
    assert rotate_credentials(db, rotating, batch_size=100) == 150
    assert rotate_credentials(db, rotating, batch_size=100) == 0
    assert _decrypt_all(db, Keyring(B)) == plain
    with pytest.raises(DecryptionError):
        _decrypt_all(db, Keyring(A))
    raw = (tmp_path / "rot.db").read_bytes()
    assert b"secret-0-x-a" not in raw
