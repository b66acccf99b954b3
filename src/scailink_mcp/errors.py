"""The one error hierarchy of ScaiLink and the one place that renders the error envelope.

    ScaiLinkError                     SCAILINK_INTERNAL          500
    ├── Unauthorized                  SCAILINK_UNAUTHORIZED      401
    ├── Forbidden                     SCAILINK_FORBIDDEN         403
    ├── NotFound                      SCAILINK_NOT_FOUND         404
    ├── ValidationFailed              SCAILINK_VALIDATION_ERROR  422
    ├── EndpointForbidden             SCAILINK_ENDPOINT_FORBIDDEN 422
    ├── Conflict                      SCAILINK_CONFLICT          409
    ├── PayloadTooLarge               SCAILINK_PAYLOAD_TOO_LARGE 413
    ├── RemoteLimitExceeded           SCAILINK_REMOTE_LIMIT_EXCEEDED 429
    ├── RateLimited                   SCAILINK_RATE_LIMITED      429
    ├── ToolNotFound                  SCAILINK_TOOL_NOT_FOUND    404
    ├── DeviceOffline                 SCAILINK_DEVICE_OFFLINE    404
    ├── ConsentDenied                 SCAILINK_CONSENT_DENIED    403
    ├── UpstreamAuthRequired          SCAILINK_UPSTREAM_AUTH_REQUIRED 403
    ├── UpstreamError                 SCAILINK_UPSTREAM_ERROR    502
    │   └── ResultTooLarge            SCAILINK_RESULT_TOO_LARGE  502
    ├── UpstreamTimeout               SCAILINK_UPSTREAM_TIMEOUT  504
    ├── ProtocolError                 SCAILINK_PROTOCOL_ERROR    400 (a JSON-RPC error, even for tools/call)
    └── RegistryDisabled              SCAILINK_REGISTRY_DISABLED 503

Routes raise these; they never build error dicts. One renderer per surface lives here: the REST
envelope (`error_response`), an MCP JSON-RPC error (`mcp_error`), and an MCP tool result with
`isError` (`tool_error_result`); the desktop bridge answers with close codes (desktop/protocol.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS, INVALID_REQUEST
from pydantic import ValidationError
from starlette.responses import JSONResponse


class ScaiLinkError(Exception):
    """Base class: carries a stable code, an HTTP status and a message safe to show a client."""

    code: ClassVar[str] = "SCAILINK_INTERNAL"
    status: ClassVar[int] = 500
    default_message: ClassVar[str] = "internal error"

    def __init__(
        self,
        message: str | None = None,
        *,
        details: Any = None,
        retry_after: float | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.details = details
        self.retry_after = retry_after
        super().__init__(self.message)


class Unauthorized(ScaiLinkError):
    code = "SCAILINK_UNAUTHORIZED"
    status = 401
    default_message = "authentication required"


class Forbidden(ScaiLinkError):
    code = "SCAILINK_FORBIDDEN"
    status = 403
    default_message = "permission denied"


class NotFound(ScaiLinkError):
    code = "SCAILINK_NOT_FOUND"
    status = 404
    default_message = "not found"


class ValidationFailed(ScaiLinkError):
    code = "SCAILINK_VALIDATION_ERROR"
    status = 422
    default_message = "invalid request"


class EndpointForbidden(ScaiLinkError):
    code = "SCAILINK_ENDPOINT_FORBIDDEN"
    status = 422
    default_message = "endpoint_url resolves to a blocked address"


class Conflict(ScaiLinkError):
    code = "SCAILINK_CONFLICT"
    status = 409
    default_message = "a server with that name already exists"


class PayloadTooLarge(ScaiLinkError):
    code = "SCAILINK_PAYLOAD_TOO_LARGE"
    status = 413
    default_message = "request body too large"


class RemoteLimitExceeded(ScaiLinkError):
    code = "SCAILINK_REMOTE_LIMIT_EXCEEDED"
    status = 429
    default_message = "the tenant already has the maximum number of remote servers"


class RateLimited(ScaiLinkError):
    code = "SCAILINK_RATE_LIMITED"
    status = 429
    default_message = "too many requests"


class ToolNotFound(ScaiLinkError):
    code = "SCAILINK_TOOL_NOT_FOUND"
    status = 404
    default_message = "tool not found"


class DeviceOffline(ScaiLinkError):
    """The replica holding the device's WebSocket is gone, or Redis cannot reach it (SPEC section 10)."""

    code = "SCAILINK_DEVICE_OFFLINE"
    status = 404
    default_message = "the desktop device is offline"


def error_class(code: str) -> type[ScaiLinkError]:
    """The error class of a code (a forwarded call's error, rebuilt on the caller's replica)."""
    stack: list[type[ScaiLinkError]] = [ScaiLinkError]
    while stack:
        cls = stack.pop()
        if cls.code == code:
            return cls
        stack.extend(cls.__subclasses__())
    return ScaiLinkError


class ConsentDenied(ScaiLinkError):
    code = "SCAILINK_CONSENT_DENIED"
    status = 403
    default_message = "the user did not approve this invocation"


class UpstreamAuthRequired(ScaiLinkError):
    """The caller has not authorized ScaiLink for an OAuth upstream, or its refresh failed (SPEC
    section 12). 403, never 401: the caller's own token is fine. `authorize_url` (absolute, with a
    one-time ticket) is where a browser authorizes; it is in `details` and in the tool result's `_meta`.
    `elicitation_id` names that ticket's flow for a URL-mode elicitation (never in `details`).
    """

    code = "SCAILINK_UPSTREAM_AUTH_REQUIRED"
    status = 403
    default_message = "authorize ScaiLink for this server first: open authorize_url in a browser"

    def __init__(self, message: str | None = None, *, authorize_url: str, elicitation_id: str = "") -> None:
        super().__init__(message, details={"authorize_url": authorize_url})
        self.authorize_url = authorize_url
        self.elicitation_id = elicitation_id


class UpstreamError(ScaiLinkError):
    code = "SCAILINK_UPSTREAM_ERROR"
    status = 502
    default_message = "upstream MCP server failed"


class ResultTooLarge(UpstreamError):
    """An upstream or device answer over `max_result_bytes`, stopped while reading (never buffered whole)."""

    code = "SCAILINK_RESULT_TOO_LARGE"
    status = 502
    default_message = "the upstream answer is larger than the configured limit"


class UpstreamTimeout(ScaiLinkError):
    code = "SCAILINK_UPSTREAM_TIMEOUT"
    status = 504
    default_message = "upstream MCP server did not answer in time"


class ProtocolError(ScaiLinkError):
    """What MCP answers with a JSON-RPC error rather than an `isError` result, `tools/call` included:
    a bad or expired multi-round-trip `requestState` (era_bridge.py), and an upstream's own JSON-RPC
    error on a 2026-07-28 call, passed through with its code and data (what the client would have
    got directly)."""

    code = "SCAILINK_PROTOCOL_ERROR"
    status = 400
    default_message = "Invalid request"

    def __init__(
        self, message: str | None = None, *, rpc_code: int = INVALID_PARAMS, data: Any = None
    ) -> None:
        super().__init__(message)
        self.rpc_code = rpc_code
        self.data = data


class ClientCapabilityMissing(ScaiLinkError):
    """An upstream needs the calling client's input (sampling, elicitation, roots) to go on, and the
    client did not declare that capability, has no session to ask on (REST), or refused the request
    (era_reverse.py). `details.missing` names the capabilities."""

    code = "SCAILINK_CLIENT_CAPABILITY_MISSING"
    status = 422
    default_message = "the upstream needs a client capability this client did not declare"


class RegistryDisabled(ScaiLinkError):
    code = "SCAILINK_REGISTRY_DISABLED"
    status = 503
    default_message = "the remote server registry is disabled: no encryption KEK is configured"


ERROR_TABLE: tuple[type[ScaiLinkError], ...] = (
    Unauthorized,
    Forbidden,
    NotFound,
    ValidationFailed,
    EndpointForbidden,
    Conflict,
    PayloadTooLarge,
    RemoteLimitExceeded,
    RateLimited,
    ToolNotFound,
    ConsentDenied,
    UpstreamAuthRequired,
    ResultTooLarge,
    UpstreamError,
    UpstreamTimeout,
    ProtocolError,
    ClientCapabilityMissing,
    RegistryDisabled,
    ScaiLinkError,
)


def validation_details(exc: ValidationError) -> list[dict[str, str]]:
    """Turn a pydantic error into `[{field, reason}]` without echoing input values (they may be secrets)."""
    details: list[dict[str, str]] = []
    for err in exc.errors(include_input=False, include_url=False):
        field = ".".join(str(part) for part in err["loc"]) or "body"
        details.append({"field": field, "reason": err["msg"]})
    return details


def from_validation(exc: ValidationError, prefix: Sequence[str] = ()) -> ValidationFailed:
    details = validation_details(exc)
    if prefix:
        for item in details:
            item["field"] = ".".join([*prefix, item["field"]])
    return ValidationFailed("request validation failed", details=details)


def envelope(err: ScaiLinkError, request_id: str) -> dict[str, Any]:
    return {
        "status": "error",
        "error": {
            "code": err.code,
            "message": err.message,
            "retry_after": err.retry_after,
            "details": err.details,
        },
        "meta": {"request_id": request_id},
    }


def error_response(err: ScaiLinkError, request_id: str) -> JSONResponse:
    headers = {"X-Request-ID": request_id}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(err.retry_after)))
    if isinstance(err, Unauthorized):
        headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    return JSONResponse(envelope(err, request_id), status_code=err.status, headers=headers)


def mcp_error(err: ScaiLinkError) -> MCPError:
    """A JSON-RPC error for MCP requests other than `tools/call` (reads, prompts, subscriptions), and
    for a `ProtocolError` on any request (its own JSON-RPC code, message and data)."""
    if isinstance(err, ProtocolError):
        return MCPError(err.rpc_code, err.message, err.data)
    return MCPError(INVALID_REQUEST, f"{err.code}: {err.message}")


def tool_error_result(err: ScaiLinkError) -> dict[str, Any]:
    """A failed `tools/call` as MCP wants it: `isError` with a text, and the code in `_meta`."""
    error: dict[str, Any] = {"code": err.code, "message": err.message}
    text = f"{err.code}: {err.message}"
    if isinstance(err, UpstreamAuthRequired):
        error["authorize_url"] = err.authorize_url
        text = f"{text} ({err.authorize_url})"
    return {
        "content": [{"type": "text", "text": text}],
        "isError": True,
        "_meta": {"scailink/error": error},
    }
