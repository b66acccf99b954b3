"""Listings keep every field the upstream sent (issue 14): a real upstream on 127.0.0.1 that lists
objects with fields the SDK does not know (`tests/raw_upstream.py`; a desktop device announcing them,
and a desktop client's local stdio server sending them, `tests/raw_mcp.py`), registered through REST, listed
through `/mcp` and the per-server endpoint by a raw JSON-RPC client (an SDK client would drop the
fields on its own side), in both eras: a handshake-era session (2025-11-25) and 2026-07-28 requests.

Only the name (namespaced) or the URI (`scailink://`) changes; 2026-07-28 results carry
`resultType`, `ttlMs: 0` and `cacheScope: "private"`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import httpx
import pytest
from mcp_types import CLIENT_CAPABILITIES_META_KEY, CLIENT_INFO_META_KEY, PROTOCOL_VERSION_META_KEY

from scailink_mcp.desktop.local_servers import LocalServers, ServerSpec
from tests.conftest import LiveApp, TokenFactory, auth_headers
from tests.raw_mcp import NEWER_PROMPT, NEWER_RESOURCE, NEWER_TEMPLATE, NEWER_TOOL, PLAIN_TOOL
from tests.raw_upstream import RawUpstream
from tests.test_desktop_bridge import device
from tests.test_mcp_gateway import register

pytestmark = pytest.mark.anyio

Era = Literal["2025-11-25", "2026-07-28"]
ERAS: tuple[Era, ...] = ("2025-11-25", "2026-07-28")
SINGLE = "/v1/modules/scailink/remote-servers/{id}/mcp"
RAW_STDIO = str(Path(__file__).with_name("raw_mcp.py"))


@pytest.fixture
def raw_upstream() -> Iterator[RawUpstream]:
    with RawUpstream() as server:
        yield server


@pytest.fixture(params=ERAS)
def era(request: pytest.FixtureRequest) -> Era:
    value: Era = request.param
    return value


def _answer(response: httpx.Response, request_id: int) -> dict[str, Any]:
    """The JSON-RPC answer to `request_id` in a JSON body or an SSE stream."""
    assert response.status_code == 200, response.text
    if response.headers.get("content-type", "").startswith("application/json"):
        messages = [response.json()]
    else:
        messages = [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]
    answer: dict[str, Any] = next(m for m in messages if m.get("id") == request_id)
    return answer


class RawClient:
    """JSON-RPC over Streamable HTTP by hand: the bytes ScaiLink sends are what the test reads."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        url: str,
        tok: str,
        era: Era,
        capabilities: dict[str, Any] | None = None,
    ) -> None:
        self.http, self.url, self.era = http, url, era
        self.capabilities = capabilities or {}
        self.headers = {**auth_headers(tok), "accept": "application/json, text/event-stream"}
        self.ids = 0

    async def open(self) -> None:
        if self.era == "2026-07-28":
            return  # no handshake: every request carries its own protocol version
        init = {
            "protocolVersion": self.era,
            "capabilities": self.capabilities,
            "clientInfo": {"name": "raw-test", "version": "1"},
        }
        response = await self._post({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": init})
        _answer(response, 0)
        self.headers["mcp-session-id"] = response.headers["mcp-session-id"]
        self.headers["mcp-protocol-version"] = self.era
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert (await self._post(note)).status_code == 202

    async def _post(self, message: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.http.post(self.url, json=message, headers={**self.headers, **(headers or {})})

    async def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self.ids += 1
        params = dict(params or {})
        headers: dict[str, str] = {}
        if self.era == "2026-07-28":
            params["_meta"] = {
                PROTOCOL_VERSION_META_KEY: self.era,
                CLIENT_INFO_META_KEY: {"name": "raw-test", "version": "1"},
                CLIENT_CAPABILITIES_META_KEY: self.capabilities,
            }
            headers = {"mcp-protocol-version": self.era, "mcp-method": method}
        message = {"jsonrpc": "2.0", "id": self.ids, "method": method, "params": params}
        answer = _answer(await self._post(message, headers), self.ids)
        assert "result" in answer, answer
        result: dict[str, Any] = answer["result"]
        return result


def _check_era(result: dict[str, Any], era: Era) -> None:
    if era == "2026-07-28":
        assert result["resultType"] == "complete"
        assert result["ttlMs"] == 0 and result["cacheScope"] == "private"
        assert result["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "scailink"
    else:
        assert not {"resultType", "ttlMs", "cacheScope"} & set(result), result


async def test_aggregate_listings_keep_unknown_fields(
    live: LiveApp, token: TokenFactory, raw_upstream: RawUpstream, era: Era
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="raw", endpoint_url=raw_upstream.url)
    ns = f"remote.u1.{server['slug']}"
    async with httpx.AsyncClient(timeout=30) as http:
        rpc = RawClient(http, live.mcp_url, tok, era)
        await rpc.open()
        tools = await rpc.request("tools/list")
        _check_era(tools, era)
        by_name = {t["name"]: t for t in tools["tools"]}
        assert by_name[f"{ns}.future_tool"] == {**NEWER_TOOL, "name": f"{ns}.future_tool"}
        prompts = await rpc.request("prompts/list")
        _check_era(prompts, era)
        assert prompts["prompts"] == [{**NEWER_PROMPT, "name": f"{ns}.future_prompt"}]
        resources = await rpc.request("resources/list")
        _check_era(resources, era)
        uri = f"scailink://{ns}/{quote(NEWER_RESOURCE['uri'], safe='')}"
        assert resources["resources"] == [{**NEWER_RESOURCE, "uri": uri}]
        templates = await rpc.request("resources/templates/list")
        _check_era(templates, era)
        public = f"scailink://{ns}/{quote(NEWER_TEMPLATE['uriTemplate'], safe='{}')}"
        assert templates["resourceTemplates"] == [{**NEWER_TEMPLATE, "uriTemplate": public}]
        # Served from the pre-serialized page the second time: the same bytes, parsed the same.
        assert await rpc.request("tools/list") == tools


async def test_a_client_declaring_a_back_channel_gets_the_raw_listing_too(
    live: LiveApp, token: TokenFactory, raw_upstream: RawUpstream, era: Era
) -> None:
    """Listing needs no back-channel: a client declaring roots, sampling and elicitation (many real
    clients declare roots) is listed from the same raw pages, unknown fields included."""
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="raw", endpoint_url=raw_upstream.url)
    ns = f"remote.u1.{server['slug']}"
    capabilities = {"roots": {"listChanged": True}, "sampling": {}, "elicitation": {"form": {}}}
    async with httpx.AsyncClient(timeout=30) as http:
        rpc = RawClient(http, live.mcp_url, tok, era, capabilities)
        await rpc.open()
        tools = await rpc.request("tools/list")
        _check_era(tools, era)
        by_name = {t["name"]: t for t in tools["tools"]}
        assert by_name[f"{ns}.future_tool"] == {**NEWER_TOOL, "name": f"{ns}.future_tool"}


async def test_per_server_listing_is_the_upstreams_objects(
    live: LiveApp, token: TokenFactory, raw_upstream: RawUpstream, era: Era
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="raw", endpoint_url=raw_upstream.url)
    async with httpx.AsyncClient(timeout=30) as http:
        rpc = RawClient(http, live.base_url + SINGLE.format(id=server["id"]), tok, era)
        await rpc.open()
        tools = await rpc.request("tools/list")
        _check_era(tools, era)
        assert tools["tools"] == raw_upstream.listing["tools"]
        assert (await rpc.request("prompts/list"))["prompts"] == [NEWER_PROMPT]


async def test_a_refresh_drops_the_serialized_pages(
    live: LiveApp, token: TokenFactory, raw_upstream: RawUpstream
) -> None:
    """A listing changed upstream and re-discovered is listed anew (the pages went with the view)."""
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="raw", endpoint_url=raw_upstream.url)
    ns = f"remote.u1.{server['slug']}"
    async with httpx.AsyncClient(timeout=30) as http:
        rpc = RawClient(http, live.mcp_url, tok, "2025-11-25")
        await rpc.open()
        before = await rpc.request("tools/list")
        assert f"{ns}.plain" in {t["name"] for t in before["tools"]}
        changed = {**NEWER_TOOL, "_meta": {"com.example/cost": {"tokens": 99}}}
        raw_upstream.listing["tools"] = [changed]
        refresh = await http.post(
            f"{live.base_url}/v1/modules/scailink/remote-servers/{server['id']}/refresh",
            headers=auth_headers(tok),
        )
        assert refresh.status_code == 200, refresh.text
        after = await rpc.request("tools/list")
        assert after["tools"] == [{**changed, "name": f"{ns}.future_tool"}]


async def test_a_desktop_local_servers_items_are_kept_as_sent() -> None:
    """The desktop client lists its local (stdio) servers raw too: what it announces in
    `session_init` is each object as the server sent it (one server: names unchanged)."""
    servers = LocalServers({"raw": ServerSpec(command=sys.executable, args=[RAW_STDIO])})
    async with AsyncExitStack() as stack:
        await servers.start(stack)
        caps = servers.capabilities()
    assert caps["tools"] == [NEWER_TOOL, PLAIN_TOOL]
    assert caps["prompts"] == [NEWER_PROMPT]
    assert caps["resources"] == [NEWER_RESOURCE]
    assert caps["resource_templates"] == [NEWER_TEMPLATE]


async def test_desktop_tools_are_listed_as_the_device_sent_them(
    live: LiveApp, token: TokenFactory, era: Era
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    capabilities = {"tools": [NEWER_TOOL], "prompts": [NEWER_PROMPT]}
    async with (
        device(live, tok, device_name="raw", capabilities=capabilities),
        httpx.AsyncClient(timeout=30) as http,
    ):
        rpc = RawClient(http, live.mcp_url, tok, era)
        await rpc.open()
        tools = await rpc.request("tools/list")
        _check_era(tools, era)
        (listed,) = tools["tools"]
        assert listed["name"].startswith("desktop.u1.") and listed["name"].endswith(".future_tool")
        assert listed == {**NEWER_TOOL, "name": listed["name"]}
        (prompt,) = (await rpc.request("prompts/list"))["prompts"]
        assert prompt == {**NEWER_PROMPT, "name": prompt["name"]}
