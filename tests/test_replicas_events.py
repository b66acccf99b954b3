"""Catalog events across replicas (issue 13 item 4, SPEC section 10): two ScaiLink apps, each a real
uvicorn on 127.0.0.1, sharing one database (a SQLite file, or PostgreSQL) and the real Redis on
127.0.0.1:6379 (a channel prefix of their own per test), with a real upstream MCP server and real SDK
MCP clients. A change made through replica A must be seen by replica B within 1 s.

Skipped only when no Redis answers on 127.0.0.1:6379 and SCAILINK_TEST_REQUIRE_REDIS is unset
(`.ci/run` starts Redis and sets it)."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import anyio
import httpx
import mcp_types as types
import pytest
import redis
from mcp.client.session import ClientSession, IncomingMessage
from mcp.shared.exceptions import MCPError

from bench.cluster import REDIS_HOST, REDIS_PORT
from bench.cluster import redis_reason as _redis_reason
from scailink_mcp.app import build_components
from scailink_mcp.config import Settings
from scailink_mcp.events import EventBus, ServerEvent
from scailink_mcp.redis_bus import RedisEventBus, decode, encode
from tests.conftest import LiveApp, TokenFactory, auth_headers
from tests.test_mcp_gateway import list_all_tools, mcp_client
from tests.upstream import UpstreamServer

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(20)]

REG = "/v1/modules/scailink/remote-servers"
AUDIT = "/v1/modules/scailink/audit"
PROPAGATION_S = 1.0  # SPEC section 10: every replica sees a change within 1 s


@pytest.fixture(scope="module")
def redis_reason() -> str | None:
    reason = _redis_reason()
    if reason and os.environ.get("SCAILINK_TEST_REQUIRE_REDIS"):
        pytest.fail(f"{reason}, but SCAILINK_TEST_REQUIRE_REDIS is set (CI)")
    return reason


@pytest.fixture
def redis_settings(
    redis_reason: str | None, settings_factory: Callable[..., Settings]
) -> Callable[..., Settings]:
    """Settings on the real Redis, with a channel prefix of this test's own."""
    if redis_reason:
        pytest.skip(redis_reason)
    prefix = f"scailink-test-{uuid.uuid4().hex[:12]}"

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {"redis_url": f"redis://{REDIS_HOST}:{REDIS_PORT}/0", "redis_prefix": prefix}
        return settings_factory(**(values | overrides))

    return make


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_db(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue({"sqlite": "sqlite_url", "postgresql": "postgres_url"}[request.param])
    return url


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer() as server:
        yield server


def bus(live: LiveApp) -> RedisEventBus:
    events = live.parts.events
    assert isinstance(events, RedisEventBus)
    return events


async def until(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    """Poll `predicate` (state of another thread) until it holds, failing after `timeout` seconds."""
    with anyio.fail_after(timeout):
        while not predicate():  # noqa: ASYNC110  (a deadline-bounded poll of another thread's state)
            await anyio.sleep(0.01)


async def eventually(check: Callable[[], Any], timeout: float = PROPAGATION_S) -> None:
    """Re-run the async `check` until it returns true, failing after `timeout` seconds."""
    with anyio.fail_after(timeout):
        while not await check():  # noqa: ASYNC110  (a deadline-bounded poll of another replica)
            await anyio.sleep(0.01)


@asynccontextmanager
async def two_replicas(settings: Settings) -> AsyncIterator[tuple[LiveApp, LiveApp]]:
    """Replicas A and B on one database and one Redis, both subscribed."""
    with LiveApp(settings) as a, LiveApp(settings) as b:
        await until(lambda: bus(a).ready and bus(b).ready)
        yield a, b


async def register(live: LiveApp, tok: str, **body: Any) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as c:
        resp = await c.post(REG, json=body, headers=auth_headers(tok))
    assert resp.status_code == 201, resp.text
    data: dict[str, Any] = resp.json()["data"]
    return data


async def names(session: ClientSession) -> set[str]:
    return {t.name for t in await list_all_tools(session)}


async def rest_invoke(live: LiveApp, tok: str, tool: str, arguments: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as c:
        return await c.post(
            f"/v1/modules/scailink/users/u1/tools/{tool}/invoke",
            json={"arguments": arguments},
            headers=auth_headers(tok),
        )


def text_of(result: types.CallToolResult) -> str:
    content = result.content[0]
    assert isinstance(content, types.TextContent)
    return content.text


async def test_registration_on_a_is_listed_callable_and_notified_on_b(
    shared_db: str,
    redis_settings: Callable[..., Settings],
    token: TokenFactory,
    upstream: UpstreamServer,
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    admin = token("admin", "t1", ("tenant_admin",))
    changed: list[float] = []

    async def on_message(message: IncomingMessage) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            changed.append(time.monotonic())

    async with (
        two_replicas(redis_settings(database_url=shared_db)) as (a, b),
        mcp_client(b.mcp_url, tok, on_message=on_message) as on_b,
    ):
        assert await names(on_b) == set()
        server = await register(a, tok, name="across", endpoint_url=upstream.url)
        registered = time.monotonic()
        echo = f"remote.u1.{server['slug']}.echo"

        # Listed on B within 1 s, and B's downstream session was told (list_changed) within 1 s.
        await eventually(lambda: _has(on_b, echo))
        await until(lambda: changed, timeout=PROPAGATION_S)
        assert changed[0] - registered < PROPAGATION_S

        # Callable through B: MCP and REST invoke (B's own pool opens its own upstream session).
        result = await on_b.call_tool(echo, {"text": "via B"})
        assert not result.is_error and text_of(result) == "via B"
        rest = await rest_invoke(b, tok, echo, {"text": "rest via B"})
        assert rest.status_code == 200, rest.text
        assert b.parts.pool.stats.misses == 1 and a.parts.pool.stats.misses == 0

        # Each replica handled the event once: A dispatched its own locally and ignored its echo from
        # Redis; B heard it from Redis. The registration is audited once, by A.
        assert bus(a).received == 0 and bus(b).received >= 2  # created, then capabilities_changed
        assert bus(a).published >= 2 and bus(a).publish_failures == 0
        await a.parts.audit.flush()
        await b.parts.audit.flush()
        async with httpx.AsyncClient(base_url=b.base_url) as c:
            resp = await c.get(f"{AUDIT}?event=registry.server_created", headers=auth_headers(admin))
        assert resp.status_code == 200, resp.text
        created = [i for i in resp.json()["data"]["items"] if i["target"] == server["id"]]
        assert len(created) == 1 and created[0]["user_id"] == "u1"


async def _has(session: ClientSession, tool: str) -> bool:
    return tool in await names(session)


async def _lacks(session: ClientSession, tool: str) -> bool:
    return tool not in await names(session)


async def test_rotation_and_deletion_on_a_apply_on_b(
    redis_settings: Callable[..., Settings], token: TokenFactory, upstream: UpstreamServer
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    upstream.required_headers = {"x-api-key": "old"}
    async with two_replicas(redis_settings()) as (a, b):
        server = await register(
            a,
            tok,
            name="rot",
            endpoint_url=upstream.url,
            auth_type="api_key_header",
            credentials={"x-api-key": "old"},
        )
        echo = f"remote.u1.{server['slug']}.echo"
        async with mcp_client(b.mcp_url, tok) as on_b:
            await eventually(lambda: _has(on_b, echo))
            assert not (await on_b.call_tool(echo, {"text": "1"})).is_error
            assert not (await on_b.call_tool(echo, {"text": "2"})).is_error
            assert b.parts.pool.stats.misses == 1 and b.parts.pool.size() == 1  # one warm session

            # Rotation through A: B's pooled session (with the old key) is closed within 1 s ...
            upstream.required_headers = {"x-api-key": "new"}
            async with httpx.AsyncClient(base_url=a.base_url) as c:
                resp = await c.put(
                    f"{REG}/{server['id']}/credentials/x-api-key",
                    json={"value": "new"},
                    headers=auth_headers(tok),
                )
            assert resp.status_code == 200, resp.text
            await until(lambda: b.parts.pool.size() == 0, timeout=PROPAGATION_S)
            # ... so B's next call handshakes again, with the new key.
            result = await on_b.call_tool(echo, {"text": "3"})
            assert not result.is_error, result
            assert b.parts.pool.stats.misses == 2
            assert upstream.last_headers.get("x-api-key") == "new"

            # Deletion through A: B answers unknown tool within 1 s, on MCP and REST invoke.
            async with httpx.AsyncClient(base_url=a.base_url) as c:
                deleted = await c.delete(f"{REG}/{server['id']}", headers=auth_headers(tok))
            assert deleted.status_code == 204
            await eventually(lambda: _lacks(on_b, echo))
            with pytest.raises(MCPError) as err:
                await on_b.call_tool(echo, {"text": "4"})
            assert err.value.error.code == -32602
            rest = await rest_invoke(b, tok, echo, {"text": "5"})
            assert rest.status_code == 404 and rest.json()["error"]["code"] == "SCAILINK_TOOL_NOT_FOUND"


async def test_status_flip_and_refresh_on_a_reach_b(
    redis_settings: Callable[..., Settings], token: TokenFactory, upstream: UpstreamServer
) -> None:
    """System events (a health check's status flip, no actor) travel too, and so does a refresh."""
    tok = token("u1", "t1", ("tenant_user",))
    async with two_replicas(redis_settings()) as (a, b):
        server = await register(a, tok, name="flip", endpoint_url=upstream.url)
        echo = f"remote.u1.{server['slug']}.echo"
        async with mcp_client(b.mcp_url, tok) as on_b:
            await eventually(lambda: _has(on_b, echo))
            upstream.stop()
            for _ in range(a.parts.settings.health_failure_threshold):
                await a.parts.health.run_once()
            await eventually(lambda: _lacks(on_b, echo))  # status `error` on A -> unlisted on B
            upstream.start()
            async with httpx.AsyncClient(base_url=a.base_url, timeout=30) as c:
                resp = await c.post(f"{REG}/{server['id']}/refresh", headers=auth_headers(tok))
            assert resp.status_code == 200, resp.text
            await eventually(lambda: _has(on_b, echo))
            assert not (await on_b.call_tool(echo, {"text": "back"})).is_error


async def test_subscriber_reconnects_and_is_not_ready_meanwhile(
    redis_settings: Callable[..., Settings], token: TokenFactory, upstream: UpstreamServer
) -> None:
    """B's subscription connection is killed in Redis: B reports not ready until it has subscribed
    again, then hears A's changes again. A malformed message on the channel is ignored."""
    tok = token("u1", "t1", ("tenant_user",))
    async with two_replicas(redis_settings()) as (a, b):
        b_bus = bus(b)
        # A reconnection slow enough to observe B's not-ready window, loaded too.
        b_bus.link = replace(b_bus.link, backoff_min_s=3.0)
        admin = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
        try:
            name = f"{b_bus.client_name_prefix}:sub:{b_bus.worker_id}"
            ids = [c["id"] for c in admin.client_list() if c.get("name") == name]
            assert len(ids) == 1, admin.client_list()
            admin.execute_command("CLIENT", "KILL", "ID", ids[0])

            async with httpx.AsyncClient(base_url=b.base_url) as c:
                await eventually(lambda: _status(c, 503), timeout=3)
                down = (await c.get("/readyz")).json()["checks"]
                assert down["redis"] == "ok" and down["redis_events"].startswith("reconnecting")
                await eventually(lambda: _status(c, 200), timeout=10)
            assert b_bus.subscriptions == 2 and b_bus.ready
            admin.publish(b_bus.channel, b"not json")  # ignored: the subscription stays up
        finally:
            admin.close()

        server = await register(a, tok, name="after", endpoint_url=upstream.url)
        async with mcp_client(b.mcp_url, tok) as on_b:
            await eventually(lambda: _has(on_b, f"remote.u1.{server['slug']}.echo"))
        assert b_bus.subscriptions == 2


async def _status(client: httpx.AsyncClient, status: int) -> bool:
    return (await client.get("/readyz")).status_code == status


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind((REDIS_HOST, 0))
        port: int = sock.getsockname()[1]
    return port


async def test_redis_unreachable_app_serves_and_is_not_ready(
    settings_factory: Callable[..., Settings], token: TokenFactory, upstream: UpstreamServer
) -> None:
    """No Redis needed for this one: a URL whose port nobody listens on."""
    tok = token("u1", "t1", ("tenant_user",))
    settings = settings_factory(redis_url=f"redis://{REDIS_HOST}:{_closed_port()}/0")
    with LiveApp(settings) as live:
        async with httpx.AsyncClient(base_url=live.base_url) as c:
            assert (await c.get("/healthz")).status_code == 200
            await eventually(lambda: _status(c, 503), timeout=5)
            checks = (await c.get("/readyz")).json()["checks"]
            assert checks["database"] == "ok"
            assert checks["redis"].startswith("unreachable")
            assert checks["redis_events"].startswith("reconnecting")
        # It still serves: a registration succeeds (its event is dispatched locally; the PUBLISH
        # failure is only logged) and the tool is callable.
        server = await register(live, tok, name="alone", endpoint_url=upstream.url)
        async with mcp_client(live.mcp_url, tok) as s:
            result = await s.call_tool(f"remote.u1.{server['slug']}.echo", {"text": "still here"})
            assert not result.is_error and text_of(result) == "still here"
        await until(lambda: bus(live).publish_failures >= 1)
        assert not bus(live).ready


def test_without_redis_url_the_bus_is_in_process(settings_factory: Callable[..., Settings]) -> None:
    parts = build_components(settings_factory())
    try:
        assert type(parts.events) is EventBus
    finally:
        parts.db.dispose()


async def test_worker_identity_is_made_at_start_up(
    redis_settings: Callable[..., Settings],
) -> None:
    """Not at construction (a forked worker would inherit it): each running worker has its own."""
    settings = redis_settings()
    idle = build_components(settings)
    idle.db.dispose()
    assert isinstance(idle.events, RedisEventBus) and idle.events.worker_id == ""
    async with two_replicas(settings) as (a, b):
        ids = {bus(a).worker_id, bus(b).worker_id}
        assert len(ids) == 2
        for worker_id in ids:
            host, pid, rand = worker_id.split(":")
            assert host == socket.gethostname() and pid == str(os.getpid()) and len(rand) == 8


def test_wire_format_round_trip_and_rejects() -> None:
    from scailink_mcp.events import ServerEventKind

    event = ServerEvent(ServerEventKind.CREDENTIALS_CHANGED, "s1", "t1", "u1", True, "u1")
    assert decode(encode(event, "h:1:ab")) == ("h:1:ab", event)
    for bad in (b"not json", b"[]", b'{"v": 2}', b'{"v": 1, "origin": "x", "type": "desktop", "event": {}}'):
        with pytest.raises(ValueError):
            decode(bad)
    wrong_kind = encode(event, "x").replace("credentials_changed", "nope")
    with pytest.raises(ValueError):
        decode(wrong_kind)


async def test_custom_role_change_on_a_applies_on_b_within_1s(
    redis_settings: Callable[..., Settings], token: TokenFactory
) -> None:
    """A custom role put through A grants its permissions to requests on B within 1 s (RolesChanged
    over Redis), long before B's 30 s reload; deleting it through B revokes it on A."""
    admin = token("admin", "t1", ("tenant_admin",))
    auditor = token("carol", "t1", ("auditors",))  # a group named like the role grants it
    async with two_replicas(redis_settings()) as (a, b):

        async def audit_status(live: LiveApp) -> int:
            async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as c:
                return (await c.get(AUDIT, headers=auth_headers(auditor))).status_code

        assert await audit_status(b) == 403
        async with httpx.AsyncClient(base_url=a.base_url, timeout=30) as c:
            resp = await c.put(
                "/v1/iam/roles/auditors",
                json={"permissions": ["scailink:audit"], "description": "read the audit log"},
                headers=auth_headers(admin),
            )
        assert resp.status_code == 200, resp.text
        await eventually(lambda: _status_is(audit_status(b), 200))
        async with httpx.AsyncClient(base_url=b.base_url, timeout=30) as c:
            resp = await c.delete("/v1/iam/roles/auditors", headers=auth_headers(admin))
        assert resp.status_code == 204, resp.text
        await eventually(lambda: _status_is(audit_status(a), 403))


async def _status_is(status: Any, expected: int) -> bool:
    return bool(await status == expected)
