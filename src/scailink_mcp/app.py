"""`create_app(settings)`: builds every part explicitly and mounts the surfaces.

The lifespan owns every background task (health checks, re-discovery): they start with the app and
are cancelled and awaited on shutdown, so nothing outlives it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass

import anyio
import anyio.to_thread
from mcp.server.auth.routes import create_protected_resource_routes
from mcp.server.connection import Connection
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from pydantic import AnyHttpUrl
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute
from starlette.types import ASGIApp, Scope

from scailink_mcp import dashboard, front_calls, mcp_server, mcp_transports
from scailink_mcp.api import audit as audit_api
from scailink_mcp.api import desktop as desktop_api
from scailink_mcp.api import iam as iam_api
from scailink_mcp.api import oauth as oauth_api
from scailink_mcp.api import operations, remote_servers
from scailink_mcp.api.middleware import (
    LanedStarlette,
    Lanes,
    RequestIdMiddleware,
    http_exception_handler,
    scailink_error_handler,
    unhandled_error_handler,
)
from scailink_mcp.audit import AuditLog, AuditRecord
from scailink_mcp.auth import Principal, TokenVerifier
from scailink_mcp.catalog import Catalog, RemoteDirectory
from scailink_mcp.config import Settings
from scailink_mcp.crypto import Keyring
from scailink_mcp.db import Database
from scailink_mcp.desktop.bridge import Bridge
from scailink_mcp.desktop.cluster import DesktopCluster
from scailink_mcp.desktop.connections import DesktopConsentGate, DesktopRegistry
from scailink_mcp.desktop.protocol import Close
from scailink_mcp.era_bridge import EraBridge
from scailink_mcp.era_cluster import EraCluster
from scailink_mcp.errors import ScaiLinkError
from scailink_mcp.events import DesktopCatalogChanged, EventBus, RolesChanged, ServerEvent, UpstreamAuthorized
from scailink_mcp.iam import RoleStore
from scailink_mcp.inflight import InFlight
from scailink_mcp.invocation import Invoker
from scailink_mcp.leases import Lease, RedisLease
from scailink_mcp.mcp_auth import McpTokenVerifier, rate_key, resource_url
from scailink_mcp.mcp_auth import protect as protect_mcp
from scailink_mcp.mcp_guard import McpGuard
from scailink_mcp.mcp_sessions import SessionStore, SharedSessions
from scailink_mcp.metrics import Metrics
from scailink_mcp.notifier import SessionNotifier
from scailink_mcp.ratelimit import RateLimiter, RedisRateLimiter
from scailink_mcp.redis_bus import RedisEventBus, from_peer
from scailink_mcp.redis_link import cluster_key, peer_link
from scailink_mcp.relay import Relay
from scailink_mcp.remote.breaker import BreakerPolicy
from scailink_mcp.remote.connector import Connector
from scailink_mcp.remote.health import HealthChecker, Rediscovery
from scailink_mcp.remote.pool import UpstreamPool
from scailink_mcp.remote.registry import Registry
from scailink_mcp.sdk_sessions import SessionTable
from scailink_mcp.session_park import LocalSessions, Parking
from scailink_mcp.subscriptions import Subscriptions
from scailink_mcp.targets import Backends

SINGLE_SERVER_MCP_PATH = "/v1/modules/scailink/remote-servers/{server_id}/mcp"

logger = logging.getLogger(__name__)


@dataclass
class Components:
    """Everything a request handler may reach, built once per app (no module-level singletons)."""

    settings: Settings
    db: Database
    events: EventBus
    keyring: Keyring | None
    verifier: TokenVerifier
    registry: Registry
    health: HealthChecker
    rediscovery: Rediscovery
    directory: RemoteDirectory
    catalog: Catalog
    pool: UpstreamPool
    notifier: SessionNotifier
    invoker: Invoker
    mcp: mcp_server.McpSurface
    desktop: DesktopRegistry
    bridge: Bridge
    metrics: Metrics
    limiter: RateLimiter
    audit: AuditLog
    roles: RoleStore
    in_flight: InFlight
    mcp_sessions: SessionStore | None
    parking: Parking
    lease: Lease


def build_components(settings: Settings, db: Database | None = None) -> Components:
    db = db or Database(settings.effective_database_url)
    # Several workers or replicas: what they share travels through Redis, signed (redis_link.py).
    link = peer_link(settings)
    events: EventBus = RedisEventBus(link) if link else EventBus()
    keyring = Keyring.from_settings(settings)
    # Several replicas: work done once per cluster takes a Redis lease, limits count in Redis.
    lease = RedisLease(settings.redis_url, prefix=settings.redis_prefix) if settings.redis_url else Lease()
    audit = AuditLog(db, queue_size=settings.audit_queue_size, lease=lease)
    registry = Registry(settings, db, keyring, events, lease=lease, audit=audit)
    limiter = (
        RedisRateLimiter(
            settings.redis_url,
            prefix=settings.redis_prefix,
            per_s=settings.rate_limit_per_s,
            burst=settings.rate_limit_burst,
        )
        if settings.redis_url
        else RateLimiter(per_s=settings.rate_limit_per_s, burst=settings.rate_limit_burst)
    )
    rediscovery = Rediscovery(settings, registry, lease=lease)
    directory = RemoteDirectory(db)
    desktop = DesktopRegistry(
        grace_period_s=settings.ws_grace_period_ms / 1000,
        max_connections_per_user=settings.ws_max_connections_per_user,
        events=events,
        # Several replicas: desktop sessions listed and reached everywhere (desktop/cluster.py).
        cluster=DesktopCluster(link) if link else None,
    )
    catalog = Catalog(directory, desktop)
    notifier = SessionNotifier(catalog, debounce_s=settings.list_changed_debounce_s)
    subscriptions = Subscriptions()

    def audit_registry_change(event: ServerEvent) -> None:
        # Changes made by a person (system flips live in the server's health fields), audited once: by
        # the worker that made the change, not again by each peer that hears of it through Redis.
        if event.actor_user_id and not from_peer():
            audit.record(
                AuditRecord(
                    tenant_id=event.tenant_id,
                    user_id=event.actor_user_id,
                    event=f"registry.{event.kind.value}",
                    outcome="ok",
                    target=event.server_id,
                    detail_level=settings.audit_detail_level,
                )
            )

    # The pool opens sessions through the connector; its relay is bound once the pool exists (`Connector`).
    connector = Connector(settings, registry, rediscovery, subscriptions)
    pool = UpstreamPool(
        connector,
        idle_ttl_s=settings.pool_idle_ttl_s,
        max_sessions=settings.pool_max_sessions,
        breakers=BreakerPolicy(
            failures=settings.pool_breaker_failures,
            window_s=settings.pool_breaker_window_s,
            open_s=settings.pool_breaker_open_s,
            min_users=settings.pool_breaker_min_users,
        ),
        lean_calls=settings.pool_lean_calls,
    )
    connector.bind_relay(Relay(pool))
    era_cluster = EraCluster(link) if link else None  # a retry reaches the replica holding its call
    era_bridge = EraBridge(
        pool, secret=cluster_key(settings), pending_timeout_s=settings.call_timeout_max_s, cluster=era_cluster
    )
    events.subscribe(era_bridge.on_event)
    events.subscribe(audit_registry_change)
    events.subscribe(directory.on_event)
    events.subscribe(pool.on_event)
    events.subscribe(registry.oauth.on_event)
    # After the directory (subscribed first) has applied the change: re-check that tenant's sessions.
    events.subscribe(lambda e: notifier.tenant_changed(e.tenant_id), ServerEvent)
    events.subscribe(lambda e: notifier.tenant_changed(e.tenant_id), DesktopCatalogChanged)
    metrics = Metrics()
    invoker = Invoker(
        settings,
        Backends(pool, desktop, settings.call_timeout_s, oauth=registry.oauth, bridge=era_bridge),
        consent=DesktopConsentGate(desktop, settings.consent_timeout_s),
        metrics=metrics,
        audit=audit,
    )
    verifier = TokenVerifier(settings)
    roles = RoleStore(db, events=events)
    surface = mcp_server.McpSurface(settings, catalog, invoker, notifier, subscriptions)
    events.subscribe(surface.elicitations.on_authorized, UpstreamAuthorized)
    # MCP sessions served by every replica (mcp_sessions.py, Redis); idle ones parked (session_park.py).
    shared = SessionStore(link, ttl_s=settings.mcp_session_idle_s) if link else None
    pinned = [subscriptions.holds, surface.elicitations.holds]  # never parked
    parking = Parking(shared or LocalSessions(), settings.mcp_park_idle_s, metrics, pinned=pinned)

    async def roles_changed(event: RolesChanged) -> None:
        if from_peer():  # this worker's own change is already in its cache
            await roles.reload(event)
        notifier.tenant_changed(event.tenant_id)

    events.subscribe(roles_changed, RolesChanged)
    verifier.custom_roles = roles.roles_for
    metrics.gauge("scailink_pool_sessions", "Warm upstream sessions", lambda: pool.size())
    metrics.gauge("scailink_pool_hits", "Pool hits (warm sessions reused)", lambda: pool.stats.hits)
    metrics.gauge("scailink_pool_misses", "Pool misses (new handshakes)", lambda: pool.stats.misses)
    metrics.gauge("scailink_pool_evictions", "Pool LRU evictions", lambda: pool.stats.evictions)
    metrics.gauge(
        "scailink_desktop_sessions", "Desktop sessions (connected or in grace)", lambda: len(desktop.sessions)
    )
    metrics.gauge("scailink_mcp_sessions", "Tracked downstream MCP sessions", notifier.session_count)
    metrics.gauge("scailink_audit_queue_depth", "Audit events waiting to be written", lambda: audit.depth())
    metrics.gauge("scailink_audit_dropped", "Audit events dropped: queue full", lambda: audit.dropped)
    metrics.gauge(
        "scailink_audit_failed_writes", "Audit events the database refused", lambda: audit.failed_writes
    )
    return Components(
        settings=settings,
        db=db,
        events=events,
        keyring=keyring,
        verifier=verifier,
        registry=registry,
        health=HealthChecker(
            settings,
            registry,
            lease=lease,
            counted=lambda result: metrics.health_checks.labels(result=result).inc(),
        ),
        rediscovery=rediscovery,
        directory=directory,
        catalog=catalog,
        pool=pool,
        notifier=notifier,
        invoker=invoker,
        mcp=surface,
        desktop=desktop,
        bridge=Bridge(settings, verifier, desktop, audit),
        metrics=metrics,
        limiter=limiter,
        audit=audit,
        roles=roles,
        in_flight=InFlight(),
        mcp_sessions=shared,
        parking=parking,
        lease=lease,
    )


def mcp_routes(parts: Components) -> tuple[list[BaseRoute], list[StreamableHTTPSessionManager], Lanes]:
    """`/mcp` (aggregate), the per-server endpoint, the OAuth protected-resource metadata; `/mcp`'s lane."""
    settings = parts.settings
    verifier = McpTokenVerifier(parts.verifier)
    resource = resource_url(settings)
    base = resource.removesuffix("/mcp")
    metadata = f"{base}/.well-known/oauth-protected-resource/mcp"
    # Per endpoint (False: /mcp, True: per-server): its SDK server, and its session table
    # (sdk_sessions.py), which the front and the replicas layer read.
    tables = {False: SessionTable(), True: SessionTable()}
    servers = {s: mcp_server.build_server(parts.mcp, single=s, sessions=tables[s]) for s in tables}
    aggregate = mcp_transports.session_manager(servers[False], settings)
    sse = mcp_transports.LegacySse(servers[False], settings)
    single = mcp_transports.session_manager(servers[True], settings)
    tables[False].bind(aggregate)
    tables[True].bind(single)
    # The front answers the warm calls it owns; everything else reaches the SDK's app (mcp_front.py).
    fronts = {s: front_calls.front(parts.mcp, servers[s], tables[s], single=s) for s in tables}
    answered = lambda: sum(f.answered for f in fronts.values())  # noqa: E731
    parts.metrics.gauge("scailink_mcp_front_answers", "MCP requests the front answered", answered)
    issuer = settings.jwt_issuer if (settings.jwt_issuer or "").startswith("http") else base

    def guarded(manager: StreamableHTTPSessionManager | None) -> Callable[[ASGIApp], ASGIApp]:
        def wrap(app: ASGIApp) -> ASGIApp:
            return McpGuard(
                app,
                limiter=parts.limiter,
                max_body_bytes=settings.max_body_bytes,
                max_json_depth=settings.max_json_depth,
                manager=manager,
                max_sessions_per_principal=settings.mcp_max_sessions_per_principal,
                principal_key=rate_key,
                in_flight=parts.in_flight,
                trim_parked=parts.parking.trim_for(manager),
            )

        return wrap

    def protect(app: ASGIApp, manager: StreamableHTTPSessionManager | None = None) -> ASGIApp:
        return protect_mcp(app, verifier, metadata, guarded(manager))

    def served(manager: StreamableHTTPSessionManager, *, single: bool) -> ASGIApp:
        parked = parts.parking.add("single" if single else "aggregate", tables[single])

        def revived(connection: Connection, principal: Principal, scope: Scope) -> None:
            tables[single].known(connection)
            parts.mcp.revived(connection, principal, scope, single=single)

        return SharedSessions(fronts[single], *parked, manager=manager, on_revived=revived)

    aggregate_chain = protect(served(aggregate, single=False), aggregate)
    routes: list[BaseRoute] = [
        Route("/mcp", endpoint=aggregate_chain),
        Route("/sse", endpoint=protect(sse.connect), methods=["GET"]),
        Mount("/messages", app=protect(sse.post)),
        Route(SINGLE_SERVER_MCP_PATH, endpoint=protect(served(single, single=True), single)),
        *create_protected_resource_routes(
            resource_url=AnyHttpUrl(resource),
            authorization_servers=[AnyHttpUrl(issuer or base)],
            scopes_supported=None,
            resource_name="ScaiLink MCP",
        ),
    ]
    return routes, [aggregate, single], {"/mcp": aggregate_chain}


def create_app(settings: Settings, components: Components | None = None) -> Starlette:
    parts = components or build_components(settings)

    routes, managers, lanes = mcp_routes(parts)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            await anyio.to_thread.run_sync(parts.directory.load)
            await anyio.to_thread.run_sync(parts.roles.load)
        except Exception as exc:  # e.g. migrations not applied: serve anyway, /readyz says why
            logger.error("could not load the server directory", extra={"error": type(exc).__name__})
        async with anyio.create_task_group() as tg:
            tg.start_soon(parts.pool.run)
            if parts.invoker.backends.bridge is not None:  # 2026-07-28 calls parked between rounds
                tg.start_soon(parts.invoker.backends.bridge.run)
            tg.start_soon(parts.notifier.run)
            tg.start_soon(parts.rediscovery.run_triggered)
            tg.start_soon(parts.desktop.run_expiry)
            tg.start_soon(parts.audit.run)
            tg.start_soon(parts.roles.run_reload)
            if isinstance(parts.events, RedisEventBus):  # the Redis sender and supervised subscriber
                tg.start_soon(parts.events.run)
            if isinstance(parts.limiter, RedisRateLimiter):  # closes its connections on shutdown
                tg.start_soon(parts.limiter.run)
            if isinstance(parts.lease, RedisLease):  # hands its leases over on shutdown
                tg.start_soon(parts.lease.run)
            if parts.desktop.cluster is not None:  # the desktop directory and the routing of calls
                tg.start_soon(parts.desktop.cluster.run)
            if parts.mcp_sessions is not None:  # MCP sessions ended on other replicas
                tg.start_soon(parts.mcp_sessions.run)
            tg.start_soon(parts.parking.run)  # idle MCP sessions parked (session_park.py)
            if settings.background_tasks:  # audit retention does not depend on the registry being enabled
                tg.start_soon(parts.audit.run_pruner, settings.audit_retention_s)
            if settings.background_tasks and parts.keyring is not None:
                tg.start_soon(parts.health.run)
                tg.start_soon(parts.rediscovery.run)
            try:
                async with AsyncExitStack() as stack:
                    for manager in managers:
                        await stack.enter_async_context(manager.run())
                    yield
                    # Shutting down: desktop clients are told 1001 and will resume elsewhere.
                    await parts.desktop.close_all(Close.GOING_AWAY, "server shutting down")
            finally:
                # MCP sessions are closed first (above), then every background task and pooled session.
                tg.cancel_scope.cancel()
        parts.db.dispose()

    app = LanedStarlette(
        # The MCP routes first: Starlette tries routes in order, and a warm `tools/call` matched ~30
        # patterns before reaching `/mcp` (~2 % of its CPU). No other route shares their paths.
        routes=[
            *routes,
            *operations.routes,
            *remote_servers.routes,
            *oauth_api.routes,
            *desktop_api.routes,
            *audit_api.routes,
            *iam_api.routes,
            Route("/", dashboard.home_redirect, methods=["GET"]),
            Mount("/dashboard", app=dashboard.create_dashboard(parts), name="dashboard"),
            WebSocketRoute("/v1/scailink/ws", parts.bridge.endpoint),
            Route("/metrics", parts.metrics.endpoint, methods=["GET"]),
        ],
        middleware=[Middleware(RequestIdMiddleware)],
        exception_handlers={
            ScaiLinkError: scailink_error_handler,
            HTTPException: http_exception_handler,
            Exception: unhandled_error_handler,
        },
        lifespan=lifespan,
        lanes=lanes,
        websocket_lanes={"/v1/scailink/ws": parts.bridge.endpoint},
    )
    app.state.scailink = parts
    return app
