"""SIGTERM: desktop sockets are closed with 1001, 20 slow in-flight calls all finish, the process exits."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.test_cli import dev_server
from tests.upstream import UpstreamServer

pytestmark = pytest.mark.anyio


async def test_sigterm_drains(tmp_path: Path) -> None:
    with UpstreamServer() as upstream, dev_server(tmp_path / "data") as (base, token, proc):
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            resp = await c.post(
                "/v1/modules/scailink/remote-servers",
                json={"name": "slow", "endpoint_url": upstream.url},
                headers=headers,
            )
            slug = resp.json()["data"]["slug"]
            tool = f"remote.dev-admin.{slug}.sleep_ms"
            url = f"/v1/modules/scailink/users/dev-admin/tools/{tool}/invoke"
            statuses: list[int] = []
            ws_url = base.replace("http://", "ws://") + "/v1/scailink/ws"
            init = {
                "protocol_version": "scailink/1.0", "client_version": "t", "device_name": "d",
                "device_id": "d1", "platform": {"os": "linux"}, "capabilities": {"tools": []},
            }  # fmt: skip
            async with connect(ws_url, additional_headers=headers) as ws:
                await ws.send(
                    json.dumps({"jsonrpc": "2.0", "id": 1, "method": "scailink/session_init", "params": init})
                )
                await ws.recv()

                async def slow_call() -> None:
                    r = await c.post(url, json={"arguments": {"ms": 1500}}, headers=headers)
                    statuses.append(r.status_code)

                started = time.monotonic()
                async with anyio.create_task_group() as tg:
                    for _ in range(20):
                        tg.start_soon(slow_call)
                    with anyio.fail_after(20):  # all 20 calls have reached the upstream
                        while len(upstream._in_flight) < 20:  # noqa: ASYNC110  (another thread's state)
                            await anyio.sleep(0.02)
                    proc.send_signal(signal.SIGTERM)
                    with anyio.fail_after(10):
                        try:
                            while True:
                                await ws.recv()
                        except ConnectionClosed as exc:
                            assert exc.rcvd is not None and exc.rcvd.code == 1001
            assert statuses == [200] * 20, statuses
            assert time.monotonic() - started < 25
        with anyio.fail_after(30):
            while proc.poll() is None:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        # uvicorn re-raises the captured SIGTERM after a graceful shutdown, so the status is -15
        assert proc.returncode in (0, -signal.SIGTERM)
    # the audit was flushed on the way out: one row per call
    import sqlite3

    with sqlite3.connect(tmp_path / "data" / "scailink.db") as db:
        rows = db.execute(
            "SELECT count(*) FROM audit_event WHERE event = 'tool_call' AND outcome = 'ok'"
        ).fetchone()
    assert rows[0] == 20


async def test_sigterm_lets_in_flight_mcp_calls_finish(tmp_path: Path) -> None:
    """15 `tools/call`s through `/mcp` (Streamable HTTP, SDK clients) in flight at SIGTERM all get their
    result, and the audit records what the callers got."""
    import httpx2
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    calls = 15
    with UpstreamServer() as upstream, dev_server(tmp_path / "data") as (base, token, proc):
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            resp = await c.post(
                "/v1/modules/scailink/remote-servers",
                json={"name": "slow", "endpoint_url": upstream.url},
                headers=headers,
            )
            tool = f"remote.dev-admin.{resp.json()['data']['slug']}.sleep_ms"
        outcomes: list[str] = []

        async def slow_call() -> None:
            try:
                async with (
                    httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=60)) as http,
                    streamable_http_client(base + "/mcp", http_client=http) as (read, write),
                    ClientSession(read, write) as session,
                ):
                    await session.initialize()
                    # Listed first: the SDK client lists tools after a session's first result (to learn
                    # output schemas), a new request that a server shutting down no longer accepts.
                    await session.list_tools()
                    result = await session.call_tool(tool, {"ms": 2000})
                    outcomes.append("error" if result.is_error else "ok")
            except Exception as exc:  # the test reports what the caller got
                outcomes.append(f"failed: {type(exc).__name__}")

        async with anyio.create_task_group() as tg:
            for _ in range(calls):
                tg.start_soon(slow_call)
            with anyio.fail_after(20):
                while len(upstream._in_flight) < calls:  # noqa: ASYNC110  (another thread's state)
                    await anyio.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
        assert outcomes == ["ok"] * calls, outcomes
        with anyio.fail_after(30):
            while proc.poll() is None:  # noqa: ASYNC110
                await anyio.sleep(0.1)
    import sqlite3

    with sqlite3.connect(tmp_path / "data" / "scailink.db") as db:
        rows = db.execute("SELECT outcome, count(*) FROM audit_event WHERE event = 'tool_call' GROUP BY 1")
        assert dict(rows.fetchall()) == {"ok": calls}
