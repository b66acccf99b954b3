"""The reference desktop client end to end: a real local stdio MCP server, the real client, ScaiLink on
127.0.0.1, an MCP client and REST invoke calling the local tool; consent through the client; resume."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from scailink_mcp.config import Settings
from scailink_mcp.desktop.client import DesktopClient, FatalClose
from tests.conftest import LiveApp, TokenFactory, auth_headers
from tests.test_mcp_gateway import list_all_tools, mcp_client

pytestmark = pytest.mark.anyio

STDIO_SERVER = {
    "local": {"command": sys.executable, "args": [str(Path(__file__).with_name("stdio_server.py"))]}
}


def ws_url(live: LiveApp) -> str:
    return live.base_url.replace("http://", "ws://") + "/v1/scailink/ws"


async def test_reference_client_end_to_end(live: LiveApp, token: TokenFactory) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    client = DesktopClient(ws_url(live), tok, STDIO_SERVER, device_name="Ada Laptop", device="dev-e2e")
    async with anyio.create_task_group() as tg:
        tg.start_soon(client.run)
        with anyio.fail_after(30):
            await client.connected.wait()
        session = live.parts.desktop.sessions[client.session_id or ""]
        ns = session.namespace
        async with mcp_client(live.mcp_url, tok) as s:
            names = {t.name for t in await list_all_tools(s)}
            assert {f"{ns}.echo", f"{ns}.add", f"{ns}.whoami"} <= names
            result = await s.call_tool(f"{ns}.add", {"a": 2, "b": 3})
            assert result.content[0].text == "5" and not result.is_error  # type: ignore[union-attr]
            who = await s.call_tool(f"{ns}.whoami", {})
            assert who.content[0].text.startswith("pid ")  # type: ignore[union-attr]
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as c:
            resp = await c.post(
                f"/v1/modules/scailink/users/u1/tools/{ns}.echo/invoke",
                json={"arguments": {"text": "via rest"}},
                headers=auth_headers(tok),
            )
            assert resp.status_code == 200 and resp.json()["data"]["content"][0]["text"] == "via rest"
        async with mcp_client(live.mcp_url, token("u2", "t1", ("tenant_user",))) as s:
            assert not any(n.startswith("desktop.u1.") for n in {t.name for t in await list_all_tools(s)})
        # a network drop: the client reconnects and resumes the same session
        first = client.session_id
        if session.close is not None:
            await session.close(1001, "going away")
        with anyio.fail_after(30):
            while client.session_id != first or not client.connected.is_set():  # noqa: ASYNC110
                await anyio.sleep(0.05)
            while live.parts.desktop.sessions[first or ""].send is None:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        await client.stop()
        tg.cancel_scope.cancel()


async def test_fatal_close_stops_the_client(
    settings_factory: Callable[..., Settings], token: TokenFactory
) -> None:
    with LiveApp(settings_factory()) as live:
        client = DesktopClient(ws_url(live), "not-a-token", STDIO_SERVER, device_name="x", device="dev-bad")
        with anyio.fail_after(30), pytest.raises(FatalClose) as err:
            await client.run()
        assert err.value.code == 4001


def test_cli_entry(tmp_path: Path) -> None:
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": STDIO_SERVER}))
    proc = subprocess.run(
        [sys.executable, "-m", "scailink_mcp.cli", "desktop", "--server", "ws://127.0.0.1:9/v1/scailink/ws",
         "--token", "x", "--config", str(config), "--state-dir", str(tmp_path), "--help"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0 and "--auto-approve" in proc.stdout


async def test_consent_through_the_client(live: LiveApp, token: TokenFactory) -> None:
    """A `confirm` remote server asks the user's connected desktop; the client's prompter answers."""
    from tests.test_mcp_gateway import register
    from tests.upstream import UpstreamServer

    tok = token("u1", "t1", ("tenant_user",))
    asked: list[str] = []

    async def prompter(tool: str, arguments: Any) -> tuple[str, str]:
        asked.append(tool)
        return ("approved" if len(asked) == 1 else "denied"), "once"

    client = DesktopClient(
        ws_url(live), tok, STDIO_SERVER, device_name="Ada", device="dev-consent", consent=prompter
    )
    with UpstreamServer() as upstream:
        server = await register(live, tok, name="guarded", endpoint_url=upstream.url, consent_tier="confirm")
        tool = f"remote.u1.{server['slug']}.echo"
        async with anyio.create_task_group() as tg:
            tg.start_soon(client.run)
            with anyio.fail_after(30):
                await client.connected.wait()
            async with mcp_client(live.mcp_url, tok) as s:
                approved = await s.call_tool(tool, {"text": "yes"})
                denied = await s.call_tool(tool, {"text": "no"})
            await client.stop()
            tg.cancel_scope.cancel()
    assert not approved.is_error and approved.content[0].text == "yes"  # type: ignore[union-attr]
    assert denied.is_error and denied.meta["scailink/error"]["code"] == "SCAILINK_CONSENT_DENIED"  # type: ignore[index]
    assert asked == [tool, tool]
