"""`scailink dev` from a fresh data dir: the printed banner (the /mcp URL, the dashboard's one-time
sign-in link, the desktop WebSocket URL, an `mcpServers` entry, the MCP Inspector command), the
built-in demo server (its tools listed and called through /mcp with the printed token), human-readable
logs without alembic's chatter, and `--no-demo`."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import anyio
import httpx

from tests.dashboard_client import csrf_of
from tests.test_cli import dev_server
from tests.test_mcp_gateway import list_all_tools, mcp_client


def read_banner(proc: subprocess.Popen[str]) -> str:
    """The banner is printed before the server starts, so it is all there once /healthz answers."""
    assert proc.stdout is not None
    lines: list[str] = []
    while not lines or not lines[-1].startswith("  curl "):
        line = proc.stdout.readline()
        assert line, "the banner ended early: " + "".join(lines)
        lines.append(line)
    return "".join(lines)


async def list_and_call(mcp_url: str, token: str) -> tuple[list[str], str]:
    async with mcp_client(mcp_url, token) as session:
        names = [t.name for t in await list_all_tools(session)]
        add = next(n for n in names if n.endswith(".add"))
        result = await session.call_tool(add, {"a": 20, "b": 22})
        assert not result.is_error
        text = result.content[0].text  # type: ignore[union-attr]
        return names, text


def test_dev_banner_demo_server_and_sign_in_link(tmp_path: Path) -> None:
    with dev_server(tmp_path / "data") as (base, token, proc):
        banner = read_banner(proc)
        mcp_url = re.search(r"^  MCP\s+(\S+)", banner, re.M).group(1)  # type: ignore[union-attr]
        assert mcp_url == f"{base}/mcp"
        assert f"  desktop    {base.replace('http://', 'ws://')}/v1/scailink/ws" in banner
        assert token in banner.split("Dev admin token")[1].splitlines()[1]
        config = banner.split("MCP client configuration (mcpServers):\n")[1].split("\n\n")[0]
        entry = json.loads(config)["mcpServers"]["scailink"]
        assert entry == {"type": "http", "url": mcp_url, "headers": {"Authorization": f"Bearer {token}"}}
        inspector = (
            f"npx @modelcontextprotocol/inspector --cli {mcp_url} --transport http --method tools/list"
        )
        assert f"{inspector} --header 'Authorization: Bearer {token}'" in banner
        assert re.search(r"demo-[0-9a-f]{6}\.time_now", banner) and "(active)" in banner

        # the printed URL and token list the demo tools, and a call succeeds
        names, text = anyio.run(list_and_call, mcp_url, token)
        assert {n.rsplit(".", 1)[1] for n in names} >= {"echo", "add", "time_now"}
        assert text == "42"

        # the one-time sign-in link opens the dashboard once
        link = re.search(r"^  dashboard\s+(\S+)", banner, re.M).group(1)  # type: ignore[union-attr]
        assert link.startswith(f"{base}/dashboard/login?ticket=") and token not in link
        with httpx.Client(base_url=base) as browser:
            page = browser.get(link)
            ticket = link.split("ticket=")[1]
            form = {"csrf_token": csrf_of(page.text), "ticket": ticket, "next": "/dashboard/"}
            assert browser.post("/dashboard/login", data=form).status_code == 303
            assert "demo" in browser.get("/dashboard/servers").text
        with httpx.Client(base_url=base) as stranger:
            page = stranger.get(link)
            form["csrf_token"] = csrf_of(page.text)
            assert stranger.post("/dashboard/login", data=form).status_code == 401
    rest = proc.stdout.read() if proc.stdout else ""
    assert "alembic" not in banner + rest and "Context impl" not in banner + rest
    assert not any(line.startswith('{"ts"') for line in (banner + rest).splitlines())  # human lines
    assert re.search(r"^\d\d:\d\d:\d\d INFO ", rest, re.M)

    # a second start reuses the data dir and re-points the demo (a new port); --no-demo has none
    with dev_server(tmp_path / "data") as (base, token, proc):
        banner = read_banner(proc)
        assert "(active)" in banner


def test_dev_without_demo(tmp_path: Path) -> None:
    with dev_server(tmp_path / "data", "--no-demo") as (base, token, proc):
        banner = read_banner(proc)
        assert "Demo MCP server" not in banner
        servers = httpx.get(
            f"{base}/v1/modules/scailink/remote-servers", headers={"Authorization": f"Bearer {token}"}
        )
        assert servers.json()["data"]["items"] == []
