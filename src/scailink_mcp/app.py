"""`create_app(settings)`: builds every part explicitly and mounts the surfaces.

The lifespan owns every background task (health checks, re-discovery): they start with the app and
are cancelled and awaited on shutdown, so nothing outlives it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

from scailink_mcp.api import operations, remote_servers
from scailink_mcp.api.middleware import (
    RequestIdMiddleware,
    http_exception_handler,
    scailink_error_handler,
    unhandled_error_handler,
)
from scailink_mcp.auth import TokenVerifier
from scailink_mcp.config import Settings
from scailink_mcp.crypto import Keyring
from scailink_mcp.db import Database
from scailink_mcp.errors import ScaiLinkError
from scailink_mcp.events import EventBus
from scailink_mcp.remote.health import HealthChecker, Rediscovery
from scailink_mcp.remote.registry import Registry

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


def build_components(settings: Settings, db: Database | None = None) -> Components:
    db = db or Database(settings.effective_database_url)
    events = EventBus()
    keyring = Keyring.from_settings(settings)
    registry = Registry(settings, db, keyring, events)
    return Components(
        settings=settings,
        db=db,
        events=events,
        keyring=keyring,
        verifier=TokenVerifier(settings),
        registry=registry,
        health=HealthChecker(settings, registry),
        rediscovery=Rediscovery(settings, registry),
    )


def create_app(settings: Settings, components: Components | None = None) -> Starlette:
    parts = components or build_components(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            if settings.background_tasks and parts.keyring is not None:
                tg.start_soon(parts.health.run)
                tg.start_soon(parts.rediscovery.run)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
        parts.db.dispose()

    app = Starlette(
        routes=[*operations.routes, *remote_servers.routes],
        middleware=[Middleware(RequestIdMiddleware)],
        exception_handlers={
            ScaiLinkError: scailink_error_handler,
            HTTPException: http_exception_handler,
            Exception: unhandled_error_handler,
        },
        lifespan=lifespan,
    )
    app.state.scailink = parts
    return app
