"""The upstream ScaiLink fronts during the official MCP conformance suite (`python -m conformance.run`).

ScaiLink's own fixture written for the v2 SDK: every tool, resource, template and prompt the suite's
server scenarios call (`test_simple_text`, `test_image_content`, `test_sampling`, ...), plus
subscriptions, logging/setLevel and completion. Run alone: `python -m conformance.upstream_server --port N`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
from typing import Any

import mcp_types as types
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.prompts.base import UserMessage
from pydantic import BaseModel, Field

from conformance.mrtr_tools import add_mrtr

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg=="
WAV = "UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA="


class Answer(BaseModel):
    response: str = Field(description="User's response")


class Defaults(BaseModel):
    name: str = Field(default="John Doe", description="User name")
    age: int = Field(default=30, description="User age")
    score: float = Field(default=95.5, description="User score")
    status: str = Field(
        default="active",
        description="User status",
        json_schema_extra={"enum": ["active", "inactive", "pending"]},
    )
    verified: bool = Field(default=True, description="Verification status")


class Enums(BaseModel):
    untitledSingle: str = Field(
        description="Simple enum", json_schema_extra={"enum": ["active", "inactive", "pending"]}
    )
    titledSingle: str = Field(description="Titled enum", json_schema_extra={"oneOf": [
        {"const": "low", "title": "Low Priority"}, {"const": "medium", "title": "Medium Priority"},
        {"const": "high", "title": "High Priority"}]})  # fmt: skip
    untitledMulti: list[str] = Field(description="Multi-select", json_schema_extra={
        "items": {"type": "string", "enum": ["read", "write", "execute"]}})  # fmt: skip
    titledMulti: list[str] = Field(description="Titled multi-select", json_schema_extra={"items": {"anyOf": [
        {"const": "feature", "title": "New Feature"}, {"const": "bug", "title": "Bug Fix"},
        {"const": "docs", "title": "Documentation"}]}})  # fmt: skip
    legacyEnum: str = Field(description="Legacy enum", json_schema_extra={
        "enum": ["small", "medium", "large"],
        "enumNames": ["Small Size", "Medium Size", "Large Size"]})  # fmt: skip


def build() -> MCPServer:
    server = MCPServer("scailink-conformance-upstream")
    subscriptions: set[str] = set()

    @server.tool()
    def test_simple_text() -> str:
        """Simple text content."""
        return "This is a simple text response for testing."

    @server.tool()
    def test_image_content() -> list[types.ImageContent]:
        """Image content."""
        return [types.ImageContent(type="image", data=PNG, mime_type="image/png")]

    @server.tool()
    def test_audio_content() -> list[types.AudioContent]:
        """Audio content."""
        return [types.AudioContent(type="audio", data=WAV, mime_type="audio/wav")]

    @server.tool()
    def test_embedded_resource() -> list[types.EmbeddedResource]:
        """An embedded resource."""
        text = types.TextResourceContents(
            uri="test://embedded-resource",
            mime_type="text/plain",
            text="This is an embedded resource content.",
        )
        return [types.EmbeddedResource(type="resource", resource=text)]

    @server.tool()
    def test_multiple_content_types() -> list[
        types.TextContent | types.ImageContent | types.EmbeddedResource
    ]:
        """Text, image and resource together."""
        data = types.TextResourceContents(
            uri="test://mixed-content-resource",
            mime_type="application/json",
            text='{"test": "data", "value": 123}',
        )
        return [
            types.TextContent(type="text", text="Multiple content types test:"),
            types.ImageContent(type="image", data=PNG, mime_type="image/png"),
            types.EmbeddedResource(type="resource", resource=data),
        ]

    @server.tool()
    async def test_tool_with_logging(ctx: Context) -> str:
        """Logs while it runs."""
        for message in ("Tool execution started", "Tool processing data", "Tool execution completed"):
            await ctx.info(message)
            await asyncio.sleep(0.05)
        return "Tool with logging executed successfully"

    @server.tool()
    async def test_tool_with_progress(ctx: Context) -> str:
        """Reports progress."""
        for step in (0, 50, 100):
            await ctx.report_progress(progress=step, total=100, message=f"Completed step {step} of 100")
            await asyncio.sleep(0.05)
        meta: Any = ctx.request_context.meta or {}
        return str(meta.get("progress_token", meta.get("progressToken", 0)))

    @server.tool()
    async def test_sampling(prompt: str, ctx: Context) -> str:
        """Asks the client's LLM."""
        try:
            result = await ctx.session.create_message(
                messages=[
                    types.SamplingMessage(role="user", content=types.TextContent(type="text", text=prompt))
                ],
                max_tokens=100,
                related_request_id=ctx.request_id,
            )
            text = result.content.text if result.content.type == "text" else "No response"  # type: ignore[union-attr]
            return f"LLM response: {text}"
        except Exception as exc:
            return f"Sampling not supported or error: {exc}"

    async def elicit(ctx: Context, message: str, schema: type[BaseModel], label: str) -> str:
        try:
            result = await ctx.elicit(message=message, schema=schema)
            content = result.data.model_dump_json() if result.action == "accept" else "{}"  # type: ignore[union-attr]
            return f"{label}: action={result.action}, content={content}"
        except Exception as exc:
            return f"Elicitation not supported or error: {exc}"

    @server.tool()
    async def test_elicitation(message: str, ctx: Context) -> str:
        """Asks the user."""
        return await elicit(ctx, message, Answer, "User response")

    @server.tool()
    async def test_elicitation_sep1034_defaults(ctx: Context) -> str:
        """Elicitation with defaults for every primitive type."""
        return await elicit(ctx, "Please provide user information", Defaults, "Elicitation result")

    @server.tool()
    async def test_elicitation_sep1330_enums(ctx: Context) -> str:
        """Elicitation with enum schema variations."""
        return await elicit(
            ctx, "Please select values using different enum schema types", Enums, "Elicitation completed"
        )

    @server.tool()
    def test_error_handling() -> str:
        """Always fails."""
        raise RuntimeError("This tool intentionally returns an error for testing")

    @server.tool()
    async def test_reconnection(ctx: Context) -> str:
        """Closes its SSE stream mid-call (SEP-1699)."""
        await ctx.info("Before disconnect")
        await ctx.close_sse_stream()
        await asyncio.sleep(0.2)
        await ctx.info("After reconnect")
        return "Reconnection test completed"

    @server.resource("test://static-text")
    def static_text() -> str:
        """A static text resource."""
        return "This is the content of the static text resource."

    @server.resource("test://static-binary")
    def static_binary() -> bytes:
        """A static binary resource."""
        return base64.b64decode(PNG)

    @server.resource("test://template/{id}/data")
    def template(id: str) -> str:
        """A template with a parameter."""
        return json.dumps({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})

    @server.resource("test://watched-resource")
    def watched() -> str:
        """A resource that can be subscribed to."""
        return "Watched resource content"

    @server.prompt()
    def test_simple_prompt() -> list[UserMessage]:
        """A simple prompt."""
        return [
            UserMessage(
                role="user",
                content=types.TextContent(type="text", text="This is a simple prompt for testing."),
            )
        ]

    @server.prompt()
    def test_prompt_with_arguments(arg1: str, arg2: str) -> list[UserMessage]:
        """A prompt with required arguments."""
        text = f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"
        return [UserMessage(role="user", content=types.TextContent(type="text", text=text))]

    @server.prompt()
    def test_prompt_with_embedded_resource(resourceUri: str) -> list[UserMessage]:
        """A prompt with an embedded resource."""
        contents = types.TextResourceContents(
            uri=resourceUri, mime_type="text/plain", text="Embedded resource content for testing."
        )
        return [
            UserMessage(role="user", content=types.EmbeddedResource(type="resource", resource=contents)),
            UserMessage(
                role="user",
                content=types.TextContent(type="text", text="Please process the embedded resource above."),
            ),
        ]

    @server.prompt()
    def test_prompt_with_image() -> list[UserMessage]:
        """A prompt with an image."""
        return [
            UserMessage(
                role="user", content=types.ImageContent(type="image", data=PNG, mime_type="image/png")
            ),
            UserMessage(
                role="user", content=types.TextContent(type="text", text="Please analyze the image above.")
            ),
        ]

    @server.completion()
    async def complete(ref: Any, argument: Any, context: Any) -> types.Completion:
        return types.Completion(values=[], total=0, has_more=False)

    lowlevel = server._lowlevel_server  # no public hook for these three in mcp 2.3

    async def set_level(ctx: Any, params: types.SetLevelRequestParams) -> types.EmptyResult:
        return types.EmptyResult()

    async def subscribe(ctx: Any, params: types.SubscribeRequestParams) -> types.EmptyResult:
        subscriptions.add(str(params.uri))
        return types.EmptyResult()

    async def unsubscribe(ctx: Any, params: types.UnsubscribeRequestParams) -> types.EmptyResult:
        subscriptions.discard(str(params.uri))
        return types.EmptyResult()

    add_mrtr(server)
    lowlevel.add_request_handler("logging/setLevel", types.SetLevelRequestParams, set_level)
    lowlevel.add_request_handler("resources/subscribe", types.SubscribeRequestParams, subscribe)
    lowlevel.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams, unsubscribe)
    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=3001)
    args = parser.parse_args()
    app = build().streamable_http_app(retry_interval=100)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
