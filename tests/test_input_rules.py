"""Hostile values that reach storage: NUL in audit fields (PostgreSQL refuses it and would drop the
whole batch), a role name with a trailing line break, a role description with control characters,
and a REST invoke whose `timeout_ms` is not an integer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from scailink_mcp.audit import AuditLog, AuditRecord
from scailink_mcp.db import Database
from tests.conftest import AppHarness, TokenFactory, auth_headers

pytestmark = pytest.mark.anyio


@pytest.fixture
def migrated(database_url: str) -> Iterator[Database]:
    db = Database(database_url)
    db.migrate()
    yield db
    db.dispose()


async def test_nul_in_audit_values_never_sinks_a_batch(migrated: Database) -> None:
    log = AuditLog(migrated, batch_size=10, flush_interval_s=3600)
    for i in range(3):
        log.record(
            AuditRecord(tenant_id="t1", user_id="u1", event="tool_call", outcome="ok", target=f"ok-{i}")
        )
    log.record(
        AuditRecord(
            tenant_id="t1",
            user_id="u1",
            event="tool_call",
            outcome="error",
            error_code="SCAILINK_TOOL_NOT_FOUND",
            target="a\x00b",
            arguments={"text": "x\x00y"},
            detail_level="metadata",
        )
    )
    assert await log.flush() == 4
    assert log.failed_writes == 0
    rows, _ = await log.query("t1", limit=10)
    assert {row["target"] for row in rows} == {"ok-0", "ok-1", "ok-2", "a\ufffdb"}
    assert [row["arguments"] for row in rows if row["target"] == "a\ufffdb"] == [{"text": "x\ufffdy"}]


async def test_role_name_with_a_trailing_newline_is_refused(harness: AppHarness, token: TokenFactory) -> None:
    hdr = auth_headers(token())
    resp = await harness.client.put(
        "/v1/iam/roles/abc%0A", json={"permissions": ["scailink:view"]}, headers=hdr
    )
    assert resp.status_code == 422, resp.text
    roles = (await harness.client.get("/v1/iam/roles", headers=hdr)).json()["data"]["items"]
    assert not [r for r in roles if not r["builtin"]], roles


async def test_role_description_with_control_characters_is_refused(
    harness: AppHarness, token: TokenFactory
) -> None:
    hdr = auth_headers(token())
    body = {"permissions": ["scailink:view"], "description": "a\x00b"}
    resp = await harness.client.put("/v1/iam/roles/ops", json=body, headers=hdr)
    assert resp.status_code == 422, resp.text


@pytest.mark.parametrize("timeout_ms", ["5", 5.0, True])
async def test_invoke_timeout_must_be_an_integer(
    harness: AppHarness, token: TokenFactory, timeout_ms: object
) -> None:
    hdr = auth_headers(token())
    url = "/v1/modules/scailink/users/u1/tools/remote.u1.x.echo/invoke"
    resp = await harness.client.post(url, json={"arguments": {}, "timeout_ms": timeout_ms}, headers=hdr)
    assert resp.status_code == 422, resp.text
