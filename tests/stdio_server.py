"""A tiny real stdio MCP server for the desktop client tests: `python tests/stdio_server.py [--marker M]`.

Built on the SDK's lowlevel `Server` so its listings are paginated (`--page-size`, 2 by default), which
makes the client follow `nextCursor`. Tools: `echo(text)`, `add(a, b)`, `whoami()` (`pid N (marker)`:
proof the call ran in this process), `slow(ms)`, `toggle_extra()` (adds or removes the tool `extra`
and sends `notifications/tools/list_changed`), `count(n)` (n progress notifications). One resource
`note://{marker}/hello`, one template `note://{marker}/{name}` (reads any name), one prompt `greet`.

Must not: import ScaiLink. The client reaches it only over stdio, like any local MCP server.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import anyio
import mcp_types as types
from mcp.server.lowlevel import NotificationOptions, Server
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPError

T = TypeVar("T")
RESOURCE_NOT_FOUND = -32002


def _tool(
    name: str, description: str, properties: dict[str, Any], required: Sequence[str] = ()
) -> types.Tool:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "required": list(required)}
    return types.Tool(name=name, description=description, input_schema=schema)


BASE_TOOLS = [
    _tool("echo", "Echo the text back.", {"text": {"type": "string"}}, ["text"]),
    _tool("add", "Add two integers.", {"a": {"type": "integer"}, "b": {"type": "integer"}}, ["a", "b"]),
    _tool("whoami", "The process id and marker of this local server.", {}),
    _tool("slow", "Sleep `ms` milliseconds, then answer.", {"ms": {"type": "integer"}}, ["ms"]),
    _tool("toggle_extra", "Add or remove the tool `extra` (announced with list_changed).", {}),
    _tool("count", "Report progress `n` times (i of n, 'step i'), then answer.", {"n": {"type": "integer"}}),
]
EXTRA = _tool("extra", "Exists only after toggle_extra.", {})


def _text(
    text: str, *, is_error: bool = False, structured: dict[str, Any] | None = None
) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(text=text)], structured_content=structured, is_error=is_error
    )


def _page(
    items: Sequence[T], params: types.PaginatedRequestParams | None, size: int
) -> tuple[list[T], str | None]:
    cursor = params.cursor if params is not None else None
    start = int(cursor) if cursor and cursor.isdigit() else 0
    end = start + size
    return list(items[start:end]), (str(end) if end < len(items) else None)


def build(marker: str, page_size: int) -> Server[Any]:
    state = {"extra": False}

    def tools() -> list[types.Tool]:
        return [*BASE_TOOLS, EXTRA] if state["extra"] else list(BASE_TOOLS)

    async def list_tools(ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        page, cursor = _page(tools(), params, page_size)
        return types.ListToolsResult(tools=page, next_cursor=cursor)

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        args = params.arguments or {}
        try:
            if params.name == "echo":
                return _text(str(args["text"]))
            if params.name == "add":
                total = int(args["a"]) + int(args["b"])
                return _text(str(total), structured={"result": total})
            if params.name == "whoami":
                return _text(f"pid {os.getpid()} ({marker})")
            if params.name == "slow":
                await anyio.sleep(int(args["ms"]) / 1000)
                return _text(f"slept {int(args['ms'])} ms")
            if params.name == "toggle_extra":
                state["extra"] = not state["extra"]
                await ctx.session.send_tool_list_changed()
                return _text(f"extra {'on' if state['extra'] else 'off'}")
            if params.name == "count":
                for step in range(1, int(args["n"]) + 1):
                    await ctx.session.report_progress(step, int(args["n"]), f"step {step}")
                return _text(f"counted to {int(args['n'])}")
            if params.name == "extra" and state["extra"]:
                return _text("extra")
        except (KeyError, ValueError) as exc:
            return _text(f"invalid arguments: {exc}", is_error=True)
        raise MCPError(types.INVALID_PARAMS, f"Unknown tool: {params.name}")

    note = types.Resource(uri=f"note://{marker}/hello", name="hello", mime_type="text/plain")

    async def list_resources(
        ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=[note])

    prefix = f"note://{marker}/"
    notes = types.ResourceTemplate(uri_template=prefix + "{name}", name="notes", mime_type="text/plain")

    async def list_templates(
        ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        return types.ListResourceTemplatesResult(resource_templates=[notes])

    async def read_resource(ctx: Any, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        uri = str(params.uri)
        name = uri[len(prefix) :]
        if not uri.startswith(prefix) or not name or "/" in name:
            raise MCPError(RESOURCE_NOT_FOUND, f"Resource not found: {params.uri}")
        text = f"hello from {marker}" if name == "hello" else f"note {name} from {marker}"
        return types.ReadResourceResult(
            contents=[types.TextResourceContents(uri=uri, mime_type="text/plain", text=text)]
        )

    greet = types.Prompt(
        name="greet", description="Greet someone.", arguments=[types.PromptArgument(name="name")]
    )

    async def list_prompts(ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListPromptsResult:
        return types.ListPromptsResult(prompts=[greet])

    async def get_prompt(ctx: Any, params: types.GetPromptRequestParams) -> types.GetPromptResult:
        if params.name != "greet":
            raise MCPError(types.INVALID_PARAMS, f"Unknown prompt: {params.name}")
        name = (params.arguments or {}).get("name", "you")
        text = f"Hello, {name}! ({marker})"
        return types.GetPromptResult(
            messages=[types.PromptMessage(role="user", content=types.TextContent(text=text))]
        )

    return Server(
        f"local-{marker}",
        version="1.0.0",
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_resources=list_resources,
        on_read_resource=read_resource,
        on_list_resource_templates=list_templates,
        on_list_prompts=list_prompts,
        on_get_prompt=get_prompt,
    )


async def serve(marker: str, page_size: int) -> None:
    server = build(marker, page_size)
    options = server.create_initialization_options(NotificationOptions(tools_changed=True))
    async with stdio_server() as (read, write):
        await server.run(read, write, options)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--marker", default="local")
    parser.add_argument("--page-size", type=int, default=2)
    args = parser.parse_args()
    anyio.run(serve, args.marker, args.page_size)
