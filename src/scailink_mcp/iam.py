"""Custom roles per tenant, kept in the database and cached in memory for the auth path.

`RoleStore.roles_for(tenant)` is what `TokenVerifier` consults on every request: a dict lookup, never
a query. Changes through the API update this worker's cache at once (no restart) and publish
`RolesChanged`: with Redis, every other worker reloads on it within a second (`run_reload` every 30 s
is the safety net for events missed while Redis was away). A reload that raced with a change is
discarded rather than allowed to put an older view back.

A custom role grants exactly its permission list (the admin catch-all never applies). Its name must
not be a built-in role's, and nobody can grant a permission they do not hold themselves
(`ungrantable`), so `scailink:manage` alone is not a way to `scailink:audit`.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import TypedDict

import anyio
import anyio.to_thread
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, func, select

from scailink_mcp import auth
from scailink_mcp.db import Database
from scailink_mcp.errors import NotFound, ValidationFailed
from scailink_mcp.events import EventBus, RolesChanged
from scailink_mcp.models import CustomRole, utcnow
from scailink_mcp.remote.schemas import TEXT_PATTERN

logger = logging.getLogger(__name__)

ROLE_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_NO_ROLES: Mapping[str, frozenset[str]] = MappingProxyType({})


class RoleBody(BaseModel):
    """`PUT /v1/iam/roles/{name}`: the complete permission list (replaces the previous one)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    permissions: list[str] = Field(max_length=64)
    description: str = Field(default="", max_length=500, pattern=TEXT_PATTERN)

    @field_validator("permissions")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - auth.ALL_PERMISSIONS)
        if unknown:
            raise ValueError(f"unknown permissions: {', '.join(unknown)}")
        return sorted(set(value))


class RoleView(TypedDict):
    name: str
    description: str
    permissions: list[str]
    builtin: bool
    created_at: str | None
    updated_at: str | None


def check_name(name: str) -> None:
    """422 unless `name` may name a custom role. Pure."""
    if not ROLE_NAME.fullmatch(name):
        raise ValidationFailed(
            "invalid role name", details=[{"field": "name", "reason": "must match " + ROLE_NAME.pattern}]
        )
    if name in auth.BUILTIN_ROLES:
        raise ValidationFailed(
            "invalid role name", details=[{"field": "name", "reason": "a built-in role's name"}]
        )


def ungrantable(held: Iterable[str], requested: Iterable[str]) -> list[str]:
    """The requested permissions the grantor does not hold (sorted). Pure."""
    return sorted(set(requested) - set(held))


def _builtin_view(name: str) -> RoleView:
    return RoleView(
        name=name,
        description="built-in",
        permissions=sorted(auth.BUILTIN_ROLES[name]),
        builtin=True,
        created_at=None,
        updated_at=None,
    )


def _iso(ts: datetime) -> str:
    return (ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts).isoformat()


def _view(row: CustomRole) -> RoleView:
    return RoleView(
        name=row.name,
        description=row.description,
        permissions=sorted(row.permissions),
        builtin=False,
        created_at=_iso(row.created_at),
        updated_at=_iso(row.updated_at),
    )


class RoleStore:
    def __init__(
        self, db: Database, *, max_roles_per_tenant: int = 100, events: EventBus | None = None
    ) -> None:
        self.db = db
        self.events = events  # each change publishes `RolesChanged` (other replicas reload, listings move)
        self.max_roles_per_tenant = max_roles_per_tenant
        self._roles: dict[str, dict[str, frozenset[str]]] = {}
        self._version = 0  # bumped by every local change; see `load`
        self._lock = threading.Lock()  # `load` runs in a worker thread
        # Changes are serialised so the cache ends as the database does when two land at once.
        self._writes = anyio.Lock()

    # ---- the auth path (sync, no I/O) ---------------------------------------------------------------

    def roles_for(self, tenant_id: str) -> Mapping[str, frozenset[str]]:
        """The tenant's custom roles: the same mapping until they change (the verifier's principal
        cache compares it by identity), a new one after."""
        return self._roles.get(tenant_id, _NO_ROLES)

    def _cache(self, tenant_id: str, name: str, permissions: frozenset[str] | None) -> None:
        # Copy on write: a reader holding the previous mapping never sees it change under it.
        with self._lock:
            tenant = dict(self._roles.get(tenant_id, {}))
            if permissions is None:
                tenant.pop(name, None)
            else:
                tenant[name] = permissions
            self._roles = {**self._roles, tenant_id: tenant}
            self._version += 1

    # ---- loading -------------------------------------------------------------------------------------

    def load(self) -> bool:
        """Replace the cache with the database's roles (blocking: at startup, or in a worker thread).
        Returns False when a local change landed meanwhile and the result was discarded."""
        with self._lock:
            version = self._version
        with self.db.session() as session:
            rows = session.exec(select(CustomRole)).all()
        fresh: dict[str, dict[str, frozenset[str]]] = {}
        for row in rows:
            fresh.setdefault(row.tenant_id, {})[row.name] = frozenset(row.permissions)
        with self._lock:
            if self._version != version:
                return False
            self._roles = fresh
        return True

    async def run_reload(self, interval_s: float = 30.0) -> None:
        """Owned by the app lifespan: picks up changes made through other workers."""
        while True:
            await anyio.sleep(interval_s)
            try:
                await anyio.to_thread.run_sync(self.load)
            except Exception as exc:
                logger.warning("custom roles reload failed", extra={"error": type(exc).__name__})

    # ---- reads and changes ---------------------------------------------------------------------------

    async def list(self, tenant_id: str) -> list[RoleView]:
        """Built-in and the tenant's custom roles, by name."""

        def run(session: Session) -> list[RoleView]:
            rows = session.exec(select(CustomRole).where(col(CustomRole.tenant_id) == tenant_id)).all()
            return [_view(r) for r in rows]

        views = [_builtin_view(name) for name in auth.BUILTIN_ROLES] + await self.db.run(run)
        return sorted(views, key=lambda v: v["name"])

    async def get(self, tenant_id: str, name: str) -> RoleView:
        if name in auth.BUILTIN_ROLES:
            return _builtin_view(name)
        row = await self.db.run(lambda s: _find(s, tenant_id, name))
        if row is None:
            raise NotFound("role not found")
        return _view(row)

    async def put(self, tenant_id: str, name: str, body: RoleBody) -> RoleView:
        """Create or replace."""
        check_name(name)

        def run(session: Session) -> CustomRole:
            row = _find(session, tenant_id, name)
            if row is None:
                count = session.exec(
                    select(func.count()).select_from(CustomRole).where(col(CustomRole.tenant_id) == tenant_id)
                ).one()
                if count >= self.max_roles_per_tenant:
                    reason = f"the tenant already has {self.max_roles_per_tenant} custom roles"
                    raise ValidationFailed("too many roles", details=[{"field": "name", "reason": reason}])
                row = CustomRole(tenant_id=tenant_id, name=name)
            row.permissions = body.permissions
            row.description = body.description
            row.updated_at = utcnow()
            session.add(row)
            session.commit()
            return row

        async with self._writes:
            try:
                row = await self.db.run(run)
            except IntegrityError:  # created at once by another worker: replace it instead
                row = await self.db.run(run)
            self._cache(tenant_id, name, frozenset(row.permissions))
        await self._changed(tenant_id)
        return _view(row)

    async def _changed(self, tenant_id: str) -> None:
        if self.events is not None:
            await self.events.publish(RolesChanged(tenant_id))

    async def reload(self, event: RolesChanged) -> None:
        """Another replica changed a tenant's roles: read them again (the cache is per process)."""
        await anyio.to_thread.run_sync(self.load)

    async def delete(self, tenant_id: str, name: str) -> None:
        if name in auth.BUILTIN_ROLES:
            raise ValidationFailed(
                "built-in roles cannot be deleted", details=[{"field": "name", "reason": "a built-in role"}]
            )

        def run(session: Session) -> bool:
            row = _find(session, tenant_id, name)
            if row is None:
                return False
            session.delete(row)
            session.commit()
            return True

        async with self._writes:
            if not await self.db.run(run):
                raise NotFound("role not found")
            self._cache(tenant_id, name, None)
        await self._changed(tenant_id)


def _find(session: Session, tenant_id: str, name: str) -> CustomRole | None:
    return session.exec(
        select(CustomRole).where(col(CustomRole.tenant_id) == tenant_id, col(CustomRole.name) == name)
    ).first()
