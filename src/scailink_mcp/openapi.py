"""The REST contract, generated from the wire models and served at `/v1/modules/scailink/openapi.json`.

`registry_api/openapi.yaml` is this document written out by `scailink openapi`; a test keeps the two
equal, so a change to a body or detail model that is not reflected in the published file fails CI.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from scailink_mcp.errors import ERROR_TABLE
from scailink_mcp.remote.schemas import CredentialValue, RegisterServer, ServerDetail, UpdateServer

BASE = "/v1/modules/scailink"
REF = "#/components/schemas/{model}"


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
                    "retry_after": {"type": ["number", "null"]},
                    "details": {},
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
    return schemas


def _ok(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"status": {"const": "ok"}, "data": data, "meta": {"$ref": REF.format(model="Meta")}},
        "required": ["status", "data", "meta"],
    }


def _json(model: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": REF.format(model=model)}}}}


def _errors(*statuses: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for status in statuses:
        codes = sorted(e.code for e in ERROR_TABLE if e.status == status and e.code != "SCAILINK_INTERNAL")
        out[str(status)] = {"description": ", ".join(codes) or "error", **_json("Error")}
    return out


def _op(summary: str, permission: str, responses: dict[str, Any], body: str | None = None) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "description": f"Permission: `{permission}`.",
        "security": [{"bearer": []}],
        "responses": {**responses, **_errors(401, 403, 404, 503)},
    }
    if body:
        op["requestBody"] = {"required": True, **_json(body)}
        op["responses"].update(_errors(413, 422))
    return op


def build_openapi() -> dict[str, Any]:
    servers = f"{BASE}/remote-servers"
    one = servers + "/{server_id}"
    server_id = {"name": "server_id", "in": "path", "required": True, "schema": {"type": "string"}}
    field = {"name": "field", "in": "path", "required": True, "schema": {"type": "string"}}
    detail = {"description": "the server", **_json("ServerEnvelope")}
    manage = "scailink:remote.manage_own (scailink:remote.manage_tenant for a tenant-shared server)"
    create = _op(
        "Register a remote MCP server and run discovery (201 even if discovery fails: status `error`)",
        manage,
        {"201": {"description": "registered", **_json("ServerEnvelope")}, **_errors(409, 429)},
        body="RegisterServer",
    )
    listing = _op(
        "The caller's personal servers and the tenant's shared ones",
        "scailink:remote.use",
        {"200": {"description": "a page of servers", **_json("ServerListEnvelope")}},
    )
    listing["parameters"] = [
        {
            "name": "limit",
            "in": "query",
            "schema": {"type": "integer", "minimum": 1, "maximum": 200, "default": 50},
        },
        {"name": "cursor", "in": "query", "schema": {"type": "string"}},
    ]
    update = _op(
        "Change name, description, endpoint_url, transport or consent_tier",
        manage,
        {"200": detail},
        "UpdateServer",
    )
    update["responses"].update(_errors(409))
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ScaiLink MCP registry API",
            "version": "1.0.0",
            "description": "Remote MCP server registry. Success: `{status: ok, data, meta}`; "
            "error: `{status: error, error: {code, message, retry_after, details}, meta}`. "
            "Every response carries `X-Request-ID`.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
            "schemas": _schemas(),
        },
        "paths": {
            servers: {"post": create, "get": listing},
            one: {
                "parameters": [server_id],
                "get": _op("Server detail", "scailink:remote.use", {"200": detail}),
                "patch": update,
                "delete": _op(
                    "Delete (cascades credentials and capabilities, closes pooled sessions)",
                    manage,
                    {"204": {"description": "deleted"}},
                ),
            },
            one + "/refresh": {
                "parameters": [server_id],
                "post": _op("Re-run discovery now", manage, {"200": detail}),
            },
            one + "/credentials/{field}": {
                "parameters": [server_id, field],
                "put": _op("Rotate one credential field", manage, {"200": detail}, "CredentialValue"),
                "delete": _op("Remove one credential field", manage, {"204": {"description": "removed"}}),
            },
        },
    }


def openapi_yaml() -> str:
    return yaml.safe_dump(build_openapi(), sort_keys=True, allow_unicode=True, width=120)
