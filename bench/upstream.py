"""The benchmark's upstream MCP server (a separate process): echo, add, sleep_ms and N generated tools.

Run: `python -m bench.upstream --port 9100 --tools 100`; `--big` adds `big_text(mib)`, an answer of
`mib` MiB (for `bench/big_answers.py`); `--json` answers with JSON bodies instead of SSE streams.
"""

from __future__ import annotations

import argparse
import asyncio

import uvicorn
from mcp.server.mcpserver import MCPServer


def build(n_tools: int, big: bool = False) -> MCPServer:
    server = MCPServer("bench-upstream")

    if big:

        @server.tool(structured_output=False)
        def big_text(mib: float) -> str:
            """Answer `mib` MiB of text."""
            return "x" * int(mib * 1024 * 1024)

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
    parser.add_argument("--big", action="store_true", help="add big_text(mib)")
    parser.add_argument("--json", action="store_true", help="answer POSTs with JSON bodies, not SSE")
    args = parser.parse_args()
    app = build(args.tools, args.big).streamable_http_app(json_response=args.json)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
