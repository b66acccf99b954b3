"""The reference desktop client: bridges local stdio MCP servers to ScaiLink over the WebSocket.

`scailink desktop --server URL --token T --config mcpServers.json` starts each local server of the
`mcpServers` config (the shape desktop MCP hosts use) with the SDK's stdio client, registers their
tools, answers `scailink/tool_invoke` by calling them, asks the person at the terminal for consent,
sends heartbeats, and reconnects with `resume_session_id` after a network drop or a 1001.

Tool names: with one local server its tools keep their names; with several, each is prefixed
`{server}__{tool}` so names cannot clash. The device id is a random id kept in `--state-dir`.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import mcp_types as types
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from scailink_mcp.desktop import protocol
from scailink_mcp.desktop.protocol import Close

logger = logging.getLogger(__name__)

CLIENT_VERSION = "scailink-desktop/0.1.0"
FATAL = {Close.UNAUTHORIZED, Close.BAD_INIT, Close.PROTOCOL, Close.TOO_MANY, Close.REPLACED}
# (tool, arguments) -> (decision, remember)
ConsentPrompter = Callable[[str, Any], Awaitable[tuple[str, str]]]


class FatalClose(Exception):
    """The server closed with a code after which reconnecting cannot help."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"closed by ScaiLink: {code} {reason}")
        self.code = code


@dataclass
class LocalTool:
    session: ClientSession
    name: str
    wire: dict[str, Any]


async def terminal_consent(tool: str, arguments: Any) -> tuple[str, str]:
    """Asks the person at the terminal (stdin is read in a thread: the event loop keeps running)."""
    prompt = f"\nAllow tool {tool} with {json.dumps(arguments)[:500]}? [y]es / [n]o / [s]ession: "
    answer = (await anyio.to_thread.run_sync(input, prompt)).strip().lower()
    if answer in ("s", "session"):
        return "approved", "session"
    return ("approved" if answer in ("y", "yes") else "denied"), "once"


async def auto_approve(tool: str, arguments: Any) -> tuple[str, str]:
    return "approved", "once"


def device_id(state_dir: Path) -> str:
    path = state_dir / "device_id"
    if path.exists():
        return path.read_text().strip()
    state_dir.mkdir(parents=True, exist_ok=True)
    value = uuid.uuid4().hex
    path.write_text(value)
    return value


class DesktopClient:
    def __init__(
        self,
        url: str,
        token: str,
        servers: dict[str, dict[str, Any]],
        *,
        device_name: str,
        device: str,
        consent: ConsentPrompter = terminal_consent,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.url = url
        self.token = token
        self.servers = servers
        self.device_name = device_name
        self.device = device
        self.consent = consent
        self.max_backoff_s = max_backoff_s
        self.tools: dict[str, LocalTool] = {}
        self.session_id: str | None = None
        self.connected = anyio.Event()
        self._stop = anyio.Event()

    async def _start_local(self, stack: AsyncExitStack) -> None:
        prefix = len(self.servers) > 1
        for name, spec in self.servers.items():
            params = StdioServerParameters(
                command=spec["command"],
                args=list(spec.get("args", [])),
                env=spec.get("env"),
                cwd=spec.get("cwd"),
            )
            read, write = await stack.enter_async_context(stdio_client(params))
            session = await stack.enter_async_context(ClientSession(read, write))
            await session.initialize()
            cursor: str | None = None
            while True:
                page = await session.list_tools(
                    params=types.PaginatedRequestParams(cursor=cursor) if cursor else None
                )
                for tool in page.tools:
                    public = f"{name}__{tool.name}" if prefix else tool.name
                    wire = tool.model_dump(by_alias=True, exclude_none=True, mode="json")
                    wire["name"] = public
                    self.tools[public] = LocalTool(session, tool.name, wire)
                cursor = page.next_cursor
                if not cursor:
                    break

    def _init_frame(self) -> str:
        params = {
            "protocol_version": protocol.PROTOCOL_VERSIONS[0],
            "client_version": CLIENT_VERSION,
            "device_name": self.device_name,
            "device_id": self.device,
            "platform": {"os": platform.system().lower() or "unknown", "arch": platform.machine() or None},
            "capabilities": {"tools": [t.wire for t in self.tools.values()], "resources": [], "prompts": []},
            "audit_detail_level": "metadata",
            "resume_session_id": self.session_id,
        }
        return json.dumps({"jsonrpc": "2.0", "id": 1, "method": protocol.INIT, "params": params})

    async def run(self) -> None:
        """Connect, serve, reconnect with resume until stopped or closed with a fatal code."""
        try:
            await self._run()
        except BaseExceptionGroup as group:  # the stdio clients' task groups wrap what escapes
            fatal = group.subgroup(FatalClose)
            if fatal is not None:
                leaf: BaseException = fatal
                while isinstance(leaf, BaseExceptionGroup):
                    leaf = leaf.exceptions[0]
                raise leaf from None
            raise

    async def _run(self) -> None:
        async with AsyncExitStack() as stack:
            await self._start_local(stack)
            backoff = 0.5
            while not self._stop.is_set():
                try:
                    await self._connection()
                    backoff = 0.5
                except FatalClose:
                    raise
                except (OSError, ConnectionClosed, TimeoutError) as exc:
                    logger.warning("disconnected from ScaiLink", extra={"error": type(exc).__name__})
                if self._stop.is_set():
                    return
                with anyio.move_on_after(backoff):
                    await self._stop.wait()
                backoff = min(backoff * 2, self.max_backoff_s)

    async def stop(self) -> None:
        self._stop.set()

    async def _connection(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with connect(self.url, additional_headers=headers, max_size=protocol_max()) as ws:
            try:
                await ws.send(self._init_frame())
                ack = json.loads(await ws.recv())
                if "result" not in ack:
                    raise FatalClose(Close.BAD_INIT, str(ack.get("error")))
                self.session_id = ack["result"]["session_id"]
                interval = ack["result"].get("heartbeat_interval_ms", 30000) / 1000
                self.connected.set()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._heartbeats, ws, interval)
                    tg.start_soon(self._watch_stop, ws)
                    async for raw in ws:
                        tg.start_soon(self._handle, ws, raw)
                    tg.cancel_scope.cancel()
            except* ConnectionClosed:
                pass
            finally:
                self.connected = anyio.Event()
        if ws.close_code in FATAL:
            raise FatalClose(ws.close_code or 0, ws.close_reason or "")

    async def _watch_stop(self, ws: ClientConnection) -> None:
        await self._stop.wait()
        await ws.send(protocol.notification(protocol.TERMINATE, {}))
        await ws.close()

    async def _heartbeats(self, ws: ClientConnection, interval: float) -> None:
        while True:
            await anyio.sleep(max(0.05, interval / 2))
            await ws.send(protocol.notification(protocol.HEARTBEAT, {}))

    async def _handle(self, ws: ClientConnection, raw: str | bytes) -> None:
        message = json.loads(raw)
        method, params = message.get("method"), message.get("params") or {}
        if method == protocol.TOOL_INVOKE:
            await ws.send(await self._invoke(message.get("id"), params))
        elif method == protocol.CONSENT_REQUEST:
            decision, remember = await self.consent(params.get("tool", ""), params.get("arguments"))
            response = {"consent_id": params.get("consent_id"), "decision": decision, "remember": remember}
            await ws.send(protocol.notification(protocol.CONSENT_RESPONSE, response))
        elif method in (protocol.RESOURCE_READ, protocol.PROMPT_GET) and "id" in message:
            await ws.send(protocol.error(message["id"], -32601, "not supported by this client"))
        elif method == protocol.POLICY_UPDATE:
            logger.info("policy update", extra={"policy": json.dumps(params)[:500]})

    async def _invoke(self, request_id: Any, params: dict[str, Any]) -> str:
        tool = self.tools.get(params.get("tool", ""))
        if tool is None:
            return protocol.error(request_id, -32001, f"unknown tool {params.get('tool')!r}")
        timeout = max(0.1, params.get("timeout_ms", 60000) / 1000)
        try:
            with anyio.fail_after(timeout):
                result = await tool.session.call_tool(tool.name, params.get("arguments") or {})
        except TimeoutError:
            return protocol.error(request_id, -32002, "the local tool timed out")
        except Exception as exc:
            return protocol.error(request_id, -32000, f"the local tool failed: {type(exc).__name__}")
        return protocol.result(request_id, result.model_dump(by_alias=True, exclude_none=True, mode="json"))


def protocol_max() -> int:
    return 1024 * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scailink desktop", description="bridge local MCP servers to ScaiLink"
    )
    parser.add_argument("--server", required=True, help="ws(s)://HOST:PORT/v1/scailink/ws")
    parser.add_argument("--token", required=True)
    parser.add_argument("--config", required=True, type=Path, help="an mcpServers JSON file")
    parser.add_argument("--device-name", default=platform.node() or "desktop")
    parser.add_argument("--state-dir", type=Path, default=Path.home() / ".config" / "scailink")
    parser.add_argument(
        "--auto-approve", action="store_true", help="approve every consent request (tests only)"
    )
    args = parser.parse_args(argv)
    servers = json.loads(args.config.read_text()).get("mcpServers", {})
    client = DesktopClient(
        args.server,
        args.token,
        servers,
        device_name=args.device_name,
        device=device_id(args.state_dir),
        consent=auto_approve if args.auto_approve else terminal_consent,
    )
    try:
        anyio.run(client.run)
    except FatalClose as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
