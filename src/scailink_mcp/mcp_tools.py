"""The one MCP `tools/call` after resolution, as both MCP front ends run it: the SDK's handler
(`mcp_server.py`) and ScaiLink's own front (`front_calls.py`).

`Invoker.call` (permission, consent, size cap, metrics, audit), resource URIs made public on `/mcp`,
a failure rendered as an `isError` result; a `ProtocolError` (a bad `requestState`, an upstream's own
JSON-RPC error in the 2026-07-28 era) and, when the caller can be asked by URL-mode elicitation, a
missing upstream authorization are raised as the `MCPError` each front end answers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mcp.shared.exceptions import MCPError

from scailink_mcp import resource_uris
from scailink_mcp.auth import Principal
from scailink_mcp.errors import (
    ProtocolError,
    ScaiLinkError,
    UpstreamAuthRequired,
    mcp_error,
    tool_error_result,
)
from scailink_mcp.invocation import Caller, Invoker
from scailink_mcp.remote.wire import WireResult
from scailink_mcp.targets import Result, Target


def _may_name_resources(result: Result) -> bool:
    """Whether `resource_uris.tool_result` may have URIs to rewrite. An upstream's result as it came
    (`WireResult`) tells by its bytes, without a scan of its content: a `resource_link` or `resource`
    item's type is a JSON string that starts `"resource`, unless its letters are `\\u`-escaped."""
    if not isinstance(result, WireResult):
        return True
    return b'"resource' in result.raw or b"\\u" in result.raw


@dataclass(frozen=True, slots=True)
class ToolRun:
    invoker: Invoker
    principal: Principal
    target: Target
    name: str
    arguments: dict[str, Any] | None
    meta: dict[str, Any]
    caller: Caller

    async def run(
        self, aggregate: bool, url_auth: Callable[[UpstreamAuthRequired], MCPError] | None = None
    ) -> Result:
        """`aggregate`: through `/mcp` (public URIs); `url_auth`: the -32042 of a URL-mode client."""
        wait = self.invoker.timeout(self.meta.get("scailink/timeout_ms"))
        try:
            result = await self.invoker.call(
                self.principal, self.target, self.name, self.arguments, timeout=wait, caller=self.caller
            )
            # Every URI an agent gets through /mcp reads back there.
            if aggregate and _may_name_resources(result):
                result = resource_uris.tool_result(result, self.target)
        except ProtocolError as err:
            raise mcp_error(err) from None
        except ScaiLinkError as err:
            if isinstance(err, UpstreamAuthRequired) and url_auth is not None:
                raise url_auth(err) from None
            result = tool_error_result(err)
        return result
