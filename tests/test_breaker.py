"""The circuit breaker counts transport failures and timeouts only, and one user cannot open it for
others (issue 11, item 7).

Real parts: a real upstream MCP server on 127.0.0.1; ScaiLink served by uvicorn with a tenant-shared
server and real SDK clients on `/mcp`, and the pool itself for the timing cases (injected clock).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio
import mcp_types as types
import pytest
from mcp.client.session import ClientSession
from mcp.shared.exceptions import MCPError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from scailink_mcp.errors import UpstreamError, UpstreamTimeout
from scailink_mcp.remote.breaker import BreakerPolicy
from scailink_mcp.remote.pool import PoolKey, UpstreamPool
from scailink_mcp.remote.upstream import UpstreamTarget, open_session
from tests.conftest import LiveApp, TokenFactory
from tests.servers import ThreadedServer
from tests.test_mcp_gateway import mcp_client, register
from tests.test_pool_unit import ALLOWED, Clock, connect_count, echo, running_pool
from tests.upstream import ToolCall, UpstreamServer, text_result

pytestmark = pytest.mark.anyio

STRICT = types.Tool(
    name="strict",
    description="Answers -32602 unless `n` is a positive integer (validation in the tool, as many do).",
    input_schema={"type": "object"},
)


async def _strict(call: ToolCall) -> types.CallToolResult:
    n = call.arguments.get("n")
    if not isinstance(n, int) or n <= 0:
        raise MCPError(types.INVALID_PARAMS, "n must be a positive integer")
    return text_result(str(n))


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer() as server:
        server.add_tool(STRICT, _strict)
        yield server


def code_of(result: types.CallToolResult) -> str | None:
    return (result.meta or {}).get("scailink/error", {}).get("code") if result.is_error else None


async def test_a_users_bad_arguments_never_block_a_shared_server(
    live: LiveApp, token: TokenFactory, upstream: UpstreamServer
) -> None:
    admin = token("admin", "t1", ("tenant_admin",))
    shared = await register(live, admin, name="shared", endpoint_url=upstream.url, is_tenant_shared=True)
    tool = f"remote.tenant.{shared['slug']}"
    async with mcp_client(live.mcp_url, token("u1", "t1", ("tenant_user",))) as careless:
        for _ in range(8):
            result = await careless.call_tool(f"{tool}.strict", {"n": "not a number"})
            assert code_of(result) == "SCAILINK_UPSTREAM_ERROR", result
            assert "n must be a positive integer" in result.content[0].text  # type: ignore[union-attr]
        assert not live.parts.pool.breaker_open(shared["id"]), "JSON-RPC answers are not failures"
        fine = await careless.call_tool(f"{tool}.strict", {"n": 3})
        assert fine.is_error is not True and fine.content[0].text == "3"  # type: ignore[union-attr]
    async with mcp_client(live.mcp_url, token("u2", "t1", ("tenant_user",))) as other:
        result = await other.call_tool(f"{tool}.echo", {"text": "still open"})
        assert result.is_error is not True and result.content[0].text == "still open"  # type: ignore[union-attr]


async def test_one_users_timeouts_open_only_their_own_circuit(upstream: UpstreamServer) -> None:
    clock = Clock()
    async with running_pool(upstream, clock=clock) as pool:
        slow, other = PoolKey("s1", 1, "slow"), PoolKey("s1", 1, "other")
        for _ in range(5):
            with anyio.fail_after(10), pytest.raises(UpstreamTimeout):
                await pool.call_tool(slow, "sleep_ms", {"ms": 5000}, timeout=0.2)
        with pytest.raises(UpstreamError, match="circuit open") as err:
            await echo(pool, slow)
        assert err.value.retry_after is not None and 0 < err.value.retry_after <= 30
        assert await echo(pool, other, "unaffected") == "unaffected"
        assert pool.breaker_open("s1", "slow") and not pool.breaker_open("s1", "other")
        clock.now += 31
        assert await echo(pool, slow, "closed again") == "closed again"


async def test_a_real_outage_opens_the_circuit_for_everyone(upstream: UpstreamServer) -> None:
    clock = Clock()
    async with running_pool(upstream, clock=clock) as pool:
        upstream.stop()
        for user in ("a", "a", "b", "b", "c"):  # five failures from three users within the window
            with anyio.fail_after(15), pytest.raises(UpstreamError):
                await echo(pool, PoolKey("s1", 1, user))
        connects = connect_count(pool)
        with pytest.raises(UpstreamError, match="circuit open"):
            await echo(pool, PoolKey("s1", 1, "newcomer"))
        assert connect_count(pool) == connects, "an open circuit fails fast without connecting"
        assert pool.breaker_open("s1", "newcomer"), "a user who never called fails fast too"
        upstream.start()
        clock.now += 31
        assert await echo(pool, PoolKey("s1", 1, "newcomer"), "back") == "back"
        clock.now += 61
        assert pool.reap_once() == 0 and not pool._breakers, "idle breakers are forgotten"


async def test_a_success_clears_the_callers_count_and_the_servers(upstream: UpstreamServer) -> None:
    """A success clears the counts of its own breaker and of the server's, also when only the
    server's exists (the pool skips breaker.py only when neither does)."""

    async def time_out(user: str) -> None:
        with anyio.fail_after(10), pytest.raises(UpstreamTimeout):
            await pool.call_tool(PoolKey("s1", 1, user), "sleep_ms", {"ms": 5000}, timeout=0.2)

    async with running_pool(upstream, clock=Clock()) as pool:
        for _ in range(4):
            await time_out("a")
        assert await echo(pool, PoolKey("s1", 1, "a"), "ok") == "ok"
        for _ in range(4):  # 8 within the window, but the success cleared the first 4
            await time_out("a")
        assert not pool.breaker_open("s1", "a")
        assert await echo(pool, PoolKey("s1", 1, "a"), "ok") == "ok"
        for user in ("b", "b", "d", "d"):  # 4 of the server's count, from 2 users
            await time_out(user)
        assert await echo(pool, PoolKey("s1", 1, "c"), "ok") == "ok"  # c has no breaker of its own
        await time_out("c")  # 5 from 3 users within the window, had c's success not cleared them
        assert not pool.breaker_open("s1", "newcomer"), "the server's count was cleared"


@asynccontextmanager
async def strict_http_upstream() -> AsyncIterator[str]:
    """A minimal real MCP server (JSON answers) that answers every `tools/call` with a JSON-RPC
    -32602 error at HTTP 400, as a spec-correct server may; yields its URL."""

    async def mcp(request: Request) -> Response:
        if request.method != "POST":
            return Response(status_code=405 if request.method == "GET" else 200)
        message = json.loads(await request.body())
        method, rid = message.get("method"), message.get("id")
        if rid is None:
            return Response(status_code=202)
        if method == "initialize":
            result = {
                "protocolVersion": message["params"]["protocolVersion"],
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "strict", "version": "1"},
            }
            return JSONResponse(
                {"jsonrpc": "2.0", "id": rid, "result": result}, headers={"mcp-session-id": "s1"}
            )
        if method == "tools/call":
            error = {"code": types.INVALID_PARAMS, "message": "bad arguments, said at HTTP 400"}
            return JSONResponse({"jsonrpc": "2.0", "id": rid, "error": error}, status_code=400)
        return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": {}})

    app = Starlette(routes=[Route("/mcp", mcp, methods=["GET", "POST", "DELETE"])])
    with ThreadedServer(app) as server:
        yield f"{server.base_url}/mcp"


async def test_json_rpc_errors_at_http_400_are_answers_not_failures() -> None:
    async with strict_http_upstream() as url:

        def connect(key: PoolKey) -> AbstractAsyncContextManager[ClientSession]:
            return open_session(
                UpstreamTarget(key.server_id, url, "streamable_http"),
                ALLOWED,
                connect_timeout=2,
                read_timeout=5,
            )

        pool = UpstreamPool(connect, idle_ttl_s=300, max_sessions=4, breakers=BreakerPolicy(min_users=1))
        async with anyio.create_task_group() as tg:
            tg.start_soon(pool.run)
            for _ in range(6):
                with anyio.fail_after(10), pytest.raises(UpstreamError, match="said at HTTP 400"):
                    await pool.call_tool(PoolKey("s1", 1, "u1"), "anything", {}, timeout=5)
            assert not pool.breaker_open("s1"), (
                "a JSON-RPC error answer never counts, whatever its HTTP status"
            )
            tg.cancel_scope.cancel()
