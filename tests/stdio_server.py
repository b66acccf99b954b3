"""A tiny real stdio MCP server for the desktop tests (run as `python tests/stdio_server.py`)."""

from __future__ import annotations

import os

from mcp.server.mcpserver import MCPServer

server = MCPServer("local-tools")


@server.tool()
def echo(text: str) -> str:
    """Echo the text back."""
    return text


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def whoami() -> str:
    """The process id of this local server (shows the call really ran here)."""
    return f"pid {os.getpid()}"


if __name__ == "__main__":
    server.run("stdio")
