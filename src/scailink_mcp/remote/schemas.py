"""Wire shapes of the remote-server registry (request bodies and the server detail)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

Transport = Literal["streamable_http", "sse"]
AuthType = Literal["none", "bearer", "api_key_header"]
ConsentTier = Literal["auto", "confirm", "locked"]

_HEADER_TOKEN = re.compile(r"^[a-z0-9!#$%&'*+.^_`|~-]{1,64}$")
# Headers ScaiLink or the transport own; a credential must not override them.
RESERVED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "connection",
        "transfer-encoding",
        "upgrade",
        "accept",
        "mcp-session-id",
        "mcp-protocol-version",
        "last-event-id",
        "te",
        "trailer",
        "keep-alive",
        "proxy-authorization",
    }
)
MAX_SECRET_CHARS = 8192


def check_endpoint_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError("endpoint_url must be an http or https URL")
    if not parts.hostname:
        raise ValueError("endpoint_url must name a host")
    if parts.username or parts.password:
        raise ValueError("endpoint_url must not carry credentials; use the credentials object")
    if any(ch in value for ch in "\r\n\t "):
        raise ValueError("endpoint_url must not contain whitespace")
    return value


def check_credential_field(auth_type: str, field: str) -> str | None:
    """None when `field` is a valid credential field for `auth_type`, else the reason."""
    if auth_type == "none":
        return "auth_type 'none' takes no credentials"
    if auth_type == "bearer":
        return (
            None if field == "authorization" else "auth_type 'bearer' uses the single field 'authorization'"
        )
    if not _HEADER_TOKEN.match(field):
        return "must be a lower-case HTTP header name"
    if field in RESERVED_HEADERS:
        return f"header '{field}' is reserved"
    return None


def check_secret(value: SecretStr) -> SecretStr:
    raw = value.get_secret_value()
    if not raw or len(raw) > MAX_SECRET_CHARS:
        raise ValueError(f"must be 1 to {MAX_SECRET_CHARS} characters")
    if any(ch in raw for ch in "\r\n\x00"):
        raise ValueError("must not contain line breaks or NUL")
    return value


class RegisterServer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    description: str = Field(default="", max_length=2000)
    endpoint_url: str = Field(max_length=2048)
    transport: Transport = "streamable_http"
    auth_type: AuthType = "none"
    credentials: dict[str, SecretStr] = Field(default_factory=dict)
    is_tenant_shared: bool = False
    consent_tier: ConsentTier = "auto"

    _url = field_validator("endpoint_url")(check_endpoint_url)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("credentials")
    @classmethod
    def _secrets(cls, value: dict[str, SecretStr]) -> dict[str, SecretStr]:
        if len(value) > 16:
            raise ValueError("at most 16 credential fields")
        for secret in value.values():
            check_secret(secret)
        return value

    @model_validator(mode="after")
    def _credentials_match_auth_type(self) -> RegisterServer:
        if self.auth_type == "bearer" and set(self.credentials) != {"authorization"}:
            raise ValueError("auth_type 'bearer' needs exactly the credential field 'authorization'")
        if self.auth_type == "api_key_header" and not self.credentials:
            raise ValueError("auth_type 'api_key_header' needs at least one header credential")
        for name in self.credentials:
            reason = check_credential_field(self.auth_type, name)
            if reason:
                raise ValueError(f"credentials.{name}: {reason}")
        return self


class UpdateServer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1, max_length=64)
    description: str | None = Field(default=None, max_length=2000)
    endpoint_url: str | None = Field(default=None, max_length=2048)
    transport: Transport | None = None
    consent_tier: ConsentTier | None = None

    @field_validator("endpoint_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else check_endpoint_url(value)


class CredentialValue(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: SecretStr

    _secret = field_validator("value")(check_secret)


class CapabilityOut(BaseModel):
    name: str
    namespaced_name: str
    description: str | None
    schema_: dict[str, object] = Field(alias="schema")

    model_config = ConfigDict(populate_by_name=True)


class Capabilities(BaseModel):
    tools: list[CapabilityOut]
    resources: list[CapabilityOut]
    resource_templates: list[CapabilityOut]
    prompts: list[CapabilityOut]


class ServerDetail(BaseModel):
    id: str
    name: str
    slug: str
    description: str
    endpoint_url: str
    transport: Transport
    auth_type: AuthType
    consent_tier: ConsentTier
    is_tenant_shared: bool
    owner_user_id: str
    tenant_id: str
    status: Literal["active", "error"]
    consecutive_failures: int
    last_health_status: str | None
    last_health_at: datetime | None
    last_discovery_at: datetime | None
    capabilities: Capabilities
    credential_fields: list[str]
    credential_oldest_days: int | None
    created_at: datetime
    updated_at: datetime
