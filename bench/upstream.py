"""The benchmark's upstream MCP server (a separate process): echo, add, sleep_ms and N generated tools.

Run: `python -m bench.upstream --port 9100 --tools 100`.
"""

from __future__ import annotations

import argparse
import asyncio

import uvicorn
from mcp.server.mcpserver import MCPServer


def build(n_tools: int) -> MCPServer:
    server = MCPServer("bench-upstream")

    @server.tool()
    def echo(text: str) -> str:
        """Echo the text back."""
        return text

    @server.tool()
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool()
    async def sleep_ms(ms: int) -> str:
        """Sleep, then answer."""
        await asyncio.sleep(ms / 1000)
        return "slept"

    for i in range(n_tools):

        def make(i: int = i) -> None:
            def generated(
                query: str, limit: int = 10, include_archived: bool = False, tags: list[str] | None = None
            ) -> str:
                return f"tool {i}: {query} {limit} {include_archived} {tags or []}"

            server.add_tool(
                generated,
                name=f"search_records_{i}",
                description=f"Search records of collection {i} by a free-text query; returns matching "
                "records with their identifiers, titles and last-modified timestamps.",
            )

        make()
    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tools", type=int, default=100)
    args = parser.parse_args()
    app = build(args.tools).streamable_http_app()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
