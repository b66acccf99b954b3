"""REST surface hardening (issue 11, items 6 and 12), against real parts: uvicorn on 127.0.0.1 with a
real socket where the connection matters, a SQLite file, a real upstream MCP server.

Item 6: a deeply nested, non-UTF-8 or non-object body is a 422 in the envelope, logged as one plain
request line, and the keep-alive connection that carried it serves the next request.
Item 12: the contract lists the 422/429 answers and the body constraints the models enforce (and
the models enforce what it lists), a 405 carries `Allow`, JSON booleans are not coerced.
"""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest
import yaml
from pydantic import ValidationError

from scailink_mcp.api.envelope import encode_cursor
from scailink_mcp.config import Settings
from scailink_mcp.remote.schemas import CredentialValue, RegisterServer, UpdateServer
from tests.conftest import AppHarness, LiveApp, TokenFactory, auth_headers, start_app
from tests.upstream import UpstreamServer

BASE = "/v1/modules/scailink"
SERVERS = f"{BASE}/remote-servers"
CONTRACT = Path(__file__).resolve().parents[1] / "registry_api" / "openapi.yaml"


def nested(depth: int) -> bytes:
    """`{"arguments": [[[...]]]}`-shaped: a value nested `depth` levels in all (the object counts)."""
    return b'{"name":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


class Connection:
    """One kept-alive HTTP/1.1 connection on a real socket: requests go out one after another and
    each answer is read to its end (Content-Length), so a reset shows as an error or an empty read."""

    def __init__(self, port: int, token: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.token = token
        self.buffer = b""

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
        head = [
            f"{method} {path} HTTP/1.1",
            "Host: 127.0.0.1",
            f"Authorization: Bearer {self.token}",
            "Content-Type: application/json",
        ]
        if body is not None:
            head.append(f"Content-Length: {len(body)}")
        self.sock.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + (body or b""))
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        raw_head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            self._read()
        payload, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, headers, payload

    def _read(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer() as server:
        yield server


@pytest.fixture
def live_app(settings_factory: Callable[..., Settings]) -> Iterator[LiveApp]:
    with LiveApp(settings_factory(rate_limit_per_s=0)) as app:
        yield app


def _register(conn: Connection, upstream: UpstreamServer, name: str = "plain") -> str:
    status, _, body = conn.request(
        "POST",
        SERVERS,
        json.dumps(
            {
                "name": name,
                "endpoint_url": upstream.url,
                "auth_type": "bearer",
                "credentials": {"authorization": "tok"},
            }
        ).encode(),
    )
    assert status == 201, body
    return str(json.loads(body)["data"]["id"])


def _assert_validation_error(status: int, headers: dict[str, str], body: bytes, reason: str) -> None:
    assert status == 422, body
    envelope = json.loads(body)
    assert envelope["status"] == "error"
    assert envelope["error"]["code"] == "SCAILINK_VALIDATION_ERROR"
    assert envelope["meta"]["request_id"] == headers["x-request-id"]
    assert any(reason in d["reason"] for d in envelope["error"]["details"]), envelope


# --- item 6: hostile bodies ---------------------------------------------------------------------


def test_deep_nesting_is_422_and_the_connection_stays_open(
    live_app: LiveApp, token: TokenFactory, upstream: UpstreamServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    conn = Connection(live_app.port, token("u1", "t1", ("tenant_admin",)))
    try:
        server_id = _register(conn, upstream)
        body = nested(990)
        assert len(body) < 2100  # the report's 2 KB body
        targets = [
            ("POST", SERVERS),  # register
            ("POST", f"{BASE}/users/u1/tools/remote.u1.x.echo/invoke"),  # REST invoke
            ("PUT", f"{SERVERS}/{server_id}/credentials/authorization"),  # credential rotation
            ("PUT", "/v1/iam/roles/auditor"),  # custom role
            ("PATCH", f"{SERVERS}/{server_id}"),
        ]
        for method, path in targets:
            status, headers, payload = conn.request(method, path, body)
            _assert_validation_error(status, headers, payload, "nested deeper than 64 levels")
            # the same socket answers the next request
            status, _, payload = conn.request("GET", f"{SERVERS}/{server_id}")
            assert status == 200, payload
    finally:
        conn.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], [
        (r.name, r.getMessage()) for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info
    ]
    assert "RecursionError" not in caplog.text and "Traceback" not in caplog.text


def test_nesting_limit_is_the_setting(
    settings_factory: Callable[..., Settings], token: TokenFactory, upstream: UpstreamServer
) -> None:
    with LiveApp(settings_factory(rate_limit_per_s=0, max_json_depth=8)) as app:
        conn = Connection(app.port, token("u1", "t1", ("tenant_admin",)))
        try:
            server_id = _register(conn, upstream)
            invoke = f"{BASE}/users/u1/tools/remote.u1.nope.echo/invoke"
            # 8 levels: parsed, then routed (no such tool)
            status, _, payload = conn.request("POST", invoke, b'{"arguments":{"a":[[[[[[1]]]]]]}}')
            assert status == 404, payload
            status, headers, payload = conn.request("POST", invoke, b'{"arguments":{"a":[[[[[[[1]]]]]]]}}')
            _assert_validation_error(status, headers, payload, "nested deeper than 8 levels")
            # brackets inside strings do not nest
            status, _, payload = conn.request(
                "PATCH", f"{SERVERS}/{server_id}", json.dumps({"description": "[" * 500}).encode()
            )
            assert status == 200, payload
        finally:
            conn.close()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"name": "\xff\xfe"}', "not UTF-8"),
        (b"\xff\xfe{\x00}\x00", "not UTF-8"),  # UTF-16 is not JSON's encoding on the wire
        (b'{"name": "a", "endpoint_url": NaN}', "invalid JSON"),
        (b'{"name": "\\ud800", "endpoint_url": "http://127.0.0.1/"}', "lone UTF-16 surrogate"),
        (b"", "empty body"),
        (b'{"name": ', "invalid JSON"),
        (b"[1, 2]", "not an object"),
        (b'"text"', "not an object"),
        (b"null", "not an object"),
        (b"1" * 5000, "invalid JSON"),  # over Python's int-digits limit: a ValueError, not a 500
    ],
)
def test_hostile_bodies_are_422(
    live_app: LiveApp, token: TokenFactory, body: bytes, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    conn = Connection(live_app.port, token("u1", "t1", ("tenant_admin",)))
    try:
        status, headers, payload = conn.request("POST", SERVERS, body)
        _assert_validation_error(status, headers, payload, reason)
        status, _, payload = conn.request("GET", SERVERS)
        assert status == 200, payload
    finally:
        conn.close()
    assert "Traceback" not in caplog.text


def test_credential_field_with_a_line_break_is_refused(
    live_app: LiveApp, token: TokenFactory, upstream: UpstreamServer
) -> None:
    conn = Connection(live_app.port, token("u1", "t1", ("tenant_admin",)))
    try:
        status, _, payload = conn.request(
            "POST",
            SERVERS,
            json.dumps(
                {"name": "k", "endpoint_url": upstream.url, "auth_type": "api_key_header",
                 "credentials": {"x-api-key": "k"}}
            ).encode(),
        )  # fmt: skip
        assert status == 201, payload
        server_id = json.loads(payload)["data"]["id"]
        status, headers, payload = conn.request(
            "PUT", f"{SERVERS}/{server_id}/credentials/x-api-key%0A", b'{"value": "v"}'
        )
        _assert_validation_error(status, headers, payload, "lower-case HTTP header name")
    finally:
        conn.close()


def test_unicode_digit_limit_is_422_not_500(live_app: LiveApp, token: TokenFactory) -> None:
    conn = Connection(live_app.port, token("u1", "t1", ("tenant_admin",)))
    try:  # "²".isdigit() is true, int("²") raises
        status, headers, payload = conn.request("GET", SERVERS + "?limit=%C2%B2")
        _assert_validation_error(status, headers, payload, "must be an integer")
    finally:
        conn.close()


# --- item 12: the contract and what the models enforce -------------------------------------------


def _contract() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CONTRACT.read_text())
    return loaded


def test_contract_documents_422_and_429_everywhere() -> None:
    contract = _contract()
    for path, item in contract["paths"].items():
        for method, op in item.items():
            if method == "parameters":
                continue
            responses = op["responses"]
            assert "429" in responses, (method, path)  # the per-user rate limit applies to every route
            takes_input = "requestBody" in op or any(p["in"] == "query" for p in op.get("parameters", []))
            if takes_input:
                assert "422" in responses, (method, path)
            for status, response in responses.items():
                assert "X-Request-ID" in response["headers"], (method, path, status)
    create = contract["paths"][SERVERS]["post"]["responses"]
    assert "SCAILINK_REMOTE_LIMIT_EXCEEDED" in create["429"]["description"]
    assert "SCAILINK_ENDPOINT_FORBIDDEN" in create["422"]["description"]


def _component(name: str) -> dict[str, Any]:
    """A contract schema with its `$ref`s resolvable. Validated with jsonschema-rs, whose regexes
    follow ECMA-262 as JSON Schema says (Python's `re`, used by `jsonschema`, lets `$` match before a
    final line break)."""
    contract = _contract()
    return {**contract["components"]["schemas"][name], "components": contract["components"]}


CASES_REGISTER: list[dict[str, Any]] = [
    {"endpoint_url": "https://mcp.example.com/mcp"},
    {"endpoint_url": "HTTP://127.0.0.1:8080/x?y=1#z"},
    {"endpoint_url": "http://[::1]:9/mcp"},
    {"endpoint_url": "ftp://mcp.example.com/"},
    {"endpoint_url": "file:///etc/passwd"},
    {"endpoint_url": "mcp.example.com"},
    {"endpoint_url": ""},
    {"endpoint_url": "http://user:pw@mcp.example.com/"},
    {"endpoint_url": "http://mcp.example.com/a b"},
    {"endpoint_url": "http://mcp.example.com/\r\nX-Injected: 1"},
    {"endpoint_url": "http:///no-host"},
    {"endpoint_url": "http://mcp.example.com:99999/"},
    {"name": "   "},
    {"name": "a\x00b"},
    {"name": "\u3000"},
    {"name": "x" * 65},
    {"description": "line one\nline two\ttabbed"},
    {"description": "nul \x00"},
    {"is_tenant_shared": 0},
    {"is_tenant_shared": "true"},
    {"is_tenant_shared": True},
    {"auth_type": "bearer", "credentials": {"authorization": "s3cret"}},
    {"auth_type": "bearer", "credentials": {"authorization": "two\nlines"}},
    {"auth_type": "bearer", "credentials": {"authorization": "cr\rlf"}},
    {"auth_type": "bearer", "credentials": {"authorization": "x" * 8193}},
    {"auth_type": "bearer", "credentials": {"authorization": ""}},
    {"auth_type": "bearer", "credentials": {"authorization": "caf\u00e9"}},
    {"auth_type": "bearer", "credentials": {"authorization": " padded "}},
    {"auth_type": "bearer", "credentials": {"authorization": "inner space"}},
    {"auth_type": "bearer", "credentials": {"x-api-key": "k"}},
    {"auth_type": "bearer"},
    {"auth_type": "api_key_header", "credentials": {"x-api-key": "k", "x-other": "v"}},
    {"auth_type": "api_key_header", "credentials": {"Host": "k"}},
    {"auth_type": "api_key_header", "credentials": {"host": "k"}},
    {"auth_type": "api_key_header", "credentials": {"x-api-key\n": "k"}},
    {"auth_type": "api_key_header", "credentials": {}},
    {"auth_type": "none", "credentials": {"x-api-key": "k"}},
    {"credentials": {"x-api-key": "k"}},
    {"transport": "websocket"},
    {"unknown_field": 1},
]


@pytest.mark.parametrize("overrides", CASES_REGISTER, ids=lambda o: json.dumps(o)[:60])
def test_register_contract_and_model_agree(overrides: dict[str, Any]) -> None:
    body = {"name": "s", "endpoint_url": "http://127.0.0.1:9/mcp", **overrides}
    contract_ok = jsonschema_rs.Draft202012Validator(_component("RegisterServer")).is_valid(body)
    try:
        RegisterServer.model_validate(body)
        model_ok = True
    except ValidationError:
        model_ok = False
    assert contract_ok == model_ok, f"contract says {contract_ok}, the model says {model_ok}"


@pytest.mark.parametrize(
    "body",
    [
        {"value": "ok"},
        {"value": ""},
        {"value": "a\nb"},
        {"value": "a\x00b"},
        {"value": "x" * 8192},
        {"value": "x" * 8193},
        {"value": 5},
        {},
        {"value": "v", "extra": 1},
    ],
    ids=lambda b: json.dumps(b)[:40],
)
def test_credential_contract_and_model_agree(body: dict[str, Any]) -> None:
    contract_ok = jsonschema_rs.Draft202012Validator(_component("CredentialValue")).is_valid(body)
    try:
        CredentialValue.model_validate(body)
        model_ok = True
    except ValidationError:
        model_ok = False
    assert contract_ok == model_ok, f"contract says {contract_ok}, the model says {model_ok}"


@pytest.mark.parametrize(
    "body",
    [{}, {"endpoint_url": "gopher://x/"}, {"endpoint_url": None}, {"name": " "}, {"transport": 1}],
    ids=lambda b: json.dumps(b)[:40],
)
def test_update_contract_and_model_agree(body: dict[str, Any]) -> None:
    contract_ok = jsonschema_rs.Draft202012Validator(_component("UpdateServer")).is_valid(body)
    try:
        UpdateServer.model_validate(body)
        model_ok = True
    except ValidationError:
        model_ok = False
    assert contract_ok == model_ok, f"contract says {contract_ok}, the model says {model_ok}"


@pytest.mark.anyio
async def test_json_booleans_are_not_coerced(
    harness: AppHarness, token: TokenFactory, upstream: UpstreamServer
) -> None:
    tok = token("admin", "t1", ("tenant_admin",))
    for value in (0, 1, "true", "false", None):
        resp = await harness.client.post(
            SERVERS,
            json={"name": f"b-{value}", "endpoint_url": upstream.url, "is_tenant_shared": value},
            headers=auth_headers(tok),
        )
        assert resp.status_code == 422, (value, resp.text)
        assert resp.json()["error"]["details"][0]["field"] == "is_tenant_shared"
    listing = await harness.client.get(SERVERS, headers=auth_headers(tok))
    assert listing.json()["data"]["items"] == []


@pytest.mark.anyio
async def test_405_carries_allow(harness: AppHarness, token: TokenFactory) -> None:
    headers = auth_headers(token())
    cases = {
        SERVERS: "GET, HEAD, POST",
        f"{SERVERS}/abc": "DELETE, GET, HEAD, PATCH",
        f"{SERVERS}/abc/refresh": "POST",
        f"{SERVERS}/abc/credentials/x-api-key": "DELETE, PUT",
        "/v1/iam/roles/auditor": "DELETE, GET, HEAD, PUT",
    }
    for path, allow in cases.items():
        resp = await harness.client.request("TRACE", path, headers=headers)
        assert resp.status_code == 405, (path, resp.text)
        assert resp.headers.get("allow") == allow, path
        assert resp.json()["meta"]["request_id"] == resp.headers["x-request-id"]
    resp = await harness.client.request("DELETE", SERVERS, headers=headers)
    assert resp.status_code == 405 and resp.headers["allow"] == "GET, HEAD, POST"


@pytest.mark.parametrize(
    "arguments",
    [b'{"text": NaN}', b'{"text": Infinity}', b'{"text": "\\ud800"}'],
    ids=["NaN", "Infinity", "lone-surrogate"],
)
def test_invoke_arguments_are_strict_json(
    live_app: LiveApp, token: TokenFactory, upstream: UpstreamServer, arguments: bytes
) -> None:
    """`arguments` is free-form (`dict[str, Any]`): only the parser stands between such a value and
    the upstream call (NaN is no JSON; a lone surrogate cannot be encoded)."""
    conn = Connection(live_app.port, token("u1", "t1", ("tenant_admin",)))
    try:
        server_id = _register(conn, upstream, "echoer")
        _, _, detail = conn.request("GET", f"{SERVERS}/{server_id}")
        tools = json.loads(detail)["data"]["capabilities"]["tools"]
        echo = next(t["namespaced_name"] for t in tools if t["name"] == "echo")
        invoke = f"{BASE}/users/u1/tools/{echo}/invoke"
        status, _, payload = conn.request("POST", invoke, b'{"arguments": {"text": "hi"}}')
        assert status == 200, payload
        status, _, payload = conn.request("POST", invoke, b'{"arguments": ' + arguments + b"}")
        assert status == 422, payload
        assert json.loads(payload)["error"]["code"] == "SCAILINK_VALIDATION_ERROR"
        status, _, payload = conn.request("POST", invoke, b'{"arguments": {"text": "again"}}')
        assert status == 200, payload
    finally:
        conn.close()


def test_a_bug_is_one_500_and_the_connection_stays_open(
    live_app: LiveApp, token: TokenFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Fault injection: a handler raising something unexpected is answered with the 500 envelope and
    one log line; uvicorn never sees the exception, so it does not drop the keep-alive connection."""

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(live_app.parts.registry, "get", broken)
    caplog.set_level(logging.INFO)
    conn = Connection(live_app.port, token("u1", "t1", ("tenant_admin",)))
    try:
        status, headers, payload = conn.request("GET", f"{SERVERS}/some-id")
        assert status == 500, payload
        envelope = json.loads(payload)
        assert envelope["error"]["code"] == "SCAILINK_INTERNAL"
        assert "injected" not in envelope["error"]["message"]
        status, _, payload = conn.request("GET", SERVERS)
        assert status == 200, payload
    finally:
        conn.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["unhandled error"]
    assert getattr(errors[0], "request_id", None) == headers["x-request-id"]


@pytest.mark.anyio
async def test_nul_in_ids_and_filters_is_never_a_500(
    database_url: str,
    settings_factory: Callable[..., Settings],
    token: TokenFactory,
) -> None:
    """PostgreSQL refuses NUL in text parameters (psycopg raises before the query runs); no stored id,
    name or filter value can hold one, so such a request is a plain 404/422 on every database."""
    async with start_app(settings_factory(database_url=database_url, rate_limit_per_s=0)) as h:
        headers = auth_headers(token("u1", "t1", ("tenant_admin",)))
        c = h.client
        for method, path in [
            ("GET", f"{SERVERS}/a%00b"),
            ("PATCH", f"{SERVERS}/a%00b"),
            ("DELETE", f"{SERVERS}/a%00b"),
            ("POST", f"{SERVERS}/a%00b/refresh"),
            ("PUT", f"{SERVERS}/a%00b/credentials/authorization"),
            ("DELETE", f"{SERVERS}/a%00b/credentials/x%00y"),
            ("GET", f"{BASE}/users/u%00x/audit"),
            ("GET", "/v1/iam/users/u%00x/permissions?groups=tenant_user"),
            ("GET", "/v1/iam/roles/r%00x"),
            ("DELETE", "/v1/iam/roles/r%00x"),
        ]:
            body = {"value": "v"} if method == "PUT" else {} if method == "PATCH" else None
            resp = await c.request(method, path, headers=headers, json=body)
            assert resp.status_code in (404, 422), (method, path, resp.status_code, resp.text)
        for query in ("event=a%00b", "target=a%00b", "user_id=a%00b"):
            resp = await c.get(f"{BASE}/audit?{query}", headers=headers)
            assert resp.status_code == 422, (query, resp.text)
        cursor = encode_cursor(("2026-01-01T00:00:00+00:00", "a\x00b"))
        for path in (f"{SERVERS}?cursor={cursor}", f"{BASE}/audit?cursor={cursor}"):
            resp = await c.get(path, headers=headers)
            assert resp.status_code == 422, (path, resp.text)
