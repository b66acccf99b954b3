"""`tools/call` in the `/mcp` front (`mcp_front.py`): the warm call without the SDK's server machinery.

The handler resolves the name in the caller's cached scope (the aggregate `CatalogView`, or the one
server of the per-server endpoint) and runs the one call path, `mcp_tools.ToolRun` ->
`Invoker.call` (permission, consent tier, size cap, metrics, audit, exactly as the SDK's handler
does). The result is the upstream's bytes when the call path kept them (`remote/wire.WireResult`:
nothing rewrote it), else the result dict serialized once.

It declines (the SDK answers, as before) what needs the SDK or a round trip to the client: params of
another shape than `name`/`arguments`/`_meta`, `_meta.progressToken`, a name the scope does not know
(the SDK's -32602 and its audit), a consent tier other than `auto` (approval may ask the client or a
device), and in the 2026-07-28 era `Mcp-Param-*` headers that disagree with the arguments (the SDK's
400). Log messages an upstream sends during the call reach the caller as the SDK relays them, as
`notifications/message` frames before the answer (`FrontDownstream`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, get_args

import mcp_types as types
from mcp.server.lowlevel.server import Server
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import MCP_PARAM_HEADER_PREFIX, validate_mcp_param_headers
from starlette.datastructures import Headers

from scailink_mcp import mcp_transports
from scailink_mcp.catalog import NameStyle
from scailink_mcp.era_pending import EraCall
from scailink_mcp.errors import ToolNotFound
from scailink_mcp.front_answer import Answer, Reply
from scailink_mcp.front_lists import list_methods
from scailink_mcp.invocation import Caller
from scailink_mcp.mcp_front import Call, Exchange, Handler, McpFront
from scailink_mcp.mcp_server import McpSurface
from scailink_mcp.mcp_tools import ToolRun
from scailink_mcp.remote.wire import WireResult, dumps
from scailink_mcp.sdk_sessions import SessionTable
from scailink_mcp.targets import DesktopTarget, Forwarding, RemoteTarget, Target

PARAMS = frozenset({"name", "arguments", "_meta"})
PARAM_PREFIX = MCP_PARAM_HEADER_PREFIX.lower()


@dataclass(frozen=True)
class FrontDownstream:
    """The relay target (`relay.Downstream`) of a call the front serves: log messages become frames of
    its answer; requests to the client are refused (the front serves no client that declared them)."""

    answer: Answer

    def supports(self, capability: str) -> bool:
        return False

    async def ask(self, request: Any, result_type: Any) -> Any:
        raise MCPError(-32601, "the calling client does not support this request")

    async def log(self, params: types.LoggingMessageNotificationParams) -> None:
        data = params.model_dump(by_alias=True, mode="json", exclude_none=True)
        await self.answer.event(dumps({"jsonrpc": "2.0", "method": "notifications/message", "params": data}))


def _input_schema(target: Target) -> Any:
    if isinstance(target, DesktopTarget):
        return target.session.tools.get(target.upstream_name, {}).get("inputSchema")
    name = target.upstream_name
    return next((t.get("inputSchema") for t in target.server.tools if t.get("name") == name), None)


def _headers_disagree(exchange: Exchange, target: Target, arguments: dict[str, Any] | None) -> bool:
    """The SDK's 2026-07-28 `Mcp-Param-*` check would reject this call (it then answers the 400)."""
    headers = Headers(scope=exchange.scope)
    if not arguments and not any(name.startswith(PARAM_PREFIX) for name in headers):
        return False
    schema = _input_schema(target)
    return schema is not None and validate_mcp_param_headers(schema, arguments or {}, headers) is not None


def tools_call(surface: McpSurface, *, single: bool) -> Handler:
    """The `tools/call` handler of one endpoint (`single`: the per-server endpoint)."""
    catalog = surface.catalog
    # `surface.style_of` of every `?names=` value, worked out once (any other value asks for the
    # default): the warm call reads a dict instead of calling into mcp_server.py.
    styles = {names: surface.style_of(names) for names in get_args(NameStyle)}
    default_style = surface.style_of(None)

    def resolve(exchange: Exchange, name: str) -> Target | None:
        principal = exchange.principal
        if single:
            server_id = exchange.server_id
            try:
                server = catalog.single_server_view(principal, server_id)
            except ToolNotFound:
                return None
            if not server.listed or not any(t.get("name") == name for t in server.tools):
                return None
            if exchange.session is not None:
                surface.notifier.track_connection(exchange.session.connection, principal, "dotted", server_id)
            return RemoteTarget("tool", name, server)
        style = styles.get(exchange.names or "", default_style)
        target = catalog.view(principal, style).tool_targets.get(name)
        if target is not None and exchange.session is not None:
            surface.notifier.track_connection(exchange.session.connection, principal, style)
        return target

    def handle(exchange: Exchange) -> Call | None:
        params = exchange.params
        name, arguments, meta = params.get("name"), params.get("arguments"), params.get("_meta", {})
        if not isinstance(name, str) or not isinstance(meta, dict) or not params.keys() <= PARAMS:
            return None
        if (arguments is not None and not isinstance(arguments, dict)) or "progressToken" in meta:
            return None
        target = resolve(exchange, name)
        if target is None or target.consent_tier != "auto":
            return None
        if exchange.modern and _headers_disagree(exchange, target, arguments):
            return None
        downstream = FrontDownstream(exchange.answer)
        # A 2026-07-28 request goes through the era bridge, as the SDK's handler sends it (era_bridge.py).
        era = EraCall(params, downstream) if exchange.modern else None
        forwarding = Forwarding(relay=downstream, era=era)
        caller = Caller(request_id=exchange.http_request_id, forwarding=forwarding)

        async def run() -> Reply:
            call = ToolRun(surface.invoker, exchange.principal, target, name, arguments, meta, caller)
            try:
                result = await call.run(not single)
            except MCPError as err:  # a ProtocolError of the call path: a JSON-RPC error, as via the SDK
                return Reply.failure(err.error)
            return Reply(result.raw, result.keys()) if isinstance(result, WireResult) else Reply.of(result)

        return run

    return handle


def methods(surface: McpSurface, *, single: bool) -> dict[str, Handler]:
    """The front's dispatch table of one endpoint: `tools/call` and the list pages (`front_lists.py`)."""
    return {"tools/call": tools_call(surface, single=single), **list_methods(surface, single=single)}


def front(surface: McpSurface, server: Server[Any], sessions: SessionTable, *, single: bool) -> McpFront:
    """The front of one endpoint, in front of its SDK app (`sessions` is bound to its manager)."""
    manager = sessions.manager
    assert manager is not None
    return McpFront(
        mcp_transports.asgi(manager),
        sessions=sessions,
        security_settings=manager.security_settings,
        server_info=server.server_info_stamp,
        methods=methods(surface, single=single),
    )
