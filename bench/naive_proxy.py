"""A naive SDK proxy peer: every `tools/call` opens a NEW upstream session (handshake) and closes it.

It shows what ScaiLink's warm pool saves. Run: `python -m bench.naive_proxy --port P --upstream URL`.
"""

from __future__ import annotations

import argparse
from typing import Any

import httpx2
import mcp_types as types
import uvicorn
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.lowlevel.server import Server
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from starlette.applications import Starlette
from starlette.routing import Route


def build(upstream: str) -> Starlette:
    async def session_call(method: str, *args: Any) -> Any:
        async with (
            httpx2.AsyncClient(timeout=30) as http,
            streamable_http_client(upstream, http_client=http) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            return await getattr(session, method)(*args)

    async def list_tools(ctx: Any, params: Any) -> types.ListToolsResult:
        result: types.ListToolsResult = await session_call("list_tools")
        return result

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        result: types.CallToolResult = await session_call("call_tool", params.name, params.arguments)
        return result

    server = Server("naive-proxy", on_list_tools=list_tools, on_call_tool=call_tool)
    manager = StreamableHTTPSessionManager(app=server)
    return Starlette(
        routes=[Route("/mcp", StreamableHTTPASGIApp(manager))], lifespan=lambda app: manager.run()
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    uvicorn.run(build(args.upstream), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
