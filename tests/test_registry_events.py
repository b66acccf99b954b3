"""Every catalog-changing state change is published: a server whose first discovery fails is
`status: error` everywhere at once, also on the per-server endpoint,
which reads the in-memory directory (issue 12: `_mark_error` wrote the row without publishing)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
from mcp.shared.exceptions import MCPError

from tests.conftest import LiveApp, TokenFactory, auth_headers
from tests.test_mcp_gateway import mcp_client, register
from tests.upstream import UpstreamServer

pytestmark = pytest.mark.anyio

REG = "/v1/modules/scailink/remote-servers"


@pytest.fixture
def closed_port_url() -> Iterator[str]:
    with socket.socket() as sock:  # bound, never listening: connections are refused at once
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/mcp"


async def test_failed_first_discovery_closes_the_per_server_endpoint(
    live: LiveApp, token: TokenFactory, closed_port_url: str
) -> None:
    tok = token()
    async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as c:
        resp = await c.post(
            REG, json={"name": "unreachable", "endpoint_url": closed_port_url}, headers=auth_headers(tok)
        )
        assert resp.status_code == 201
        server = resp.json()["data"]
        assert server["status"] == "error"
    assert live.parts.directory.get(server["id"]).status == "error"  # type: ignore[union-attr]
    url = f"{live.base_url}/v1/modules/scailink/remote-servers/{server['id']}/mcp"
    async with mcp_client(url, tok) as session:
        with pytest.raises(MCPError, match="server is not available"):
            await session.list_tools()
        with pytest.raises(MCPError, match="server is not available"):
            await session.call_tool("echo", {"text": "hi"})


async def test_an_endpoint_changed_to_an_unreachable_url_closes_the_per_server_endpoint(
    live: LiveApp, token: TokenFactory, closed_port_url: str
) -> None:
    """A working server re-pointed (PATCH `endpoint_url`) at an address whose discovery fails turns
    `status: error` in the directory at once, and its per-server endpoint stops serving."""
    tok = token()
    with UpstreamServer() as upstream:
        server = await register(live, tok, name="moving", endpoint_url=upstream.url)
        assert server["status"] == "active"
        url = f"{live.base_url}/v1/modules/scailink/remote-servers/{server['id']}/mcp"
        async with mcp_client(url, tok) as session:
            assert (await session.call_tool("echo", {"text": "hi"})).is_error is False
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as c:
            resp = await c.patch(
                f"{REG}/{server['id']}", json={"endpoint_url": closed_port_url}, headers=auth_headers(tok)
            )
        assert resp.status_code == 200 and resp.json()["data"]["status"] == "error", resp.text
        assert live.parts.directory.get(server["id"]).status == "error"  # type: ignore[union-attr]
        async with mcp_client(url, tok) as session:
            with pytest.raises(MCPError, match="server is not available"):
                await session.call_tool("echo", {"text": "hi"})
