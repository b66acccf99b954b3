"""A credential that does not decrypt is that server's error, never the round's (issue 11, item 8).

Real parts: the app with its real registry API over a real SQLite file, servers registered with bearer
credentials against a real upstream on 127.0.0.1, then ciphertexts corrupted in the database file
itself (bytes flipped; two servers' sealed credentials swapped), as a bad restore or a tampering would.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from scailink_mcp.config import Settings
from scailink_mcp.models import utcnow
from scailink_mcp.remote.health import Rediscovery
from tests.conftest import AppHarness, TokenFactory, auth_headers
from tests.upstream import UpstreamServer

pytestmark = pytest.mark.anyio

BASE = "/v1/modules/scailink/remote-servers"
SEALED = ("dek_id", "kek_id", "wrapped_dek", "nonce", "ciphertext")


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer() as server:
        yield server


def db_file(settings: Settings) -> str:
    return settings.effective_database_url.removeprefix("sqlite:///")


def flip_ciphertext(path: str, server_id: str) -> None:
    with sqlite3.connect(path) as conn:
        (ciphertext,) = conn.execute(
            "SELECT ciphertext FROM credential WHERE server_id = ?", (server_id,)
        ).fetchone()
        flipped = bytes([ciphertext[0] ^ 0xFF]) + ciphertext[1:]
        conn.execute("UPDATE credential SET ciphertext = ? WHERE server_id = ?", (flipped, server_id))


def swap_sealed(path: str, first: str, second: str) -> None:
    columns = ", ".join(SEALED)
    with sqlite3.connect(path) as conn:
        rows = {
            sid: conn.execute(f"SELECT {columns} FROM credential WHERE server_id = ?", (sid,)).fetchone()
            for sid in (first, second)
        }
        assignments = ", ".join(f"{c} = ?" for c in SEALED)
        for sid, other in ((first, second), (second, first)):
            conn.execute(f"UPDATE credential SET {assignments} WHERE server_id = ?", (*rows[other], sid))


async def detail(h: AppHarness, tok: str, server_id: str) -> dict[str, Any]:
    resp = await h.client.get(f"{BASE}/{server_id}", headers=auth_headers(tok))
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()["data"]
    return data


async def test_undecryptable_credentials_fail_their_server_only(
    harness: AppHarness, token: TokenFactory, upstream: UpstreamServer
) -> None:
    h, tok = harness, token("u1", "t1", ("tenant_user",))
    ids: list[str] = []
    for i in range(6):
        resp = await h.client.post(
            BASE,
            json={
                "name": f"srv-{i}",
                "endpoint_url": upstream.url,
                "auth_type": "bearer",
                "credentials": {"authorization": f"token-{i}"},
            },
            headers=auth_headers(tok),
        )
        assert resp.status_code == 201 and resp.json()["data"]["status"] == "active", resp.text
        ids.append(resp.json()["data"]["id"])
    path = db_file(h.parts.settings)
    flip_ciphertext(path, ids[1])
    swap_sealed(path, ids[3], ids[4])  # each ciphertext is bound to its own row: both fail
    broken = {ids[1], ids[3], ids[4]}

    results = await h.parts.health.run_once()

    assert set(results) == set(ids), "every server was checked"
    for sid in ids:
        data = await detail(h, tok, sid)
        if sid in broken:
            assert results[sid] == "CredentialDecryptError"
            assert data["status"] == "error" and data["last_health_status"] == "CredentialDecryptError"
            assert data["consecutive_failures"] == 1
        else:
            assert results[sid] == "ok"
            assert data["status"] == "active" and data["last_health_status"] == "ok"
        assert data["last_health_at"] is not None

    # refresh of a broken server answers in the envelope (422, naming the field), not 500
    resp = await h.client.post(f"{BASE}/{ids[1]}/refresh", headers=auth_headers(tok))
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "SCAILINK_VALIDATION_ERROR"
    assert [d["field"] for d in error["details"]] == ["credentials.authorization"]
    assert "token-" not in resp.text
    data = await detail(h, tok, ids[1])
    assert data["status"] == "error" and data["last_health_status"] == "CredentialDecryptError"
    assert data["consecutive_failures"] == 2

    # a re-discovery round goes on past one too
    flip_ciphertext(path, ids[5])
    later = Rediscovery(h.parts.settings, h.parts.registry, clock=lambda: utcnow() + timedelta(hours=1))
    assert set(await later.run_once()) == {ids[0], ids[2], ids[5]}, "every active server was due"
    for sid, status in ((ids[0], "ok"), (ids[2], "ok"), (ids[5], "CredentialDecryptError")):
        assert (await detail(h, tok, sid))["last_health_status"] == status

    # setting the credential again and refreshing restores the server
    put = await h.client.put(
        f"{BASE}/{ids[1]}/credentials/authorization", json={"value": "fresh"}, headers=auth_headers(tok)
    )
    assert put.status_code == 200, put.text
    resp = await h.client.post(f"{BASE}/{ids[1]}/refresh", headers=auth_headers(tok))
    assert resp.status_code == 200, resp.text
    assert resp.json()["data"]["status"] == "active" and resp.json()["data"]["last_health_status"] == "ok"
