"""The audit log as a unit and through its routes: redaction, detail levels, a queue that never blocks,
batched writes, an unavailable database, every filter with keyset pagination, retention, and the
migration that creates the tables. Real databases (SQLite file; PostgreSQL and MariaDB where the
database matters). End to end against a live ScaiLink: one event per MCP or REST call with redacted
arguments, routing failures and registry events, detail level `off`, and a lost audit table that
never fails a call."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event, inspect, text
from sqlmodel import SQLModel

from scailink_mcp.api.envelope import encode_cursor
from scailink_mcp.audit import REDACTED, AuditEntry, AuditLog, AuditRecord, is_secret_key, redact
from scailink_mcp.config import Settings
from scailink_mcp.db import Database, alembic_config
from tests.conftest import AppHarness, LiveApp, TokenFactory, auth_headers
from tests.test_mcp_gateway import mcp_client, register
from tests.test_operations import samples
from tests.upstream import UpstreamServer

pytestmark = pytest.mark.anyio

AUDIT = "/v1/modules/scailink/audit"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `predicate` until it holds, failing after `timeout` seconds."""
    with anyio.fail_after(timeout):
        while True:
            if predicate():
                return
            await anyio.sleep(0.01)


class Clock:
    """A settable clock for `AuditLog`."""

    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def _migrated(url: str) -> Iterator[Database]:
    db = Database(url)
    db.migrate()
    yield db
    db.dispose()


@pytest.fixture
def migrated(database_url: str) -> Iterator[Database]:
    yield from _migrated(database_url)


@pytest.fixture
def sqlite_db(sqlite_url: str) -> Iterator[Database]:
    yield from _migrated(sqlite_url)


# ---- redaction (pure) --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        "password", "PASSWORD", "db_passwd", "passphrase", "pwd", "pass", "userPassword",
        "secret", "client_secret", "clientSecret", "AWS_SECRET_ACCESS_KEY",
        "token", "access_token", "accessToken", "refresh-token", "id_token", "X-Auth-Token",
        "api_key", "apiKey", "apikey", "x-api-key", "X-API-KEY", "Api-Key",
        "authorization", "Authorization", "Proxy-Authorization", "auth", "basic_auth",
        "credential", "credentials", "aws_credentials",
        "private_key", "privateKey", "ssh-private-key", "signing_key", "access_key",
        "cookie", "Cookie", "Set-Cookie", "cookies",
        "session", "session_id", "sessionId", "SESSIONID", "jwt", "bearer", "signature",
    ],
)  # fmt: skip
def test_secret_keys_are_redacted(key: str) -> None:
    assert is_secret_key(key)
    assert redact({key: "value", "other": 1}) == {key: REDACTED, "other": 1}


@pytest.mark.parametrize(
    "key",
    [
        "query", "text", "author", "authority", "passenger", "compass", "bypass", "key", "keyword",
        "monkey", "keys", "max_tokens", "token_count", "num_tokens", "path", "id", "description", "url",
    ],
)  # fmt: skip
def test_ordinary_keys_are_kept(key: str) -> None:
    assert not is_secret_key(key)
    assert redact({key: "value"}) == {key: "value"}


def test_redaction_is_deep_and_copies() -> None:
    args: dict[str, Any] = {
        "q": "ok",
        "headers": {"Authorization": "Bearer abc", "Accept": "json"},
        "items": [{"token": "t"}, ["x", {"password": "p"}], ("y", {"api_key": "k"})],
        "secret": {"nested": "whole value replaced"},
        "note": "Bearer eyJabc.def",  # a credential under an innocent key
        "value": "eyJhbGciOi.eyJzdWIiOi.sig",  # a JWT
        "prose": "Bearer bonds are mentioned in this sentence.",
        "keep": [1, 2],
        7: "non-string keys are kept",
    }
    out = redact(args)
    assert out["q"] == "ok" and out[7] == "non-string keys are kept" and out["keep"] == [1, 2]
    assert out["headers"] == {"Authorization": REDACTED, "Accept": "json"}
    assert out["items"] == [{"token": REDACTED}, ["x", {"password": REDACTED}], ["y", {"api_key": REDACTED}]]
    assert out["secret"] == REDACTED
    assert out["note"] == out["value"] == REDACTED
    assert out["prose"] == args["prose"]
    assert args["headers"]["Authorization"] == "Bearer abc", "the caller's arguments are untouched"


def test_redaction_depth_is_bounded() -> None:
    deep: dict[str, Any] = {"v": 1}
    for _ in range(50):
        deep = {"d": deep}
    out = redact(deep)
    for _ in range(21):
        out = out["d"]
    assert out == REDACTED


def test_row_detail_levels_and_limits() -> None:
    rec = AuditRecord("t1", "u1", "tool_call", "ok", target="remote.u1.x.echo", arguments={"api_key": "k"})
    row = rec.values()
    assert row["target"] == "remote.u1.x.echo" and row["arguments"] == {"api_key": REDACTED}
    off = AuditRecord("t1", "u1", "tool_call", "ok", target="x", arguments={"a": 1}, detail_level="off")
    assert off.values()["target"] is None and off.values()["arguments"] is None
    assert AuditRecord("t1", "u1", "e", "ok", arguments=["not", "a", "dict"]).values()["arguments"] is None
    big = AuditRecord("t1", "u1", "e", "ok", arguments={"blob": "x" * 5000}).values(max_argument_bytes=1000)
    assert big["arguments"] is not None and big["arguments"]["_truncated"] is True
    odd = AuditRecord("t1", "u1", "e", "ok", arguments={"raw": b"\x00", "when": T0}).values()
    assert odd["arguments"] == {"raw": "b'\\x00'", "when": str(T0)}, "JSON-safe, whatever the caller passed"
    circular: dict[str, Any] = {}
    circular["self"] = [circular]
    assert AuditRecord("t1", "u1", "e", "ok", arguments=circular).values()["arguments"] is not None
    long = AuditRecord(
        "t" * 300, "u" * 300, "e" * 100, "ok", request_id="r" * 300, target="x" * 3000
    ).values()
    assert (len(long["tenant_id"]), len(long["user_id"]), len(long["event"])) == (128, 128, 64)
    assert len(long["request_id"] or "") == 128 and len(long["target"] or "") == 1024


# ---- the queue and the writer ------------------------------------------------------------------------


async def test_record_never_blocks_and_counts_drops(tmp_path: Path) -> None:
    # The database is not even reachable: `record` never touches it.
    log = AuditLog(Database(f"sqlite:///{tmp_path}/missing/dir/a.db"), queue_size=100)
    started = time.perf_counter()
    for i in range(1000):
        log.record(AuditRecord("t1", "u1", "tool_call", "ok", target=f"t{i}"))
    assert time.perf_counter() - started < 0.5
    assert log.depth() == 100 and log.dropped == 900 and log.written == 0


async def test_a_full_queue_drops_then_writes_what_it_holds(sqlite_db: Database) -> None:
    log = AuditLog(sqlite_db, queue_size=5)
    started = time.perf_counter()
    for i in range(10):
        log.record(AuditRecord("t1", "u1", "tool_call", "ok", target=f"t{i}"))
    assert time.perf_counter() - started < 0.05
    assert log.depth() == 5 and log.dropped == 5
    assert await log.flush() == 5 and log.written == 5


async def test_batches_land_one_transaction_each(migrated: Database) -> None:
    commits: list[int] = []
    event.listen(migrated.engine, "commit", lambda conn: commits.append(1))
    log = AuditLog(migrated, batch_size=3, flush_interval_s=3600)
    async with anyio.create_task_group() as tg:
        tg.start_soon(log.run)
        for i in range(7):
            log.record(AuditRecord("t1", "u1", "tool_call", "ok", target=f"t{i}"))
        # A full batch wakes the writer at once (the interval is an hour).
        await until(lambda: log.written == 7)
        assert len(commits) == 3, "7 events in batches of 3: three transactions"
        log.record(AuditRecord("t1", "u1", "tool_call", "ok", target="late-1"))
        log.record(AuditRecord("t1", "u1", "tool_call", "ok", target="late-2"))
        await anyio.sleep(0.05)
        assert log.written == 7 and log.depth() == 2, "a partial batch waits for the interval"
        tg.cancel_scope.cancel()
    assert log.written == 9 and log.depth() == 0, "cancellation drains what is queued"
    items, _ = await log.query("t1", limit=50)
    assert len(items) == 9 and log.failed_writes == 0


async def test_partial_batch_written_after_the_interval(sqlite_db: Database) -> None:
    log = AuditLog(sqlite_db, batch_size=100, flush_interval_s=0.05)
    async with anyio.create_task_group() as tg:
        tg.start_soon(log.run)
        log.record(AuditRecord("t1", "u1", "tool_call", "ok"))
        await until(lambda: log.written == 1)
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("where", ["sqlite", "postgresql"])
async def test_unavailable_database_counts_failed_writes(
    where: str, tmp_path: Path, postgres_reason: str | None
) -> None:
    if where == "postgresql" and postgres_reason:
        pytest.skip(postgres_reason)
    url = {
        "sqlite": f"sqlite:///{tmp_path}/no/such/dir/audit.db",
        "postgresql": "postgresql+psycopg://postgres@127.0.0.1:1/nothing",  # nothing listens on port 1
    }[where]
    log = AuditLog(Database(url), batch_size=10, flush_interval_s=0.02)
    async with anyio.create_task_group() as tg:
        tg.start_soon(log.run)
        started = time.perf_counter()
        for _ in range(25):
            log.record(AuditRecord("t1", "u1", "tool_call", "ok"))
        assert time.perf_counter() - started < 0.1
        await until(lambda: log.failed_writes == 25)
        # The writer keeps going after a failed batch.
        log.record(AuditRecord("t1", "u1", "tool_call", "ok"))
        await until(lambda: log.failed_writes == 26)
        tg.cancel_scope.cancel()
    assert log.written == 0 and log.depth() == 0


async def test_dropped_table_counts_failed_writes_then_recovers(migrated: Database) -> None:
    log = AuditLog(migrated)
    log.record(AuditRecord("t1", "u1", "tool_call", "ok"))
    assert await log.flush() == 1
    with migrated.engine.begin() as conn:
        conn.execute(text("DROP TABLE audit_event"))
    for _ in range(3):
        log.record(AuditRecord("t1", "u1", "tool_call", "ok"))
    assert await log.flush() == 0 and log.failed_writes == 3
    SQLModel.metadata.tables["audit_event"].create(migrated.engine)
    log.record(AuditRecord("t1", "u1", "tool_call", "ok"))
    assert await log.flush() == 1 and log.written == 2


# ---- queries -----------------------------------------------------------------------------------------


async def seeded(db: Database) -> tuple[AuditLog, Clock]:
    """Ten events of t1 one minute apart (two pairs sharing a timestamp) and one of t2."""
    clock = Clock()
    log = AuditLog(db, clock=clock)
    for i in range(10):
        clock.now = T0 + timedelta(minutes=i - (i % 5 == 1))  # events 1 and 6 share the previous minute
        log.record(
            AuditRecord(
                "t1",
                f"u{i % 2}",
                "tool_call" if i % 4 else "consent",
                ("ok", "error", "denied")[i % 3],
                target=f"tool{i % 3}",
                arguments={"i": i},
            )
        )
    log.record(AuditRecord("t2", "u0", "tool_call", "ok", target="tool0"))
    await log.flush()
    return log, clock


def numbers(items: list[AuditEntry]) -> list[int]:
    return [int((item["arguments"] or {})["i"]) for item in items]


async def test_query_filters(migrated: Database) -> None:
    log, _ = await seeded(migrated)
    everything, _ = await log.query("t1", limit=50)
    assert len(everything) == 10 and all(e["tenant_id"] == "t1" for e in everything)
    assert everything[0]["ts"] == (T0 + timedelta(minutes=9)).isoformat()
    assert set(numbers(everything)) == set(range(10))

    async def only(**filters: Any) -> set[int]:
        items, _ = await log.query("t1", limit=50, **filters)
        return set(numbers(items))

    assert await only(user_id="u1") == {1, 3, 5, 7, 9}
    assert await only(event="consent") == {0, 4, 8}
    assert await only(outcome="denied") == {2, 5, 8}
    assert await only(target="tool1") == {1, 4, 7}
    assert await only(since=T0 + timedelta(minutes=7)) == {7, 8, 9}, "since is inclusive"
    assert await only(until=T0 + timedelta(minutes=2)) == {0, 1}, "until is exclusive"
    # Bounds with another offset mean the same instant (SQLite and MySQL store no offset).
    plus_two = timezone(timedelta(hours=2))
    assert await only(since=(T0 + timedelta(minutes=8)).astimezone(plus_two)) == {8, 9}
    assert await only(user_id="u0", outcome="ok", event="tool_call") == {6}
    assert await only(user_id="nobody") == set()
    other, _ = await log.query("t2", limit=50)
    assert [e["target"] for e in other] == ["tool0"]


async def test_keyset_pagination_newest_first(migrated: Database) -> None:
    log, _ = await seeded(migrated)
    everything, _ = await log.query("t1", limit=50)
    pages: list[list[AuditEntry]] = []
    after = None
    while True:
        items, after = await log.query("t1", limit=3, after=after)
        pages.append(items)
        if after is None:
            break
    assert [len(p) for p in pages] == [3, 3, 3, 1]
    flat = [e["id"] for p in pages for e in p]
    assert flat == [e["id"] for e in everything] and len(set(flat)) == 10, "every event once, in order"
    stamps = [e["ts"] for e in everything]
    assert stamps == sorted(stamps, reverse=True)


async def test_prune_and_retention(migrated: Database) -> None:
    log, clock = await seeded(migrated)
    log.prune_chunk = 2  # several transactions per prune
    assert await log.prune(T0 + timedelta(minutes=3)) == 3  # events 0 and 1 (minute 0) and 2
    left, _ = await log.query("t1", limit=50)
    assert set(numbers(left)) == set(range(3, 10))
    clock.now = T0 + timedelta(minutes=9, seconds=30)
    assert await log.prune_expired(retention_s=60) == 6  # before minute 8:30: events 3 to 8
    assert numbers((await log.query("t1", limit=50))[0]) == [9]
    assert len((await log.query("t2", limit=50))[0]) == 1, "t2's event is at minute 9"
    assert await log.prune(T0 + timedelta(days=1)) == 2, "a prune takes every tenant's events"


async def test_pruner_loop_applies_retention(sqlite_db: Database) -> None:
    log, clock = await seeded(sqlite_db)
    clock.now = T0 + timedelta(days=30)
    async with anyio.create_task_group() as tg:
        tg.start_soon(log.run_pruner, 24 * 3600.0, 3600.0)
        with anyio.fail_after(10):
            while True:
                if not (await log.query("t1", limit=1))[0]:
                    break
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert (await log.query("t2", limit=1))[0] == []


# ---- the routes --------------------------------------------------------------------------------------


async def api_seed(h: AppHarness) -> None:
    """tool0..tool2 in t1 (users u1, u2, u1), tool3 in t2 (u1); one second apart, an hour ago."""
    log = h.parts.audit
    base = datetime.now(UTC) - timedelta(hours=1)
    for i, (tenant, user) in enumerate([("t1", "u1"), ("t1", "u2"), ("t1", "u1"), ("t2", "u1")]):
        ts = base + timedelta(seconds=i)
        log.record(AuditRecord(tenant, user, "tool_call", "ok", target=f"tool{i}", request_id=f"r{i}", ts=ts))
    await log.flush()


async def test_tenant_audit_route(harness: AppHarness, token: TokenFactory) -> None:
    await api_seed(harness)
    c = harness.client
    admin = auth_headers(token("admin", "t1", ("tenant_admin",)))
    resp = await c.get(AUDIT, headers=admin)
    assert resp.status_code == 200
    data = resp.json()["data"]
    assert [i["target"] for i in data["items"]] == ["tool2", "tool1", "tool0"] and data["next_cursor"] is None
    first = (await c.get(AUDIT, params={"limit": 2}, headers=admin)).json()["data"]
    assert len(first["items"]) == 2 and first["next_cursor"]
    rest = await c.get(AUDIT, params={"limit": 2, "cursor": first["next_cursor"]}, headers=admin)
    assert [i["target"] for i in rest.json()["data"]["items"]] == ["tool0"]
    filtered = await c.get(AUDIT, params={"user_id": "u2", "target": "tool1"}, headers=admin)
    assert [i["request_id"] for i in filtered.json()["data"]["items"]] == ["r1"]
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert (await c.get(AUDIT, params={"since": future}, headers=admin)).json()["data"]["items"] == []
    assert len((await c.get(AUDIT, params={"until": future}, headers=admin)).json()["data"]["items"]) == 3
    for role in ("tenant_user", "tenant_viewer"):
        denied = await c.get(AUDIT, headers=auth_headers(token("u1", "t1", (role,))))
        assert denied.status_code == 403 and denied.json()["error"]["code"] == "SCAILINK_FORBIDDEN"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"since": "yesterday"}, "since"),
        ({"until": "2026-01-01T00:00:00"}, "until"),  # no offset
        ({"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}, "until"),
        ({"outcome": "maybe"}, "outcome"),
        ({"event": ""}, "event"),
        ({"target": "x" * 1025}, "target"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": encode_cursor(("not-a-time", "id"))}, "cursor"),
        ({"limit": "0"}, "limit"),
    ],
)
async def test_invalid_filters(
    harness: AppHarness, token: TokenFactory, params: dict[str, str], field: str
) -> None:
    resp = await harness.client.get(AUDIT, params=params, headers=auth_headers(token()))
    assert resp.status_code == 422, resp.text
    error = resp.json()["error"]
    assert error["code"] == "SCAILINK_VALIDATION_ERROR" and error["details"][0]["field"] == field


async def test_user_audit_route(harness: AppHarness, token: TokenFactory) -> None:
    await api_seed(harness)
    c = harness.client
    user = auth_headers(token("u1", "t1", ("tenant_user",)))
    mine = await c.get("/v1/modules/scailink/users/u1/audit", headers=user)
    assert mine.status_code == 200
    assert [i["target"] for i in mine.json()["data"]["items"]] == ["tool2", "tool0"], "own tenant only"
    # the path wins over a user_id filter
    also_mine = await c.get("/v1/modules/scailink/users/u1/audit", params={"user_id": "u2"}, headers=user)
    assert [i["target"] for i in also_mine.json()["data"]["items"]] == ["tool2", "tool0"]
    assert (await c.get("/v1/modules/scailink/users/u2/audit", headers=user)).status_code == 403
    auditor = auth_headers(token("boss", "t1", ("tenant_admin",)))
    theirs = await c.get("/v1/modules/scailink/users/u2/audit", headers=auditor)
    assert [i["target"] for i in theirs.json()["data"]["items"]] == ["tool1"]
    # The same user id in t2 sees t2's events only.
    other = await c.get("/v1/modules/scailink/users/u1/audit", headers=auth_headers(token("u1", "t2", ())))
    assert [i["target"] for i in other.json()["data"]["items"]] == ["tool3"]
    # A user of another tenant is simply invisible: no events, not an error.
    t2_admin = auth_headers(token("a2", "t2", ("tenant_admin",)))
    invisible = await c.get("/v1/modules/scailink/users/u2/audit", headers=t2_admin)
    assert invisible.status_code == 200 and invisible.json()["data"]["items"] == []


# ---- end to end: real calls through a live ScaiLink --------------------------------------------------


async def audit_items(live: LiveApp, tok: str, query: str = "") -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=live.base_url) as c:
        await live.parts.audit.flush()
        resp = await c.get(f"{AUDIT}{query}", headers=auth_headers(tok))
        assert resp.status_code == 200, resp.text
        items: list[dict[str, Any]] = resp.json()["data"]["items"]
        return items


async def test_calls_are_audited(live: LiveApp, token: TokenFactory) -> None:
    """One event per call (MCP and REST) with redacted arguments, routing failures, registry events."""
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
        assert (await c.get(AUDIT, headers=auth_headers(user))).status_code == 403
        bad = await c.get(f"{AUDIT}?since=yesterday", headers=auth_headers(admin))
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


# ---- the migration -----------------------------------------------------------------------------------


def test_migration_from_empty_and_from_0001_and_back(database_url: str) -> None:
    cfg = alembic_config(database_url)
    db = Database(database_url)
    command.upgrade(cfg, "0001")
    assert "audit_event" not in db.table_names() and "custom_role" not in db.table_names()
    command.upgrade(cfg, "0002")
    assert {"audit_event", "custom_role"} <= set(db.table_names())
    indexes = {ix["name"]: ix["column_names"] for ix in inspect(db.engine).get_indexes("audit_event")}
    assert indexes["ix_audit_tenant_ts"] == ["tenant_id", "ts"]
    command.downgrade(cfg, "0001")
    assert "audit_event" not in db.table_names() and "custom_role" not in db.table_names()
    command.upgrade(cfg, "head")
    assert db.is_migrated()
    with db.engine.connect() as conn:  # at head: later revisions (0003 OAuth) add tables of their own
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == [], f"models and migrations disagree: {diff}"
    db.dispose()
