"""The remote-server registry: register, read, update, delete, refresh, credential rotation.

Business rules live here (and in the modules it composes) so every surface gets the same behaviour:
visibility and the manage permission of the owner scope (`access.py`), the race-safe tenant cap
(`quota.py`), sealed credentials (`credentials.py`), SSRF validation before any connection, the
discovery run and its recorded outcome (`discovery_runner.py`), and one event per change.

A stored credential that does not decrypt is that server's failure, never the caller's round:
`target` raises `CredentialDecryptError`, discovery records it on the server (`status: error`,
`last_health_status: CredentialDecryptError`), and `refresh` answers 422 naming the fields to set again.

Must not: decrypt anywhere but `target` (asked only to open a connection), or change a server
without publishing its `ServerEvent`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import tuple_
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, select

from scailink_mcp import auth
from scailink_mcp.audit import AuditLog
from scailink_mcp.auth import Principal
from scailink_mcp.config import Settings
from scailink_mcp.crypto import Keyring
from scailink_mcp.db import Database
from scailink_mcp.errors import Conflict, RegistryDisabled, ValidationFailed
from scailink_mcp.events import EventBus, ServerEvent, ServerEventKind, UpstreamAuthorized
from scailink_mcp.leases import Lease
from scailink_mcp.models import (
    Capability,
    Credential,
    OAuthClient,
    OAuthToken,
    RemoteServer,
    new_id,
    same_named,
    utcnow,
)
from scailink_mcp.naming import slugify
from scailink_mcp.remote import credentials
from scailink_mcp.remote.access import (
    load_for_manage,
    load_visible,
    manage_permission,
    owner_scope,
    register_permission,
    visible_filter,
)
from scailink_mcp.remote.credentials import CredentialDecryptError, credential_row, decrypt_target
from scailink_mcp.remote.discovery import aware
from scailink_mcp.remote.discovery_runner import DiscoveryRunner
from scailink_mcp.remote.netguard import validate_endpoint_url
from scailink_mcp.remote.oauth import OAuth
from scailink_mcp.remote.oauth_stamps import Stamp
from scailink_mcp.remote.quota import release_slot, take_slot
from scailink_mcp.remote.schemas import RegisterServer, ServerDetail, UpdateServer
from scailink_mcp.remote.server_detail import server_detail
from scailink_mcp.remote.upstream import Network, UpstreamTarget, parse_networks

# Importers reach these through this module; they live in the modules named above.
__all__ = [
    "CredentialDecryptError",
    "Page",
    "Registry",
    "manage_permission",
    "owner_scope",
    "visible_filter",
]

CredentialChange = Callable[[Session, RemoteServer], None]


@dataclass(frozen=True)
class Page:
    items: list[ServerDetail]
    next_cursor: tuple[str, str] | None


# The fields of a registration that the server's row stores as they are given.
STORED_AS_GIVEN = (
    "name",
    "description",
    "endpoint_url",
    "transport",
    "auth_type",
    "consent_tier",
    "is_tenant_shared",
)


class Registry:
    """One per app; holds no per-request state."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        keyring: Keyring | None,
        events: EventBus,
        *,
        lease: Lease | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.keyring = keyring
        self.events = events
        self.allowed: list[Network] = parse_networks(settings.allowed_private_networks)
        self.discovery = DiscoveryRunner(
            settings, db, self.allowed, target=self.target_by_id, publish=self.publish
        )
        # Upstream OAuth (SPEC section 12): an owner's first authorization lets discovery run.
        self.oauth = OAuth(settings, db, keyring, self.allowed, lease=lease, audit=audit)
        self.oauth.on_connected = self.discovery.run_first
        self.oauth.on_authorized = self._authorized

    # ---- helpers -------------------------------------------------------------------------------

    async def _authorized(self, stamp: Stamp) -> None:
        if stamp.elicitation:  # a flow from a ticket: a URL-mode elicitation may wait for it
            await self.events.publish(
                UpstreamAuthorized(stamp.tenant_id, stamp.user_id, stamp.server_id, stamp.elicitation)
            )

    def _keyring(self) -> Keyring:
        if self.keyring is None:
            raise RegistryDisabled()
        return self.keyring

    def ensure_enabled(self) -> None:
        self._keyring()

    def detail(self, session: Session, server: RemoteServer, viewer: str | None = None) -> ServerDetail:
        return server_detail(session, server, viewer)

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

    def target(self, session: Session, server: RemoteServer, user_id: str | None = None) -> UpstreamTarget:
        """Decrypt the server's credentials into outbound headers (only for opening a connection).

        An oauth2 server's requests carry the token of `user_id` (default: the owner, whose
        authorization discovery and health checks use).
        """
        target = decrypt_target(self._keyring(), session, server)
        if server.auth_type == "oauth2":
            target = replace(target, auth=self.oauth.bearer(server.id, user_id or server.owner_user_id))
        return target

    def target_by_id(
        self, session: Session, server_id: str, user_id: str | None = None
    ) -> UpstreamTarget | None:
        """The connection target of a server, or None once it is deleted (cold path only)."""
        server = session.get(RemoteServer, server_id)
        return None if server is None else self.target(session, server, user_id)

    async def run_discovery(self, server_id: str) -> tuple[bool, bool]:
        """Discover and record the outcome; returns (succeeded, visible capabilities changed)."""
        ok, changed, _ = await self.discovery.run(server_id)
        return ok, changed

    # ---- operations ----------------------------------------------------------------------------

    async def register(self, principal: Principal, body: RegisterServer) -> ServerDetail:
        keyring = self._keyring()
        principal.require(register_permission(body.is_tenant_shared))
        await validate_endpoint_url(body.endpoint_url, self.allowed)
        cap = self.settings.max_servers_per_tenant
        server_id = new_id()
        scope = owner_scope(principal.user_id, body.is_tenant_shared)

        def _insert(session: Session) -> RemoteServer:
            take_slot(session, principal.tenant_id, cap)
            slug = slugify(
                body.name, tenant_id=principal.tenant_id, owner_user_id=principal.user_id, server_id=server_id
            )
            server = RemoteServer(
                **same_named(
                    body,
                    STORED_AS_GIVEN,
                    id=server_id,
                    tenant_id=principal.tenant_id,
                    owner_user_id=principal.user_id,
                    owner_scope=scope,
                    slug=slug,
                )
            )
            try:
                session.add(server)
                session.flush()
                for field_name, secret in body.credentials.items():
                    session.add(credential_row(keyring, server, field_name, secret.get_secret_value()))
                if body.oauth is not None:
                    session.add(
                        OAuthClient(
                            server_id=server.id,
                            tenant_id=server.tenant_id,
                            grant=body.oauth.grant,
                            client_id=body.oauth.client_id,
                            scopes=list(body.oauth.scopes),
                        )
                    )
                session.commit()
            except IntegrityError:
                session.rollback()
                raise Conflict(f"a server named {body.name!r} already exists for this owner") from None
            return server

        server = await self.db.run(_insert)
        await self.publish(ServerEventKind.CREATED, server, principal.user_id)
        await self.discovery.run_first(server.id)
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
            items = [server_detail(session, row, principal.user_id) for row in rows[:limit]]
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
        return await self.db.run(
            lambda s: server_detail(s, load_visible(s, principal, server_id), principal.user_id)
        )

    async def update(self, principal: Principal, server_id: str, body: UpdateServer) -> ServerDetail:
        self._keyring()
        if body.endpoint_url is not None:
            await validate_endpoint_url(body.endpoint_url, self.allowed)
        fields = body.model_dump(exclude_unset=True, exclude_none=True)

        def _update(session: Session) -> tuple[RemoteServer, bool]:
            server = load_for_manage(session, principal, server_id)
            reconnect = any(
                k in fields and fields[k] != getattr(server, k) for k in ("endpoint_url", "transport")
            )
            for key, value in fields.items():
                setattr(server, key, value)
            if reconnect:
                server.credential_version += 1
                # Re-pointed: what the old endpoint listed is not this one's, and a failing first
                # discovery of the new one makes the server `error` as on registration.
                server.last_discovery_at = None
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
            await self.discovery.run_first(server.id)
        else:
            await self.publish(ServerEventKind.UPDATED, server, principal.user_id)
        return await self.get(principal, server_id, check_permission=False)

    async def delete(self, principal: Principal, server_id: str) -> None:
        self._keyring()

        def _delete(session: Session) -> RemoteServer:
            server = load_for_manage(session, principal, server_id)
            # Explicit child deletes: SQLite only cascades with foreign_keys=ON, MariaDB/PG always do.
            for table in (Capability, Credential, OAuthToken, OAuthClient):
                session.execute(_delete_rows(table, server.id))
            session.delete(server)
            release_slot(session, server.tenant_id)
            session.commit()
            return server

        server = await self.db.run(_delete)
        await self.publish(ServerEventKind.DELETED, server, principal.user_id)

    async def refresh(self, principal: Principal, server_id: str) -> ServerDetail:
        self._keyring()
        server = await self.db.run(lambda s: load_for_manage(s, principal, server_id))
        ok, _, failure = await self.discovery.run(server.id)
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
        await self._change_credentials(
            principal, server_id, lambda s, server: credentials.store(s, keyring, server, field_name, value)
        )
        return await self.get(principal, server_id, check_permission=False)

    async def delete_credential(self, principal: Principal, server_id: str, field_name: str) -> None:
        self._keyring()
        await self._change_credentials(
            principal, server_id, lambda s, server: credentials.remove(s, server, field_name)
        )

    async def _change_credentials(
        self, principal: Principal, server_id: str, change: CredentialChange
    ) -> None:
        """Load for manage, apply `change`, bump the credential version (the pool's next session
        handshakes with the new credentials), commit and publish `CREDENTIALS_CHANGED`."""

        def _apply(session: Session) -> RemoteServer:
            server = load_for_manage(session, principal, server_id)
            change(session, server)
            server.credential_version += 1
            server.updated_at = utcnow()
            session.add(server)
            session.commit()
            return server

        server = await self.db.run(_apply)
        await self.publish(ServerEventKind.CREDENTIALS_CHANGED, server, principal.user_id)


def _delete_rows(  # type: ignore[no-untyped-def]
    model: type[Capability] | type[Credential] | type[OAuthToken] | type[OAuthClient], server_id: str
):
    return delete(model).where(col(model.server_id) == server_id)
