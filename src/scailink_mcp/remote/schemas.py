"""Wire shapes of the remote-server registry (request bodies and the server detail)."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    WithJsonSchema,
    field_validator,
    model_validator,
)

Transport = Literal["streamable_http", "sse"]
AuthType = Literal["none", "bearer", "api_key_header", "oauth2"]
OAuthGrant = Literal["authorization_code", "client_credentials"]
ConsentTier = Literal["auto", "confirm", "locked"]

# Every pattern below is written once and used twice: pydantic enforces it (its Rust regex engine, whose
# `$` and classes read like JSON Schema's ECMA-262 ones) and the published contract states it.
HEADER_NAME_PATTERN = r"^[a-z0-9!#$%&'*+.^_`|~-]{1,64}$"
_HEADER_TOKEN = re.compile(HEADER_NAME_PATTERN)
# Controls (C0, DEL, C1) are never part of a name; NUL alone would break PostgreSQL text columns.
_CONTROL = r"\x00-\x1f\x7f-\x9f"
# What JSON Schema's `\s` matches besides the controls above: a name must hold something else.
_SPACE = r" \u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
NAME_PATTERN = f"^[^{_CONTROL}]*[^{_CONTROL}{_SPACE}][^{_CONTROL}]*$"
# Free text: tabs and line breaks are fine, other controls are not.
TEXT_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"
# http(s), a host (an RFC 3986 reg-name in ASCII, IDNs as `xn--` labels, or a bracketed IPv6 literal),
# an optional port, then path/query/fragment without whitespace or controls. No userinfo: credentials
# go in `credentials`. Whether the host may be contacted is decided at registration (SSRF, section 3).
_PORT = r"(?:[0-9]{1,4}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
ENDPOINT_URL_PATTERN = (
    r"^[Hh][Tt][Tt][Pp][Ss]?://(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)"
    f"(?::{_PORT})?"
    r"(?:[/?#][^\x00-\x20\x7f-\x9f]*)?$"
)
# A secret travels as an HTTP header value: visible ASCII, inner spaces or tabs, nothing at either end
# (a line break would inject a header; a leading/trailing space is stripped on the wire; non-ASCII
# cannot be encoded).
SECRET_PATTERN = r"^[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?$"
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
    """Defence in depth behind `ENDPOINT_URL_PATTERN` (which already implies all of this); a URL the
    pattern allows but nothing can parse (a malformed IPv6 literal) is refused at registration with
    `SCAILINK_ENDPOINT_FORBIDDEN`, like any host that may not be contacted."""
    if any(ch in value for ch in "\r\n\t "):
        raise ValueError("endpoint_url must not contain whitespace")
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if parts.scheme not in ("http", "https"):
        raise ValueError("endpoint_url must be an http or https URL")
    if parts.username or parts.password:
        raise ValueError("endpoint_url must not carry credentials; use the credentials object")
    return value


def check_credential_field(auth_type: str, field: str) -> str | None:
    """None when `field` is a valid credential field for `auth_type`, else the reason."""
    if auth_type == "none":
        return "auth_type 'none' takes no credentials"
    if auth_type == "bearer":
        return (
            None if field == "authorization" else "auth_type 'bearer' uses the single field 'authorization'"
        )
    if auth_type == "oauth2":
        return None if field == "client_secret" else "auth_type 'oauth2' takes only the field 'client_secret'"
    if not _HEADER_TOKEN.fullmatch(field):  # (`$` of re.match also matches before a final "\n")
        return "must be a lower-case HTTP header name"
    if field in RESERVED_HEADERS:
        return f"header '{field}' is reserved"
    return None


_SECRET = re.compile(SECRET_PATTERN)


def check_secret(value: SecretStr) -> SecretStr:
    raw = value.get_secret_value()
    if not raw or len(raw) > MAX_SECRET_CHARS:
        raise ValueError(f"must be 1 to {MAX_SECRET_CHARS} characters")
    if any(ch in raw for ch in "\r\n\x00"):
        raise ValueError("must not contain line breaks or NUL")
    if not _SECRET.fullmatch(raw):
        raise ValueError(
            "must be printable ASCII (inner spaces and tabs allowed, none at either end): "
            "it is sent as an HTTP header value"
        )
    return value


# The contract of a secret; its value is write-only and never appears in any response.
SECRET_SCHEMA: dict[str, Any] = {
    "type": "string",
    "format": "password",
    "writeOnly": True,
    "minLength": 1,
    "maxLength": MAX_SECRET_CHARS,
    "pattern": SECRET_PATTERN,
}
Secret = Annotated[SecretStr, AfterValidator(check_secret), WithJsonSchema(SECRET_SCHEMA)]
MAX_CREDENTIAL_FIELDS = 16


def _credentials_contract(schema: dict[str, Any]) -> None:
    """What `RegisterServer._credentials_match_auth_type` enforces, stated in the JSON Schema."""
    reserved = sorted(RESERVED_HEADERS)
    schema["allOf"] = [
        {
            "if": {"properties": {"auth_type": {"const": "bearer"}}, "required": ["auth_type"]},
            "then": {
                "required": ["credentials"],
                "properties": {
                    "credentials": {
                        "required": ["authorization"],
                        "propertyNames": {"const": "authorization"},
                    }
                },
            },
        },
        {
            "if": {"properties": {"auth_type": {"const": "api_key_header"}}, "required": ["auth_type"]},
            "then": {
                "required": ["credentials"],
                "properties": {
                    "credentials": {
                        "minProperties": 1,
                        "propertyNames": {"pattern": HEADER_NAME_PATTERN, "not": {"enum": reserved}},
                    }
                },
            },
        },
        {
            "if": {"properties": {"auth_type": {"const": "oauth2"}}, "required": ["auth_type"]},
            "then": {
                "required": ["oauth"],
                "properties": {
                    "oauth": {"type": "object"},
                    "credentials": {"propertyNames": {"const": "client_secret"}},
                },
            },
        },
        {
            "if": {"required": ["oauth"]},
            "then": {"required": ["auth_type"], "properties": {"auth_type": {"const": "oauth2"}}},
        },
        {
            "if": {
                "required": ["oauth"],
                "properties": {
                    "oauth": {"required": ["grant"], "properties": {"grant": {"const": "client_credentials"}}}
                },
            },
            "then": {
                "required": ["credentials"],
                "properties": {
                    "oauth": {"required": ["client_id"], "properties": {"client_id": {"type": "string"}}},
                    "credentials": {"required": ["client_secret"]},
                },
            },
        },
        {
            "if": {
                "anyOf": [
                    {"not": {"required": ["auth_type"]}},
                    {"properties": {"auth_type": {"const": "none"}}},
                ]
            },
            "then": {"properties": {"credentials": {"maxProperties": 0}}},
        },
    ]


# Strict: JSON types matter (`is_tenant_shared: 0` or `"true"` is not a boolean).
_BODY = ConfigDict(extra="forbid", strict=True)


SCOPE_PATTERN = r"^[\x21\x23-\x5b\x5d-\x7e]{1,128}$"  # RFC 6749 section 3.3 scope-token


class OAuthSettings(BaseModel):
    """`oauth` of an `auth_type: oauth2` server (SPEC section 12); the secret goes in `credentials`."""

    model_config = _BODY

    grant: OAuthGrant
    client_id: str | None = Field(default=None, min_length=1, max_length=512, pattern=r"^[\x21-\x7e]+$")
    scopes: list[Annotated[str, Field(pattern=SCOPE_PATTERN)]] = Field(default_factory=list, max_length=32)


class RegisterServer(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_credentials_contract)

    name: str = Field(min_length=1, max_length=64, pattern=NAME_PATTERN)
    description: str = Field(default="", max_length=2000, pattern=TEXT_PATTERN)
    endpoint_url: str = Field(max_length=2048, pattern=ENDPOINT_URL_PATTERN)
    transport: Transport = "streamable_http"
    auth_type: AuthType = "none"
    credentials: dict[str, Secret] = Field(default_factory=dict, max_length=MAX_CREDENTIAL_FIELDS)
    is_tenant_shared: StrictBool = False
    consent_tier: ConsentTier = "auto"
    oauth: OAuthSettings | None = None

    _url = field_validator("endpoint_url")(check_endpoint_url)

    @model_validator(mode="after")
    def _credentials_match_auth_type(self) -> RegisterServer:
        if (self.auth_type == "oauth2") != (self.oauth is not None):
            raise ValueError("auth_type 'oauth2' needs `oauth`, and `oauth` needs auth_type 'oauth2'")
        oauth = self.oauth
        if (
            oauth is not None
            and oauth.grant == "client_credentials"
            and (oauth.client_id is None or "client_secret" not in self.credentials)
        ):
            raise ValueError("grant 'client_credentials' needs oauth.client_id and credentials.client_secret")
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
    model_config = _BODY

    name: str | None = Field(default=None, min_length=1, max_length=64, pattern=NAME_PATTERN)
    description: str | None = Field(default=None, max_length=2000, pattern=TEXT_PATTERN)
    endpoint_url: str | None = Field(default=None, max_length=2048, pattern=ENDPOINT_URL_PATTERN)
    transport: Transport | None = None
    consent_tier: ConsentTier | None = None

    @field_validator("endpoint_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else check_endpoint_url(value)


class CredentialValue(BaseModel):
    model_config = _BODY

    value: Secret


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
    status: Literal["active", "error", "pending_authorization"]
    consecutive_failures: int
    last_health_status: str | None
    last_health_at: datetime | None
    last_discovery_at: datetime | None
    capabilities: Capabilities
    credential_fields: list[str]
    credential_oldest_days: int | None
    created_at: datetime
    updated_at: datetime
    oauth: OAuthView | None = None


class OAuthView(BaseModel):
    """An oauth2 server's client settings and whether the caller is connected (never a token)."""

    grant: OAuthGrant
    client_id: str | None
    scopes: list[str]
    issuer: str | None
    connected: bool


ServerDetail.model_rebuild()
