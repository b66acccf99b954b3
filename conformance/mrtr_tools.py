"""The conformance upstream's multi-round-trip tools and prompt (SEP-2322, the `input-required-result-*`
scenarios of the 2026-07-28 set), in that era's style: the tool answers `input_required` and reads the
client's `inputResponses` (and its own `requestState`, sealed by the SDK's `RequestStateBoundary`,
which `MCPServer` installs) on the retry.

Called in the 2026-07-28 era, directly or through ScaiLink (which calls an upstream that speaks that
era in it and passes these results through, era_bridge.py). In the handshake era they answer a plain
text saying so.
"""

from __future__ import annotations

from typing import Any

import mcp_types as types
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.prompts.base import UserMessage
from mcp.shared.exceptions import MCPError
from mcp_types import MISSING_REQUIRED_CLIENT_CAPABILITY

ToolAnswer = types.CallToolResult | types.InputRequiredResult


def _elicit(message: str, field: str, kind: str = "string") -> types.ElicitRequest:
    schema = {"type": "object", "properties": {field: {"type": kind}}, "required": [field]}
    return types.ElicitRequest(params=types.ElicitRequestFormParams(message=message, requested_schema=schema))


def _sample(text: str, max_tokens: int) -> types.CreateMessageRequest:
    message = types.SamplingMessage(role="user", content=types.TextContent(text=text))
    return types.CreateMessageRequest(
        params=types.CreateMessageRequestParams(messages=[message], max_tokens=max_tokens)
    )


ROOTS = types.ListRootsRequest()


def _ask(requests: dict[str, Any], state: str | None = None) -> types.InputRequiredResult:
    return types.InputRequiredResult(input_requests=requests, request_state=state)


def _text(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=text)])


def _answers(ctx: Context, *keys: str) -> dict[str, Any] | None:
    """The client's answers to `keys`, or None when one is missing (then the tool asks again)."""
    got = ctx.input_responses or {}
    if all(k in got for k in keys):
        return {k: got[k] for k in keys}
    return None


def _content(answer: Any) -> dict[str, Any]:
    content = getattr(answer, "content", None)
    return content if isinstance(content, dict) else {}


def _sampled_text(answer: Any) -> str:
    content = getattr(answer, "content", None)
    return str(getattr(content, "text", "")) if content is not None else ""


def add_mrtr(server: MCPServer) -> None:
    @server.tool()
    async def test_input_required_result_elicitation(ctx: Context) -> ToolAnswer:
        """Asks the user's name (one round of elicitation)."""
        got = _answers(ctx, "user_name")
        if got is None:
            return _ask({"user_name": _elicit("What is your name?", "name")})
        name = _content(got["user_name"]).get("name")
        if not isinstance(name, str):  # an answer of the wrong shape: ask again
            return _ask({"user_name": _elicit("What is your name?", "name")})
        return _text(f"Hello, {name}!")

    @server.tool()
    async def test_input_required_result_sampling(ctx: Context) -> ToolAnswer:
        """Asks the client's LLM."""
        got = _answers(ctx, "capital_question")
        if got is None:
            return _ask({"capital_question": _sample("What is the capital of France?", 100)})
        return _text(f"LLM response: {_sampled_text(got['capital_question'])}")

    @server.tool()
    async def test_input_required_result_list_roots(ctx: Context) -> ToolAnswer:
        """Asks for the client's roots."""
        got = _answers(ctx, "client_roots")
        if got is None:
            return _ask({"client_roots": ROOTS})
        roots = getattr(got["client_roots"], "roots", None) or []
        return _text("Roots: " + ", ".join(str(r.uri) for r in roots))

    @server.tool()
    async def test_input_required_result_request_state(ctx: Context) -> ToolAnswer:
        """Round-trips its requestState."""
        got = _answers(ctx, "confirm")
        if got is None or ctx.request_state != "awaiting-confirm":
            return _ask({"confirm": _elicit("Please confirm", "ok", "boolean")}, "awaiting-confirm")
        return _text(f"state-ok: confirmed={_content(got['confirm']).get('ok')}")

    @server.tool()
    async def test_input_required_result_multiple_inputs(ctx: Context) -> ToolAnswer:
        """Asks for three inputs at once."""
        got = _answers(ctx, "user_name", "greeting", "client_roots")
        if got is None or ctx.request_state != "multiple":
            requests = {
                "user_name": _elicit("What is your name?", "name"),
                "greeting": _sample("Generate a greeting", 50),
                "client_roots": ROOTS,
            }
            return _ask(requests, "multiple")
        return _text(f"{_sampled_text(got['greeting'])}, {_content(got['user_name']).get('name')}")

    @server.tool()
    async def test_input_required_result_multi_round(ctx: Context) -> ToolAnswer:
        """Two rounds, each with its own requestState."""
        if ctx.request_state == "round-2" and _answers(ctx, "step2") is not None:
            return _text("multi-round complete")
        if ctx.request_state == "round-1" and _answers(ctx, "step1") is not None:
            return _ask({"step2": _elicit("Step 2: What is your favorite color?", "color")}, "round-2")
        return _ask({"step1": _elicit("Step 1: What is your name?", "name")}, "round-1")

    @server.tool()
    async def test_input_required_result_tampered_state(ctx: Context) -> ToolAnswer:
        """A requestState the client tampers with is refused (by the SDK's boundary, before this)."""
        if ctx.request_state == "untampered" and _answers(ctx, "confirm") is not None:
            return _text("state verified")
        return _ask({"confirm": _elicit("Please confirm", "ok", "boolean")}, "untampered")

    @server.tool()
    async def test_input_required_result_capabilities(ctx: Context) -> ToolAnswer:
        """Asks only for what the client declared (`_meta` clientCapabilities)."""
        caps = ctx.client_capabilities
        requests: dict[str, Any] = {}
        if caps is not None and caps.sampling is not None:
            requests["sampling_input"] = _sample("Say hello", 20)
        if caps is not None and caps.elicitation is not None:
            requests["elicitation_input"] = _elicit("Your name?", "name")
        if caps is not None and caps.roots is not None:
            requests["roots_input"] = ROOTS
        if not requests or ctx.input_responses:
            return _text("capabilities respected")
        return _ask(requests)

    # server-stateless (SEP-2575): the diagnostic tools it calls.
    @server.tool()
    async def test_missing_capability(ctx: Context) -> str:
        """Needs sampling: a client that did not declare it gets -32021 (HTTP 400)."""
        caps = ctx.client_capabilities
        if caps is None or caps.sampling is None:
            raise MCPError(
                MISSING_REQUIRED_CLIENT_CAPABILITY,
                "this tool needs the sampling capability",
                {"requiredCapabilities": {"sampling": {}}},
            )
        return "sampling declared"

    @server.tool()
    async def test_streaming_elicitation(ctx: Context) -> ToolAnswer:
        """Asks for input the 2026-07-28 way: an `input_required` result, never a request on the stream."""
        if _answers(ctx, "confirm") is None:
            return _ask({"confirm": _elicit("Continue?", "ok", "boolean")})
        return _text("streamed")

    @server.tool()
    async def test_logging_tool(ctx: Context) -> str:
        """Logs; the SDK sends it only to a request that set `_meta` logLevel."""
        await ctx.info("a log message")
        return "logged"

    @server.prompt()
    def test_input_required_result_prompt(ctx: Context) -> list[UserMessage] | types.InputRequiredResult:
        """A prompt that needs the user's context first."""
        got = (ctx.input_responses or {}).get("user_context")
        if got is None:
            return _ask({"user_context": _elicit("What context should the prompt use?", "context")})
        text = f"Prompt with context: {_content(got).get('context')}"
        return [UserMessage(role="user", content=types.TextContent(text=text))]
