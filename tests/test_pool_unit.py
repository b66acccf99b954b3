"""The upstream session pool against a real upstream on 127.0.0.1: single-flight, idle TTL and LRU with
an injected clock, close on error, the circuit breaker, and a clean shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import pytest
from mcp.client.session import ClientSession

from scailink_mcp.errors import UpstreamError, UpstreamTimeout
from scailink_mcp.events import ServerEvent, ServerEventKind
from scailink_mcp.remote.pool import PoolKey, UpstreamPool
from scailink_mcp.remote.upstream import UpstreamTarget, open_session, parse_networks
from tests.servers import ThreadedServer
from tests.upstream import UpstreamServer

pytestmark = pytest.mark.anyio
ALLOWED = parse_networks(["127.0.0.0/8"])


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer() as server:
        yield server


class RecordingConnector:
    """The pool's connector: real SDK sessions to `url`, recording the key of every one it opens."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.keys: list[PoolKey] = []

    def __call__(self, key: PoolKey) -> AbstractAsyncContextManager[ClientSession]:
        self.keys.append(key)
        target = UpstreamTarget(server_id=key.server_id, endpoint_url=self.url, transport="streamable_http")
        return open_session(target, ALLOWED, connect_timeout=5, read_timeout=30)


def connect_count(pool: UpstreamPool) -> int:
    """How many sessions a pool of `running_pool` has tried to open."""
    assert isinstance(pool.connector, RecordingConnector)
    return len(pool.connector.keys)


@asynccontextmanager
async def running_pool(upstream: UpstreamServer, **kw: Any) -> AsyncIterator[UpstreamPool]:
    connector = RecordingConnector(upstream.url)
    pool = UpstreamPool(connector, **{"idle_ttl_s": 300, "max_sessions": 10, **kw})
    async with anyio.create_task_group() as tg:
        tg.start_soon(pool.run)
        yield pool
        tg.cancel_scope.cancel()


KEY = PoolKey("s1", 1, "u1")


async def echo(pool: UpstreamPool, key: PoolKey = KEY, text: str = "x", timeout: float = 10) -> str:
    result = await pool.call_tool(key, "echo", {"text": text}, timeout=timeout)
    return str(result["content"][0]["text"])


async def test_single_flight_and_users_apart(upstream: UpstreamServer) -> None:
    async with running_pool(upstream) as pool:
        before = upstream.initialize_count
        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(echo, pool, KEY, str(i))
        assert upstream.initialize_count == before + 1, "20 concurrent first calls share one handshake"
        for _ in range(50):
            await echo(pool)
        assert upstream.initialize_count == before + 1
        await echo(pool, PoolKey("s1", 1, "u2"))
        assert upstream.initialize_count == before + 2, "another user gets a session of their own"
        assert pool.stats.misses == 2 and pool.stats.hits >= 69


async def test_idle_ttl_and_lru(upstream: UpstreamServer) -> None:
    clock = Clock()
    async with running_pool(upstream, clock=clock, idle_ttl_s=300, max_sessions=2) as pool:
        await echo(pool)
        clock.now = 299
        assert pool.reap_once() == 0
        clock.now = 301
        assert pool.reap_once() == 1 and pool.size() == 0
        before = upstream.initialize_count
        await echo(pool)
        assert upstream.initialize_count == before + 1, "after the TTL the next call handshakes again"
        await echo(pool, PoolKey("s2", 1, "u1"))
        await echo(pool, PoolKey("s3", 1, "u1"))
        assert pool.size() == 2 and pool.stats.evictions == 1
        assert KEY not in pool._entries, "the least recently used session was evicted"


async def test_error_closes_session_and_recovers(upstream: UpstreamServer) -> None:
    async with running_pool(upstream) as pool:
        await echo(pool)
        upstream.stop()
        with anyio.fail_after(15), pytest.raises(UpstreamError):
            await echo(pool)
        assert pool.size() == 0
        upstream.start()
        before = upstream.initialize_count
        assert await echo(pool, text="back") == "back"
        assert upstream.initialize_count == before + 1


async def test_an_upstream_restart_costs_no_failed_call(upstream: UpstreamServer) -> None:
    """The upstream restarts and forgets our session (404): the next call opens a new session and
    succeeds, for the lean `tools/call` and for the SDK's requests (a prompt) alike."""
    async with running_pool(upstream) as pool:
        await echo(pool)
        await anyio.to_thread.run_sync(upstream.restart)
        before = upstream.initialize_count
        assert await echo(pool, text="after the restart") == "after the restart"
        assert upstream.initialize_count == before + 1
        await anyio.to_thread.run_sync(upstream.restart)
        prompt = await pool.use(KEY, lambda s: s.get_prompt("greet", {"name": "Ada"}), timeout=10)
        assert prompt.messages


async def test_a_json_rpc_error_answer_keeps_the_session_warm(upstream: UpstreamServer) -> None:
    """An upstream that answers with a JSON-RPC error is up: its session is reused, not re-opened."""
    async with running_pool(upstream) as pool:
        await echo(pool)
        before = upstream.initialize_count
        for _ in range(3):
            with pytest.raises(UpstreamError):
                await pool.use(KEY, lambda s: s.get_prompt("no-such-prompt", {}), timeout=10)
        assert await echo(pool) == "x"
        assert upstream.initialize_count == before, "no new handshake after an error answer"


async def test_killed_mid_call_and_timeout(upstream: UpstreamServer) -> None:
    async with running_pool(upstream) as pool:
        await echo(pool)
        with anyio.fail_after(5), pytest.raises(UpstreamTimeout):
            await pool.call_tool(KEY, "sleep_ms", {"ms": 3000}, timeout=0.3)

        async def kill_soon() -> None:
            await anyio.sleep(0.3)
            await anyio.to_thread.run_sync(upstream.stop)

        async with anyio.create_task_group() as tg:
            tg.start_soon(kill_soon)
            with anyio.fail_after(15), pytest.raises(UpstreamError):
                await pool.call_tool(KEY, "sleep_ms", {"ms": 5000}, timeout=10)
        upstream.start()
        assert await echo(pool, text="again") == "again"


async def test_circuit_breaker(upstream: UpstreamServer) -> None:
    clock = Clock()
    async with running_pool(upstream, clock=clock) as pool:
        upstream.stop()
        for _ in range(5):
            with pytest.raises(UpstreamError):
                await echo(pool)
        assert pool.breaker_open("s1")
        calls = connect_count(pool)
        with pytest.raises(UpstreamError) as err:
            await echo(pool)
        assert err.value.retry_after is not None and 0 < err.value.retry_after <= 30
        assert connect_count(pool) == calls, "an open circuit fails fast without connecting"
        upstream.start()
        clock.now += 31
        assert await echo(pool, text="closed") == "closed"


async def test_events_close_sessions_and_results_pass_through(upstream: UpstreamServer) -> None:
    async with running_pool(upstream) as pool:
        await echo(pool)
        failed = await pool.call_tool(KEY, "fail", {}, timeout=10)
        assert failed["isError"] is True, "isError results pass through and do not close the session"
        assert pool.size() == 1
        event = ServerEvent(ServerEventKind.CREDENTIALS_CHANGED, "s1", "t1", "u1", False)
        await pool.on_event(event)
        with anyio.fail_after(5):
            while pool.size():  # noqa: ASYNC110
                await anyio.sleep(0.01)
        meta_only = ServerEvent(ServerEventKind.UPDATED, "s1", "t1", "u1", False)
        await echo(pool)
        await pool.on_event(meta_only)
        assert pool.size() == 1, "a metadata change keeps the warm session"


async def test_shutdown_closes_everything(upstream: UpstreamServer) -> None:
    async with running_pool(upstream) as pool:
        for user in ("a", "b", "c"):
            await echo(pool, PoolKey("s1", 1, user))
        entries = list(pool._entries.values())
    with anyio.fail_after(10):
        for entry in entries:
            await entry.closed.wait()
    assert pool.size() == 0


async def test_garbage_answering_upstream_fails_cleanly() -> None:
    """An upstream answering non-MCP garbage: a clear UpstreamError within the timeout, nothing hangs."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    async def garbage(request: Any) -> Response:
        return Response(b"\x00\x01 this is not JSON-RPC", media_type="application/json")

    app = Starlette(routes=[Route("/mcp", garbage, methods=["GET", "POST", "DELETE"])])
    with ThreadedServer(app) as server:

        def connect(key: PoolKey) -> AbstractAsyncContextManager[ClientSession]:
            target = UpstreamTarget(key.server_id, f"{server.base_url}/mcp", "streamable_http")
            return open_session(target, ALLOWED, connect_timeout=2, read_timeout=5)

        pool = UpstreamPool(connect, idle_ttl_s=300, max_sessions=4)
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.run)
            with anyio.fail_after(10), pytest.raises((UpstreamError, UpstreamTimeout)):
                await pool.call_tool(KEY, "echo", {"text": "x"}, timeout=3)
            assert pool.size() == 0
            tg.cancel_scope.cancel()
