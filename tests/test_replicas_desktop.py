"""Desktop sessions across replicas (issue 13 items 2-3, SPEC section 10): three ScaiLink apps, each a
real uvicorn on 127.0.0.1, on one SQLite file and the real Redis (a prefix of their own per test), with
real WebSocket devices and real SDK MCP clients. A device connected to B is listed, called, asked for
consent, terminated, replaced (4010), resumed and counted against the per-user cap through A and C.

Skipped only when no Redis answers on 127.0.0.1:6379 and SCAILINK_TEST_REQUIRE_REDIS is unset."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import ExitStack, asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from scailink_mcp.config import Settings
from tests.conftest import LiveApp, TokenFactory, auth_headers
from tests.test_desktop_bridge import closed_with, device, init_frame, serve_tools, ws_url
from tests.test_mcp_gateway import list_all_tools, mcp_client
from tests.test_replicas_events import PROPAGATION_S, eventually, redis_reason, redis_settings, until

__all__ = ["redis_reason", "redis_settings"]  # fixtures used here, defined with the events tests

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

API = "/v1/modules/scailink"


@asynccontextmanager
async def replicas(settings: Settings, count: int = 3) -> AsyncIterator[list[LiveApp]]:
    """`count` replicas on one database and one Redis, each subscribed to the desktop directory."""
    with ExitStack() as stack:
        lives = [stack.enter_context(LiveApp(settings)) for _ in range(count)]
        await until(lambda: all(_cluster_ready(live) for live in lives))
        yield lives


def _cluster_ready(live: LiveApp) -> bool:
    cluster = live.parts.desktop.cluster
    return cluster is not None and cluster.ready


async def get(live: LiveApp, tok: str, path: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as c:
        return await c.get(API + path, headers=auth_headers(tok))


async def invoke(live: LiveApp, tok: str, tool: str, arguments: dict[str, Any]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as c:
        return await c.post(
            f"{API}/users/u1/tools/{tool}/invoke", json={"arguments": arguments}, headers=auth_headers(tok)
        )


async def sessions_seen(live: LiveApp, tok: str) -> list[dict[str, Any]]:
    resp = await get(live, tok, "/sessions")
    assert resp.status_code == 200, resp.text
    items: list[dict[str, Any]] = resp.json()["data"]["items"]
    return items


def _settings(redis_settings: Callable[..., Settings], **overrides: Any) -> Settings:
    return redis_settings(ws_heartbeat_interval_ms=5000, ws_grace_period_ms=5000, **overrides)


async def heartbeat(ws: ClientConnection) -> None:
    while True:
        await ws.send(json.dumps({"jsonrpc": "2.0", "method": "scailink/heartbeat"}))
        await anyio.sleep(0.5)


async def test_device_on_b_is_listed_called_and_asked_through_a_and_c(
    redis_settings: Callable[..., Settings], token: TokenFactory
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    results: dict[str, Any] = {}
    async with (
        replicas(_settings(redis_settings)) as (a, b, c),
        device(b, tok) as (ws, ack),
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(serve_tools, ws, results)
        tg.start_soon(heartbeat, ws)
        ns, session_id = ack["namespace"], ack["session_id"]

        async def listed_everywhere() -> bool:
            seen = [[x["session_id"] for x in await sessions_seen(live, tok)] for live in (a, c)]
            return seen == [[session_id], [session_id]]

        await eventually(listed_everywhere)

        # The same sessions and capabilities on every replica.
        seen = [await sessions_seen(x, tok) for x in (a, b, c)]
        assert seen[0] == seen[1] == seen[2] and seen[0][0]["state"] == "connected"
        caps = [(await get(x, tok, "/capabilities")).json()["data"]["items"] for x in (a, b, c)]
        assert caps[0] == caps[1] == caps[2]
        assert {"kind": "tool", "namespaced_name": f"{ns}.echo", "upstream_name": "echo",
                    "source": "desktop", "session_id": session_id, "server_id": None} in caps[0]  # fmt: skip
        one = await get(c, tok, f"/sessions/{session_id}")
        assert one.status_code == 200 and one.json()["data"] == seen[1][0]

        # An MCP call through A and a REST invoke through C reach the device on B.
        async with mcp_client(a.mcp_url, tok) as on_a:
            assert f"{ns}.echo" in {t.name for t in await list_all_tools(on_a)}
            result = await on_a.call_tool(f"{ns}.echo", {"text": "via A"})
            assert not result.is_error
            assert json.loads(result.content[0].text) == {"text": "via A"}  # type: ignore[union-attr]
            # consent on the device (a tool marked confirm), asked through A
            guarded = await on_a.call_tool(f"{ns}.rm", {"path": "/tmp/x"})
            assert not guarded.is_error and results["consents"] == ["rm"]
        rest = await invoke(c, tok, f"{ns}.echo", {"text": "via C"})
        assert rest.status_code == 200, rest.text
        assert json.loads(rest.json()["data"]["content"][0]["text"]) == {"text": "via C"}
        assert results["calls"] == ["echo", "rm", "echo"]
        assert a.parts.desktop.cluster.forwarded >= 3 and c.parts.desktop.cluster.forwarded >= 1  # type: ignore[union-attr]

        # Another user sees none of it anywhere.
        other = token("u2", "t1", ("tenant_user",))
        assert (await get(a, other, f"/sessions/{session_id}")).status_code == 404
        assert await sessions_seen(c, other) == []
        tg.cancel_scope.cancel()


async def test_delete_through_a_closes_the_socket_on_b(
    redis_settings: Callable[..., Settings], token: TokenFactory
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    async with replicas(_settings(redis_settings)) as (a, b, c), device(b, tok) as (ws, ack):
        session_id = ack["session_id"]

        async def on_a() -> bool:
            return bool(await sessions_seen(a, tok))

        await eventually(on_a)
        async with httpx.AsyncClient(base_url=a.base_url, timeout=30) as client:
            resp = await client.delete(f"{API}/sessions/{session_id}", headers=auth_headers(tok))
        assert resp.status_code == 204, resp.text
        assert await closed_with(ws) == 1000

        async def gone_everywhere() -> bool:
            return [await sessions_seen(x, tok) for x in (a, b, c)] == [[], [], []]

        await eventually(gone_everywhere)


async def test_same_device_on_c_replaces_b_with_4010_and_resume_moves(
    redis_settings: Callable[..., Settings], token: TokenFactory
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    results: dict[str, Any] = {}
    async with replicas(_settings(redis_settings)) as (a, b, c), device(b, tok) as (ws_b, ack_b):
        await eventually(lambda: _listed(c, tok))
        # The same device connects to C: the newest connection wins, B's socket closes 4010, and
        # the session (same id, resumed) is C's now.
        async with device(c, tok) as (ws_c, ack_c), anyio.create_task_group() as tg:
            assert await closed_with(ws_b) == 4010
            assert ack_c["session_id"] == ack_b["session_id"] and ack_c["resumed"] is True
            tg.start_soon(serve_tools, ws_c, results)

            async def owned_by_c() -> bool:
                return ack_c["session_id"] in c.parts.desktop.sessions and not b.parts.desktop.sessions

            await eventually(owned_by_c)
            seen = await sessions_seen(a, tok)
            assert [s["session_id"] for s in seen] == [ack_c["session_id"]]
            rest = await invoke(a, tok, f"{ack_c['namespace']}.echo", {"text": "after the move"})
            assert rest.status_code == 200, rest.text
            tg.cancel_scope.cancel()
    assert results["calls"] == ["echo"]


async def _listed(live: LiveApp, tok: str) -> bool:
    return bool(await sessions_seen(live, tok))


async def test_resume_on_another_replica_within_grace(
    redis_settings: Callable[..., Settings], token: TokenFactory
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    results: dict[str, Any] = {}
    async with replicas(_settings(redis_settings)) as (a, b, c):
        async with device(b, tok, device_id=None) as (_ws, ack):
            session_id = ack["session_id"]
        # dropped from B: still listed (disconnected) on A during the grace period

        async def disconnected_on_a() -> bool:
            seen = await sessions_seen(a, tok)
            return bool(seen) and seen[0]["state"] == "disconnected"

        await eventually(disconnected_on_a)
        async with device(c, tok, device_id=None, resume_session_id=session_id) as (ws, ack2):
            assert ack2["session_id"] == session_id and ack2["resumed"] is True
            async with anyio.create_task_group() as tg:
                tg.start_soon(serve_tools, ws, results)

                async def connected_on_a() -> bool:
                    seen = await sessions_seen(a, tok)
                    return bool(seen) and seen[0]["state"] == "connected"

                await eventually(connected_on_a)
                rest = await invoke(a, tok, f"{ack2['namespace']}.echo", {"text": "resumed"})
                assert rest.status_code == 200, rest.text
                tg.cancel_scope.cancel()
        assert session_id not in b.parts.desktop.sessions
    assert results["calls"] == ["echo"]


async def test_per_user_cap_holds_across_replicas(
    redis_settings: Callable[..., Settings], token: TokenFactory
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    async with (
        replicas(_settings(redis_settings, ws_max_connections_per_user=2)) as (a, b, c),
        device(a, tok, device_id="d-a"),
        device(b, tok, device_id="d-b"),
    ):

        async def two_on_c() -> bool:
            return len(await sessions_seen(c, tok)) == 2

        await eventually(two_on_c)
        async with connect(ws_url(c), additional_headers=auth_headers(tok)) as ws:
            await ws.send(init_frame(device_id="d-c"))
            assert await closed_with(ws) == 4009


async def test_stopped_owner_fails_fast(redis_settings: Callable[..., Settings], token: TokenFactory) -> None:
    """The device's replica stops (a clean shutdown: it withdraws its sessions): a call through A
    right after answers at once (the device is gone), never after the call's timeout."""
    tok = token("u1", "t1", ("tenant_user",))
    settings = _settings(redis_settings)
    with LiveApp(settings) as a, ExitStack() as on_b:
        b = on_b.enter_context(LiveApp(settings))
        await until(lambda: _cluster_ready(a) and _cluster_ready(b))
        async with device(b, tok) as (_ws, ack):
            await eventually(lambda: _listed(a, tok))
            on_b.close()
            started = anyio.current_time()
            resp = await invoke(a, tok, f"{ack['namespace']}.echo", {"text": "x"})
            elapsed = anyio.current_time() - started
        assert resp.status_code == 404, resp.text
        assert resp.json()["error"]["code"] in ("SCAILINK_DEVICE_OFFLINE", "SCAILINK_TOOL_NOT_FOUND")
        assert elapsed < PROPAGATION_S
