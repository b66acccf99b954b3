"""SQLModel tables. Schema changes go through alembic migrations in `migrations/`.

Credential values are never stored here in plaintext: `Credential` holds only the AES-GCM
ciphertext and the wrapped data key (see `crypto.py`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Column, DateTime, ForeignKey, Index, LargeBinary, String, UniqueConstraint
from sqlalchemy.dialects import mysql
from sqlmodel import Field, SQLModel

# Microsecond precision everywhere (MySQL/MariaDB DATETIME defaults to whole seconds, which would
# break the keyset order of lists and the "seen by the latest discovery" comparison).
Timestamp = DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


def same_named(source: object, names: Iterable[str], **values: Any) -> dict[str, Any]:
    """`values`, plus each of `names` not among them read from `source`: the keyword arguments of a
    view (a snapshot, a detail) built from a row, where most fields are the row's own."""
    return {name: getattr(source, name) for name in names if name not in values} | values


class Sealed(SQLModel):
    """The envelope columns of a sealed value (`crypto.SealedSecret`): a credential field or an OAuth
    token. `sa_type` rather than `sa_column`: each table gets its own columns."""

    dek_id: str = Field(max_length=32)
    kek_id: str = Field(max_length=32, index=True)
    wrapped_dek: bytes = Field(sa_type=LargeBinary, nullable=False)
    nonce: bytes = Field(sa_type=LargeBinary, nullable=False)
    ciphertext: bytes = Field(sa_type=LargeBinary, nullable=False)


class ServerRow(SQLModel):
    """The keys of a row that belongs to one server (a credential field, a capability, a user's OAuth
    tokens): its own id, and the server's, whose deletion takes the row with it. `sa_type` and
    `foreign_key` rather than `sa_column`: each table gets its own columns."""

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    server_id: str = Field(
        sa_type=String(32), foreign_key="remote_server.id", ondelete="CASCADE", index=True, nullable=False
    )


class TenantQuota(SQLModel, table=True):
    """One row per tenant holding its server count; the cap is enforced by a conditional UPDATE on it."""

    __tablename__ = "tenant_quota"

    tenant_id: str = Field(primary_key=True, max_length=128)
    server_count: int = Field(default=0)


class RemoteServer(SQLModel, table=True):
    __tablename__ = "remote_server"
    __table_args__ = (UniqueConstraint("tenant_id", "owner_scope", "name", name="uq_server_owner_name"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    tenant_id: str = Field(index=True, max_length=128)
    owner_user_id: str = Field(max_length=128)
    # `tenant` for a tenant-shared server, else `user:<id>`: names are unique per owner scope.
    owner_scope: str = Field(max_length=140)
    name: str = Field(max_length=64)
    slug: str = Field(max_length=80)
    description: str = Field(default="", max_length=2000)
    endpoint_url: str = Field(max_length=2048)
    transport: str = Field(default="streamable_http", max_length=32)
    auth_type: str = Field(default="none", max_length=32)
    consent_tier: str = Field(default="auto", max_length=16)
    is_tenant_shared: bool = Field(default=False)
    status: str = Field(default="active", max_length=16)
    consecutive_failures: int = Field(default=0)
    consecutive_successes: int = Field(default=0)
    last_health_status: str | None = Field(default=None, max_length=128)
    last_health_at: datetime | None = Field(default=None, sa_type=Timestamp)
    last_discovery_at: datetime | None = Field(default=None, sa_type=Timestamp)
    # Bumped whenever credentials or the endpoint change: part of the upstream pool's key.
    credential_version: int = Field(default=1)
    created_at: datetime = Field(default_factory=utcnow, sa_type=Timestamp)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=Timestamp)


class Credential(ServerRow, Sealed, table=True):
    """One encrypted credential field of a server (envelope encryption, see `crypto.py`)."""

    __tablename__ = "credential"
    __table_args__ = (UniqueConstraint("server_id", "field", name="uq_credential_field"),)

    tenant_id: str = Field(max_length=128)
    field: str = Field(max_length=128)
    created_at: datetime = Field(default_factory=utcnow, sa_type=Timestamp)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=Timestamp)


class Capability(ServerRow, table=True):
    """One tool, resource, resource template or prompt seen by discovery, in its MCP wire shape."""

    __tablename__ = "capability"
    __table_args__ = (UniqueConstraint("server_id", "kind", "name", name="uq_capability"),)

    kind: str = Field(max_length=24)  # tool | resource | resource_template | prompt
    # The upstream name (a resource's URI, a template's uriTemplate).
    name: str = Field(max_length=1024)
    description: str | None = Field(default=None)
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    last_seen_at: datetime = Field(default_factory=utcnow, sa_type=Timestamp)


class AuditEvent(SQLModel, table=True):
    """One audited event (SPEC section 7). `target`/`arguments` are empty at detail level `off`."""

    __tablename__ = "audit_event"
    __table_args__ = (Index("ix_audit_tenant_ts", "tenant_id", "ts"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    ts: datetime = Field(default_factory=utcnow, sa_type=Timestamp)
    tenant_id: str = Field(max_length=128)
    user_id: str = Field(max_length=128)
    event: str = Field(max_length=64)
    outcome: str = Field(max_length=16)
    error_code: str | None = Field(default=None, max_length=64)
    duration_ms: float | None = Field(default=None)
    request_id: str | None = Field(default=None, max_length=128)
    target: str | None = Field(default=None, max_length=1024)
    arguments: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))


class CustomRole(SQLModel, table=True):
    """A tenant-defined role: exactly the permissions listed."""

    __tablename__ = "custom_role"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_custom_role"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=32)
    tenant_id: str = Field(max_length=128)
    name: str = Field(max_length=64)
    description: str = Field(default="", max_length=500)
    permissions: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow, sa_type=Timestamp)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=Timestamp)


class OAuthClient(SQLModel, table=True):
    """The OAuth client identity ScaiLink uses for one `auth_type: oauth2` server (SPEC section 12).

    `client_id` is the one given at registration, or the one a dynamic registration returned (its
    secret, like a given one, is the server's `Credential` field `client_secret`). `issuer` is pinned
    by the first discovery of the authorization server: a later one naming another issuer is refused.
    """

    __tablename__ = "oauth_client"

    server_id: str = Field(
        sa_column=Column(
            String(32), ForeignKey("remote_server.id", ondelete="CASCADE"), primary_key=True, nullable=False
        )
    )
    tenant_id: str = Field(max_length=128)
    grant: str = Field(max_length=32)  # authorization_code | client_credentials
    client_id: str | None = Field(default=None, max_length=512)
    scopes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    issuer: str | None = Field(default=None, max_length=2048)
    created_at: datetime = Field(default_factory=utcnow, sa_type=Timestamp)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=Timestamp)


class OAuthToken(ServerRow, Sealed, table=True):
    """The tokens of one (server, user): sealed like a credential, with the user in the associated
    data (`oauth_tokens.py`). `user_id` is empty for a `client_credentials` server's one token.
    `version` moves on every new token: part of the upstream pool's key."""

    __tablename__ = "oauth_token"
    __table_args__ = (UniqueConstraint("server_id", "user_id", name="uq_oauth_token_user"),)

    tenant_id: str = Field(max_length=128)
    user_id: str = Field(max_length=128)
    version: int = Field(default=1)
    expires_at: datetime | None = Field(default=None, sa_type=Timestamp)
    created_at: datetime = Field(default_factory=utcnow, sa_type=Timestamp)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=Timestamp)


class OAuthNonce(SQLModel, table=True):
    """A used one-time value (an authorization `state` or an authorize ticket), by its hash: a second
    use fails on the primary key, on every replica. Rows past `expires_at` are useless and pruned."""

    __tablename__ = "oauth_nonce"

    id: str = Field(primary_key=True, max_length=64)
    expires_at: datetime = Field(sa_type=Timestamp, index=True)
