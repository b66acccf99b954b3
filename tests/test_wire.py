"""The lean `tools/call` path (remote/wire.py) against a real upstream on 127.0.0.1: warm calls share
one kept-alive TCP connection (the SDK client's path opens one per call), a call given up on is
cancelled upstream, and upstream JSON-RPC errors surface as errors."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from scailink_mcp.errors import UpstreamError, UpstreamTimeout
from tests.test_pool_unit import KEY, echo, running_pool
from tests.test_pool_unit import upstream as upstream  # the fixture
from tests.upstream import UpstreamServer

pytestmark = pytest.mark.anyio


def sockets_to(port: int) -> int:
    """Client sockets (any state, TIME_WAIT included) whose remote end is 127.0.0.1:`port`."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        remote = line.split()[2]
        if remote == f"0100007F:{port:04X}":
            count += 1
    return count


def port_of(server: UpstreamServer) -> int:
    return int(server.url.rsplit(":", 1)[1].split("/", 1)[0])


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="counts sockets through /proc/net/tcp")
async def test_warm_calls_reuse_one_connection(upstream: UpstreamServer) -> None:
    # (The SDK client's own path, `lean_calls=False`, opens 14 to 30 connections for the same calls,
    # depending on timing; that is the SDK's behaviour, not ScaiLink's, so it is not asserted here.)
    async with running_pool(upstream, lean_calls=True) as pool:
        await echo(pool)
        before = sockets_to(port_of(upstream))
        for i in range(30):
            assert await echo(pool, text=str(i)) == str(i)
        opened = sockets_to(port_of(upstream)) - before
    assert opened <= 3, f"30 warm calls opened {opened} connections"


async def test_a_call_given_up_is_cancelled_upstream(upstream: UpstreamServer) -> None:
    async with running_pool(upstream) as pool:
        await echo(pool)
        with pytest.raises(UpstreamTimeout):
            await pool.call_tool(KEY, "sleep_ms", {"ms": 20_000}, timeout=0.5)
        with anyio.fail_after(10):
            while upstream._in_flight:  # noqa: ASYNC110  (polled with a deadline)
                await anyio.sleep(0.05)
        assert await echo(pool, text="after") == "after"


async def test_upstream_protocol_errors_surface(upstream: UpstreamServer) -> None:
    async with running_pool(upstream) as pool:
        with pytest.raises(UpstreamError, match="Unknown tool"):
            await pool.call_tool(KEY, "no_such_tool", {}, timeout=5)
        assert await echo(pool, text="next") == "next", "the next call opens a fresh session"
