"""The stored OAuth client settings of `auth_type: oauth2` servers (the cold path of `oauth.py`).

Owns reading an `oauth_client` row into a `ClientConfig` (no secret), pinning the issuer at first
use, opening the client secret (the server's sealed `client_secret` credential field), and storing a
dynamically registered client. Plain functions of a database session: the caller runs them in
`Database.run` and keeps the caches.

Must not: return a secret anywhere but to the token request that needs it, or log one.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from sqlmodel import Session, select

from scailink_mcp.crypto import DecryptionError, Keyring, open_sealed, sealed_from_row
from scailink_mcp.errors import ValidationFailed
from scailink_mcp.models import Credential, OAuthClient, RemoteServer
from scailink_mcp.remote import credentials
from scailink_mcp.remote.oauth_client import ClientIdentity
from scailink_mcp.remote.oauth_tokens import TokenOwner

AUTHORIZATION_CODE = "authorization_code"
CLIENT_CREDENTIALS = "client_credentials"
CLIENT_SECRET = "client_secret"


@dataclass(frozen=True)
class ClientConfig:
    """An oauth2 server as the call path needs it (no secret)."""

    server_id: str
    tenant_id: str
    owner_user_id: str
    endpoint_url: str
    grant: str
    client_id: str | None
    scopes: tuple[str, ...]
    issuer: str | None
    transport: str = "streamable_http"  # how the upstream is asked without a token (oauth_client.py)

    def owner(self, user_id: str) -> TokenOwner:
        return TokenOwner(self.server_id, self.tenant_id, "" if self.grant == CLIENT_CREDENTIALS else user_id)


def config_of(session: Session, server_id: str) -> ClientConfig | None:
    server = session.get(RemoteServer, server_id)
    row = session.get(OAuthClient, server_id)
    if server is None or row is None:
        return None
    return ClientConfig(
        server_id=server.id,
        tenant_id=server.tenant_id,
        owner_user_id=server.owner_user_id,
        endpoint_url=server.endpoint_url,
        grant=row.grant,
        client_id=row.client_id,
        scopes=tuple(row.scopes),
        issuer=row.issuer,
        transport=server.transport,
    )


def pin_issuer(session: Session, server_id: str, issuer: str) -> None:
    row = session.get(OAuthClient, server_id)
    if row is not None and row.issuer is None:
        row.issuer = issuer
        session.add(row)
        session.commit()


def client_secret(session: Session, keyring: Keyring | None, server_id: str) -> str | None:
    """The server's client secret, decrypted for one token request (None when it has none)."""
    server = session.get(RemoteServer, server_id)
    if server is None:
        return None
    row = session.exec(
        select(Credential).where(Credential.server_id == server.id, Credential.field == CLIENT_SECRET)
    ).first()
    if row is None or keyring is None:
        return None
    try:
        return open_sealed(
            keyring,
            tenant_id=server.tenant_id,
            server_id=server.id,
            field=CLIENT_SECRET,
            sealed=sealed_from_row(row),
        )
    except (DecryptionError, InvalidTag, ValueError):
        raise ValidationFailed(
            "the stored client secret does not decrypt; set it again",
            details=[{"field": "credentials.client_secret", "reason": "does not decrypt; PUT it again"}],
        ) from None


def save_client(session: Session, keyring: Keyring | None, server_id: str, identity: ClientIdentity) -> None:
    row, server = session.get(OAuthClient, server_id), session.get(RemoteServer, server_id)
    if row is None or server is None or keyring is None:
        return
    row.client_id = identity.client_id
    session.add(row)
    if identity.client_secret:
        credentials.store(session, keyring, server, CLIENT_SECRET, identity.client_secret)
    session.commit()
