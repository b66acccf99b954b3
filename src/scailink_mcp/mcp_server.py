"""The aggregating MCP server at `/mcp` and the per-server endpoint; thin handlers over `catalog` + pool.

Identity: ScaiLink's JWT verifier is plugged into the SDK's resource-server auth (`BearerAuthBackend`,
`RequireAuthMiddleware`, protected-resource metadata), so a missing token answers 401 with
`WWW-Authenticate` pointing at `/.well-known/oauth-protected-resource`. Handlers read the `Principal`
from the SDK's auth context.

Hot path of `tools/call`: resolve the name in the cached view -> check `scailink:invoke` and the
consent tier -> `pool.call_tool` on a warm upstream session -> return the upstream result unchanged.
No database query, no handshake when a session is warm.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import anyio
import mcp_types as types
from mcp.server.auth.middleware.auth_context import AuthContextMiddleware, get_access_token
from mcp.server.auth.middleware.bearer_auth import BearerAuthBackend, RequireAuthMiddleware
from mcp.server.auth.provider import AccessToken
from mcp.server.connection import Connection
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import NotificationOptions, Server
from mcp.server.models import InitializationOptions
from mcp.server.session import ServerSession
from mcp.server.sse import SseServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ConfigDict, ValidationError
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from scailink_mcp import auth
from scailink_mcp.audit import AuditLog, AuditRecord
from scailink_mcp.auth import Principal, TokenVerifier
from scailink_mcp.catalog import Catalog, CatalogView, NameStyle, ServerSnapshot, Target
from scailink_mcp.config import Settings
from scailink_mcp.desktop.connections import DesktopRegistry, consent_denied, needs_consent
from scailink_mcp.desktop.protocol import PROMPT_GET, RESOURCE_READ, TOOL_INVOKE
from scailink_mcp.errors import (
    ConsentDenied,
    Forbidden,
    ResultTooLarge,
    ScaiLinkError,
    ToolNotFound,
    Unauthorized,
    UpstreamError,
)
from scailink_mcp.metrics import Metrics
from scailink_mcp.notifier import SessionNotifier
from scailink_mcp.relay import DownstreamCall
from scailink_mcp.remote.pool import PoolKey, UpstreamPool
from scailink_mcp.subscriptions import Subscriptions

logger = logging.getLogger(__name__)

INVALID_PARAMS = -32602
INVALID_REQUEST = -32600


class ScaiLinkAccessToken(AccessToken):
    """The SDK's access token carrying ScaiLink's `Principal` to the handlers."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    principal: Principal


class McpTokenVerifier:
    """Adapts `auth.TokenVerifier` to the SDK's `TokenVerifier` protocol."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self.verifier = verifier

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            principal = await self.verifier.verify(token)
        except Unauthorized as exc:
            logger.info("mcp token refused", extra={"reason": exc.message})
            return None
        # The SDK ties a session (Streamable HTTP and SSE alike) to (client_id, issuer, subject) and
        # answers 404 to anyone else: both carry the tenant, since `sub` is only unique inside one.
        owner = json.dumps(principal.identity)
        return ScaiLinkAccessToken(
            token=token,
            client_id=owner,
            scopes=sorted(principal.permissions),
            subject=owner,
            claims={"tenant_id": principal.tenant_id},
            principal=principal,
        )


class ConsentGate(Protocol):
    """Asks the user to approve one invocation of a `confirm` tool. The desktop bridge implements it."""

    async def ask(self, principal: Principal, public_name: str, arguments: dict[str, Any] | None) -> bool: ...


class DenyingConsentGate:
    """Until a desktop session can be asked, `confirm` tools are denied (unless MCP elicitation is used)."""

    async def ask(self, principal: Principal, public_name: str, arguments: dict[str, Any] | None) -> bool:
        return False


def current_principal() -> Principal:
    token = get_access_token()
    if not isinstance(token, ScaiLinkAccessToken):
        raise MCPError(INVALID_REQUEST, "not authenticated")
    return token.principal


# A `CallToolResult` in its wire form (camelCase keys), passed through from the upstream unchanged.
ToolResult = dict[str, Any]


def error_result(err: ScaiLinkError) -> ToolResult:
    return {
        "content": [{"type": "text", "text": f"{err.code}: {err.message}"}],
        "isError": True,
        "_meta": {"scailink/error": {"code": err.code, "message": err.message}},
    }


def _text_size(item: Any) -> int:
    if not isinstance(item, dict):
        return 0
    size = 0
    for field in ("text", "data", "blob"):
        value = item.get(field)
        if isinstance(value, str):
            size += len(value)
    return size


def result_size(result: ToolResult) -> int:
    """A cheap estimate of the result's wire size: text and base64 payloads dominate it."""
    size = 0
    content = result.get("content")
    for block in content if isinstance(content, list) else ():
        size += _text_size(block)
        if isinstance(block, dict):
            size += _text_size(block.get("resource"))
    structured = result.get("structuredContent")
    if structured is not None:
        size += len(json.dumps(structured))
    return size


def request_id_of(ctx: ServerRequestContext[Any, Any] | None) -> str | None:
    """The HTTP request id (set by `RequestIdMiddleware`) of the request that carried this message."""
    request = ctx.request if ctx is not None else None
    if isinstance(request, Request):
        value = request.scope.get("state", {}).get("request_id")
        return str(value) if value else None
    return None


def _page_cursor(index: int) -> str:
    return base64.urlsafe_b64encode(f"p{index}".encode()).decode()


def _page_index(cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        raw = base64.urlsafe_b64decode(cursor.encode()).decode()
        if raw.startswith("p") and raw[1:].isdigit():
            return int(raw[1:])
    except (ValueError, UnicodeDecodeError):
        pass
    raise MCPError(INVALID_PARAMS, "invalid cursor")


class Gateway:
    """The business of the MCP surface, shared by the aggregate and per-server endpoints."""

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        pool: UpstreamPool,
        notifier: SessionNotifier,
        consent: ConsentGate | None = None,
        desktop: DesktopRegistry | None = None,
        metrics: Metrics | None = None,
        subscriptions: Subscriptions | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.audit = audit
        self.subscriptions = subscriptions or Subscriptions()
        self.desktop = desktop
        self.metrics = metrics
        self.settings = settings
        self.catalog = catalog
        self.pool = pool
        self.notifier = notifier
        self.consent: ConsentGate = consent or DenyingConsentGate()

    def style(self, ctx: ServerRequestContext[Any, Any]) -> NameStyle:
        request = ctx.request
        if isinstance(request, Request) and request.query_params.get("names") in ("compat", "dotted"):
            return request.query_params["names"]  # type: ignore[return-value]
        return self.settings.tool_name_style

    def view(self, ctx: ServerRequestContext[Any, Any]) -> tuple[Principal, CatalogView]:
        principal = current_principal()
        style = self.style(ctx)
        self.notifier.track(ctx.session, principal, style)
        return principal, self.catalog.view(principal, style)

    def timeout(self, meta: Mapping[str, Any] | None) -> float:
        """Default 60 s; a caller may ask for another via `_meta["scailink/timeout_ms"]`, capped at 300 s."""
        requested = (meta or {}).get("scailink/timeout_ms")
        seconds = self.settings.call_timeout_s
        if isinstance(requested, int | float) and requested > 0:
            seconds = requested / 1000
        return min(seconds, self.settings.call_timeout_max_s)

    async def approve(
        self,
        principal: Principal,
        target: Target,
        public: str,
        args: Any,
        ctx: ServerRequestContext[Any, Any] | None = None,
    ) -> None:
        """The consent tier: `locked` is never callable, `confirm` needs the user's approval per call."""
        if target.desktop is not None:
            tool = target.desktop.tools.get(target.upstream_name, {})
            if needs_consent(tool):
                approved = await self._ask_desktop(target, public, args)
                self.record(principal, "consent", "ok" if approved else "denied", target=public)
                if not approved:
                    raise consent_denied()
            return
        assert target.server is not None
        tier = target.server.consent_tier
        if tier == "locked":
            raise ToolNotFound(f"unknown tool {public!r}")
        if tier != "confirm":
            return
        session: ServerSession | None = ctx.session if ctx is not None else None
        caps = session.client_capabilities if session is not None else None
        if session is not None and caps is not None and caps.elicitation is not None:
            with anyio.move_on_after(self.settings.consent_timeout_s):
                answer = await session.elicit_form(
                    f"Allow the call of {public}?",
                    {"type": "object", "properties": {}},
                    related_request_id=ctx.request_id if ctx is not None else None,
                )
                if answer.action == "accept":
                    self.record(principal, "consent", "ok", target=public)
                    return
            self.record(principal, "consent", "denied", target=public)
            raise consent_denied()
        with anyio.move_on_after(self.settings.consent_timeout_s):
            if await self.consent.ask(principal, public, args):
                self.record(principal, "consent", "ok", target=public)
                return
        self.record(principal, "consent", "denied", target=public)
        raise consent_denied()

    async def _ask_desktop(self, target: Target, public: str, args: Any) -> bool:
        assert target.desktop is not None and self.desktop is not None
        return await self.desktop.ask_consent(
            target.desktop, target.upstream_name, args, timeout=self.settings.consent_timeout_s
        )

    async def invoke(
        self,
        principal: Principal,
        target: Target,
        public: str,
        arguments: dict[str, Any] | None,
        *,
        timeout: float,
        ctx: ServerRequestContext[Any, Any] | None = None,
        progress: ProgressFnT | None = None,
        request_id: str | None = None,
    ) -> ToolResult:
        """The one call path of MCP and REST: permission, consent, forward, size cap. Raises ScaiLinkError."""
        started = time.perf_counter()
        source = "desktop" if target.desktop is not None else "remote"
        outcome, code = "error", None
        try:
            result = await self._invoke(
                principal,
                target,
                public,
                arguments,
                timeout=timeout,
                ctx=ctx,
                progress=progress,
            )
            outcome = "tool_error" if result.get("isError") is True else "ok"
            return result
        except ScaiLinkError as err:
            outcome, code = ("denied" if isinstance(err, Forbidden | ConsentDenied) else "error"), err.code
            raise
        finally:
            elapsed = time.perf_counter() - started
            if self.metrics is not None:
                self.metrics.call(source, outcome, elapsed)
            level = target.desktop.audit_detail_level if target.desktop is not None else None
            self.record(
                principal,
                "tool_call",
                "error" if outcome == "tool_error" else outcome,
                code,
                elapsed,
                request_id if request_id is not None else request_id_of(ctx),
                public,
                arguments,
                level,
            )

    def record(
        self,
        principal: Principal,
        event: str,
        outcome: str,
        code: str | None = None,
        elapsed_s: float | None = None,
        request_id: str | None = None,
        target: str | None = None,
        arguments: Any = None,
        level: str | None = None,
    ) -> None:
        """One audit event; never blocks nor fails the caller."""
        if self.audit is None:
            return
        self.audit.record(
            AuditRecord(
                tenant_id=principal.tenant_id,
                user_id=principal.user_id,
                event=event,
                outcome=outcome,
                error_code=code,
                duration_ms=elapsed_s * 1000 if elapsed_s is not None else None,
                request_id=request_id,
                target=target,
                arguments=arguments,
                detail_level=level or self.settings.audit_detail_level,
            )
        )

    async def _invoke(
        self,
        principal: Principal,
        target: Target,
        public: str,
        arguments: dict[str, Any] | None,
        *,
        timeout: float,
        ctx: ServerRequestContext[Any, Any] | None,
        progress: ProgressFnT | None,
    ) -> ToolResult:
        principal.require(auth.INVOKE)
        await self.approve(principal, target, public, arguments, ctx)
        if target.desktop is not None:
            assert self.desktop is not None
            raw = await self.desktop.invoke(
                target.desktop,
                TOOL_INVOKE,
                {
                    "tool": target.upstream_name,
                    "arguments": arguments or {},
                    "caller": {"user_id": principal.user_id},
                },
                timeout=timeout,
            )
            try:
                result = types.CallToolResult.model_validate(raw).model_dump(
                    by_alias=True, mode="json", exclude_none=True
                )
            except ValidationError:
                raise UpstreamError("the desktop device answered with an invalid tool result") from None
        else:
            assert target.server is not None
            result = await self.pool.call_tool(
                PoolKey(target.server.id, target.server.credential_version, principal.user_id),
                target.upstream_name,
                arguments,
                timeout=timeout,
                progress_callback=progress,
                relay=DownstreamCall(ctx.session, ctx.request_id) if ctx is not None else None,
            )
        if result_size(result) > self.settings.max_result_bytes:
            raise ResultTooLarge(f"tool result over {self.settings.max_result_bytes} bytes refused")
        return result

    async def call(
        self,
        ctx: ServerRequestContext[Any, Any],
        principal: Principal,
        target: Target,
        public: str,
        params: types.CallToolRequestParams,
    ) -> ToolResult:
        """`tools/call` over MCP: failures become `isError` results with `_meta["scailink/error"]`."""
        try:
            result = await self.invoke(
                principal,
                target,
                public,
                params.arguments,
                timeout=self.timeout(params.meta),
                ctx=ctx,
                progress=self._progress_relay(ctx, params),
            )
        except ScaiLinkError as err:
            result = error_result(err)
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS and "resultType" not in result:
            result = {**result, "resultType": "complete"}  # required from 2026-07-28 on
        return result

    def _progress_relay(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> ProgressFnT | None:
        meta: Mapping[str, Any] = params.meta or {}
        token = meta.get("progress_token", meta.get("progressToken"))
        if token is None:
            return None
        session: ServerSession = ctx.session
        related = str(ctx.request_id) if ctx.request_id is not None else None

        async def relay(progress: float, total: float | None, message: str | None) -> None:
            await session.send_progress_notification(
                token, progress, total, message, related_request_id=related
            )

        return relay

    async def subscription(self, ctx: ServerRequestContext[Any, Any], uri: str, *, subscribe: bool) -> None:
        """`resources/(un)subscribe` of a remote resource, relayed to the caller's upstream session."""
        principal, view = self.view(ctx)
        try:
            target = view.resolve_resource(uri)
        except ToolNotFound:
            raise MCPError(INVALID_PARAMS, f"Unknown resource: {uri}") from None
        if target.server is None:
            raise MCPError(INVALID_PARAMS, "desktop resources cannot be subscribed to")
        key = PoolKey(target.server.id, target.server.credential_version, principal.user_id)
        connection: Connection = ctx.session._connection  # see notifier.py: no public accessor in mcp 2.3
        await self._subscribe(principal, target.server, key, connection, target.upstream_name, uri, subscribe)

    async def subscribe_raw(
        self,
        ctx: ServerRequestContext[Any, Any],
        principal: Principal,
        server: ServerSnapshot,
        uri: str,
        *,
        subscribe: bool,
    ) -> None:
        """The per-server endpoint: URIs are the upstream's own."""
        key = PoolKey(server.id, server.credential_version, principal.user_id)
        connection: Connection = ctx.session._connection
        await self._subscribe(principal, server, key, connection, uri, uri, subscribe)

    async def _subscribe(
        self,
        principal: Principal,
        server: ServerSnapshot,
        key: PoolKey,
        connection: Connection,
        upstream: str,
        public: str,
        subscribe: bool,
    ) -> None:
        if subscribe and self.subscriptions.add(key, upstream, connection, public):
            await self.use(principal, server, lambda s: s.subscribe_resource(upstream))
        elif not subscribe and self.subscriptions.remove(key, upstream, connection):
            await self.use(principal, server, lambda s: s.unsubscribe_resource(upstream))

    async def desktop_request(self, target: Target, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """`scailink/resource_read` / `scailink/prompt_get` to the device; failures are JSON-RPC errors."""
        assert target.desktop is not None and self.desktop is not None
        try:
            return await self.desktop.invoke(
                target.desktop, method, params, timeout=self.settings.call_timeout_s
            )
        except ScaiLinkError as err:
            raise MCPError(INVALID_REQUEST, f"{err.code}: {err.message}") from None

    async def use(
        self, principal: Principal, server: ServerSnapshot | None, fn: Callable[[Any], Awaitable[Any]]
    ) -> Any:
        if server is None:
            raise MCPError(INVALID_PARAMS, "desktop resources and prompts are not relayed yet")
        try:
            return await self.pool.use(
                PoolKey(server.id, server.credential_version, principal.user_id),
                fn,
                timeout=self.settings.call_timeout_s,
            )
        except ScaiLinkError as err:
            raise MCPError(INVALID_REQUEST, f"{err.code}: {err.message}") from None


class _Server(Server[Any]):
    """The SDK's session manager builds init options without notification options; announce listChanged.

    The SDK's default OpenTelemetry middleware is dropped: it wraps every message on the hot path and
    ScaiLink exports Prometheus metrics instead.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.middleware = []

    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        return super().create_initialization_options(
            notification_options
            or NotificationOptions(prompts_changed=True, resources_changed=True, tools_changed=True),
            experimental_capabilities,
            extensions,
        )


def build_aggregate_server(gw: Gateway) -> Server[Any]:
    async def list_tools(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        _, view = gw.view(ctx)
        index = _page_index(params.cursor if params else None)
        if index >= len(view.tool_pages):
            return types.ListToolsResult(tools=[])
        start, end = view.tool_pages[index]
        more = index + 1 < len(view.tool_pages)
        return types.ListToolsResult(
            tools=view.tools[start:end], next_cursor=_page_cursor(index + 1) if more else None
        )

    async def call_tool(
        ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> ToolResult:
        principal, view = gw.view(ctx)
        try:
            target = view.resolve_tool(params.name)
        except ToolNotFound:
            gw.record(
                principal, "tool_call", "error", ToolNotFound.code, None, request_id_of(ctx), params.name
            )
            raise MCPError(INVALID_PARAMS, f"Unknown tool: {params.name}") from None
        return await gw.call(ctx, principal, target, params.name, params)

    async def list_prompts(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListPromptsResult:
        return types.ListPromptsResult(prompts=gw.view(ctx)[1].prompts)

    async def get_prompt(
        ctx: ServerRequestContext[Any, Any], params: types.GetPromptRequestParams
    ) -> types.GetPromptResult:
        principal, view = gw.view(ctx)
        try:
            target = view.resolve_prompt(params.name)
        except ToolNotFound:
            raise MCPError(INVALID_PARAMS, f"Unknown prompt: {params.name}") from None
        if target.desktop is not None:
            raw = await gw.desktop_request(
                target, PROMPT_GET, {"name": target.upstream_name, "arguments": params.arguments}
            )
            return types.GetPromptResult.model_validate(raw)
        result: types.GetPromptResult = await gw.use(
            principal, target.server, lambda s: s.get_prompt(target.upstream_name, params.arguments)
        )
        return result

    async def list_resources(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=gw.view(ctx)[1].resources)

    async def list_templates(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        return types.ListResourceTemplatesResult(resource_templates=gw.view(ctx)[1].resource_templates)

    async def read_resource(
        ctx: ServerRequestContext[Any, Any], params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        principal, view = gw.view(ctx)
        try:
            target = view.resolve_resource(str(params.uri))
        except ToolNotFound:
            raise MCPError(INVALID_PARAMS, f"Unknown resource: {params.uri}") from None
        if target.desktop is not None:
            raw = await gw.desktop_request(target, RESOURCE_READ, {"uri": target.upstream_name})
            return types.ReadResourceResult.model_validate(raw)
        result: types.ReadResourceResult = await gw.use(
            principal, target.server, lambda s: s.read_resource(target.upstream_name)
        )
        return result

    async def subscribe(
        ctx: ServerRequestContext[Any, Any], params: types.SubscribeRequestParams
    ) -> types.EmptyResult:
        await gw.subscription(ctx, str(params.uri), subscribe=True)
        return types.EmptyResult()

    async def unsubscribe(
        ctx: ServerRequestContext[Any, Any], params: types.UnsubscribeRequestParams
    ) -> types.EmptyResult:
        await gw.subscription(ctx, str(params.uri), subscribe=False)
        return types.EmptyResult()

    async def listen(
        ctx: ServerRequestContext[Any, Any], params: types.SubscriptionsListenRequestParams
    ) -> types.SubscriptionsListenResult:
        principal = current_principal()
        return await gw.notifier.modern.handler(principal, gw.style(ctx))(ctx, params)

    aggregate = _Server(
        "scailink",
        on_subscriptions_listen=listen,
        on_subscribe_resource=subscribe,
        on_unsubscribe_resource=unsubscribe,
        version="0.1.0",
        instructions="ScaiLink: the tools of your registered MCP servers and desktop devices, namespaced.",
        on_list_tools=list_tools,
        on_list_prompts=list_prompts,
        on_get_prompt=get_prompt,
        on_list_resources=list_resources,
        on_list_resource_templates=list_templates,
        on_read_resource=read_resource,
    )
    # Registered directly: the handler returns the upstream's result dict, passed through unchanged.
    aggregate.add_request_handler("tools/call", types.CallToolRequestParams, call_tool)
    return aggregate


def build_single_server(gw: Gateway) -> Server[Any]:
    """One registered server, its upstream names unchanged (for single-server clients and federation)."""

    def server_of(ctx: ServerRequestContext[Any, Any]) -> tuple[Principal, ServerSnapshot]:
        principal = current_principal()
        request = ctx.request
        server_id = request.path_params.get("server_id", "") if isinstance(request, Request) else ""
        gw.notifier.track(ctx.session, principal, "dotted", server_id=server_id)
        try:
            server = gw.catalog.single_server_view(principal, server_id)
        except ToolNotFound:
            raise MCPError(INVALID_PARAMS, "unknown server") from None
        if not server.listed:
            raise MCPError(
                INVALID_PARAMS, f"server is not available (status {server.status}, {server.consent_tier})"
            )
        return principal, server

    async def list_tools(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        _, server = server_of(ctx)
        return types.ListToolsResult(tools=[types.Tool.model_validate(t) for t in server.tools])

    async def call_tool(
        ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> ToolResult:
        principal, server = server_of(ctx)
        if params.name not in {t["name"] for t in server.tools}:
            raise MCPError(INVALID_PARAMS, f"Unknown tool: {params.name}")
        return await gw.call(ctx, principal, Target("tool", params.name, server=server), params.name, params)

    async def list_prompts(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListPromptsResult:
        _, server = server_of(ctx)
        return types.ListPromptsResult(prompts=[types.Prompt.model_validate(p) for p in server.prompts])

    async def get_prompt(
        ctx: ServerRequestContext[Any, Any], params: types.GetPromptRequestParams
    ) -> types.GetPromptResult:
        principal, server = server_of(ctx)
        result: types.GetPromptResult = await gw.use(
            principal, server, lambda s: s.get_prompt(params.name, params.arguments)
        )
        return result

    async def list_resources(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        _, server = server_of(ctx)
        return types.ListResourcesResult(
            resources=[types.Resource.model_validate(r) for r in server.resources]
        )

    async def list_templates(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        _, server = server_of(ctx)
        return types.ListResourceTemplatesResult(
            resource_templates=[types.ResourceTemplate.model_validate(r) for r in server.resource_templates]
        )

    async def read_resource(
        ctx: ServerRequestContext[Any, Any], params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        principal, server = server_of(ctx)
        result: types.ReadResourceResult = await gw.use(
            principal, server, lambda s: s.read_resource(str(params.uri))
        )
        return result

    async def complete(
        ctx: ServerRequestContext[Any, Any], params: types.CompleteRequestParams
    ) -> types.CompleteResult:
        principal, server = server_of(ctx)
        request = types.CompleteRequest(params=params)
        result: types.CompleteResult = await gw.use(
            principal, server, lambda s: s.send_request(request, types.CompleteResult)
        )
        return result

    async def set_level(
        ctx: ServerRequestContext[Any, Any], params: types.SetLevelRequestParams
    ) -> types.EmptyResult:
        principal, server = server_of(ctx)
        await gw.use(principal, server, lambda s: s.set_logging_level(params.level))
        return types.EmptyResult()

    async def subscribe(
        ctx: ServerRequestContext[Any, Any], params: types.SubscribeRequestParams
    ) -> types.EmptyResult:
        principal, server = server_of(ctx)
        await gw.subscribe_raw(ctx, principal, server, str(params.uri), subscribe=True)
        return types.EmptyResult()

    async def unsubscribe(
        ctx: ServerRequestContext[Any, Any], params: types.UnsubscribeRequestParams
    ) -> types.EmptyResult:
        principal, server = server_of(ctx)
        await gw.subscribe_raw(ctx, principal, server, str(params.uri), subscribe=False)
        return types.EmptyResult()

    single = _Server(
        "scailink-server",
        version="0.1.0",
        on_list_tools=list_tools,
        on_list_prompts=list_prompts,
        on_get_prompt=get_prompt,
        on_list_resources=list_resources,
        on_list_resource_templates=list_templates,
        on_read_resource=read_resource,
        on_completion=complete,
        on_subscribe_resource=subscribe,
        on_unsubscribe_resource=unsubscribe,
    )
    # Registered directly: the constructor argument warns that logging is deprecated as of 2026-07-28,
    # but clients of the handshake era still send it and the upstream may honour it.
    single.add_request_handler("logging/setLevel", types.SetLevelRequestParams, set_level)
    single.add_request_handler("tools/call", types.CallToolRequestParams, call_tool)
    return single


def security_settings(settings: Settings) -> TransportSecuritySettings:
    """DNS-rebinding protection: Host/Origin must name this service."""
    hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*", *settings.mcp_allowed_hosts]
    origins = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*", *settings.mcp_allowed_origins]
    if settings.public_url:
        from urllib.parse import urlsplit

        public = urlsplit(settings.public_url)
        hosts += [public.netloc, f"{public.hostname}:*"]
        origins.append(f"{public.scheme}://{public.netloc}")
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins
    )


def resource_url(settings: Settings) -> str:
    return (settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/") + "/mcp"


def rate_key(scope: Scope) -> str | None:
    """The per-user rate-limit bucket of an authenticated request (the same key as REST)."""
    user = scope.get("user")
    token = getattr(user, "access_token", None)
    if isinstance(token, ScaiLinkAccessToken):
        return f"{token.principal.tenant_id}/{token.principal.user_id}"
    return None


def protect(
    app: ASGIApp,
    verifier: McpTokenVerifier,
    metadata_url: str,
    guard: Callable[[ASGIApp], ASGIApp] | None = None,
) -> ASGIApp:
    """Bearer auth the SDK way: 401 + `WWW-Authenticate: Bearer ... resource_metadata=...`; then
    `guard` (rate limit, body and message checks) on authenticated requests."""
    from pydantic import AnyHttpUrl

    required = RequireAuthMiddleware(guard(app) if guard else app, [], AnyHttpUrl(metadata_url))
    return AuthenticationMiddleware(AuthContextMiddleware(required), backend=BearerAuthBackend(verifier))


def session_manager(server: Server[Any], settings: Settings) -> StreamableHTTPSessionManager:
    return StreamableHTTPSessionManager(
        app=server,
        security_settings=security_settings(settings),
        session_idle_timeout=settings.mcp_session_idle_s,
        max_sessions=settings.mcp_max_sessions,
        max_request_body_size=settings.max_body_bytes,
    )


def asgi(manager: StreamableHTTPSessionManager) -> ASGIApp:
    return StreamableHTTPASGIApp(manager)


class LegacySse:
    """The 2024-11-05 HTTP+SSE transport: `GET /sse` opens the stream, `POST /messages/` feeds it."""

    def __init__(self, server: Server[Any], settings: Settings) -> None:
        self.server = server
        self.transport = SseServerTransport("/messages/", security_settings=security_settings(settings))

    async def connect(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with self.transport.connect_sse(scope, receive, send) as (read, write):
                await self.server.run(read, write, self.server.create_initialization_options())
        except ValueError:
            return  # a forged Host/Origin: the transport already answered 403/421

    async def post(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.transport.handle_post_message(scope, receive, send)
