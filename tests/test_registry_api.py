"""The remote-server registry end to end: real app in-process, real upstream MCP servers on 127.0.0.1,
real SQLite file (and PostgreSQL where marked)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from sqlalchemy import text

from scailink_mcp.config import Settings
from scailink_mcp.remote.upstream import open_session
from tests.conftest import AppHarness, TokenFactory, auth_headers, start_app
from tests.upstream import UpstreamServer

pytestmark = pytest.mark.anyio

BASE = "/v1/modules/scailink/remote-servers"
SECRET = "s3cr3t-token-value-do-not-leak"
API_KEY = "k3y-value-do-not-leak-42"


@pytest.fixture(scope="module")
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer() as server:
        yield server


def assert_envelope_error(resp: Any, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["status"] == "error"
    assert body["error"]["code"] == code
    assert set(body["error"]) == {"code", "message", "retry_after", "details"}
    assert body["meta"]["request_id"] == resp.headers["x-request-id"]
    return dict(body)


async def register(h: AppHarness, tok: str, **body: Any) -> Any:
    return await h.client.post(BASE, json=body, headers=auth_headers(tok))


async def test_register_streamable_http_with_bearer(
    harness: AppHarness, token: TokenFactory, upstream: UpstreamServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tok = token("u1", "t1", ("tenant_user",))
    resp = await register(
        harness,
        tok,
        name="My Tools!",
        endpoint_url=upstream.url,
        auth_type="bearer",
        credentials={"authorization": SECRET},
    )
    assert resp.status_code == 201, resp.text
    data = resp.json()["data"]
    assert resp.json()["status"] == "ok"
    expected_keys = {
        "id", "name", "slug", "description", "endpoint_url", "transport", "auth_type", "consent_tier",
        "is_tenant_shared", "owner_user_id", "tenant_id", "status", "consecutive_failures",
        "last_health_status", "last_health_at", "last_discovery_at", "capabilities", "credential_fields",
        "credential_oldest_days", "created_at", "updated_at", "oauth",
    }  # fmt: skip
    assert set(data) == expected_keys
    assert data["oauth"] is None  # only an `auth_type: oauth2` server has OAuth settings
    assert re.fullmatch(r"my-tools-[0-9a-f]{6}", data["slug"])
    assert data["status"] == "active" and data["last_health_status"] == "ok"
    assert data["credential_fields"] == ["authorization"]
    assert data["owner_user_id"] == "u1" and data["tenant_id"] == "t1"
    tools = {t["name"]: t for t in data["capabilities"]["tools"]}
    assert "echo" in tools and "echo_headers" in tools
    assert tools["echo"]["namespaced_name"] == f"remote.u1.{data['slug']}.echo"
    assert tools["echo"]["schema"]["inputSchema"]["properties"]["text"]
    # pagination was followed: every generated tool is there
    assert {"resources", "resource_templates", "prompts"} <= set(data["capabilities"])
    assert data["capabilities"]["prompts"] and data["capabilities"]["resources"]
    assert data["capabilities"]["resources"][0]["namespaced_name"].startswith(
        f"scailink://remote.u1.{data['slug']}/"
    )

    # GET returns the same detail; never the secret
    got = await harness.client.get(f"{BASE}/{data['id']}", headers=auth_headers(tok))
    assert got.status_code == 200 and got.json()["data"]["id"] == data["id"]
    for body in (resp.text, got.text):
        assert SECRET not in body
    # ScaiLink's own logging of registration, discovery and reads (DEBUG, every library) holds no secret
    assert SECRET not in caplog.text
    # (last: the echoed headers below are the upstream's tool output, which the SDK logs at DEBUG)
    # The upstream received the credential header, and a session built from the stored credentials
    # reaches a tool that echoes the headers back.
    parts = harness.parts
    target = await parts.db.run(lambda s: parts.registry.target_by_id(s, data["id"]))
    assert target is not None
    async with open_session(target, parts.registry.allowed, connect_timeout=5, read_timeout=10) as session:
        result = await session.call_tool("echo_headers", {})
    echoed = json.loads(result.content[0].text)  # type: ignore[union-attr]
    assert echoed.get("authorization") == f"Bearer {SECRET}"

    assert SECRET not in repr(target)


async def test_register_sse_tenant_shared_with_api_key(
    harness: AppHarness, token: TokenFactory, upstream: UpstreamServer
) -> None:
    tok = token("admin", "t1", ("tenant_admin",))
    resp = await register(
        harness,
        tok,
        name="shared-sse",
        endpoint_url=upstream.sse_url,
        transport="sse",
        auth_type="api_key_header",
        credentials={"x-api-key": API_KEY},
        is_tenant_shared=True,
    )
    assert resp.status_code == 201, resp.text
    data = resp.json()["data"]
    assert data["transport"] == "sse" and data["is_tenant_shared"] is True
    names = [t["namespaced_name"] for t in data["capabilities"]["tools"]]
    assert f"remote.tenant.{data['slug']}.echo" in names
    assert upstream.last_headers.get("x-api-key") == API_KEY

    # another user of the tenant sees the shared server; a user of another tenant does not
    other = token("u2", "t1", ("tenant_viewer",))
    listing = await harness.client.get(BASE, headers=auth_headers(other))
    assert [s["id"] for s in listing.json()["data"]["items"]] == [data["id"]]
    stranger = token("u9", "t2", ("tenant_admin",))
    assert (
        await harness.client.get(f"{BASE}/{data['id']}", headers=auth_headers(stranger))
    ).status_code == 404


async def test_secrets_never_stored_in_plaintext(
    harness: AppHarness,
    token: TokenFactory,
    upstream: UpstreamServer,
    settings_factory: Callable[..., Settings],
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    resp = await register(
        harness, tok, name="plain", endpoint_url=upstream.url, auth_type="api_key_header",
        credentials={"x-api-key": API_KEY, "x-other": SECRET},
    )  # fmt: skip
    assert resp.status_code == 201
    server_id = resp.json()["data"]["id"]
    rotated = await harness.client.put(
        f"{BASE}/{server_id}/credentials/x-api-key", json={"value": SECRET + "-2"}, headers=auth_headers(tok)
    )
    assert rotated.status_code == 200 and SECRET not in rotated.text
    # every column of every table, read back raw
    with harness.parts.db.engine.connect() as conn:
        for table in ("remote_server", "credential", "capability", "tenant_quota"):
            for row in conn.execute(text(f"SELECT * FROM {table}")):
                dumped = repr(tuple(row))
                assert API_KEY not in dumped and SECRET not in dumped
    db_file = harness.parts.db.url.removeprefix("sqlite:///")
    raw = b"".join(Path(p).read_bytes() for p in (db_file, db_file + "-wal") if Path(p).exists())  # noqa: ASYNC240
    assert API_KEY.encode() not in raw and SECRET.encode() not in raw


async def test_error_envelopes(harness: AppHarness, token: TokenFactory, upstream: UpstreamServer) -> None:
    c = harness.client
    # 401: missing, malformed, expired, wrong audience, no groups
    assert_envelope_error(await c.get(BASE), 401, "SCAILINK_UNAUTHORIZED")
    assert_envelope_error(
        await c.get(BASE, headers={"Authorization": "Bearer not.a.jwt"}), 401, "SCAILINK_UNAUTHORIZED"
    )
    expired = token(ttl_s=-3600)
    assert_envelope_error(await c.get(BASE, headers=auth_headers(expired)), 401, "SCAILINK_UNAUTHORIZED")
    tok = token("u1", "t1", ("tenant_user",))
    # request id echoed when well-formed, replaced when not
    resp = await c.get(BASE, headers={**auth_headers(tok), "X-Request-ID": "abc-123"})
    assert resp.headers["x-request-id"] == "abc-123" and resp.json()["meta"]["request_id"] == "abc-123"
    resp = await c.get(BASE, headers={**auth_headers(tok), "X-Request-ID": "bad id\twith spaces"})
    assert resp.headers["x-request-id"] != "bad id\twith spaces"
    # 422 with per-field details; unknown fields rejected
    body = assert_envelope_error(
        await register(harness, tok, name="", endpoint_url="ftp://x", transport="carrier-pigeon", extra=1),
        422,
        "SCAILINK_VALIDATION_ERROR",
    )
    fields = {d["field"] for d in body["error"]["details"]}
    assert {"name", "endpoint_url", "transport", "extra"} <= fields
    body = assert_envelope_error(
        await register(harness, tok, name="x", endpoint_url=upstream.url, auth_type="bearer", credentials={}),
        422,
        "SCAILINK_VALIDATION_ERROR",
    )
    not_json = await c.post(
        BASE, content=b"{nope", headers={**auth_headers(tok), "content-type": "application/json"}
    )
    assert_envelope_error(not_json, 422, "SCAILINK_VALIDATION_ERROR")
    assert_envelope_error(
        await c.get(BASE + "?limit=0", headers=auth_headers(tok)), 422, "SCAILINK_VALIDATION_ERROR"
    )
    assert_envelope_error(
        await c.get(BASE + "?cursor=zzz", headers=auth_headers(tok)), 422, "SCAILINK_VALIDATION_ERROR"
    )
    # 413 over the registry body cap (64 KiB)
    big = {"name": "big", "endpoint_url": upstream.url, "description": "x" * 70_000}
    assert_envelope_error(
        await c.post(BASE, json=big, headers=auth_headers(tok)), 413, "SCAILINK_PAYLOAD_TOO_LARGE"
    )
    # 403: a tenant_user cannot register a tenant-shared server
    shared = await register(harness, tok, name="shared", endpoint_url=upstream.url, is_tenant_shared=True)
    assert_envelope_error(shared, 403, "SCAILINK_FORBIDDEN")
    # 409 duplicate name for the same owner; the same name for another owner is fine
    first = await register(harness, tok, name="dup", endpoint_url=upstream.url)
    assert first.status_code == 201
    assert_envelope_error(
        await register(harness, tok, name="dup", endpoint_url=upstream.url), 409, "SCAILINK_CONFLICT"
    )
    other = token("u2", "t1", ("tenant_user",))
    assert (await register(harness, other, name="dup", endpoint_url=upstream.url)).status_code == 201
    # 404: unknown id, unknown route
    assert_envelope_error(await c.get(f"{BASE}/nope", headers=auth_headers(tok)), 404, "SCAILINK_NOT_FOUND")
    assert_envelope_error(await c.get("/v1/modules/scailink/nothing-here"), 404, "SCAILINK_NOT_FOUND")


async def test_cross_tenant_and_permissions(
    harness: AppHarness, token: TokenFactory, upstream: UpstreamServer
) -> None:
    c = harness.client
    owner = token("u1", "t1", ("tenant_user",))
    created = await register(harness, owner, name="mine", endpoint_url=upstream.url, auth_type="bearer",
                             credentials={"authorization": SECRET})  # fmt: skip
    sid = created.json()["data"]["id"]
    for stranger in (token("u1", "t2", ("tenant_admin",)), token("u3", "t1", ("tenant_admin",))):
        h = auth_headers(stranger)
        assert_envelope_error(await c.get(f"{BASE}/{sid}", headers=h), 404, "SCAILINK_NOT_FOUND")
        assert_envelope_error(
            await c.patch(f"{BASE}/{sid}", json={"name": "x"}, headers=h), 404, "SCAILINK_NOT_FOUND"
        )
        assert_envelope_error(await c.delete(f"{BASE}/{sid}", headers=h), 404, "SCAILINK_NOT_FOUND")
        assert_envelope_error(await c.post(f"{BASE}/{sid}/refresh", headers=h), 404, "SCAILINK_NOT_FOUND")
        put = await c.put(f"{BASE}/{sid}/credentials/authorization", json={"value": "x"}, headers=h)
        assert_envelope_error(put, 404, "SCAILINK_NOT_FOUND")
        dele = await c.delete(f"{BASE}/{sid}/credentials/authorization", headers=h)
        assert_envelope_error(dele, 404, "SCAILINK_NOT_FOUND")
        assert (await c.get(BASE, headers=h)).json()["data"]["items"] == []
    # listing needs remote.use even for one's own servers
    no_use = token("u1", "t1", ("some-unmapped-group",))
    assert_envelope_error(await c.get(BASE, headers=auth_headers(no_use)), 403, "SCAILINK_FORBIDDEN")
    assert_envelope_error(
        await c.get(f"{BASE}/{sid}", headers=auth_headers(no_use)), 403, "SCAILINK_FORBIDDEN"
    )
    # a viewer of the same tenant cannot see another user's personal server
    viewer = token("u4", "t1", ("tenant_viewer",))
    assert_envelope_error(
        await c.get(f"{BASE}/{sid}", headers=auth_headers(viewer)), 404, "SCAILINK_NOT_FOUND"
    )


async def test_update_rotate_delete(
    harness: AppHarness, token: TokenFactory, upstream: UpstreamServer
) -> None:
    c = harness.client
    tok = token("u1", "t1", ("tenant_user",))
    h = auth_headers(tok)
    created = (await register(harness, tok, name="orig", endpoint_url=upstream.url)).json()["data"]
    sid, slug = created["id"], created["slug"]
    events: list[str] = []
    harness.parts.events.subscribe(lambda e: events.append(e.kind.value))
    patched = await c.patch(f"{BASE}/{sid}", json={"name": "renamed", "consent_tier": "confirm"}, headers=h)
    assert patched.status_code == 200
    assert patched.json()["data"]["slug"] == slug and patched.json()["data"]["name"] == "renamed"
    assert_envelope_error(await c.patch(f"{BASE}/{sid}", json={"auth_type": "bearer"}, headers=h), 422,
                          "SCAILINK_VALIDATION_ERROR")  # fmt: skip
    # a credential for auth_type none is refused; switch server to a header credential via a new one
    bad = await c.put(f"{BASE}/{sid}/credentials/x-api-key", json={"value": "v"}, headers=h)
    assert_envelope_error(bad, 422, "SCAILINK_VALIDATION_ERROR")
    keyed = await register(harness, tok, name="keyed", endpoint_url=upstream.url, auth_type="api_key_header",
                           credentials={"x-api-key": API_KEY})  # fmt: skip
    kid = keyed.json()["data"]["id"]
    rotated = await c.put(f"{BASE}/{kid}/credentials/x-api-key", json={"value": "new-value"}, headers=h)
    assert rotated.status_code == 200 and rotated.json()["data"]["credential_fields"] == ["x-api-key"]
    assert "credentials_changed" in events
    target = await harness.parts.db.run(lambda s: harness.parts.registry.target_by_id(s, kid))
    assert target is not None and target.headers["x-api-key"] == "new-value"
    assert (await c.delete(f"{BASE}/{kid}/credentials/x-api-key", headers=h)).status_code == 204
    assert_envelope_error(
        await c.delete(f"{BASE}/{kid}/credentials/x-api-key", headers=h), 404, "SCAILINK_NOT_FOUND"
    )
    # delete cascades and frees the quota
    assert (await c.delete(f"{BASE}/{sid}", headers=h)).status_code == 204
    assert "server_deleted" in events
    assert_envelope_error(await c.get(f"{BASE}/{sid}", headers=h), 404, "SCAILINK_NOT_FOUND")
    with harness.parts.db.engine.connect() as conn:
        assert (
            conn.execute(text("SELECT count(*) FROM capability WHERE server_id = :s"), {"s": sid}).scalar()
            == 0
        )
        assert conn.execute(text("SELECT server_count FROM tenant_quota WHERE tenant_id='t1'")).scalar() == 1


async def test_pagination(harness: AppHarness, token: TokenFactory) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    for i in range(5):
        # an unreachable loopback port: registration still succeeds (status error)
        resp = await register(harness, tok, name=f"s{i}", endpoint_url="http://127.0.0.1:9/mcp")
        assert resp.status_code == 201
        assert resp.json()["data"]["status"] == "error"
        assert resp.json()["data"]["last_health_status"]
    seen: list[str] = []
    cursor: str | None = None
    while True:
        url = f"{BASE}?limit=2" + (f"&cursor={cursor}" if cursor else "")
        data = (await harness.client.get(url, headers=auth_headers(tok))).json()["data"]
        seen += [item["name"] for item in data["items"]]
        cursor = data["next_cursor"]
        if cursor is None:
            break
    assert seen == [f"s{i}" for i in range(5)]


async def test_registry_disabled_without_kek(
    settings_factory: Callable[..., Settings], token: TokenFactory
) -> None:
    async with start_app(settings_factory(encryption_local_kek=None)) as h:
        hdr = auth_headers(token())
        calls = [
            h.client.post(BASE, json={"name": "x", "endpoint_url": "http://127.0.0.1:9/mcp"}, headers=hdr),
            h.client.get(BASE, headers=hdr),
            h.client.get(f"{BASE}/x", headers=hdr),
            h.client.patch(f"{BASE}/x", json={}, headers=hdr),
            h.client.delete(f"{BASE}/x", headers=hdr),
            h.client.post(f"{BASE}/x/refresh", headers=hdr),
            h.client.put(f"{BASE}/x/credentials/authorization", json={"value": "v"}, headers=hdr),
            h.client.delete(f"{BASE}/x/credentials/authorization", headers=hdr),
        ]
        for call in calls:
            assert_envelope_error(await call, 503, "SCAILINK_REGISTRY_DISABLED")
        assert (await h.client.get("/healthz")).status_code == 200
        assert (await h.client.get("/readyz")).status_code == 200


async def _registration_race(settings: Settings, token: TokenFactory, n: int) -> tuple[list[int], int]:
    statuses: list[int] = []
    async with start_app(settings) as h:
        tok = token("u1", "t1", ("tenant_user",))

        async def one(i: int) -> None:
            resp = await register(h, tok, name=f"race-{i}", endpoint_url="http://127.0.0.1:9/mcp")
            statuses.append(resp.status_code)
            if resp.status_code == 429:
                assert resp.json()["error"]["code"] == "SCAILINK_REMOTE_LIMIT_EXCEEDED"

        with anyio.fail_after(240):
            async with anyio.create_task_group() as tg:
                for i in range(n):
                    tg.start_soon(one, i)
        with h.parts.db.engine.connect() as conn:
            rows = conn.execute(text("SELECT count(*) FROM remote_server WHERE tenant_id='t1'")).scalar()
    return statuses, int(rows or 0)


async def test_tenant_cap_under_concurrency(
    database_url: str, settings_factory: Callable[..., Settings], token: TokenFactory
) -> None:
    settings = settings_factory(database_url=database_url, max_servers_per_tenant=100)
    statuses, rows = await _registration_race(settings, token, 150)
    assert rows == 100
    assert statuses.count(201) == 100 and statuses.count(429) == 50


@pytest.fixture
async def loopback_blocked(settings_factory: Callable[..., Settings]) -> AsyncIterator[AppHarness]:
    async with start_app(settings_factory(allowed_private_networks=[])) as h:
        yield h


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data",
        "http://[fd00:ec2::254]/",
        "http://10.0.0.5/mcp",
        "http://192.168.1.10/mcp",
        "http://172.16.3.4/mcp",
        "http://100.64.0.1/mcp",
        "http://[::ffff:169.254.169.254]/",
        "http://[::ffff:127.0.0.1]/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://[2002:a9fe:a9fe::1]/",
        "http://[2001:0:4136:e378:8000:63bf:5601:5601]/",  # Teredo, client 169.254.169.254 (inverted)
        "http://0.0.0.0/",
        "http://[::1]/mcp",
        "http://224.0.0.1/",
    ],
)
async def test_ssrf_blocked_addresses(loopback_blocked: AppHarness, token: TokenFactory, url: str) -> None:
    resp = await register(loopback_blocked, token(), name="ssrf", endpoint_url=url)
    assert_envelope_error(resp, 422, "SCAILINK_ENDPOINT_FORBIDDEN")


async def test_ssrf_loopback_not_contacted(
    loopback_blocked: AppHarness, token: TokenFactory, upstream: UpstreamServer
) -> None:
    before = upstream.request_count
    for url in (upstream.url, upstream.url.replace("127.0.0.1", "localhost")):
        resp = await register(loopback_blocked, token(), name="loop", endpoint_url=url)
        assert_envelope_error(resp, 422, "SCAILINK_ENDPOINT_FORBIDDEN")
    patch_target = await register(loopback_blocked, token(), name="ok", endpoint_url="http://8.8.8.8:9/mcp")
    # (no network here: discovery of a public address just fails; the PATCH below must still be refused)
    sid = patch_target.json()["data"]["id"]
    patched = await loopback_blocked.client.patch(
        f"{BASE}/{sid}", json={"endpoint_url": upstream.url}, headers=auth_headers(token())
    )
    assert_envelope_error(patched, 422, "SCAILINK_ENDPOINT_FORBIDDEN")
    assert upstream.request_count == before


async def test_redirect_not_followed(
    harness: AppHarness, token: TokenFactory, upstream: UpstreamServer
) -> None:
    with UpstreamServer(redirect_to=upstream.url) as redirector:
        before = upstream.request_count
        resp = await register(harness, token(), name="redir", endpoint_url=redirector.url)
        assert resp.status_code == 201
        data = resp.json()["data"]
        assert data["status"] == "error" and data["last_health_status"] not in (None, "ok")
        assert redirector.request_count >= 1
        assert upstream.request_count == before


async def test_health_flip_and_refresh(
    settings_factory: Callable[..., Settings], token: TokenFactory
) -> None:
    async with start_app(settings_factory(health_timeout_s=2.0)) as h:
        tok = token("u1", "t1", ("tenant_user",))
        with UpstreamServer() as up:
            created = (await register(h, tok, name="flaky", endpoint_url=up.url)).json()["data"]
            sid = created["id"]
            assert created["status"] == "active"
            assert "echo" in [t["name"] for t in created["capabilities"]["tools"]]
            checker = h.parts.health
            assert (await checker.run_once())[sid] == "ok"
            up.stop()
            for expected_failures in (1, 2, 3):
                await checker.run_once()
                detail = (await h.client.get(f"{BASE}/{sid}", headers=auth_headers(tok))).json()["data"]
                assert detail["consecutive_failures"] == expected_failures
                assert detail["last_health_status"] not in (None, "ok")
                assert detail["status"] == ("error" if expected_failures >= 3 else "active")
            assert re.fullmatch(r"[A-Za-z]+(Error|Exception)?", detail["last_health_status"])
            up.restart()
            # a success alone does not bring an `error` server back (no auto-recover)
            await checker.run_once()
            detail = (await h.client.get(f"{BASE}/{sid}", headers=auth_headers(tok))).json()["data"]
            assert detail["status"] == "error"
            up.remove_tool("echo")
            refreshed = await h.client.post(f"{BASE}/{sid}/refresh", headers=auth_headers(tok))
            data = refreshed.json()["data"]
            assert data["status"] == "active" and data["consecutive_failures"] == 0
            assert "echo" not in [t["name"] for t in data["capabilities"]["tools"]]
            assert "add" in [t["name"] for t in data["capabilities"]["tools"]]


async def test_rate_limited_per_user(settings_factory: Callable[..., Settings], token: TokenFactory) -> None:
    async with start_app(settings_factory(rate_limit_per_s=0.5, rate_limit_burst=3)) as h:
        hdr = auth_headers(token("u1", "t1", ("tenant_user",)))
        for _ in range(3):
            assert (await h.client.get(BASE, headers=hdr)).status_code == 200
        body = assert_envelope_error(await h.client.get(BASE, headers=hdr), 429, "SCAILINK_RATE_LIMITED")
        assert body["error"]["retry_after"] > 0
        # another user has a bucket of their own
        assert (
            await h.client.get(BASE, headers=auth_headers(token("u2", "t1", ("tenant_user",))))
        ).status_code == 200


async def test_capability_eviction_and_periodic_rediscovery(harness: AppHarness, token: TokenFactory) -> None:
    from datetime import timedelta

    from scailink_mcp.models import utcnow
    from scailink_mcp.remote.health import Rediscovery

    tok = token("u1", "t1", ("tenant_user",))
    with UpstreamServer() as up:
        sid = (await register(harness, tok, name="evict", endpoint_url=up.url)).json()["data"]["id"]
        up.remove_tool("echo")
        refreshed = (await harness.client.post(f"{BASE}/{sid}/refresh", headers=auth_headers(tok))).json()[
            "data"
        ]
        assert "echo" not in [t["name"] for t in refreshed["capabilities"]["tools"]]

        def echo_rows() -> int:
            with harness.parts.db.engine.connect() as conn:
                query = text("SELECT count(*) FROM capability WHERE server_id = :s AND name = 'echo'")
                return int(conn.execute(query, {"s": sid}).scalar() or 0)

        assert echo_rows() == 1, "unseen rows are kept (hidden) for 24 h"
        with harness.parts.db.engine.begin() as conn:
            conn.execute(
                text("UPDATE capability SET last_seen_at = :t WHERE name = 'echo'"),
                {"t": utcnow() - timedelta(hours=25)},
            )
        await harness.client.post(f"{BASE}/{sid}/refresh", headers=auth_headers(tok))
        assert echo_rows() == 0, "rows unseen for over 24 h are deleted on refresh"

        # periodic re-discovery (15 min), stepped with an injected clock instead of sleeping
        up.add_tool("fresh_tool")
        settings = harness.parts.settings
        not_yet = Rediscovery(settings, harness.parts.registry, clock=lambda: utcnow() + timedelta(minutes=5))
        assert await not_yet.run_once() == []
        later = Rediscovery(settings, harness.parts.registry, clock=lambda: utcnow() + timedelta(minutes=16))
        assert await later.run_once() == [sid]
        detail = (await harness.client.get(f"{BASE}/{sid}", headers=auth_headers(tok))).json()["data"]
        assert "fresh_tool" in [t["name"] for t in detail["capabilities"]["tools"]]


def test_health_interval_jitter(settings_factory: Callable[..., Settings]) -> None:
    import random

    from scailink_mcp.app import build_components

    parts = build_components(settings_factory(health_interval_s=60, health_jitter=0.1))
    parts.health.rng = random.Random(7)
    delays = [parts.health.next_delay() for _ in range(500)]
    assert 54 <= min(delays) < 56 and 64 < max(delays) <= 66


async def test_registry_flow_on_every_database(
    database_url: str,
    settings_factory: Callable[..., Settings],
    token: TokenFactory,
    upstream: UpstreamServer,
) -> None:
    """Register with credentials, page, patch, rotate, refresh, delete: SQLite, PostgreSQL and MariaDB."""
    async with start_app(settings_factory(database_url=database_url)) as h:
        tok = token("u1", "t1", ("tenant_user",))
        hdr = auth_headers(tok)
        ids = []
        for i in range(3):
            resp = await register(h, tok, name=f"db-{i}", endpoint_url=upstream.url, auth_type="bearer",
                                  credentials={"authorization": f"{SECRET}-{i}"})  # fmt: skip
            assert resp.status_code == 201 and resp.json()["data"]["status"] == "active", resp.text
            ids.append(resp.json()["data"]["id"])
        assert (await register(h, tok, name="db-0", endpoint_url=upstream.url)).status_code == 409
        first = (await h.client.get(f"{BASE}?limit=2", headers=hdr)).json()["data"]
        rest = (await h.client.get(f"{BASE}?limit=2&cursor={first['next_cursor']}", headers=hdr)).json()[
            "data"
        ]
        assert [s["id"] for s in first["items"] + rest["items"]] == ids and rest["next_cursor"] is None
        assert (
            await h.client.patch(f"{BASE}/{ids[0]}", json={"name": "renamed"}, headers=hdr)
        ).status_code == 200
        rotated = await h.client.put(
            f"{BASE}/{ids[1]}/credentials/authorization", json={"value": "v2"}, headers=hdr
        )
        assert rotated.status_code == 200
        target = await h.parts.db.run(lambda s: h.parts.registry.target_by_id(s, ids[1]))
        assert target is not None and target.headers["Authorization"] == "Bearer v2"
        assert (await h.client.post(f"{BASE}/{ids[2]}/refresh", headers=hdr)).json()["data"][
            "status"
        ] == "active"
        assert (await h.client.delete(f"{BASE}/{ids[2]}", headers=hdr)).status_code == 204
        assert len((await h.client.get(BASE, headers=hdr)).json()["data"]["items"]) == 2
