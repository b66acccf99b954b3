"""The `mcp-proxy` peer (sparfenyuk/mcp-proxy 0.13.0), run from its own virtualenv by `python -m bench`.

`mcp-proxy` pins `mcp<2`, so it cannot share the repo's venv (SDK 2.x): it lives in
`bench/.peers/mcp-proxy`, created on request like the FastMCP peer.

It has no HTTP-to-HTTP mode: server mode exposes a *stdio* MCP server over SSE (`/sse`) and Streamable
HTTP (`/mcp`); client mode connects to a remote Streamable HTTP server and speaks stdio. To put a
Streamable HTTP front on the Streamable HTTP upstream (what ScaiLink does), the two are chained:
front (server mode) -> stdio -> child (client mode) -> upstream. See `MCP_PROXY_NOTE`.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

MCP_PROXY_PIN = "mcp-proxy==0.13.0"

STOP_SIGNAL = signal.SIGINT
"""Stops the front *and* its stdio child together (SIGTERM leaves the child orphaned for ~0.2 s)."""

MCP_PROXY_NOTE = (
    "`mcp_proxy` (`bench/mcp_proxy.py`, `mcp-proxy` 0.13.0 in its own virtualenv `bench/.peers/mcp-proxy`, "
    "it pins `mcp<2`): mcp-proxy has no HTTP-to-HTTP mode, so two of its processes are chained, a "
    "server-mode front (Streamable HTTP on /mcp, stateful, JSON responses) whose stdio child is a "
    "client-mode mcp-proxy connected to the upstream: one upstream session for all clients, opened at "
    "start (the upstream must be up first), plus one stdio hop per message"
)


def mcp_proxy_bin(peers_dir: Path, setup: bool) -> Path | None:
    """The `mcp-proxy` executable of `peers_dir/mcp-proxy`, created (venv + pinned install) if `setup`.

    A separate venv because the package pins `mcp<2` and the repo runs the 2.x SDK. Returns None when
    the venv is missing and `setup` is false, so the bench can skip the peer with a note.
    """
    venv = peers_dir / "mcp-proxy"
    binary = venv / "bin" / "mcp-proxy"
    if binary.exists():
        return binary
    if not setup:
        return None
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", MCP_PROXY_PIN]
        subprocess.run(pip, check=True)
    except subprocess.CalledProcessError as exc:
        print(f"mcp_proxy: could not be installed ({exc}); skipped", flush=True)
        return None
    return binary


def mcp_proxy_command(binary: Path, port: int, upstream: str) -> list[str]:
    """argv of the front: server mode on 127.0.0.1:`port` (`/mcp`), its stdio child in client mode.

    Everything after `--` is the stdio command the front spawns: the same binary in client mode,
    `--transport streamablehttp` (the default is SSE) to the upstream's `/mcp` URL. Both log at
    WARNING: at the default INFO the front's uvicorn writes an access-log line per request, which
    would be charged to the peer. The front is stateful (no `--stateless`), like the other peers.

    Stopping: the child runs in its own session (the mcp 1.x stdio client spawns it with
    `start_new_session=True`), so a killpg of the front's group would not reach it. On SIGTERM the
    front's uvicorn re-raises the signal after its shutdown, killing the front before its exit stack
    stops the child: the orphan exits on stdin EOF ~0.2 s later. SIGINT unwinds that stack instead,
    and the child is gone when the front is (`STOP_SIGNAL`).
    """
    return [
        str(binary),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "WARNING",
        "--",
        str(binary),
        "--transport",
        "streamablehttp",
        "--log-level",
        "WARNING",
        upstream,
    ]
