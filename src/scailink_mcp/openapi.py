"""The REST contract, generated from the wire models and served at `/v1/modules/scailink/openapi.json`.

`registry_api/openapi.yaml` is this document written out by `scailink openapi`; a test keeps the two
equal, so a change to a body or detail model that is not reflected in the published file fails CI.

Every status a route can answer is listed with the exact error codes it carries (a 5xx other than the
documented 503 is a bug, never a contract), every response declares `X-Request-ID`, a 401 declares
`WWW-Authenticate`, and the body constraints are the ones pydantic enforces (the models are the single
source: `remote/schemas.py`).
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from scailink_mcp.errors import (
    ERROR_TABLE,
    Conflict,
    EndpointForbidden,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RegistryDisabled,
    RemoteLimitExceeded,
    ScaiLinkError,
    Unauthorized,
    UpstreamError,
    ValidationFailed,
)
from scailink_mcp.remote.schemas import (
    HEADER_NAME_PATTERN,
    CredentialValue,
    RegisterServer,
    ServerDetail,
    UpdateServer,
)

BASE = "/v1/modules/scailink"
REF = "#/components/schemas/{model}"
ErrorType = type[ScaiLinkError]

# What every authenticated registry route can answer besides its own outcomes.
COMMON_ERRORS: tuple[ErrorType, ...] = (Unauthorized, Forbidden, RateLimited, RegistryDisabled)
BODY_ERRORS: tuple[ErrorType, ...] = (PayloadTooLarge, ValidationFailed)


def _schemas() -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    models: list[type[BaseModel]] = [RegisterServer, UpdateServer, CredentialValue, ServerDetail]
    for model in models:
        schema = model.model_json_schema(
            ref_template=REF, mode="serialization" if model is ServerDetail else "validation"
        )
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    schemas["Meta"] = {
        "type": "object",
        "properties": {"request_id": {"type": "string"}},
        "required": ["request_id"],
    }
    schemas["Error"] = {
        "type": "object",
        "properties": {
            "status": {"const": "error"},
            "error": {
                "type": "object",
                "properties": {
                    "code": {"type": "string", "enum": sorted({e.code for e in ERROR_TABLE})},
                    "message": {"type": "string"},
                    "retry_after": {"type": ["number", "null"], "minimum": 0},
                    "details": {
                        "description": "For SCAILINK_VALIDATION_ERROR: `[{field, reason}]`, one per problem"
                    },
                },
                "required": ["code", "message", "retry_after", "details"],
            },
            "meta": {"$ref": REF.format(model="Meta")},
        },
        "required": ["status", "error", "meta"],
    }
    schemas["ServerEnvelope"] = _ok({"$ref": REF.format(model="ServerDetail")})
    schemas["ServerListEnvelope"] = _ok(
        {
            "type": "object",
            "properties": {
                "items": {"type": "array", "items": {"$ref": REF.format(model="ServerDetail")}},
                "next_cursor": {"type": ["string", "null"]},
            },
            "required": ["items", "next_cursor"],
        }
    )
    schemas["OAuthConnectedEnvelope"] = _ok(
        {
            "type": "object",
            "properties": {"server_id": {"type": "string"}, "connected": {"const": True}},
            "required": ["server_id", "connected"],
        }
    )
    return schemas


def _oauth_paths(one: str, server_id: dict[str, Any]) -> dict[str, Any]:
    """Upstream OAuth (SPEC section 12): start, callback, disconnect."""
    redirect = {
        "description": "to the upstream's authorization server (PKCE S256, one-time `state`, `resource`)",
        "headers": {"X-Request-ID": _header("RequestId"), "Location": {"schema": {"type": "string"}}},
    }
    authorize = _op(
        "authorizeServer",
        "Start authorizing ScaiLink for an OAuth upstream (a browser redirect)",
        "scailink:remote.use, or the one-time `ticket` of a SCAILINK_UPSTREAM_AUTH_REQUIRED answer",
        {"302": redirect},
        (NotFound, ValidationFailed, UpstreamError),
    )
    authorize["security"] = [{"bearer": []}, {}]
    authorize["parameters"] = [
        {
            "name": "ticket",
            "in": "query",
            "description": "One-time, valid 10 minutes, bound to (tenant, user, server); replaces the token "
            "(at most 4096 characters)",
            "schema": {"type": "string"},
        }
    ]
    connected = _success(
        "the caller is connected (JSON; for a flow started from the dashboard's Connect, a page that"
        " goes back to the dashboard)",
        "OAuthConnectedEnvelope",
    )
    connected["content"]["text/html"] = {"schema": {"type": "string"}}
    callback = {
        "operationId": "oauthCallback",
        "summary": "The authorization server's redirect back (public: the one-time `state` is the proof)",
        "security": [],
        "parameters": [
            {
                "name": name,
                "in": "query",
                "required": name == "state",
                # Each at most 4096 characters (longer: 422 naming it).
                "schema": {"type": "string", "minLength": 1 if name == "state" else 0},
            }
            for name in ("state", "code", "iss", "error")
        ],
        "responses": {
            "200": connected,
            **_errors(RateLimited, RegistryDisabled, NotFound, ValidationFailed, UpstreamError),
        },
    }
    disconnect = _op(
        "disconnectServer",
        "Forget the caller's token (revoked at the authorization server when it can be)",
        "scailink:remote.use (a client-credentials server's token: scailink:remote.manage_tenant)",
        {"204": _success("disconnected", None)},
        (NotFound,),
    )
    return {
        one + "/oauth/authorize": {"parameters": [server_id], "get": authorize},
        one + "/oauth/token": {"parameters": [server_id], "delete": disconnect},
        f"{BASE}/oauth/callback": {"get": callback},
    }


def _headers() -> dict[str, Any]:
    return {
        "RequestId": {
            "description": "The request id: the client's own `X-Request-ID` if well formed, else a new one",
            "required": True,
            "schema": {"type": "string", "minLength": 1},
        },
        "WwwAuthenticate": {"required": True, "schema": {"type": "string", "pattern": "^Bearer "}},
        "RetryAfter": {
            "description": "Seconds to wait (SCAILINK_RATE_LIMITED)",
            "schema": {"type": "integer", "minimum": 1},
        },
    }


def _header(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/headers/{name}"}


def _ok(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"status": {"const": "ok"}, "data": data, "meta": {"$ref": REF.format(model="Meta")}},
        "required": ["status", "data", "meta"],
    }


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _success(description: str, envelope: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "headers": {"X-Request-ID": _header("RequestId")}}
    if envelope:
        out.update(_json({"$ref": REF.format(model=envelope)}))
    return out


def _errors(*errors: ErrorType) -> dict[str, Any]:
    """One response per status, its schema narrowed to exactly the codes this route answers with."""
    by_status: dict[int, list[str]] = {}
    for err in errors:
        by_status.setdefault(err.status, []).append(err.code)
    out: dict[str, Any] = {}
    for status, codes in sorted(by_status.items()):
        codes = sorted(set(codes))
        headers: dict[str, Any] = {"X-Request-ID": _header("RequestId")}
        if status == Unauthorized.status:
            headers["WWW-Authenticate"] = _header("WwwAuthenticate")
        if RateLimited.code in codes:
            headers["Retry-After"] = _header("RetryAfter")
        narrowed = {
            "allOf": [
                {"$ref": REF.format(model="Error")},
                {"properties": {"error": {"properties": {"code": {"enum": codes}}}}},
            ]
        }
        out[str(status)] = {"description": ", ".join(codes), "headers": headers, **_json(narrowed)}
    return out


def _op(
    operation_id: str,
    summary: str,
    permission: str,
    responses: dict[str, Any],
    errors: tuple[ErrorType, ...] = (),
    body: str | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": operation_id,
        "summary": summary,
        "description": f"Permission: `{permission}`.",
        "security": [{"bearer": []}],
        "responses": {**responses, **_errors(*COMMON_ERRORS, *errors, *(BODY_ERRORS if body else ()))},
    }
    if body:
        op["requestBody"] = {"required": True, **_json({"$ref": REF.format(model=body)})}
    return op


def _server_links() -> dict[str, Any]:
    """OpenAPI links from a registration to the operations on the new server (for clients and for
    stateful test generators)."""
    server_id = {"server_id": "$response.body#/data/id"}
    return {
        op: {"operationId": op, "parameters": server_id}
        for op in ("getServer", "updateServer", "deleteServer", "refreshServer", "putCredential")
    }


def build_openapi() -> dict[str, Any]:
    servers = f"{BASE}/remote-servers"
    one = servers + "/{server_id}"
    server_id = {"name": "server_id", "in": "path", "required": True, "schema": {"type": "string"}}
    field = {
        "name": "field",
        "in": "path",
        "required": True,
        "description": "A credential field: `authorization` for `auth_type: bearer`; a lower-case header "
        "name (not one ScaiLink or the transport owns) for `api_key_header`. A field that does not fit "
        "the server's `auth_type` answers 422 with the field named in `details`.",
        "schema": {"type": "string", "pattern": HEADER_NAME_PATTERN},
    }
    detail = _success("the server", "ServerEnvelope")
    manage = "scailink:remote.manage_own (scailink:remote.manage_tenant for a tenant-shared server)"
    registered = _success("registered", "ServerEnvelope")
    registered["links"] = _server_links()
    create = _op(
        "registerServer",
        "Register a remote MCP server and run discovery (201 even if discovery fails: status `error`)",
        manage,
        {"201": registered},
        (Conflict, RemoteLimitExceeded, EndpointForbidden),
        body="RegisterServer",
    )
    listing = _op(
        "listServers",
        "The caller's personal servers and the tenant's shared ones",
        "scailink:remote.use",
        {"200": _success("a page of servers", "ServerListEnvelope")},
        (ValidationFailed,),
    )
    listing["parameters"] = [
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
        },
        {
            "name": "cursor",
            "in": "query",
            "description": "Opaque: the `next_cursor` of the previous page (anything else answers 422)",
            "schema": {"type": "string"},
        },
    ]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ScaiLink MCP registry API",
            "version": "1.0.0",
            "description": "Remote MCP server registry. Success: `{status: ok, data, meta}`; "
            "error: `{status: error, error: {code, message, retry_after, details}, meta}`. "
            "Every response carries `X-Request-ID`. Request bodies are strict JSON (UTF-8, no NaN, "
            "nested at most `SCAILINK_MAX_JSON_DEPTH` levels) and JSON types are not coerced. "
            "A method a path does not serve answers 405 with `Allow`.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": _schemas(),
            "headers": _headers(),
        },
        "paths": {
            servers: {"post": create, "get": listing},
            one: {
                "parameters": [server_id],
                "get": _op("getServer", "Server detail", "scailink:remote.use", {"200": detail}, (NotFound,)),
                "patch": _op(
                    "updateServer",
                    "Change name, description, endpoint_url, transport or consent_tier",
                    manage,
                    {"200": detail},
                    (NotFound, Conflict, EndpointForbidden),
                    "UpdateServer",
                ),
                "delete": _op(
                    "deleteServer",
                    "Delete (cascades credentials and capabilities, closes pooled sessions)",
                    manage,
                    {"204": _success("deleted", None)},
                    (NotFound,),
                ),
            },
            one + "/refresh": {
                "parameters": [server_id],
                "post": _op("refreshServer", "Re-run discovery now", manage, {"200": detail}, (NotFound,)),
            },
            one + "/credentials/{field}": {
                "parameters": [server_id, field],
                "put": _op(
                    "putCredential",
                    "Rotate one credential field",
                    manage,
                    {"200": detail},
                    (NotFound,),
                    "CredentialValue",
                ),
                "delete": _op(
                    "deleteCredential",
                    "Remove one credential field",
                    manage,
                    {"204": _success("removed", None)},
                    (NotFound,),
                ),
            },
            **_oauth_paths(one, server_id),
        },
    }


def openapi_yaml() -> str:
    return yaml.safe_dump(build_openapi(), sort_keys=True, allow_unicode=True, width=120)
