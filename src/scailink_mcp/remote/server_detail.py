"""The detail view of one registered server, as the REST surface and the dashboard show it.

Owns the shape of `ServerDetail`: the capabilities the latest discovery saw, under their public
(namespaced) names, and the credential fields set (names and age, never a value).

Must not: check visibility or permissions (the caller loaded the row through `access.py`), decrypt
anything, or write.
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Session, select

from scailink_mcp.models import Credential, OAuthClient, OAuthToken, RemoteServer, same_named, utcnow
from scailink_mcp.naming import namespaced_name, namespaced_uri, remote_namespace
from scailink_mcp.remote.discovery import KINDS, aware, visible_capabilities
from scailink_mcp.remote.schemas import Capabilities, CapabilityOut, OAuthView, ServerDetail


def server_detail(session: Session, server: RemoteServer, viewer: str | None = None) -> ServerDetail:
    """`viewer`: whose connection an oauth2 server's `oauth.connected` tells (the caller's)."""
    groups = _capabilities(session, server)
    creds = session.exec(select(Credential).where(Credential.server_id == server.id)).all()
    oldest = min((aware(c.updated_at) for c in creds), default=None)
    return ServerDetail(
        **same_named(
            server,
            ServerDetail.model_fields,
            last_health_at=_aware_or_none(server.last_health_at),
            last_discovery_at=_aware_or_none(server.last_discovery_at),
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
            oauth=_oauth_view(session, server, viewer),
        )
    )


def _oauth_view(session: Session, server: RemoteServer, viewer: str | None) -> OAuthView | None:
    row = session.get(OAuthClient, server.id) if server.auth_type == "oauth2" else None
    if row is None:
        return None
    user_key = "" if row.grant == "client_credentials" else (viewer or "")
    token = session.exec(
        select(OAuthToken.id).where(OAuthToken.server_id == server.id, OAuthToken.user_id == user_key)
    ).first()
    return OAuthView(
        grant=row.grant,
        client_id=row.client_id,
        scopes=list(row.scopes),
        issuer=row.issuer,
        connected=token is not None and (viewer is not None or row.grant == "client_credentials"),
    )


def _capabilities(session: Session, server: RemoteServer) -> dict[str, list[CapabilityOut]]:
    """The visible capabilities by kind, each with its public name (a `scailink://` URI for resources)."""
    namespace = remote_namespace(
        slug=server.slug, owner_user_id=server.owner_user_id, is_tenant_shared=server.is_tenant_shared
    )
    groups: dict[str, list[CapabilityOut]] = {kind: [] for kind in KINDS}
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
    return groups


def _aware_or_none(ts: datetime | None) -> datetime | None:
    return aware(ts) if ts else None
