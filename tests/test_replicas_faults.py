"""Redis faults with several replicas (issue 13 item 8, SPEC section 10): two ScaiLink apps on one
SQLite file and a Redis server of this test's own (a real `redis-server` on a free 127.0.0.1 port,
killed and started again on the same port), a real upstream and a real desktop device.

While Redis is away: `/readyz` answers 503 naming Redis, remote tool calls keep working on every
replica, a call for a desktop held by the other replica answers SCAILINK_DEVICE_OFFLINE at once, and
nothing stored is lost. When Redis is back (empty: it keeps nothing on disk), each replica
resubscribes without a restart and re-announces its desktop sessions, and calls cross again."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from scailink_mcp.config import Settings
from tests.conftest import LiveApp, TokenFactory, auth_headers
from tests.test_desktop_bridge import device, serve_tools
from tests.test_mcp_gateway import mcp_client
from tests.test_replicas_desktop import heartbeat, invoke, sessions_seen
from tests.test_replicas_events import register, until
from tests.upstream import UpstreamServer

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]

REDIS_SERVER = shutil.which("redis-server")


class PrivateRedis:
    """A `redis-server` of this test's own: `stop()` kills it (SIGKILL), `start()` brings it back."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert REDIS_SERVER is not None
        options = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            [REDIS_SERVER, *options, "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer() as server:
        yield server


async def readyz(live: LiveApp) -> httpx.Response:
    async with httpx.AsyncClient(base_url=live.base_url, timeout=10) as c:
        return await c.get("/readyz")


async def wait_ready(live: LiveApp, expected: int, timeout: float = 20.0) -> dict[str, Any]:
    with anyio.fail_after(timeout):
        while (resp := await readyz(live)).status_code != expected:  # noqa: ASYNC110
            await anyio.sleep(0.1)
    checks: dict[str, Any] = resp.json()["checks"]
    return checks


async def test_redis_goes_away_and_comes_back(
    private_redis: PrivateRedis,
    settings_factory: Callable[..., Settings],
    token: TokenFactory,
    upstream: UpstreamServer,
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    settings = settings_factory(
        redis_url=private_redis.url, ws_heartbeat_interval_ms=5000, ws_grace_period_ms=30000
    )
    results: dict[str, Any] = {}
    with ExitStack() as stack:
        a, b = (stack.enter_context(LiveApp(settings)) for _ in range(2))
        await wait_ready(a, 200)
        await wait_ready(b, 200)
        server = await register(a, tok, name="steady", endpoint_url=upstream.url)
        echo = f"remote.u1.{server['slug']}.echo"
        async with device(b, tok) as (ws, ack), anyio.create_task_group() as tg:
            tg.start_soon(serve_tools, ws, results)
            tg.start_soon(heartbeat, ws)
            desktop_echo = f"{ack['namespace']}.echo"
            await until(lambda: bool(a.parts.desktop.peers))
            assert (await invoke(a, tok, desktop_echo, {"text": "before"})).status_code == 200

            private_redis.stop()
            checks = await wait_ready(a, 503)
            assert checks["redis"].startswith("unreachable"), checks
            # Remote tools keep working on both replicas, REST and MCP alike.
            for live in (a, b):
                resp = await invoke(live, tok, echo, {"text": "no redis"})
                assert resp.status_code == 200, resp.text
            async with mcp_client(a.mcp_url, tok) as on_a:
                assert not (await on_a.call_tool(echo, {"text": "mcp, no redis"})).is_error
            # The desktop on B cannot be reached from A: at once, not after the call's timeout.
            started = anyio.current_time()
            resp = await invoke(a, tok, desktop_echo, {"text": "no redis"})
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "SCAILINK_DEVICE_OFFLINE"
            assert anyio.current_time() - started < 1.0
            # B still serves its own device, and nothing stored was lost.
            assert (await invoke(b, tok, desktop_echo, {"text": "local"})).status_code == 200

            private_redis.start()  # empty: Redis keeps nothing on disk here
            await wait_ready(a, 200)
            await wait_ready(b, 200)

            async def crosses_again() -> bool:
                return (await invoke(a, tok, desktop_echo, {"text": "after"})).status_code == 200

            with anyio.fail_after(10):
                while not await crosses_again():  # noqa: ASYNC110
                    await anyio.sleep(0.1)
            assert [s["session_id"] for s in await sessions_seen(a, tok)] == [ack["session_id"]]
            tg.cancel_scope.cancel()
        async with httpx.AsyncClient(base_url=b.base_url, timeout=10) as c:
            listed = await c.get("/v1/modules/scailink/remote-servers", headers=auth_headers(tok))
        assert [s["id"] for s in listed.json()["data"]["items"]] == [server["id"]]
    assert results["calls"] == ["echo", "echo", "echo"]
