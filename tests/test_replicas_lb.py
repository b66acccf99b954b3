"""Several replicas as a deployment runs them (SPEC section 10): three real `scailink serve`
processes on one database and the real Redis, a real HAProxy in front (round robin, no stickiness),
real WebSocket devices, real SDK MCP clients in both protocol eras and a real upstream.

These are the process-level runs of what test_replicas_desktop.py, test_replicas_sessions.py and
test_replicas_events.py show with in-process replicas: a desktop on B called through A, C and the
load balancer and terminated through A; one handshake-era session spread by HAProxy over all three;
a registration on A told to sessions held by B in both eras; SIGKILL of the replica holding a
desktop, the device reconnecting through the load balancer to a survivor with its tools back.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import httpx2
import pytest
import redis.asyncio as aioredis
from mcp import types
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.client.subscriptions import listen
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.cluster import ClusterEnv, HAProxy, Replica, load_balancer, replicas
from tests.conftest import TokenFactory, auth_headers
from tests.test_desktop_bridge import init_frame, serve_tools
from tests.test_mcp_gateway import list_all_tools, mcp_client
from tests.test_replicas_cluster import (
    CALL_TIMEOUT_S,
    PROPAGATION_S,
    REG,
    _lacks,
    _lists,
    by,
    haproxy_available,
    invoke,
    make_env,
    migrate,
    redis_available,
    register,
    text_of,
    upstream,
)
from tests.upstream import UpstreamServer

__all__ = ["haproxy_available", "make_env", "redis_available", "upstream"]  # fixtures used here

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

API = "/v1/modules/scailink"
# Heartbeats every 1 s (the test's device sends its own), a grace period long enough to resume.
DESKTOP = {"WS_HEARTBEAT_INTERVAL_MS": "1000", "WS_GRACE_PERIOD_MS": "10000"}
NOTIFIED_S = PROPAGATION_S + 0.25 + 0.5  # the event's 1 s, the 250 ms debounce, the stream's delivery

Served = Replica | HAProxy  # anything with a base_url a client connects to


def ws_url(node: Served) -> str:
    return node.base_url.replace("http://", "ws://") + "/v1/scailink/ws"


@asynccontextmanager
async def device(
    node: Served, tok: str, **init: Any
) -> AsyncIterator[tuple[ClientConnection, dict[str, Any]]]:
    async with connect(ws_url(node), additional_headers=auth_headers(tok), open_timeout=CALL_TIMEOUT_S) as ws:
        await ws.send(init_frame(**init))
        with anyio.fail_after(CALL_TIMEOUT_S):
            ack = json.loads(await ws.recv())
        assert "result" in ack, ack
        yield ws, ack["result"]


async def run_device(ws: ClientConnection, results: dict[str, Any]) -> None:
    """Answer invocations and consent requests (`serve_tools`) and heartbeat, until the socket closes;
    its close code lands in `results["closed"]`."""

    async def beat() -> None:
        with suppress(ConnectionClosed):
            while True:
                await ws.send(json.dumps({"jsonrpc": "2.0", "method": "scailink/heartbeat"}))
                await anyio.sleep(0.5)

    async with anyio.create_task_group() as tg:
        tg.start_soon(beat)
        with suppress(ConnectionClosed):
            await serve_tools(ws, results)
        results["closed"] = ws.close_code
        tg.cancel_scope.cancel()


async def sessions_on(node: Served, tok: str) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=node.base_url, timeout=CALL_TIMEOUT_S) as c:
        resp = await c.get(f"{API}/sessions", headers=auth_headers(tok))
    assert resp.status_code == 200, resp.text
    items: list[dict[str, Any]] = resp.json()["data"]["items"]
    return items


def first_text(result: types.CallToolResult) -> str:
    assert not result.is_error, result
    content = result.content[0]
    assert isinstance(content, types.TextContent)
    return content.text


class ToolsChanged:
    """A client's message handler recording when each `notifications/tools/list_changed` arrived."""

    def __init__(self) -> None:
        self.times: list[float] = []

    async def __call__(self, message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            self.times.append(time.monotonic())

    async def more_than(self, count: int, within: float) -> float:
        """Wait (bounded) until more than `count` have arrived; when the first of those did."""
        with anyio.fail_after(within):
            while len(self.times) <= count:  # noqa: ASYNC110  (the client's message handler)
                await anyio.sleep(0.02)
        return self.times[count]


# --- a desktop on B ----------------------------------------------------------------------------------


async def test_desktop_on_b_is_called_through_a_c_and_the_lb_and_closed_through_a(
    make_env: Callable[..., ClusterEnv], haproxy_available: None, token: TokenFactory, tmp_path: Path
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    env = make_env(**DESKTOP)
    migrate(env.database_url)
    results: dict[str, Any] = {}
    with replicas(env, 3) as (a, b, c), load_balancer([a, b, c], tmp_path) as lb:
        async with device(b, tok) as (ws, ack), anyio.create_task_group() as tg:
            tg.start_soon(run_device, ws, results)
            ns, session_id = ack["namespace"], ack["session_id"]
            echo = f"{ns}.echo"
            deadline = time.monotonic() + PROPAGATION_S
            for node in (a, c):
                await by(deadline, f"{echo} listed on {node.name}", lambda n=node: _lists(n, tok, echo))
            seen = [await sessions_on(node, tok) for node in (a, b, c)]
            assert seen[0] == seen[1] == seen[2] and [s["session_id"] for s in seen[0]] == [session_id]

            # MCP through A (handshake era), a consent asked of the device through A, REST through C.
            async with mcp_client(f"{a.base_url}/mcp", tok) as on_a:
                assert json.loads(first_text(await on_a.call_tool(echo, {"text": "via A"}))) == {
                    "text": "via A"
                }
                assert not (await on_a.call_tool(f"{ns}.rm", {"path": "/tmp/x"})).is_error
            async with httpx.AsyncClient(base_url=c.base_url) as client:
                assert json.loads(text_of(await invoke(client, tok, echo, {"text": "via C"}))) == {
                    "text": "via C"
                }

            # Through the load balancer: six calls in a row, each answered by whichever replica.
            before = await anyio.to_thread.run_sync(lb.answered)
            async with httpx.AsyncClient(base_url=lb.base_url) as client:
                for i in range(6):
                    assert json.loads(text_of(await invoke(client, tok, echo, {"text": f"lb {i}"}))) == {
                        "text": f"lb {i}"
                    }
            after = await anyio.to_thread.run_sync(lb.answered)
            assert all(after[n.name] > before[n.name] for n in (a, b, c)), (before, after)
            assert results["calls"] == ["echo", "rm", "echo"] + ["echo"] * 6
            assert results["consents"] == ["rm"]

            # DELETE through A closes the socket held by B, normally.
            async with httpx.AsyncClient(base_url=a.base_url, timeout=CALL_TIMEOUT_S) as client:
                deleted = await client.delete(f"{API}/sessions/{session_id}", headers=auth_headers(tok))
            assert deleted.status_code == 204, deleted.text
            with anyio.fail_after(CALL_TIMEOUT_S):
                while "closed" not in results:  # noqa: ASYNC110  (the device task's state)
                    await anyio.sleep(0.02)
            assert results["closed"] == 1000
        deadline = time.monotonic() + PROPAGATION_S
        for node in (a, b, c):
            await by(deadline, f"no session on {node.name}", lambda n=node: _no_sessions(n, tok))


async def _no_sessions(node: Served, tok: str) -> bool:
    return await sessions_on(node, tok) == []


async def test_sigkill_of_the_desktops_replica_and_the_device_back_on_a_survivor(
    make_env: Callable[..., ClusterEnv],
    haproxy_available: None,
    token: TokenFactory,
    upstream: UpstreamServer,
    tmp_path: Path,
) -> None:
    """The replica holding a device is SIGKILLed while calls of its tools and of a remote tool run
    through the load balancer: the desktop calls fail with an error, fast (no hang), the remote calls
    all succeed; the device reconnects through the load balancer (with its session id), lands on a
    survivor, and its tools are listed and callable everywhere again."""
    tok = token("u1", "t1", ("tenant_user",))
    env = make_env(**DESKTOP)
    migrate(env.database_url)
    with replicas(env, 3) as (a, b, c), load_balancer([a, b, c], tmp_path) as lb:
        server = await register(lb.base_url, tok, name="kill", endpoint_url=upstream.url)
        remote = f"remote.u1.{server['slug']}.echo"
        first: dict[str, Any] = {}
        async with device(b, tok, device_id=None) as (ws, ack):
            echo = f"{ack['namespace']}.echo"
            deadline = time.monotonic() + PROPAGATION_S
            for node in (a, c):
                await by(deadline, f"{echo} on {node.name}", lambda n=node: _lists(n, tok, echo))
                await by(deadline, f"{remote} on {node.name}", lambda n=node: _lists(n, tok, remote))
            outcomes: dict[str, list[tuple[float, float, str]]] = {"desktop": [], "remote": []}
            stop = anyio.Event()

            async def caller(kind: str, tool: str) -> None:
                async with httpx.AsyncClient(base_url=lb.base_url) as client:
                    for i in range(400):
                        if stop.is_set():
                            return
                        started = time.monotonic()
                        try:
                            resp = await invoke(client, tok, tool, {"text": f"{kind} {i}"})
                            outcome = str(resp.status_code)
                            if resp.status_code != 200:
                                outcome += " " + resp.json()["error"]["code"]
                        except httpx.HTTPError as exc:
                            outcome = type(exc).__name__
                        outcomes[kind].append((started, time.monotonic(), outcome))
                        await anyio.sleep(0.01)

            async with anyio.create_task_group() as tg:
                tg.start_soon(run_device, ws, first)
                tg.start_soon(caller, "desktop", echo)
                tg.start_soon(caller, "remote", remote)
                with anyio.fail_after(20):
                    while len(outcomes["desktop"]) < 10:  # noqa: ASYNC110  (the callers' state)
                        await anyio.sleep(0.02)
                killing = time.monotonic()
                await anyio.to_thread.run_sync(b.kill)
                killed = time.monotonic()
                await anyio.to_thread.run_sync(lambda: lb.wait_status({b.name: "DOWN"}, 5))
                with anyio.fail_after(CALL_TIMEOUT_S):
                    while "closed" not in first:  # noqa: ASYNC110  (the device task's state)
                        await anyio.sleep(0.02)
                # The device sees its socket drop; it reconnects through the load balancer.
                second: dict[str, Any] = {}
                async with device(lb, tok, device_id=None, resume_session_id=ack["session_id"]) as (
                    ws2,
                    ack2,
                ):
                    reconnected = time.monotonic()
                    assert ack2["session_id"] == ack["session_id"] and ack2["resumed"] is True
                    tg.start_soon(run_device, ws2, second)

                    async def back_on(node: Replica) -> bool:
                        seen = await sessions_on(node, tok)
                        return [(s["session_id"], s["state"]) for s in seen] == [
                            (ack["session_id"], "connected")
                        ]

                    deadline = time.monotonic() + PROPAGATION_S
                    for node in (a, c):
                        await by(deadline, f"the device back on {node.name}", lambda n=node: back_on(n))
                    with anyio.fail_after(20):
                        while not any(o[0] > reconnected + PROPAGATION_S for o in outcomes["desktop"]):  # noqa: ASYNC110
                            await anyio.sleep(0.02)
                    stop.set()
                    tg.cancel_scope.cancel()

        hung = [o for kind in outcomes.values() for o in kind if o[1] - o[0] >= CALL_TIMEOUT_S]
        assert not hung, hung
        # Every remote call succeeded but those in flight on B when it died (one at most).
        remote_failed = [o for o in outcomes["remote"] if not o[2].startswith("200")]
        assert len(remote_failed) <= 1 and all(o[0] <= killed for o in remote_failed), remote_failed
        # Desktop calls: 200 before the kill; between the kill and the device's return each fails with
        # an error (the device is offline, or B's connection dropped), never a hang; 200 once it is back.
        desktop = outcomes["desktop"]
        assert [o for o in desktop if o[1] < killing and o[2] != "200"] == []
        assert all(o[2] == "200" for o in desktop if o[0] > reconnected + PROPAGATION_S), desktop
        between = {o[2] for o in desktop if killed < o[0] < reconnected}
        assert between <= {"200", "404 SCAILINK_DEVICE_OFFLINE", "404 SCAILINK_TOOL_NOT_FOUND", "502"}, (
            between
        )
        assert second.get("calls"), "the device answered calls after its return"


# --- MCP sessions through the load balancer ----------------------------------------------------------


async def test_a_handshake_session_spread_by_the_lb_and_another_principal_refused(
    make_env: Callable[..., ClusterEnv],
    haproxy_available: None,
    token: TokenFactory,
    upstream: UpstreamServer,
    tmp_path: Path,
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    env = make_env()
    migrate(env.database_url)
    changed = ToolsChanged()

    with replicas(env, 3) as nodes, load_balancer(nodes, tmp_path) as lb:
        server = await register(lb.base_url, tok, name="spread", endpoint_url=upstream.url)
        echo = f"remote.u1.{server['slug']}.echo"
        deadline = time.monotonic() + PROPAGATION_S
        for node in nodes:
            await by(deadline, f"{echo} on {node.name}", lambda n=node: _lists(n, tok, echo))
        session_ids: list[str] = []

        async def remember(response: httpx2.Response) -> None:
            sid = response.headers.get("mcp-session-id")
            if sid and sid not in session_ids:
                session_ids.append(sid)

        before = await anyio.to_thread.run_sync(lb.answered)
        async with (
            httpx2.AsyncClient(
                headers=auth_headers(tok),
                timeout=httpx2.Timeout(30, read=60),
                event_hooks={"response": [remember]},
            ) as http,
            streamable_http_client(f"{lb.base_url}/mcp", http_client=http) as (read, write),
            ClientSession(read, write, message_handler=changed) as session,
        ):
            await session.initialize()
            for i in range(9):
                if i % 3 == 0:
                    assert echo in {t.name for t in await list_all_tools(session)}
                assert first_text(await session.call_tool(echo, {"text": f"call {i}"})) == f"call {i}"
            after = await anyio.to_thread.run_sync(lb.answered)
            # 1 initialize + 3 listings + 9 calls (+ the GET stream and notifications) over 3 replicas,
            # in turn: each answered several of them.
            assert all(after[n.name] - before[n.name] >= 3 for n in nodes), (before, after)
            assert len(session_ids) == 1

            # Another principal presenting the id gets 404, on each replica in turn.
            other = token("u2", "t1", ("tenant_user",))
            async with httpx.AsyncClient(base_url=lb.base_url, timeout=CALL_TIMEOUT_S) as c:
                for _ in range(3):
                    stolen = await c.post(
                        "/mcp",
                        json={"jsonrpc": "2.0", "id": 7, "method": "tools/list", "params": {}},
                        headers={
                            **auth_headers(other),
                            "mcp-session-id": session_ids[0],
                            "accept": "application/json, text/event-stream",
                            "mcp-protocol-version": "2025-11-25",
                        },
                    )
                    assert stolen.status_code == 404, stolen.text

            # A registration through the load balancer reaches this session's GET stream, on whichever
            # replica HAProxy opened it.
            registered = time.monotonic()
            await register(lb.base_url, tok, name="spread-two", endpoint_url=upstream.url)
            assert await changed.more_than(0, within=NOTIFIED_S) - registered < NOTIFIED_S


async def test_registration_on_a_notifies_sessions_on_b_in_both_eras_and_deletion_on_c(
    make_env: Callable[..., ClusterEnv], token: TokenFactory, upstream: UpstreamServer
) -> None:
    """A handshake-era session and a 2026-07-28 `subscriptions/listen` stream, both held by B: a
    registration on A reaches both within the propagation bound; the tool is callable on C; its
    deletion on C reaches both again and it is gone on A and B."""
    tok = token("u1", "t1", ("tenant_user",))
    env = make_env()
    migrate(env.database_url)
    changed = ToolsChanged()

    with replicas(env, 3) as (a, b, c):
        async with (
            mcp_client(f"{b.base_url}/mcp", tok, on_message=changed) as old_era,
            httpx2.AsyncClient(headers=auth_headers(tok), timeout=httpx2.Timeout(30, read=60)) as http,
            streamable_http_client(f"{b.base_url}/mcp", http_client=http) as (read, write),
            ClientSession(read, write) as new_era,
        ):
            await new_era.discover()
            assert new_era.protocol_version == "2026-07-28"
            async with listen(new_era, tools_list_changed=True) as events:
                registered = time.monotonic()
                server = await register(a.base_url, tok, name="across", endpoint_url=upstream.url)
                echo = f"remote.u1.{server['slug']}.echo"
                with anyio.fail_after(NOTIFIED_S):
                    event = await events.__anext__()
                assert type(event).__name__ == "ToolsListChanged"
                assert time.monotonic() - registered < NOTIFIED_S
                assert await changed.more_than(0, within=NOTIFIED_S) - registered < NOTIFIED_S
                assert echo in {t.name for t in await list_all_tools(old_era)}
                assert echo in {t.name for t in await list_all_tools(new_era)}
                async with mcp_client(f"{c.base_url}/mcp", tok) as on_c:
                    assert first_text(await on_c.call_tool(echo, {"text": "on C"})) == "on C"

                told = len(changed.times)
                async with httpx.AsyncClient(base_url=c.base_url, timeout=CALL_TIMEOUT_S) as client:
                    deleted = await client.delete(f"{REG}/{server['id']}", headers=auth_headers(tok))
                assert deleted.status_code == 204, deleted.text
                with anyio.fail_after(NOTIFIED_S):
                    event = await events.__anext__()
                assert type(event).__name__ == "ToolsListChanged"
                await changed.more_than(told, within=NOTIFIED_S)
                deadline = time.monotonic() + PROPAGATION_S
                for node in (a, b):
                    await by(deadline, f"{echo} gone on {node.name}", lambda n=node: _lacks(n, tok, echo))
                assert echo not in {t.name for t in await list_all_tools(old_era)}


# --- work done once per cluster ----------------------------------------------------------------------


def health_checks_counted(node: Replica) -> float:
    """The replica's own count of the health checks it ran (`scailink_health_checks_total`)."""
    text = httpx.get(f"{node.base_url}/metrics", timeout=CALL_TIMEOUT_S).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("scailink_health_checks_total{")
    )


async def test_three_replicas_check_a_server_once_per_interval_and_flip_it_once(
    make_env: Callable[..., ClusterEnv], token: TokenFactory, upstream: UpstreamServer
) -> None:
    """Health checks every second on three `scailink serve` replicas: the upstream sees one check per
    interval (not three), run by one replica; stopped, the server flips to `error` once (one
    `status_changed` on the cluster's event channel, read off Redis by the test) and every replica
    shows it. (At 0.5 s the lease lives 1 s, and a loaded 2-core machine once stalled the holder past
    it: the lease moved to another replica mid-window, which is the design, not what this counts.)"""
    interval = 1.0
    tok = token("u1", "t1", ("tenant_user",))
    env = make_env(HEALTH_INTERVAL_S=str(interval), HEALTH_FAILURE_THRESHOLD="1", HEALTH_TIMEOUT_S="1")
    migrate(env.database_url)
    watcher = aioredis.Redis(host="127.0.0.1", port=6379)
    pubsub = watcher.pubsub()
    try:
        await pubsub.subscribe(f"{env.redis_prefix}:events")
        with replicas(env, 3) as nodes:
            server = await register(nodes[0].base_url, tok, name="checked", endpoint_url=upstream.url)
            await anyio.sleep(interval)  # the registration's own discovery is over
            before = upstream.initialize_count
            window = 4.0
            await anyio.sleep(window)
            checks = upstream.initialize_count - before
            # One replica's rounds: window / interval (± 10 % jitter) handshakes; three would be ~12.
            assert window / interval / 2 <= checks <= window / interval * 1.1 + 2, checks
            counted = [await anyio.to_thread.run_sync(health_checks_counted, n) for n in nodes]
            assert sum(1 for c in counted if c > 0) == 1, counted

            upstream.stop()

            async def in_error(node: Replica) -> bool:
                async with httpx.AsyncClient(base_url=node.base_url, timeout=CALL_TIMEOUT_S) as c:
                    resp = await c.get(f"{REG}/{server['id']}", headers=auth_headers(tok))
                return bool(resp.json()["data"]["status"] == "error")

            deadline = time.monotonic() + interval * 1.1 + 1 + PROPAGATION_S + 1  # a round, its timeout
            for node in nodes:
                await by(deadline, f"error on {node.name}", lambda n=node: in_error(n))
            await anyio.sleep(interval * 4)  # further failing rounds flip nothing more
        flips, kinds = [], []
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < 0.5:  # read until the channel has been quiet 0.5 s
            message = await pubsub.get_message(timeout=0.1)
            if message is None or message["type"] != "message":
                continue
            quiet_since = time.monotonic()
            event = json.loads(message["data"].decode().partition(".")[2])["event"]
            kinds.append(event.get("kind"))
            if event.get("kind") == "status_changed" and event.get("server_id") == server["id"]:
                flips.append(event)
        assert "server_created" in kinds, kinds
        assert len(flips) == 1, flips
    finally:
        await pubsub.aclose()
        await watcher.aclose()
