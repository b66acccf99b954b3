"""Operations: /healthz, /readyz, /metrics (parsed with prometheus-client's own parser)."""

from __future__ import annotations

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LiveApp, TokenFactory
from tests.test_mcp_gateway import mcp_client, register
from tests.test_replicas_events import until
from tests.upstream import UpstreamServer

pytestmark = pytest.mark.anyio


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_health_ready_and_metrics_move(live: LiveApp, token: TokenFactory) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    async with httpx.AsyncClient(base_url=live.base_url) as c:
        assert (await c.get("/healthz")).json() == {"status": "ok"}
        ready = await c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["database"] == "ok"
        before = samples((await c.get("/metrics")).text)
        with UpstreamServer() as upstream:
            server = await register(live, tok, name="m", endpoint_url=upstream.url)
            async with mcp_client(live.mcp_url, tok) as s:
                for _ in range(3):
                    await s.call_tool(f"remote.u1.{server['slug']}.echo", {"text": "x"})
                await s.call_tool(f"remote.u1.{server['slug']}.fail", {})
                after = samples((await c.get("/metrics")).text)
    ok_key = ("scailink_tool_calls_total", (("outcome", "ok"), ("source", "remote")))
    assert after[ok_key] - before.get(ok_key, 0) == 3
    assert after[("scailink_tool_calls_total", (("outcome", "tool_error"), ("source", "remote")))] == 1
    assert after[("scailink_tool_call_seconds_count", (("source", "remote"),))] == 4
    assert after[("scailink_pool_sessions", ())] == 1
    assert after[("scailink_pool_hits", ())] >= 3


async def test_readyz_reports_pending_migrations(settings_factory: object, tmp_path: object) -> None:
    from scailink_mcp.app import create_app
    from scailink_mcp.config import Settings

    assert callable(settings_factory)
    settings: Settings = settings_factory(database_url=f"sqlite:///{tmp_path}/empty.db")  # never migrated
    app = create_app(settings)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c,
    ):
        resp = await c.get("/readyz")
    assert resp.status_code == 503 and resp.json()["checks"]["database"] == "migrations pending"


async def test_one_json_log_line_per_request(
    harness: object, token: TokenFactory, caplog: pytest.LogCaptureFixture
) -> None:
    import json
    import logging

    from scailink_mcp.logs import JsonFormatter

    caplog.set_level(logging.INFO, logger="scailink_mcp.access")
    client = harness.client  # type: ignore[attr-defined]
    tok = token()
    headers = {"Authorization": f"Bearer {tok}", "X-Request-ID": "log-me-1"}
    await client.get("/v1/modules/scailink/remote-servers?cursor=x", headers=headers)
    lines = [JsonFormatter().format(r) for r in caplog.records if r.name == "scailink_mcp.access"]
    assert len(lines) == 1
    line = json.loads(lines[0])
    assert line["request_id"] == "log-me-1" and line["status"] == 422 and line["method"] == "GET"
    assert line["path"] == "/v1/modules/scailink/remote-servers"
    assert tok not in lines[0] and "cursor" not in lines[0]


async def test_readyz_checks_redis_when_configured(settings_factory: object) -> None:
    from tests.conftest import start_app

    assert callable(settings_factory)
    async with start_app(settings_factory(redis_url="redis://127.0.0.1:1/0")) as h:
        resp = await h.client.get("/readyz")
        assert resp.status_code == 503 and resp.json()["checks"]["redis"].startswith("unreachable")
    try:
        import redis

        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping()
    except Exception:
        return  # no local Redis: the reachable case cannot be shown here
    async with start_app(settings_factory(redis_url="redis://127.0.0.1:6379/0")) as h:
        with anyio.fail_after(5):  # ready once the event and desktop subscriptions are confirmed
            while (resp := await h.client.get("/readyz")).status_code != 200:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        checks = resp.json()["checks"]
        expected = {"database", "redis", "redis_events", "redis_desktop", "redis_mcp_sessions", "redis_mrtr"}
        assert expected <= set(checks) and set(checks.values()) == {"ok"}, checks


async def test_mcp_requests_take_the_lane_with_their_request_id_and_log_line(
    live: LiveApp, token: TokenFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """`/mcp` skips Starlette's outer layers (`LanedStarlette`) but keeps what they did for it: the
    X-Request-ID echo, one access log line, the SDK's 401; a path the lane does not take
    (`/mcp/`, another path) still goes through the router."""
    import logging

    from scailink_mcp.api.middleware import LanedStarlette

    caplog.set_level(logging.INFO, logger="scailink_mcp.access")
    assert isinstance(live.app, LanedStarlette)
    tok = token()
    headers = {"Authorization": f"Bearer {tok}", "X-Request-ID": "lane-1",
               "Accept": "application/json, text/event-stream"}  # fmt: skip
    hello = {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
    init = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello}
    async with httpx.AsyncClient(base_url=live.base_url) as client:
        resp = await client.post("/mcp", json=init, headers=headers)
        refused = await client.post("/mcp", json=init, headers={"X-Request-ID": "lane-2"})
        other = await client.post("/mcp/", json=init, headers={**headers, "X-Request-ID": "lane-3"})
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "lane-1"
    assert refused.status_code == 401 and refused.headers["x-request-id"] == "lane-2"
    assert "resource_metadata=" in refused.headers["www-authenticate"]
    assert other.headers["x-request-id"] == "lane-3" and other.status_code in (307, 404)

    def logged() -> list[tuple[str, str, int]]:
        access = [r for r in caplog.records if r.name == "scailink_mcp.access"]
        return sorted((r.request_id, r.path, r.status) for r in access)  # type: ignore[attr-defined]

    # An SSE answer's line is written once its stream has ended, which may be after the next request's.
    await until(lambda: len(logged()) == 3)
    assert logged() == [
        ("lane-1", "/mcp", 200),
        ("lane-2", "/mcp", 401),
        ("lane-3", "/mcp/", other.status_code),
    ]
