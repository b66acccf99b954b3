"""The remote-server registry: register, read, update, delete, refresh, credential rotation.

Business rules live here so every surface gets the same behaviour: visibility (a caller sees their
own personal servers and their tenant's shared ones; anything else is "not found"), the manage
permission of the owner scope, the race-safe tenant cap (a conditional UPDATE on `tenant_quota` inside
the insert's transaction), SSRF validation before any connection, and one event per change.

A stored credential that does not decrypt (moved to another row, tampered with, an unknown KEK) is
that server's failure, never the caller's round: `target` raises `CredentialDecryptError`, discovery
records it on the server (`status: error`, `last_health_status: CredentialDecryptError`), and
`refresh` answers 422 naming the fields to set again.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography.exceptions import InvalidTag
from sqlalchemy import and_, or_, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from scailink_mcp import auth
from scailink_mcp.auth import Principal
from scailink_mcp.config import Settings
from scailink_mcp.crypto import DecryptionError, Keyring, open_sealed, seal, sealed_from_row
from scailink_mcp.db import Database
from scailink_mcp.errors import (
    Conflict,
    NotFound,
    RegistryDisabled,
    RemoteLimitExceeded,
    ValidationFailed,
)
from scailink_mcp.events import EventBus, ServerEvent, ServerEventKind
from scailink_mcp.models import Capability, Credential, RemoteServer, TenantQuota, new_id, utcnow
from scailink_mcp.naming import namespaced_name, namespaced_uri, remote_namespace, slugify
from scailink_mcp.remote.discovery import (
    DiscoveryResult,
    aware,
    discover,
    store_discovery,
    visible_capabilities,
)
from scailink_mcp.remote.netguard import validate_endpoint_url
from scailink_mcp.remote.schemas import (
    Capabilities,
    CapabilityOut,
    RegisterServer,
    ServerDetail,
    UpdateServer,
    check_credential_field,
)
from scailink_mcp.remote.upstream import (
    Network,
    UpstreamTarget,
    error_class_name,
    parse_networks,
    upstream_headers,
)

logger = logging.getLogger(__name__)


class CredentialDecryptError(Exception):
    """Stored credential fields of one server do not decrypt. Names the fields, never a value."""

    def __init__(self, server_id: str, fields: Sequence[str]) -> None:
        self.server_id = server_id
        self.fields = list(fields)
        super().__init__(f"credential fields {', '.join(self.fields)} do not decrypt")


@dataclass(frozen=True)
class Page:
    items: list[ServerDetail]
    next_cursor: tuple[str, str] | None


def owner_scope(principal_user_id: str, is_tenant_shared: bool) -> str:
    return "tenant" if is_tenant_shared else f"user:{principal_user_id}"


def manage_permission(server: RemoteServer) -> str:
    return auth.REMOTE_MANAGE_TENANT if server.is_tenant_shared else auth.REMOTE_MANAGE_OWN


def visible_filter(principal: Principal):  # type: ignore[no-untyped-def]
    """Same tenant and (shared, or personal to the caller)."""
    return and_(
        col(RemoteServer.tenant_id) == principal.tenant_id,
        or_(
            col(RemoteServer.is_tenant_shared).is_(True), col(RemoteServer.owner_user_id) == principal.user_id
        ),
    )


class Registry:
    """One per app; holds no per-request state."""

    def __init__(self, settings: Settings, db: Database, keyring: Keyring | None, events: EventBus) -> None:
        self.settings = settings
        self.db = db
        self.keyring = keyring
        self.events = events
        self.allowed: list[Network] = parse_networks(settings.allowed_private_networks)

    # ---- helpers -------------------------------------------------------------------------------

    def _keyring(self) -> Keyring:
        if self.keyring is None:
            raise RegistryDisabled()
        return self.keyring

    def ensure_enabled(self) -> None:
        self._keyring()

    def _load(self, session: Session, principal: Principal, server_id: str) -> RemoteServer:
        server = session.exec(
            select(RemoteServer).where(RemoteServer.id == server_id, visible_filter(principal))
        ).first()
        if server is None:
            raise NotFound("remote server not found")
        return server

    def _load_for_manage(self, session: Session, principal: Principal, server_id: str) -> RemoteServer:
        server = self._load(session, principal, server_id)
        principal.require(manage_permission(server))
        return server

    def detail(self, session: Session, server: RemoteServer) -> ServerDetail:
        namespace = remote_namespace(
            slug=server.slug, owner_user_id=server.owner_user_id, is_tenant_shared=server.is_tenant_shared
        )
        groups: dict[str, list[CapabilityOut]] = {
            "tool": [],
            "resource": [],
            "resource_template": [],
            "prompt": [],
        }
        for cap in visible_capabilities(session, server):
            public = namespaced_uri(namespace, cap.name) if cap.kind.startswith("resource") else None
            groups[cap.kind].append(
                CapabilityOut(
                    name=cap.name,
                    namespaced_name=public or namespaced_name(namespace, cap.name),
                    description=cap.description,
                    schema_=cap.payload,
                )
            )
        creds = session.exec(select(Credential).where(Credential.server_id == server.id)).all()
        oldest = min((aware(c.updated_at) for c in creds), default=None)
        return ServerDetail(
            id=server.id,
            name=server.name,
            slug=server.slug,
            description=server.description,
            endpoint_url=server.endpoint_url,
            transport=server.transport,
            auth_type=server.auth_type,
            consent_tier=server.consent_tier,
            is_tenant_shared=server.is_tenant_shared,
            owner_user_id=server.owner_user_id,
            tenant_id=server.tenant_id,
            status=server.status,
            consecutive_failures=server.consecutive_failures,
            last_health_status=server.last_health_status,
            last_health_at=aware(server.last_health_at) if server.last_health_at else None,
            last_discovery_at=aware(server.last_discovery_at) if server.last_discovery_at else None,
            capabilities=Capabilities(
                tools=groups["tool"],
                resources=groups["resource"],
                resource_templates=groups["resource_template"],
                prompts=groups["prompt"],
            ),
            credential_fields=sorted(c.field for c in creds),
            credential_oldest_days=(utcnow() - oldest).days if oldest else None,
            created_at=aware(server.created_at),
            updated_at=aware(server.updated_at),
        )

    async def publish(self, kind: ServerEventKind, server: RemoteServer, actor: str = "") -> None:
        """Tell the subscribers (catalog, pool, audit) that this server changed."""
        await self.events.publish(
            ServerEvent(
                kind=kind,
                server_id=server.id,
                tenant_id=server.tenant_id,
                owner_user_id=server.owner_user_id,
                is_tenant_shared=server.is_tenant_shared,
                actor_user_id=actor,
            )
        )

    def target(self, session: Session, server: RemoteServer) -> UpstreamTarget:
        """Decrypt the server's credentials into outbound headers (only for opening a connection)."""
        keyring = self._keyring()
        creds = session.exec(select(Credential).where(Credential.server_id == server.id)).all()
        values: dict[str, str] = {}
        broken: list[str] = []
        for c in creds:
            try:
                values[c.field] = open_sealed(
                    keyring,
                    tenant_id=server.tenant_id,
                    server_id=server.id,
                    field=c.field,
                    sealed=sealed_from_row(c),
                )
            except (DecryptionError, InvalidTag, ValueError):  # ValueError: a malformed nonce or text
                broken.append(c.field)
        if broken:
            raise CredentialDecryptError(server.id, sorted(broken))
        return UpstreamTarget(
            server_id=server.id,
            endpoint_url=server.endpoint_url,
            transport=server.transport,
            headers=upstream_headers(server.auth_type, values),
        )

    async def _discover(self, target: UpstreamTarget) -> DiscoveryResult | BaseException:
        try:
            return await discover(
                target,
                self.allowed,
                connect_timeout=self.settings.discovery_connect_timeout_s,
                total_timeout=self.settings.discovery_timeout_s,
                max_answer_bytes=self.settings.max_result_bytes,
            )
        except Exception as exc:  # any upstream failure is recorded on the server, not raised
            logger.info(
                "discovery failed", extra={"server_id": target.server_id, "error": error_class_name(exc)}
            )
            return exc

    async def run_discovery(self, server_id: str) -> tuple[bool, bool]:
        """Discover and record the outcome; returns (succeeded, visible capabilities changed)."""
        ok, changed, _ = await self._run_discovery(server_id)
        return ok, changed

    async def _run_discovery(self, server_id: str) -> tuple[bool, bool, BaseException | None]:
        """`run_discovery`, plus the failure recorded (None on success or if the server is gone)."""
        outcome: DiscoveryResult | BaseException
        try:
            target = await self.db.run(lambda s: self.target_by_id(s, server_id))
        except CredentialDecryptError as exc:
            logger.warning(
                "credential does not decrypt", extra={"server_id": server_id, "fields": exc.fields}
            )
            outcome = exc
        else:
            if target is None:
                return False, False, None
            outcome = await self._discover(target)
        now = utcnow()

        def _record(session: Session) -> tuple[bool, bool, RemoteServer | None, bool]:
            server = session.get(RemoteServer, server_id)
            if server is None:
                return False, False, None, False
            was_error = server.status == "error"
            server.last_health_at = now
            if isinstance(outcome, BaseException):
                server.last_health_status = error_class_name(outcome)
                server.consecutive_failures += 1
                server.consecutive_successes = 0
                # No retry can decrypt it: the server is unusable until the credential is set again.
                flipped = isinstance(outcome, CredentialDecryptError) and not was_error
                if flipped:
                    server.status = "error"
                session.add(server)
                session.commit()
                return False, False, server, flipped
            changed = store_discovery(
                session, server, outcome, now=now, retention_s=self.settings.capability_retention_s
            )
            server.status = "active"
            server.consecutive_failures = 0
            server.consecutive_successes = 0
            server.last_health_status = "ok"
            session.add(server)
            session.commit()
            return True, changed, server, was_error

        ok, changed, server, status_changed = await self.db.run(_record)
        if server is not None:
            if ok and changed:
                await self.publish(ServerEventKind.CAPABILITIES_CHANGED, server)
            if status_changed:
                await self.publish(ServerEventKind.STATUS_CHANGED, server)
        failure = outcome if isinstance(outcome, BaseException) and server is not None else None
        return ok, changed, failure

    def target_by_id(self, session: Session, server_id: str) -> UpstreamTarget | None:
        """The connection target of a server, or None once it is deleted (cold path only)."""
        server = session.get(RemoteServer, server_id)
        return None if server is None else self.target(session, server)

    # ---- operations ----------------------------------------------------------------------------

    async def register(self, principal: Principal, body: RegisterServer) -> ServerDetail:
        keyring = self._keyring()
        principal.require(auth.REMOTE_MANAGE_TENANT if body.is_tenant_shared else auth.REMOTE_MANAGE_OWN)
        await validate_endpoint_url(body.endpoint_url, self.allowed)
        cap = self.settings.max_servers_per_tenant
        server_id = new_id()
        scope = owner_scope(principal.user_id, body.is_tenant_shared)

        def _insert(session: Session) -> RemoteServer:
            _ensure_quota_row(session, principal.tenant_id)
            # The conditional increment is the cap: concurrent creates serialize on the quota row.
            bumped = session.execute(
                update(TenantQuota)
                .where(col(TenantQuota.tenant_id) == principal.tenant_id, col(TenantQuota.server_count) < cap)
                .values(server_count=col(TenantQuota.server_count) + 1)
            )
            if bumped.rowcount != 1:  # type: ignore[attr-defined]
                session.rollback()
                raise RemoteLimitExceeded(
                    f"tenant already has {cap} remote servers", details={"max_servers_per_tenant": cap}
                )
            server = RemoteServer(
                id=server_id,
                tenant_id=principal.tenant_id,
                owner_user_id=principal.user_id,
                owner_scope=scope,
                name=body.name,
                slug=slugify(
                    body.name,
                    tenant_id=principal.tenant_id,
                    owner_user_id=principal.user_id,
                    server_id=server_id,
                ),
                description=body.description,
                endpoint_url=body.endpoint_url,
                transport=body.transport,
                auth_type=body.auth_type,
                consent_tier=body.consent_tier,
                is_tenant_shared=body.is_tenant_shared,
            )
            try:
                session.add(server)
                session.flush()
                for field_name, secret in body.credentials.items():
                    session.add(_credential_row(keyring, server, field_name, secret.get_secret_value()))
                session.commit()
            except IntegrityError:
                session.rollback()
                raise Conflict(f"a server named {body.name!r} already exists for this owner") from None
            return server

        server = await self.db.run(_insert)
        await self.publish(ServerEventKind.CREATED, server, principal.user_id)
        ok, _ = await self.run_discovery(server.id)
        if not ok:
            await self._first_discovery_failed(server.id)
        return await self.get(principal, server.id, check_permission=False)

    async def list(self, principal: Principal, *, limit: int, after: tuple[str, str] | None) -> Page:
        self._keyring()
        principal.require(auth.REMOTE_USE)

        def _list(session: Session) -> Page:
            query = select(RemoteServer).where(visible_filter(principal))
            if after is not None:
                created, last_id = after
                query = query.where(
                    tuple_(col(RemoteServer.created_at), col(RemoteServer.id))
                    > tuple_(datetime.fromisoformat(created), last_id)
                )
            rows = session.exec(
                query.order_by(col(RemoteServer.created_at), col(RemoteServer.id)).limit(limit + 1)
            ).all()
            items = [self.detail(session, row) for row in rows[:limit]]
            more = len(rows) > limit
            last = rows[limit - 1] if more else None
            return Page(items, (aware(last.created_at).isoformat(), last.id) if last else None)

        return await self.db.run(_list)

    async def get(
        self, principal: Principal, server_id: str, *, check_permission: bool = True
    ) -> ServerDetail:
        self._keyring()
        if check_permission:
            principal.require(auth.REMOTE_USE)
        return await self.db.run(lambda s: self.detail(s, self._load(s, principal, server_id)))

    async def update(self, principal: Principal, server_id: str, body: UpdateServer) -> ServerDetail:
        self._keyring()
        if body.endpoint_url is not None:
            await validate_endpoint_url(body.endpoint_url, self.allowed)
        fields = body.model_dump(exclude_unset=True, exclude_none=True)

        def _update(session: Session) -> tuple[RemoteServer, bool]:
            server = self._load_for_manage(session, principal, server_id)
            reconnect = any(
                k in fields and fields[k] != getattr(server, k) for k in ("endpoint_url", "transport")
            )
            for key, value in fields.items():
                setattr(server, key, value)
            if reconnect:
                server.credential_version += 1
            server.updated_at = utcnow()
            session.add(server)
            try:
                session.commit()
            except IntegrityError:
                session.rollback()
                raise Conflict(f"a server named {body.name!r} already exists for this owner") from None
            return server, reconnect

        server, reconnect = await self.db.run(_update)
        if reconnect:
            await self.publish(ServerEventKind.ENDPOINT_CHANGED, server, principal.user_id)
            ok, _ = await self.run_discovery(server.id)
            if not ok:
                await self._first_discovery_failed(server.id)
        else:
            await self.publish(ServerEventKind.UPDATED, server, principal.user_id)
        return await self.get(principal, server_id, check_permission=False)

    async def delete(self, principal: Principal, server_id: str) -> None:
        self._keyring()

        def _delete(session: Session) -> RemoteServer:
            server = self._load_for_manage(session, principal, server_id)
            # Explicit child deletes: SQLite only cascades with foreign_keys=ON, MariaDB/PG always do.
            session.execute(_delete_rows(Capability, server.id))
            session.execute(_delete_rows(Credential, server.id))
            session.delete(server)
            session.execute(
                update(TenantQuota)
                .where(col(TenantQuota.tenant_id) == server.tenant_id, col(TenantQuota.server_count) > 0)
                .values(server_count=col(TenantQuota.server_count) - 1)
            )
            session.commit()
            return server

        server = await self.db.run(_delete)
        await self.publish(ServerEventKind.DELETED, server, principal.user_id)

    async def refresh(self, principal: Principal, server_id: str) -> ServerDetail:
        self._keyring()
        server = await self.db.run(lambda s: self._load_for_manage(s, principal, server_id))
        ok, _, failure = await self._run_discovery(server.id)
        if ok:
            # Next call handshakes again with current credentials and endpoint.
            await self.publish(ServerEventKind.REFRESHED, server, principal.user_id)
        if isinstance(failure, CredentialDecryptError):
            # Recorded on the server (status error); the caller can only fix it by setting them again.
            raise ValidationFailed(
                "stored credentials of this server cannot be decrypted; set them again",
                details=[
                    {"field": f"credentials.{name}", "reason": "does not decrypt; PUT it again"}
                    for name in failure.fields
                ],
            )
        return await self.get(principal, server_id, check_permission=False)

    async def put_credential(
        self, principal: Principal, server_id: str, field_name: str, value: str
    ) -> ServerDetail:
        keyring = self._keyring()

        def _put(session: Session) -> RemoteServer:
            server = self._load_for_manage(session, principal, server_id)
            reason = check_credential_field(server.auth_type, field_name)
            if reason:
                raise ValidationFailed(
                    "invalid credential field", details=[{"field": field_name, "reason": reason}]
                )
            existing = session.exec(
                select(Credential).where(Credential.server_id == server.id, Credential.field == field_name)
            ).first()
            fresh = _credential_row(keyring, server, field_name, value)
            if existing is not None:
                for attr in ("dek_id", "kek_id", "wrapped_dek", "nonce", "ciphertext"):
                    setattr(existing, attr, getattr(fresh, attr))
                existing.updated_at = utcnow()
                session.add(existing)
            else:
                session.add(fresh)
            server.credential_version += 1
            server.updated_at = utcnow()
            session.add(server)
            session.commit()
            return server

        server = await self.db.run(_put)
        await self.publish(ServerEventKind.CREDENTIALS_CHANGED, server, principal.user_id)
        return await self.get(principal, server_id, check_permission=False)

    async def delete_credential(self, principal: Principal, server_id: str, field_name: str) -> None:
        self._keyring()

        def _remove(session: Session) -> RemoteServer:
            server = self._load_for_manage(session, principal, server_id)
            row = session.exec(
                select(Credential).where(Credential.server_id == server.id, Credential.field == field_name)
            ).first()
            if row is None:
                raise NotFound("credential field not found")
            session.delete(row)
            server.credential_version += 1
            server.updated_at = utcnow()
            session.add(server)
            session.commit()
            return server

        server = await self.db.run(_remove)
        await self.publish(ServerEventKind.CREDENTIALS_CHANGED, server, principal.user_id)

    async def _first_discovery_failed(self, server_id: str) -> None:
        """Stored with `status: error` (the user can fix it and refresh), and published like any status
        flip, so the catalog, the per-server endpoint and the pool all see it."""
        server = await self.db.run(lambda s: _mark_error(s, server_id))
        if server is not None:
            await self.publish(ServerEventKind.STATUS_CHANGED, server)


def _credential_row(keyring: Keyring, server: RemoteServer, field_name: str, value: str) -> Credential:
    sealed = seal(keyring, tenant_id=server.tenant_id, server_id=server.id, field=field_name, plaintext=value)
    return Credential(
        server_id=server.id,
        tenant_id=server.tenant_id,
        field=field_name,
        dek_id=sealed.dek_id,
        kek_id=sealed.kek_id,
        wrapped_dek=sealed.wrapped_dek,
        nonce=sealed.nonce,
        ciphertext=sealed.ciphertext,
    )


def _delete_rows(model: type[Capability] | type[Credential], server_id: str):  # type: ignore[no-untyped-def]
    from sqlmodel import delete

    return delete(model).where(col(model.server_id) == server_id)


def _ensure_quota_row(session: Session, tenant_id: str) -> None:
    if session.get(TenantQuota, tenant_id) is not None:
        return
    try:
        with session.begin_nested():
            session.add(TenantQuota(tenant_id=tenant_id, server_count=0))
    except IntegrityError:
        pass  # a concurrent create inserted it first


def _mark_error(session: Session, server_id: str) -> RemoteServer | None:
    """`status: error` for a server whose first discovery failed; the server if it changed."""
    server = session.get(RemoteServer, server_id)
    if server is None or server.last_discovery_at is not None or server.status == "error":
        return None
    server.status = "error"
    session.add(server)
    session.commit()
    session.refresh(server)
    return server
