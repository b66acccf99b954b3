"""Audit: one event per call (MCP and REST) with redacted arguments, detail levels, routing failures,
consent and registry events, never blocking or failing a call, filters and pagination."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from sqlalchemy import text

from scailink_mcp.audit import REDACTED, AuditLog, AuditRecord, redact
from scailink_mcp.config import Settings
from scailink_mcp.db import Database
from tests.conftest import LiveApp, TokenFactory, auth_headers
from tests.test_mcp_gateway import mcp_client, register
from tests.test_operations import samples
from tests.upstream import UpstreamServer

pytestmark = pytest.mark.anyio


def test_redaction() -> None:
    nested = {"api_key": "k", "X-Api-Key": "k2", "list": [{"token": "t"}]}
    args = {"query": "ok", "password": "p", "nested": nested, "Authorization": "Bearer x"}
    args |= {"client_secret": "s", "keep": [1, 2]}
    out = redact(args)
    assert out["query"] == "ok" and out["keep"] == [1, 2]
    assert out["password"] == out["Authorization"] == out["client_secret"] == REDACTED
    assert out["nested"]["api_key"] == out["nested"]["X-Api-Key"] == REDACTED
    assert out["nested"]["list"][0]["token"] == REDACTED
    assert args["password"] == "p", "the caller's arguments are not modified"


async def test_record_never_blocks_and_counts_overflow(tmp_path: Any) -> None:
    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    db.migrate()
    log = AuditLog(db, queue_size=5)
    started = time.perf_counter()
    for i in range(10):
        log.record(AuditRecord("t1", "u1", "tool_call", "ok", target=f"t{i}"))
    assert time.perf_counter() - started < 0.05
    assert log.depth() == 5 and log.dropped == 5
    assert await log.flush() == 5 and log.written == 5


async def audit_items(live: LiveApp, tok: str, query: str = "") -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=live.base_url) as c:
        await live.parts.audit.flush()
        resp = await c.get(f"/v1/modules/scailink/audit{query}", headers=auth_headers(tok))
        assert resp.status_code == 200, resp.text
        items: list[dict[str, Any]] = resp.json()["data"]["items"]
        return items


async def test_calls_are_audited(live: LiveApp, token: TokenFactory) -> None:
    user = token("u1", "t1", ("tenant_user",))
    admin = token("admin", "t1", ("tenant_admin",))
    with UpstreamServer() as upstream:
        server = await register(live, user, name="audited", endpoint_url=upstream.url)
        tool = f"remote.u1.{server['slug']}.echo"
        async with mcp_client(live.mcp_url, user) as s:
            await s.call_tool(tool, {"text": "via mcp", "password": "hunter2"})
            with pytest.raises(Exception):  # noqa: B017  (an unknown name is a JSON-RPC error)
                await s.call_tool("remote.u1.nope.echo", {})
        async with httpx.AsyncClient(base_url=live.base_url) as c:
            resp = await c.post(
                f"/v1/modules/scailink/users/u1/tools/{tool}/invoke",
                json={"arguments": {"text": "via rest", "api_key": "k"}},
                headers={**auth_headers(user), "X-Request-ID": "req-rest-1"},
            )
            assert resp.status_code == 200
    calls = await audit_items(live, admin, "?event=tool_call")
    ok = [c for c in calls if c["outcome"] == "ok"]
    assert len(ok) == 2, calls
    rest, mcp = ok  # newest first
    assert rest["request_id"] == "req-rest-1" and rest["target"] == tool
    assert rest["arguments"] == {"text": "via rest", "api_key": REDACTED}
    assert mcp["arguments"] == {"text": "via mcp", "password": REDACTED} and mcp["request_id"]
    assert all(c["duration_ms"] is not None for c in ok)
    routing = [c for c in calls if c["error_code"] == "SCAILINK_TOOL_NOT_FOUND"]
    assert len(routing) == 1 and routing[0]["target"] == "remote.u1.nope.echo"
    registry = await audit_items(live, admin, "?event=registry.server_created")
    assert registry and registry[0]["user_id"] == "u1" and registry[0]["target"] == server["id"]
    # per-user log: self allowed, another user's needs scailink:audit
    async with httpx.AsyncClient(base_url=live.base_url) as c:
        mine = await c.get("/v1/modules/scailink/users/u1/audit", headers=auth_headers(user))
        assert mine.status_code == 200 and all(i["user_id"] == "u1" for i in mine.json()["data"]["items"])
        theirs = await c.get("/v1/modules/scailink/users/admin/audit", headers=auth_headers(user))
        assert theirs.status_code == 403
        assert (await c.get("/v1/modules/scailink/audit", headers=auth_headers(user))).status_code == 403
        bad = await c.get("/v1/modules/scailink/audit?since=yesterday", headers=auth_headers(admin))
        assert bad.status_code == 422 and bad.json()["error"]["details"][0]["field"] == "since"


async def test_detail_level_off(settings_factory: Callable[..., Settings], token: TokenFactory) -> None:
    user = token("u1", "t1", ("tenant_admin",))
    with LiveApp(settings_factory(audit_detail_level="off")) as live, UpstreamServer() as upstream:
        server = await register(live, user, name="quiet", endpoint_url=upstream.url)
        async with mcp_client(live.mcp_url, user) as s:
            await s.call_tool(f"remote.u1.{server['slug']}.echo", {"text": "secret plans"})
        calls = await audit_items(live, user, "?event=tool_call")
    assert len(calls) == 1 and calls[0]["outcome"] == "ok"
    assert calls[0]["target"] is None and calls[0]["arguments"] is None


async def test_audit_database_failure_never_fails_calls(live: LiveApp, token: TokenFactory) -> None:
    user = token("u1", "t1", ("tenant_admin",))
    with UpstreamServer() as upstream:
        server = await register(live, user, name="resilient", endpoint_url=upstream.url)
        await live.parts.audit.flush()
        with live.parts.db.engine.begin() as conn:  # the audit table disappears mid-run
            conn.execute(text("DROP TABLE audit_event"))
        async with mcp_client(live.mcp_url, user) as s:
            for i in range(5):
                with anyio.fail_after(5):
                    result = await s.call_tool(f"remote.u1.{server['slug']}.echo", {"text": str(i)})
                assert not result.is_error
        await live.parts.audit.flush()
        async with httpx.AsyncClient(base_url=live.base_url) as c:
            metrics = samples((await c.get("/metrics")).text)
    assert metrics[("scailink_audit_failed_writes", ())] >= 5


async def test_filters_and_pagination(tmp_path: Any) -> None:
    db = Database(f"sqlite:///{tmp_path / 'q.db'}")
    db.migrate()
    log = AuditLog(db)
    for i in range(7):
        log.record(AuditRecord("t1", f"u{i % 2}", "tool_call", "ok" if i % 3 else "error", target=f"tool{i}"))
    log.record(AuditRecord("t2", "u0", "tool_call", "ok"))
    await log.flush()
    seen: list[str] = []
    after = None
    while True:
        items, after = await log.query("t1", limit=3, after=after)
        seen += [i["target"] for i in items]
        if after is None:
            break
    assert seen == [f"tool{i}" for i in reversed(range(7))], "newest first, every event once"
    errors, _ = await log.query("t1", outcome="error", limit=50)
    assert {e["target"] for e in errors} == {"tool0", "tool3", "tool6"}
    mine, _ = await log.query("t1", user_id="u1", limit=50)
    assert {e["target"] for e in mine} == {"tool1", "tool3", "tool5"}
    from datetime import timedelta

    from scailink_mcp.models import utcnow

    assert await log.prune(utcnow() + timedelta(seconds=1)) == 8
