"""The cross-tenant isolation matrix (issue 11): user `u1` of tenant B, a tenant admin, tries every
REST verb, `/mcp` and the REST invoke against the objects of user `u1` of tenant A (the same user id:
the worst case). Everything answers as if A's objects did not exist (404, never 403), nothing of A's is
listed, and A's objects are unchanged afterwards. Real ScaiLink (uvicorn on 127.0.0.1), a real upstream,
a real desktop WebSocket client for A. The WebSocket side (replace, resume, caps) is in
`tests/test_desktop_security.py`; `/mcp` and `/sse` session ownership in `tests/test_mcp_security.py`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from mcp.shared.exceptions import MCPError

from tests.conftest import LiveApp, TokenFactory, auth_headers
from tests.test_desktop_bridge import device
from tests.test_mcp_gateway import list_all_tools, mcp_client
from tests.upstream import UpstreamServer

pytestmark = pytest.mark.anyio

BASE = "/v1/modules/scailink"


@pytest.fixture
def upstream() -> Iterator[UpstreamServer]:
    with UpstreamServer() as server:
        yield server


async def _register(c: httpx.AsyncClient, tok: str, **body: Any) -> dict[str, Any]:
    resp = await c.post(f"{BASE}/remote-servers", json=body, headers=auth_headers(tok))
    assert resp.status_code == 201, resp.text
    data: dict[str, Any] = resp.json()["data"]
    return data


def _assert_not_found(resp: httpx.Response) -> None:
    assert resp.status_code == 404, (resp.request.method, resp.request.url.path, resp.text)
    assert resp.json()["status"] == "error"


async def test_tenant_b_cannot_see_or_touch_tenant_a(
    live: LiveApp, token: TokenFactory, upstream: UpstreamServer
) -> None:
    tok_a, tok_b = token("u1", "tenant-a"), token("u1", "tenant-b")
    hdr_b = auth_headers(tok_b)
    async with (
        httpx.AsyncClient(base_url=live.base_url, timeout=30) as c,
        device(live, tok_a, device_id="shared-device-id") as (_ws, ack),
    ):
        personal = await _register(
            c, tok_a, name="a-personal", endpoint_url=upstream.url, auth_type="bearer",
            credentials={"authorization": "a-secret"},
        )  # fmt: skip
        shared = await _register(c, tok_a, name="a-shared", endpoint_url=upstream.url, is_tenant_shared=True)
        role = await c.put(
            "/v1/iam/roles/ops", json={"permissions": ["scailink:view"]}, headers=auth_headers(tok_a)
        )
        assert role.status_code in (200, 201), role.text
        a_session = ack["session_id"]
        a_tool = f"remote.u1.{personal['slug']}.echo"
        a_desktop_tool = f"{ack['namespace']}.echo"

        # ---- the registry: every verb on each of A's servers
        for server in (personal, shared):
            sid = server["id"]
            _assert_not_found(await c.get(f"{BASE}/remote-servers/{sid}", headers=hdr_b))
            _assert_not_found(
                await c.patch(f"{BASE}/remote-servers/{sid}", json={"name": "x"}, headers=hdr_b)
            )
            _assert_not_found(await c.post(f"{BASE}/remote-servers/{sid}/refresh", headers=hdr_b))
            _assert_not_found(
                await c.put(
                    f"{BASE}/remote-servers/{sid}/credentials/authorization",
                    json={"value": "b"},
                    headers=hdr_b,
                )
            )
            _assert_not_found(
                await c.delete(f"{BASE}/remote-servers/{sid}/credentials/authorization", headers=hdr_b)
            )
            _assert_not_found(await c.delete(f"{BASE}/remote-servers/{sid}", headers=hdr_b))
        listed = await c.get(f"{BASE}/remote-servers", headers=hdr_b)
        assert listed.status_code == 200 and listed.json()["data"]["items"] == []

        # ---- desktop sessions, the catalog, invoke
        sessions = await c.get(f"{BASE}/sessions", headers=hdr_b)
        assert sessions.status_code == 200 and sessions.json()["data"]["items"] == []
        _assert_not_found(await c.get(f"{BASE}/sessions/{a_session}", headers=hdr_b))
        _assert_not_found(await c.delete(f"{BASE}/sessions/{a_session}", headers=hdr_b))
        caps = await c.get(f"{BASE}/capabilities", headers=hdr_b)
        assert caps.status_code == 200 and caps.json()["data"]["items"] == []
        for tool in (a_tool, a_desktop_tool, f"remote.tenant.{shared['slug']}.echo"):
            resp = await c.post(
                f"{BASE}/users/u1/tools/{tool}/invoke", json={"arguments": {"text": "hi"}}, headers=hdr_b
            )
            assert resp.status_code == 404, resp.text
            assert resp.json()["error"]["code"] == "SCAILINK_TOOL_NOT_FOUND"

        # ---- audit and IAM
        audit = await c.get(f"{BASE}/audit", headers=hdr_b)
        assert audit.status_code == 200
        assert all(row["tenant_id"] == "tenant-b" for row in audit.json()["data"]["items"])
        own = await c.get(f"{BASE}/users/u1/audit", headers=hdr_b)
        assert own.status_code == 200
        assert all(row["tenant_id"] == "tenant-b" for row in own.json()["data"]["items"])
        _assert_not_found(await c.get("/v1/iam/roles/ops", headers=hdr_b))
        _assert_not_found(await c.delete("/v1/iam/roles/ops", headers=hdr_b))
        roles = await c.get("/v1/iam/roles", headers=hdr_b)
        assert "ops" not in {r["name"] for r in roles.json()["data"]["items"]}

        # ---- /mcp: nothing of A's is listed or callable
        async with mcp_client(live.mcp_url, tok_b) as session:
            assert await list_all_tools(session) == []
            for tool in (a_tool, a_desktop_tool):
                with pytest.raises(MCPError, match="Unknown tool"):
                    await session.call_tool(tool, {"text": "hi"})
            with pytest.raises(MCPError):
                await session.get_prompt(f"remote.u1.{personal['slug']}.greet", {})

        # ---- A is untouched
        for server in (personal, shared):
            detail = await c.get(f"{BASE}/remote-servers/{server['id']}", headers=auth_headers(tok_a))
            assert detail.status_code == 200
            assert detail.json()["data"]["name"] == server["name"]
            assert detail.json()["data"]["credential_fields"] == server["credential_fields"]
        mine = await c.get(f"{BASE}/sessions/{a_session}", headers=auth_headers(tok_a))
        assert mine.status_code == 200 and mine.json()["data"]["state"] == "connected"
        assert (await c.get("/v1/iam/roles/ops", headers=auth_headers(tok_a))).status_code == 200
        async with mcp_client(live.mcp_url, tok_a) as session:
            names = {t.name for t in await list_all_tools(session)}
            assert {a_tool, a_desktop_tool} <= names
            result = await session.call_tool(a_tool, {"text": "still mine"})
            assert not result.is_error
