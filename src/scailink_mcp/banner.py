"""What `scailink dev` prints at start: where everything is, the dev admin token, a one-time dashboard
sign-in link and client configurations ready to paste (an `mcpServers` entry; the MCP Inspector CLI).

Pure: builds text from what it is given; the CLI prints it. The token appears here on purpose (it is
the dev admin's, on the developer's own terminal); nothing else ever prints one.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass


@dataclass(frozen=True)
class DemoInfo:
    url: str
    tools: tuple[str, ...]  # public (namespaced) names in the dev admin's catalog
    status: str


def ws_url(base: str) -> str:
    if base.startswith("https://"):
        return "wss://" + base.removeprefix("https://") + "/v1/scailink/ws"
    return "ws://" + base.removeprefix("http://") + "/v1/scailink/ws"


def mcp_servers_entry(mcp_url: str, token: str) -> str:
    """The `mcpServers` JSON of Claude Code, Cursor, VS Code and most clients for a remote HTTP server."""
    entry = {
        "mcpServers": {
            "scailink": {"type": "http", "url": mcp_url, "headers": {"Authorization": f"Bearer {token}"}}
        }
    }
    return json.dumps(entry, indent=2)


def inspector_command(mcp_url: str, token: str) -> str:
    """`npx @modelcontextprotocol/inspector --cli URL --transport http --method tools/list --header ...`."""
    return shlex.join(
        [
            "npx",
            "@modelcontextprotocol/inspector",
            "--cli",
            mcp_url,
            "--transport",
            "http",
            "--method",
            "tools/list",
            "--header",
            f"Authorization: Bearer {token}",
        ]
    )


def dev_banner(
    *,
    base: str,
    database: str,
    token: str,
    token_file: str,
    sign_in_url: str,
    ticket_minutes: int,
    demo: DemoInfo | None,
) -> str:
    mcp_url = f"{base}/mcp"
    lines = [
        "",
        f"ScaiLink MCP (dev) on {base}",
        f"  MCP        {mcp_url}   (Streamable HTTP; legacy SSE at {base}/sse)",
        f"  dashboard  {sign_in_url}",
        f"             (a one-time sign-in link, valid {ticket_minutes} min; then sign in with the token)",
        f"  desktop    {ws_url(base)}",
        f"  REST       {base}/v1/modules/scailink/remote-servers",
        f"  OpenAPI    {base}/v1/modules/scailink/openapi.json",
        f"  health     {base}/healthz",
        f"  database   {database}",
    ]
    if demo is not None:
        lines += [
            "",
            f"Demo MCP server on {demo.url}, registered as your personal server 'demo' ({demo.status}):",
            *[f"  {name}" for name in demo.tools],
        ]
    lines += [
        "",
        f"Dev admin token (user dev-admin, tenant dev, tenant_admin; 12 h; also in {token_file}):",
        token,
        "",
        "MCP client configuration (mcpServers):",
        mcp_servers_entry(mcp_url, token),
        "",
        "MCP Inspector (CLI):",
        f"  {inspector_command(mcp_url, token)}",
        "",
        "REST:",
        f'  curl -s -H "Authorization: Bearer $(cat {token_file})" {base}/v1/modules/scailink/remote-servers',
        "",
    ]
    return "\n".join(lines)
