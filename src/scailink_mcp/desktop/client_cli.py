"""`scailink desktop`: the command line of the reference desktop client.

Owns: the options, reading the token (from `--token` or `--token-file`), building a `DesktopClient`
with this machine's device id, running it until Ctrl-C/SIGTERM, and the exit codes: 0 after a
signal, 1 when ScaiLink refuses the device, 2 on bad input.

Must not: print the token; everything about the connection belongs to `client.py`.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import anyio

from scailink_mcp.desktop.client import DesktopClient
from scailink_mcp.desktop.client_errors import ConfigError, DesktopClientError
from scailink_mcp.desktop.consent_prompt import TerminalConsent, auto_approve
from scailink_mcp.desktop.device import default_state_dir, load_device_id
from scailink_mcp.desktop.local_servers import load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scailink desktop",
        description="Bridge the local MCP servers of an mcpServers config to ScaiLink.",
    )
    parser.add_argument(
        "--server", required=True, help="ws(s)://HOST[:PORT]/v1/scailink/ws, or the http(s) base URL"
    )
    token = parser.add_mutually_exclusive_group(required=True)
    token.add_argument("--token", help="a JWT with scailink:view and scailink:invoke")
    token.add_argument(
        "--token-file", type=Path, help="a file holding the JWT (keeps it out of the process list)"
    )
    parser.add_argument("--config", required=True, type=Path, help="an mcpServers JSON file")
    parser.add_argument(
        "--device-name", default=platform.node() or "desktop", help="how ScaiLink shows this device"
    )
    parser.add_argument(
        "--state-dir", type=Path, help="where the device id is kept (default: the user config dir)"
    )
    parser.add_argument("--auto-approve", action="store_true", help="approve every consent request unasked")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """`scailink desktop ...`: 0 after Ctrl-C/SIGTERM, 1 when ScaiLink refuses the device, 2 on bad input."""
    args = build_parser().parse_args(argv)
    try:
        servers = load_config(args.config)
        token = args.token or _read_token(args.token_file)
        state_dir = args.state_dir or default_state_dir(platform.system(), os.environ, Path.home())
        client = DesktopClient(
            args.server,
            token,
            servers,
            device_name=args.device_name,
            device_id=load_device_id(state_dir),
            consent=auto_approve if args.auto_approve else TerminalConsent(),
        )
    except (ConfigError, OSError) as exc:
        print(f"scailink desktop: {exc}", file=sys.stderr)
        return 2
    error = anyio.run(_run_until_signal, client)
    if error is not None:
        print(f"scailink desktop: {error}", file=sys.stderr)
        return 2 if isinstance(error, ConfigError) else 1
    return 0


def _read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if not token:
        raise ConfigError(f"{path} is empty")
    return token


async def _run_until_signal(client: DesktopClient) -> DesktopClientError | None:
    error: DesktopClientError | None = None
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signals, client, tg.cancel_scope)
        try:
            await client.run()
        except DesktopClientError as exc:
            error = exc
        tg.cancel_scope.cancel()
    return error


async def _stop_on_signals(client: DesktopClient, scope: anyio.CancelScope) -> None:
    """The first Ctrl-C/SIGTERM ends the session cleanly; a second one stops waiting for that."""
    try:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                if client.stopping:
                    scope.cancel()
                    return
                await client.stop()
    except NotImplementedError:  # Windows: Ctrl-C arrives as KeyboardInterrupt instead
        await anyio.sleep_forever()
