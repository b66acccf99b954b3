"""`Settings`: the single source of every knob and limit (env prefix `SCAILINK_`).

Built once (by the CLI or a test fixture) and passed down; no other module reads the environment.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]


def _split_commas(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """Every setting is `SCAILINK_<FIELD>`; SPEC section 9 names are part of the contract."""

    model_config = SettingsConfigDict(env_prefix="SCAILINK_", extra="ignore")

    # --- listening and identity of the service
    host: str = "127.0.0.1"
    port: int = 8080
    public_url: str | None = None
    data_dir: Path = Path("./.scailink")
    database_url: str | None = None
    redis_url: str | None = None
    # Channel (and client name) prefix in Redis: replicas sharing one Redis with the same prefix are one
    # gateway; another prefix keeps another deployment apart.
    redis_prefix: str = Field(default="scailink", min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    # Base64 of >= 32 bytes shared by all replicas: signs every message and session state they put in
    # Redis (redis_link.Signer). Unset: derived from the primary KEK.
    cluster_secret: SecretStr | None = None
    log_level: str = "INFO"

    # --- credentials at rest
    encryption_local_kek: SecretStr | None = None
    # Decrypt-only KEKs kept during a rotation (base64, comma-separated).
    encryption_previous_keks: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)

    # --- JWT verification
    jwt_audience: str = "scailink"
    jwt_issuer: str | None = None
    jwt_jwks_url: str | None = None
    jwt_public_key: str | None = None
    jwt_algorithms: CommaList = Field(default_factory=lambda: ["RS256", "ES256", "EdDSA"])
    jwt_leeway_s: int = 30
    jwt_max_token_bytes: int = 8192
    jwks_cache_ttl_s: int = 300
    # Verified tokens remembered so a session's every message does not re-check the signature.
    jwt_verified_cache_size: int = 10_000
    jwt_verified_cache_ttl_s: int = 300
    jwks_min_refetch_interval_s: int = 30
    # Extra group -> role mappings, e.g. `{"eng-admins": "tenant_admin"}` (JSON in the env).
    group_role_map: dict[str, str] = Field(default_factory=dict)
    # The dev issuer: private key used by `scailink token`; never set implicitly in production.
    dev_signing_key_path: Path | None = None

    # --- REST conventions
    max_body_bytes: int = 1024 * 1024
    registry_max_body_bytes: int = 64 * 1024
    page_limit_default: int = 50
    page_limit_max: int = 200
    # Per-user REST request rate (token bucket); 0 disables.
    rate_limit_per_s: float = 20.0
    rate_limit_burst: int = 200

    # --- cloud registry
    allowed_private_networks: CommaList = Field(default_factory=list)
    max_servers_per_tenant: int = 100
    tool_name_style: Literal["dotted", "compat"] = "dotted"
    discovery_connect_timeout_s: float = 5.0
    discovery_timeout_s: float = 30.0
    discovery_interval_s: float = 900.0
    capability_retention_s: float = 24 * 3600.0

    # --- the MCP surface
    call_timeout_s: float = 60.0
    call_timeout_max_s: float = 300.0
    max_result_bytes: int = 10 * 1024 * 1024
    consent_timeout_s: float = 60.0
    list_changed_debounce_s: float = 0.25
    # Handshake-era `/mcp` sessions: idle ones close after this long (the SDK's default is 1800 s);
    # one principal holds at most this many (opening one more closes its oldest); all of them together
    # at most `mcp_max_sessions`.
    mcp_session_idle_s: float = 600.0
    mcp_max_sessions_per_principal: int = 32
    mcp_max_sessions: int = 10_000
    # An idle handshake-era session (no request for this long, no GET stream, nothing in flight) is
    # parked: the SDK's machinery torn down, a small record kept, revived by its next request
    # (session_park.py). 0 disables parking.
    mcp_park_idle_s: float = Field(default=5.0, ge=0)
    # Nesting deeper than this in a JSON body (REST, /mcp) or frame (desktop bridge) is refused.
    max_json_depth: int = 64
    # Host/Origin values accepted besides loopback and PUBLIC_URL (DNS-rebinding protection).
    mcp_allowed_hosts: CommaList = Field(default_factory=list)
    mcp_allowed_origins: CommaList = Field(default_factory=list)

    # --- health checks
    health_interval_s: float = 60.0
    health_jitter: float = 0.1
    health_timeout_s: float = 5.0
    health_failure_threshold: int = 3
    health_auto_recover: bool = False
    health_recover_successes: int = 2

    # --- upstream session pool
    pool_idle_ttl_s: float = 300.0
    # `tools/call` over Streamable HTTP on the lean path (remote/wire.py); false = the SDK client's.
    pool_lean_calls: bool = True
    pool_max_sessions: int = 1000
    # Circuit breakers (remote/pool.py): only transport failures and timeouts count. This many of one
    # user's calls failing within the window open that user's circuit to the server for `open_s`; the
    # same count from at least `min_users` distinct users opens it for everyone.
    pool_breaker_failures: int = 5
    pool_breaker_window_s: float = 60.0
    pool_breaker_open_s: float = 30.0
    pool_breaker_min_users: int = 3

    # --- desktop bridge
    ws_heartbeat_interval_ms: int = 30000
    ws_grace_period_ms: int = 120000
    ws_init_timeout_s: float = 10.0
    ws_max_connections_per_user: int = 5
    ws_max_frame_bytes: int = 1024 * 1024
    # permessage-deflate keeps a zlib compressor and decompressor per connection: measured ~50 KiB of
    # the ~88 KiB an idle desktop session cost (issue 14, tracemalloc); frames are small JSON, so off.
    ws_per_message_deflate: bool = False
    # Tools one desktop session may hold (session_init and after each catalog_update), and one
    # (tenant, user) across all its sessions; over either the frame is refused (4002 / 4003).
    ws_max_tools_per_session: int = 2000
    ws_max_tools_per_user: int = 5000
    # catalog_update frames are applied at once, but the catalog is marked changed (views rebuilt,
    # list_changed sent) at most once per this interval per session; the rest is coalesced.
    ws_catalog_change_min_interval_ms: int = 500
    # catalog_update frames one (tenant, user) may send (token bucket, across its connections); one
    # over it closes the socket 4003 before the frame is even parsed. 0 disables.
    ws_catalog_updates_per_s: float = 1.0
    ws_catalog_updates_burst: int = 10

    # --- audit
    audit_detail_level: Literal["off", "metadata"] = (
        "metadata"  # the tenant default; desktops choose their own
    )
    audit_retention_s: float = 90 * 24 * 3600.0
    audit_queue_size: int = 10_000

    # --- shutdown: in-flight requests get this long after SIGTERM
    shutdown_grace_s: int = 25

    # --- background tasks
    background_tasks: bool = True

    # --- upstream OAuth (SPEC section 12)
    # How long an authorization `state` and an authorize ticket stay valid (each works once).
    oauth_state_ttl_s: float = 600.0
    # Issuers (exact, as their metadata names them) ScaiLink may register itself with (RFC 7591)
    # when a server is registered without a client id; comma-separated. Empty: never.
    oauth_dcr_allowed_issuers: CommaList = Field(default_factory=list)
    # An access token is refreshed once less than this is left (at most half its lifetime).
    oauth_refresh_skew_s: float = 60.0
    # Bound of each request to an authorization server (metadata, token, registration).
    oauth_http_timeout_s: float = 10.0

    _split = field_validator(
        "jwt_algorithms",
        "allowed_private_networks",
        "mcp_allowed_hosts",
        "mcp_allowed_origins",
        "oauth_dcr_allowed_issuers",
        mode="before",
    )(_split_commas)

    @field_validator("encryption_previous_keks", mode="before")
    @classmethod
    def _split_keks(cls, value: object) -> object:
        return _split_commas(value)

    @field_validator("allowed_private_networks")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)
        return value

    @field_validator("cluster_secret")
    @classmethod
    def _secret_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                raw = base64.b64decode(value.get_secret_value().strip(), validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("SCAILINK_CLUSTER_SECRET must be base64") from None
            if len(raw) < 32:
                raise ValueError("SCAILINK_CLUSTER_SECRET must be base64 of at least 32 bytes")
        return value

    @property
    def effective_database_url(self) -> str:
        """The configured URL, or a SQLite file inside the data dir."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'scailink.db').resolve()}"

    @property
    def registry_enabled(self) -> bool:
        return self.encryption_local_kek is not None
