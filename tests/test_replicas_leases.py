"""Work done once per cluster (issue 13 item 6, SPEC section 10): leases in the real Redis on
127.0.0.1:6379 (a key prefix of their own per test). Three replicas on one database (a SQLite file, or
PostgreSQL) check a server that went down once and flip its status once; re-discovery and audit
pruning run once per interval; the single process's lease always grants; Redis out of reach skips the
work (logged once) and never ends a loop; `scailink kek rotate` takes a cluster lock.

Skipped only when no Redis answers and SCAILINK_TEST_REQUIRE_REDIS is unset (see test_replicas_events).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import timedelta
from pathlib import Path

import anyio
import pytest
from sqlalchemy import text
from sqlmodel import select

from scailink_mcp.audit import PRUNE_LEASE, AuditLog, AuditRecord
from scailink_mcp.config import Settings
from scailink_mcp.crypto import Keyring, generate_kek, rotate_credentials, seal
from scailink_mcp.db import Database
from scailink_mcp.events import ServerEvent, ServerEventKind
from scailink_mcp.leases import Lease, RedisLease
from scailink_mcp.models import Credential, RemoteServer, utcnow
from scailink_mcp.redis_bus import RedisEventBus, from_peer
from scailink_mcp.remote.credentials import decrypt_target, store
from scailink_mcp.remote.health import Rediscovery
from tests.conftest import AppHarness, TokenFactory, auth_headers, start_app
from tests.test_replicas_events import (  # noqa: F401  (fixtures)
    REDIS_HOST,
    REDIS_PORT,
    _closed_port,
    redis_reason,
    redis_settings,
    shared_db,
    until,
    upstream,
)
from tests.upstream import UpstreamServer

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

REG = "/v1/modules/scailink/remote-servers"
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/0"


@pytest.fixture
def prefix(redis_reason: str | None) -> str:  # noqa: F811
    if redis_reason:
        pytest.skip(redis_reason)
    return f"scailink-test-{uuid.uuid4().hex[:12]}"


@asynccontextmanager
async def leases(prefix: str, count: int) -> AsyncIterator[list[RedisLease]]:
    """`count` lease holders on their own connections, each `run()` as a lifespan would."""
    holders = [RedisLease(REDIS_URL, prefix=prefix) for _ in range(count)]
    async with anyio.create_task_group() as tg:
        for holder in holders:
            tg.start_soon(holder.run)
        yield holders
        tg.cancel_scope.cancel()


# ---- the lease itself ----------------------------------------------------------------------------------


async def test_the_single_process_lease_always_grants() -> None:
    lease = Lease()
    assert [await lease.acquire("health:s1", 60) for _ in range(3)] == [True] * 3
    await lease.release("health:s1")
    assert await lease.acquire("health:s1", 0.001)
    await lease.run()  # nothing to own: returns at once
    assert not lease.unavailable


async def test_one_holder_renews_releases_by_compare_and_delete_and_expires(prefix: str) -> None:
    async with leases(prefix, 2) as (a, b):
        assert await a.acquire("job", 30)
        assert not await b.acquire("job", 30), "held by a"
        assert await a.acquire("job", 30), "the holder renews its own lease"
        assert await b.holder("job") == a.owner and a.owner != b.owner
        await b.release("job")  # not b's: compare-and-delete leaves it
        assert await a.holder("job") == a.owner
        await a.release("job")
        assert await b.acquire("job", 30), "released: free at once"

        assert await a.acquire("short", 0.05)
        assert not await b.acquire("short", 30)
        with anyio.fail_after(5):  # the TTL is Redis' to count: poll until it has run out
            while not await b.acquire("short", 30):  # noqa: ASYNC110
                await anyio.sleep(0.01)
        assert await a.holder("short") == b.owner
        await a.release("short")  # a's lease expired: it must not delete its successor's
        assert await a.holder("short") == b.owner
        assert a.granted == 3 and b.refused >= 2 and a.failures == b.failures == 0


async def test_run_hands_held_leases_over_on_shutdown(prefix: str) -> None:
    async with leases(prefix, 1) as (other,):
        async with leases(prefix, 1) as (holder,):
            assert await holder.acquire("health:s1", 600) and await holder.acquire("audit-prune", 600)
            assert not await other.acquire("health:s1", 600)
        # holder's run() was cancelled (a replica shutting down): both are free now, not in 10 min
        assert await other.holder("health:s1") is None and await other.holder("audit-prune") is None
        assert await other.acquire("health:s1", 600)


async def test_redis_unreachable_grants_nothing_logs_once_and_recovers_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="scailink_mcp.leases")
    lease = RedisLease(f"redis://{REDIS_HOST}:{_closed_port()}/0", timeout_s=0.5)
    assert [await lease.acquire(f"health:s{i}", 60) for i in range(3)] == [False] * 3
    assert lease.unavailable and lease.failures == 3 and lease.granted == 0
    assert len([r for r in caplog.records if r.name == "scailink_mcp.leases"]) == 1


# ---- health checks on three replicas -------------------------------------------------------------------


@asynccontextmanager
async def replicas(settings: Settings, count: int) -> AsyncIterator[list[AppHarness]]:
    """`count` apps (lifespans running, in process) on one database and one Redis, all subscribed."""
    async with AsyncExitStack() as stack:
        apps = [await stack.enter_async_context(start_app(settings)) for _ in range(count)]
        await until(lambda: all(_bus(h).ready for h in apps))
        yield apps


def _bus(h: AppHarness) -> RedisEventBus:
    assert isinstance(h.parts.events, RedisEventBus)
    return h.parts.events


def status_changes(apps: list[AppHarness]) -> list[list[bool]]:
    """Per replica, the STATUS_CHANGED events its subscribers saw (True: heard from a peer)."""
    seen: list[list[bool]] = [[] for _ in apps]
    for i, h in enumerate(apps):

        def record(event: ServerEvent, i: int = i) -> None:
            if event.kind is ServerEventKind.STATUS_CHANGED:
                seen[i].append(from_peer())

        h.parts.events.subscribe(record)
    return seen


async def register(h: AppHarness, tok: str, url: str) -> str:
    resp = await h.client.post(REG, json={"name": "watched", "endpoint_url": url}, headers=auth_headers(tok))
    assert resp.status_code == 201, resp.text
    server_id: str = resp.json()["data"]["id"]
    return server_id


def server_row(h: AppHarness, server_id: str) -> RemoteServer:
    with h.parts.db.session() as session:
        row = session.get(RemoteServer, server_id)
        assert row is not None
        return row


async def round_on_all(apps: list[AppHarness]) -> list[dict[str, str | None]]:
    results: list[dict[str, str | None]] = [{} for _ in apps]

    async def one(i: int) -> None:
        results[i] = await apps[i].parts.health.run_once()

    async with anyio.create_task_group() as tg:
        for i in range(len(apps)):
            tg.start_soon(one, i)
    return results


async def test_three_replicas_check_a_server_once_and_flip_its_status_once(
    shared_db: str,  # noqa: F811
    redis_settings: Callable[..., Settings],  # noqa: F811
    token: TokenFactory,
    upstream: UpstreamServer,  # noqa: F811
) -> None:
    settings = redis_settings(database_url=shared_db, health_failure_threshold=1)
    tok = token("u1", "t1", ("tenant_user",))
    async with replicas(settings, 3) as apps:
        server_id = await register(apps[0], tok, upstream.url)
        seen = status_changes(apps)
        upstream.stop()

        # One round on all three at once: one replica checks (one failure counted), the others skip.
        results = await round_on_all(apps)
        checked = [i for i, r in enumerate(results) if server_id in r]
        assert len(checked) == 1, results
        assert results[checked[0]][server_id] != "ok"
        row = server_row(apps[0], server_id)
        assert row.status == "error" and row.consecutive_failures == 1
        # The flip is published once, by the replica that checked; it reaches the two others.
        assert [peer for s in seen for peer in s].count(False) == 1
        assert seen[checked[0]] == [False]
        with anyio.fail_after(1.0):
            while not all(seen):  # noqa: ASYNC110  (a deadline-bounded wait for Redis delivery)
                await anyio.sleep(0.01)
        assert seen == [[False] if i == checked[0] else [True] for i in range(3)]

        # The next round: the same replica (it renewed its lease) checks, once; no second flip.
        again = await round_on_all(apps)
        assert [i for i, r in enumerate(again) if server_id in r] == checked
        assert server_row(apps[0], server_id).consecutive_failures == 2
        assert sum(len(s) for s in seen) == 3

        # The holder gives its lease up (what its `run()` does when it shuts down): one of the two
        # others takes the server over in the next round, and only one.
        holder = apps[checked[0]]
        assert isinstance(holder.parts.lease, RedisLease)
        await holder.parts.lease.release(f"health:{server_id}")
        rest = [h for i, h in enumerate(apps) if i != checked[0]]
        after = await round_on_all(rest)
        assert len([r for r in after if server_id in r]) == 1, after
        assert server_row(apps[0], server_id).consecutive_failures == 3


async def test_redis_down_skips_the_round_without_ending_the_loop(
    settings_factory: Callable[..., Settings],
    token: TokenFactory,
    upstream: UpstreamServer,  # noqa: F811
) -> None:
    """The lease store is unreachable: no check runs (nothing is recorded), run_once returns."""
    settings = settings_factory(redis_url=f"redis://{REDIS_HOST}:{_closed_port()}/0")
    tok = token("u1", "t1", ("tenant_user",))
    async with start_app(settings) as h:
        server_id = await register(h, tok, upstream.url)
        before = server_row(h, server_id).last_health_at
        assert await h.parts.health.run_once() == {}
        assert server_row(h, server_id).last_health_at == before
        assert h.parts.lease.unavailable


# ---- re-discovery and audit pruning --------------------------------------------------------------------


async def test_periodic_rediscovery_runs_once_across_three_replicas(
    redis_settings: Callable[..., Settings],  # noqa: F811
    token: TokenFactory,
    upstream: UpstreamServer,  # noqa: F811
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    async with replicas(redis_settings(), 3) as apps:
        server_id = await register(apps[0], tok, upstream.url)
        later = [
            Rediscovery(
                h.parts.settings,
                h.parts.registry,
                clock=lambda: utcnow() + timedelta(minutes=16),  # the server is due
                lease=h.parts.lease,
            )
            for h in apps
        ]
        ran: list[list[str]] = [[] for _ in later]

        async def one(i: int) -> None:
            ran[i] = await later[i].run_once()

        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(one, i)
        assert sorted(ran) == [[], [], [server_id]], ran


async def test_audit_pruning_runs_once_per_interval_across_two_replicas(prefix: str, sqlite_url: str) -> None:
    db = Database(sqlite_url)
    db.migrate()
    async with leases(prefix, 2) as (lease_a, lease_b):
        a, b = AuditLog(db, lease=lease_a), AuditLog(db, lease=lease_b)
        old = utcnow() - timedelta(days=10)
        for i in range(5):
            a.record(AuditRecord("t1", "u1", "tool_call", "ok", target=f"tool{i}", ts=old))
        await a.flush()

        deleted: list[int | None] = [None, None]

        async def one(i: int, log: AuditLog) -> None:
            deleted[i] = await log.prune_round(retention_s=24 * 3600.0, interval_s=3600.0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, 0, a)
            tg.start_soon(one, 1, b)
        assert sorted(deleted, key=lambda d: d is None) == [5, None], deleted
        holder, other = (a, b) if deleted[0] == 5 else (b, a)
        # Within the interval the other replica skips; the holder keeps its lease round after round.
        assert await other.prune_round(24 * 3600.0, 3600.0) is None
        assert await holder.prune_round(24 * 3600.0, 3600.0) == 0
        await holder.lease.release(PRUNE_LEASE)
        assert await other.prune_round(24 * 3600.0, 3600.0) == 0, "released: the other takes over"
    db.dispose()


async def test_in_process_audit_log_always_prunes(sqlite_url: str) -> None:
    db = Database(sqlite_url)
    db.migrate()
    a, b = AuditLog(db), AuditLog(db)  # the single process: the lease always grants
    assert await a.prune_round(60.0, 3600.0) == 0 and await b.prune_round(60.0, 3600.0) == 0
    db.dispose()


# ---- scailink kek rotate -------------------------------------------------------------------------------

SCAILINK = [sys.executable, "-m", "scailink_mcp.cli"]


def _seed_credential(db: Database, kek: str) -> str:
    with db.session() as session:
        server = RemoteServer(
            tenant_id="t1", owner_user_id="u1", owner_scope="user:u1", name="s", slug="s-abcdef",
            endpoint_url="https://example.com/mcp", auth_type="bearer",
        )  # fmt: skip
        session.add(server)
        session.flush()
        field = "authorization"
        sealed = seal(Keyring(kek), tenant_id="t1", server_id=server.id, field=field, plaintext="v1")
        session.add(Credential(server_id=server.id, tenant_id="t1", field=field, **sealed.__dict__))
        session.commit()
        return server.id


def _decrypted(db: Database, keyring: Keyring, server_id: str) -> dict[str, str]:
    with db.session() as session:
        server = session.get(RemoteServer, server_id)
        assert server is not None
        target = decrypt_target(keyring, session, server)
    return target.headers


def _kek_ids(db: Database) -> set[str]:
    with db.session() as session:
        return {row.kek_id for row in session.exec(select(Credential)).all()}


async def test_kek_rotate_takes_the_cluster_lock(prefix: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'rot.db'}"
    db = Database(url)
    db.migrate()
    old, new = generate_kek(), generate_kek()
    _seed_credential(db, old)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCAILINK_")}
    env |= {
        "SCAILINK_DATABASE_URL": url,
        "SCAILINK_ENCRYPTION_LOCAL_KEK": new,
        "SCAILINK_ENCRYPTION_PREVIOUS_KEKS": old,
        "SCAILINK_REDIS_URL": REDIS_URL,
        "SCAILINK_REDIS_PREFIX": prefix,
    }

    def rotate(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*SCAILINK, "kek", "rotate"], env=env | extra, capture_output=True, text=True, timeout=60
        )

    async with leases(prefix, 1) as (operator,):
        assert await operator.acquire("kek-rotate", 60)  # another rotation is running
        busy = await anyio.to_thread.run_sync(rotate)
        assert busy.returncode == 3 and "another `kek rotate` is running" in busy.stderr, busy.stderr
        assert operator.owner in busy.stderr
        assert _kek_ids(db) == {Keyring(old).primary_id}, "nothing was rewritten"
        await operator.release("kek-rotate")

        done = await anyio.to_thread.run_sync(rotate)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == {"rewrapped": 1, "kek_id": Keyring(new).primary_id}
        assert _kek_ids(db) == {Keyring(new).primary_id}
        assert await operator.holder("kek-rotate") is None, "released when done"

    down = rotate(SCAILINK_REDIS_URL=f"redis://{REDIS_HOST}:{_closed_port()}/0")
    assert down.returncode == 3 and "Redis is unreachable" in down.stderr, down.stderr
    db.dispose()


def test_rotation_never_overwrites_a_credential_set_meanwhile(postgres_url: str) -> None:
    """The race of a rotation with a replica still on the old primary KEK setting that credential:
    the replica's UPDATE (a new DEK, still under the old KEK) holds the row when the rotation, which
    read the row before, comes to rewrite it. PostgreSQL re-checks the rotation's WHERE against the
    committed row: comparing the KEK alone matched and wrapped the old DEK over the new ciphertext
    (a credential nobody could open again); comparing the DEK too leaves the row for the next batch."""
    db, replica = Database(postgres_url), Database(postgres_url)
    db.migrate()
    old, new = generate_kek(), generate_kek()
    server_id = _seed_credential(db, old)
    rotating = Keyring(new, [old])
    outcome: list[int] = []
    try:
        with replica.session() as session:  # the lagging replica, mid-request
            server = session.get(RemoteServer, server_id)
            assert server is not None
            store(session, Keyring(old), server, "authorization", "v2")
            session.flush()  # the row is locked until this transaction ends

            worker = threading.Thread(target=lambda: outcome.append(rotate_credentials(db, rotating)))
            worker.start()
            deadline = time.monotonic() + 10
            while not _waits_on_a_lock(db):  # the rotation read v1 and now waits for the row
                assert time.monotonic() < deadline, "the rotation never reached the locked row"
                time.sleep(0.01)
            session.commit()
        worker.join(10)
        assert outcome == [1], "the row set meanwhile was re-wrapped by the next batch, once"
        assert _decrypted(db, Keyring(new), server_id) == {"Authorization": "Bearer v2"}
    finally:
        db.dispose()
        replica.dispose()


def _waits_on_a_lock(db: Database) -> bool:
    with db.engine.connect() as conn:
        query = text(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database() AND query ILIKE 'UPDATE credential%'"
        )
        return bool(conn.execute(query).scalar())
