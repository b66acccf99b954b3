"""The MCP surface: translates MCP requests of `/mcp` (aggregate) and the per-server endpoint into calls
on the catalog and the `Invoker`. Protocol translation only; the business is in invocation.py.

Both endpoints share one set of handlers over a scope: the caller's `CatalogView` (namespaced names)
or one server's `ServerScope` (upstream names). Hot path of `tools/call`: resolve the name in the
cached scope -> `Invoker.call` -> the upstream's result dict, passed through unchanged. No database
query, no handshake when a pooled session is warm.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from typing import Any, Protocol

import mcp_types as types
from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from starlette.requests import Request
from starlette.types import Scope

from scailink_mcp import __version__, list_pages, resource_uris
from scailink_mcp import mcp_forwarding as forwarding
from scailink_mcp.auth import Principal
from scailink_mcp.catalog import Catalog, CatalogView, NameStyle, ServerScope
from scailink_mcp.config import Settings
from scailink_mcp.era_pending import era_call
from scailink_mcp.errors import (
    ScaiLinkError,
    ToolNotFound,
    mcp_error,
)
from scailink_mcp.invocation import Caller, Invoker
from scailink_mcp.list_pages import Listed
from scailink_mcp.mcp_auth import current_principal
from scailink_mcp.mcp_elicitation import UrlElicitations, supports_url_elicitation
from scailink_mcp.mcp_tools import ToolRun
from scailink_mcp.mcp_transports import ListChangedServer
from scailink_mcp.notifier import SessionNotifier
from scailink_mcp.relay import DownstreamCall
from scailink_mcp.sdk_sessions import SessionTable, connection_of
from scailink_mcp.subscriptions import Subscriptions
from scailink_mcp.targets import Forwarding, PromptResult, ReadResult, RemoteTarget, Result, Target

Ctx = ServerRequestContext[Any, Any]
INSTRUCTIONS = "ScaiLink: the tools of your registered MCP servers and desktop devices, namespaced."
# Both endpoints are one product and name themselves alike (`serverInfo.name`, the package version):
# clients and federating gateways that key settings or telemetry on the name see one ScaiLink. The
# title tells the endpoints apart for people.
SERVER_NAME = "scailink"
AGGREGATE_TITLE = "ScaiLink"
SINGLE_TITLE = "ScaiLink (one registered server, upstream names)"


class McpScope(Listed, Protocol):
    """What an endpoint lists (`Listed`) and resolves (`CatalogView` or `ServerScope`)."""

    def resolve_tool(self, name: str) -> Target: ...
    def resolve_prompt(self, name: str) -> Target: ...
    def resolve_resource(self, uri: str) -> Target: ...


ScopeOf = Callable[[Ctx], tuple[Principal, McpScope]]


def request_id_of(ctx: Ctx | None) -> str | None:
    """The HTTP request id (set by `RequestIdMiddleware`) of the request that carried this message."""
    request = ctx.request if ctx is not None else None
    if isinstance(request, Request):
        value = request.scope.get("state", {}).get("request_id")
        return str(value) if value else None
    return None


def _forwarding(ctx: Ctx) -> Forwarding:
    """A `prompts/get` or `resources/read`'s side: the downstream asked when the upstream needs input,
    and the request itself when it is of the 2026-07-28 era."""
    return Forwarding(relay=DownstreamCall(ctx.session, ctx.request_id), era=era_call(ctx))


class McpSurface:
    """The MCP side of a call: which scope a request sees, and what its session offers the Invoker."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        invoker: Invoker,
        notifier: SessionNotifier,
        subscriptions: Subscriptions,
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.invoker = invoker
        self.notifier = notifier
        self.subscriptions = subscriptions
        self.elicitations = UrlElicitations(ttl_s=settings.oauth_state_ttl_s)

    def style(self, ctx: Ctx) -> NameStyle:
        request = ctx.request
        return self.style_of(request.query_params.get("names") if isinstance(request, Request) else None)

    def style_of(self, names: str | None) -> NameStyle:
        """The naming style a request asks for (`?names=compat|dotted`), else the configured one."""
        if names == "compat":
            return "compat"
        if names == "dotted":
            return "dotted"
        return self.settings.tool_name_style

    def aggregate_scope(self, ctx: Ctx) -> tuple[Principal, CatalogView]:
        principal = current_principal()
        style = self.style(ctx)
        self.notifier.track(ctx.session, principal, style)
        return principal, self.catalog.view(principal, style)

    def revived(self, connection: Connection, principal: Principal, scope: Scope, *, single: bool) -> None:
        """A session created on another replica is served here now: it hears of catalog changes."""
        if single:
            server_id = str(scope.get("path_params", {}).get("server_id", ""))
            self.notifier.track_connection(connection, principal, "dotted", server_id=server_id)
            return
        style = self.style_of(Request(scope).query_params.get("names"))
        self.notifier.track_connection(connection, principal, style)

    def server_scope(self, ctx: Ctx) -> tuple[Principal, ServerScope]:
        principal = current_principal()
        request = ctx.request
        server_id = request.path_params.get("server_id", "") if isinstance(request, Request) else ""
        self.notifier.track(ctx.session, principal, "dotted", server_id=server_id)
        return principal, self._listed_server(principal, server_id)

    def _listed_server(self, principal: Principal, server_id: str) -> ServerScope:
        try:
            server = self.catalog.single_server_view(principal, server_id)
        except ToolNotFound:
            raise MCPError(INVALID_PARAMS, "unknown server") from None
        if not server.listed:
            raise MCPError(
                INVALID_PARAMS, f"server is not available (status {server.status}, {server.consent_tier})"
            )
        return self.catalog.server_scope(server)

    def listing(self, principal: Principal, *, names: str | None, server_id: str | None) -> McpScope:
        """For the `/mcp` front (no SDK context): the listing of the aggregate endpoint in the style
        `names` asks for, or of the per-server endpoint of `server_id`. Raises `MCPError` (-32602)
        for an unknown or unlisted server."""
        if server_id is None:
            return self.catalog.view(principal, self.style_of(names))
        return self._listed_server(principal, server_id)

    def caller(self, ctx: Ctx, meta: dict[str, Any] | None) -> Caller:
        relay = DownstreamCall(ctx.session, ctx.request_id)
        # A 2026-07-28 request goes through the era bridge (era_bridge.py); the handshake era's warm
        # path stays as it was.
        era = era_call(ctx, relay) if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS else None
        return Caller(
            request_id=request_id_of(ctx),
            forwarding=Forwarding(progress=self._progress(ctx, meta or {}), relay=relay, era=era),
            elicit=self._elicit(ctx),
        )

    async def call_tool(self, ctx: Ctx, scope_of: ScopeOf, params: types.CallToolRequestParams) -> Result:
        """`tools/call`: an unknown name is -32602; an upstream authorization missing is -32042 for a
        client of URL-mode elicitation (mcp_elicitation.py); other failures are `isError` results."""
        principal, scope = scope_of(ctx)
        try:
            target = scope.resolve_tool(params.name)
        except ToolNotFound:
            self.invoker.unknown(principal, params.name, request_id_of(ctx))
            raise MCPError(INVALID_PARAMS, f"Unknown tool: {params.name}") from None
        meta: dict[str, Any] = dict(params.meta or {})
        caller, aggregate = self.caller(ctx, meta), isinstance(scope, CatalogView)
        url_auth = (lambda e: self.elicitations.required(ctx, e)) if supports_url_elicitation(ctx) else None
        call = ToolRun(self.invoker, principal, target, params.name, params.arguments, meta, caller)
        result = await call.run(aggregate, url_auth)
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS and "resultType" not in result:
            result = {**result, "resultType": "complete"}  # required from 2026-07-28 on
        return result

    async def subscription(self, ctx: Ctx, scope_of: ScopeOf, uri: str, *, subscribe: bool) -> None:
        """`resources/(un)subscribe` of a remote resource, relayed to the caller's upstream session."""
        principal, scope = scope_of(ctx)
        try:
            target = scope.resolve_resource(uri)
        except ToolNotFound:
            raise MCPError(INVALID_PARAMS, f"Unknown resource: {uri}") from None
        if not isinstance(target, RemoteTarget):
            raise MCPError(INVALID_PARAMS, "desktop resources cannot be subscribed to")
        key, upstream, connection = (
            target.pool_key(principal),
            target.upstream_name,
            connection_of(ctx.session),
        )
        try:
            if subscribe and self.subscriptions.add(key, upstream, connection, uri):
                await target.use(self.invoker.backends, principal, lambda s: s.subscribe_resource(upstream))
            elif not subscribe and self.subscriptions.remove(key, upstream, connection):
                await target.use(self.invoker.backends, principal, lambda s: s.unsubscribe_resource(upstream))
        except ScaiLinkError as err:
            raise mcp_error(err) from None

    def _progress(self, ctx: Ctx, meta: dict[str, Any]) -> ProgressFnT | None:
        token = meta.get("progress_token", meta.get("progressToken"))
        if token is None:
            return None
        session, related = ctx.session, str(ctx.request_id) if ctx.request_id is not None else None

        async def relay(progress: float, total: float | None, message: str | None) -> None:
            await session.send_progress_notification(
                token, progress, total, message, related_request_id=related
            )

        return relay

    def _elicit(self, ctx: Ctx) -> Callable[[str], Any] | None:
        session = ctx.session
        caps = session.client_capabilities
        if caps is None or caps.elicitation is None or ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return None  # 2026-07-28 has no back-channel to ask on: the desktop is asked instead

        async def ask(message: str) -> bool:
            answer = await session.elicit_form(
                message, {"type": "object", "properties": {}}, related_request_id=ctx.request_id
            )
            return answer.action == "accept"

        return ask


def build_server(surface: McpSurface, *, single: bool, sessions: SessionTable | None = None) -> Server[Any]:
    """One handler set; `single` is the per-server endpoint (upstream names). `sessions` records each
    initialized session's connection for the `/mcp` front (`mcp_front.py`)."""
    scope_of: ScopeOf = surface.server_scope if single else surface.aggregate_scope
    invoker = surface.invoker

    def lister(method: str) -> Callable[[Ctx, types.PaginatedRequestParams], Any]:
        """A list handler: the page of `list_pages.py` as a dict, shaped per era by the SDK."""

        async def handler(ctx: Ctx, params: types.PaginatedRequestParams) -> dict[str, Any]:
            modern = ctx.protocol_version in MODERN_PROTOCOL_VERSIONS
            result = list_pages.page_result(scope_of(ctx)[1], method, params.cursor, modern=modern)
            return {**result, "resultType": "complete"} if modern else result

        return handler

    async def call_tool(ctx: Ctx, params: types.CallToolRequestParams) -> Result:
        return await surface.call_tool(ctx, scope_of, params)

    async def get_prompt(ctx: Ctx, params: types.GetPromptRequestParams) -> PromptResult:
        principal, scope = scope_of(ctx)
        try:
            target = scope.resolve_prompt(params.name)
        except ToolNotFound:
            raise MCPError(INVALID_PARAMS, f"Unknown prompt: {params.name}") from None
        try:
            return await invoker.get_prompt(principal, target, params.arguments, _forwarding(ctx))
        except ScaiLinkError as err:
            raise mcp_error(err) from None

    async def read_resource(ctx: Ctx, params: types.ReadResourceRequestParams) -> ReadResult:
        principal, scope = scope_of(ctx)
        try:
            target = scope.resolve_resource(str(params.uri))
        except ToolNotFound:
            raise MCPError(INVALID_PARAMS, f"Unknown resource: {params.uri}") from None
        try:
            result = await invoker.read(principal, target, _forwarding(ctx))
        except ScaiLinkError as err:
            raise mcp_error(err) from None
        if single or isinstance(result, types.InputRequiredResult):  # 2026-07-28: the upstream's rounds
            return result
        return resource_uris.read_result(result, target, str(params.uri))

    async def subscribe(ctx: Ctx, params: types.SubscribeRequestParams) -> types.EmptyResult:
        await surface.subscription(ctx, scope_of, str(params.uri), subscribe=True)
        return types.EmptyResult()

    async def unsubscribe(ctx: Ctx, params: types.UnsubscribeRequestParams) -> types.EmptyResult:
        await surface.subscription(ctx, scope_of, str(params.uri), subscribe=False)
        return types.EmptyResult()

    async def on_server(ctx: Ctx, request: Callable[[Any], Any]) -> Any:
        """Per-server endpoint: a request relayed as is to the server's upstream session."""
        principal, scope = surface.server_scope(ctx)
        assert isinstance(scope, ServerScope)
        target = RemoteTarget("tool", "", scope.server)
        try:
            return await target.use(invoker.backends, principal, request)
        except ScaiLinkError as err:
            raise mcp_error(err) from None

    async def complete(ctx: Ctx, params: types.CompleteRequestParams) -> types.CompleteResult:
        if not single:  # routed by the namespaced prompt name or the scailink:// URI
            principal, view = surface.aggregate_scope(ctx)
            try:
                target = forwarding.completion_target(view, params.ref)
            except ToolNotFound as err:
                raise MCPError(INVALID_PARAMS, err.message) from None
            try:
                return await forwarding.complete(invoker, principal, target, params)
            except ScaiLinkError as err:
                raise mcp_error(err) from None
        request = types.CompleteRequest(params=params)
        result: types.CompleteResult = await on_server(
            ctx, lambda s: s.send_request(request, types.CompleteResult)
        )
        return result

    async def set_level(ctx: Ctx, params: types.SetLevelRequestParams) -> types.EmptyResult:
        if not single:
            principal, view = surface.aggregate_scope(ctx)
            await forwarding.set_level(invoker, surface.subscriptions, principal, view, params.level)
            return types.EmptyResult()
        await on_server(
            ctx, lambda s: s.send_request(forwarding.set_level_request(params.level), types.EmptyResult)
        )
        return types.EmptyResult()

    async def listen(
        ctx: Ctx, params: types.SubscriptionsListenRequestParams
    ) -> types.SubscriptionsListenResult:
        principal = current_principal()
        return await surface.notifier.modern.handler(principal, surface.style(ctx))(ctx, params)

    handlers: dict[str, Any] = {
        "on_get_prompt": get_prompt,
        "on_read_resource": read_resource,
        "on_subscribe_resource": subscribe,
        "on_unsubscribe_resource": unsubscribe,
    }
    if single:
        server = ListChangedServer(
            SERVER_NAME, version=__version__, title=SINGLE_TITLE, on_completion=complete, **handlers
        )
    else:
        server = ListChangedServer(
            SERVER_NAME,
            version=__version__,
            title=AGGREGATE_TITLE,
            instructions=INSTRUCTIONS,
            on_subscriptions_listen=listen,
            on_completion=complete,
            **handlers,
        )
    # Registered directly: the constructor argument warns that logging is deprecated as of 2026-07-28,
    # but clients of the handshake era still send it and upstreams may honour it.
    server.add_request_handler("logging/setLevel", types.SetLevelRequestParams, set_level)
    # Registered directly: the handler returns the upstream's result dict, passed through unchanged.
    server.add_request_handler("tools/call", types.CallToolRequestParams, call_tool)
    # Registered directly: the handlers return the catalog's raw items (a dict, not result models).
    for method in list_pages.LIST_METHODS:
        server.add_request_handler(method, types.PaginatedRequestParams, lister(method))

    async def initialized(ctx: Ctx, params: types.NotificationParams) -> None:
        """Tracked from the handshake on: a session that has not listed anything yet still hears of
        catalog changes (an agent may connect to an empty catalog and wait for one)."""
        with suppress(MCPError):
            scope_of(ctx)

    server.add_notification_handler("notifications/initialized", types.NotificationParams, initialized)
    if sessions is not None:
        server.middleware = [sessions.record]
    return server
