"""Custom roles per tenant, kept in the database and cached in memory for the auth path.

`RoleStore.roles_for(tenant)` is what `TokenVerifier` consults on every request: a dict lookup, never
a query. Changes through the API update the cache at once (no restart); other workers pick them up
through `run_reload` (every 30 s) until catalog fan-out moves to Redis.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from typing import Any

import anyio
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlmodel import Session, col, select

from scailink_mcp import auth
from scailink_mcp.db import Database
from scailink_mcp.errors import NotFound, ValidationFailed
from scailink_mcp.models import CustomRole, utcnow

logger = logging.getLogger(__name__)

ROLE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


class RoleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    permissions: list[str] = Field(max_length=len(auth.ALL_PERMISSIONS))
    description: str = Field(default="", max_length=500)

    @field_validator("permissions")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - auth.ALL_PERMISSIONS)
        if unknown:
            raise ValueError(f"unknown permissions: {', '.join(unknown)}")
        return sorted(set(value))


def check_name(name: str) -> None:
    if not ROLE_NAME.match(name):
        raise ValidationFailed(
            "invalid role name", details=[{"field": "name", "reason": "must match " + ROLE_NAME.pattern}]
        )
    if name in auth.BUILTIN_ROLES:
        raise ValidationFailed(
            "invalid role name", details=[{"field": "name", "reason": "a built-in role's name"}]
        )


def _dump(row: CustomRole) -> dict[str, Any]:
    return {
        "name": row.name,
        "description": row.description,
        "permissions": sorted(row.permissions),
        "builtin": False,
    }


class RoleStore:
    def __init__(self, db: Database) -> None:
        self.db = db
        self._roles: dict[str, dict[str, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def load(self) -> None:
        with self.db.session() as session:
            rows = session.exec(select(CustomRole)).all()
        fresh: dict[str, dict[str, frozenset[str]]] = {}
        for row in rows:
            fresh.setdefault(row.tenant_id, {})[row.name] = frozenset(row.permissions)
        with self._lock:
            self._roles = fresh

    def roles_for(self, tenant_id: str) -> Mapping[str, frozenset[str]]:
        return self._roles.get(tenant_id, {})

    async def run_reload(self, interval_s: float = 30.0) -> None:
        """Owned by the app lifespan."""
        while True:
            await anyio.sleep(interval_s)
            try:
                await anyio.to_thread.run_sync(self.load)
            except Exception:
                logger.exception("custom roles reload failed")

    async def list(self, tenant_id: str) -> list[dict[str, Any]]:
        def run(session: Session) -> list[dict[str, Any]]:
            rows = session.exec(select(CustomRole).where(col(CustomRole.tenant_id) == tenant_id)).all()
            return [_dump(r) for r in sorted(rows, key=lambda r: r.name)]

        builtin = [
            {"name": name, "description": "built-in", "permissions": sorted(perms), "builtin": True}
            for name, perms in auth.BUILTIN_ROLES.items()
        ]
        return builtin + await self.db.run(run)

    async def get(self, tenant_id: str, name: str) -> dict[str, Any]:
        if name in auth.BUILTIN_ROLES:
            return {"name": name, "description": "built-in", "permissions": sorted(auth.BUILTIN_ROLES[name]),
                    "builtin": True}  # fmt: skip
        row = await self.db.run(lambda s: _find(s, tenant_id, name))
        if row is None:
            raise NotFound("role not found")
        return _dump(row)

    async def put(self, tenant_id: str, name: str, body: RoleBody) -> dict[str, Any]:
        check_name(name)

        def run(session: Session) -> CustomRole:
            row = _find(session, tenant_id, name) or CustomRole(tenant_id=tenant_id, name=name)
            row.permissions = body.permissions
            row.description = body.description
            row.updated_at = utcnow()
            session.add(row)
            session.commit()
            return row

        row = await self.db.run(run)
        with self._lock:
            self._roles.setdefault(tenant_id, {})[name] = frozenset(row.permissions)
        return _dump(row)

    async def delete(self, tenant_id: str, name: str) -> None:
        def run(session: Session) -> bool:
            row = _find(session, tenant_id, name)
            if row is None:
                return False
            session.delete(row)
            session.commit()
            return True

        if not await self.db.run(run):
            raise NotFound("role not found")
        with self._lock:
            self._roles.get(tenant_id, {}).pop(name, None)


def _find(session: Session, tenant_id: str, name: str) -> CustomRole | None:
    return session.exec(
        select(CustomRole).where(col(CustomRole.tenant_id) == tenant_id, col(CustomRole.name) == name)
    ).first()
