"""The reference desktop client (`scailink desktop`): local stdio MCP servers bridged to ScaiLink.

Owns: one WebSocket to `/v1/scailink/ws` at a time: `session_init` with the local catalog,
heartbeats, each server frame handed to the `FrameResponder` in its own task, `catalog_update` after
a local server's `tools/list_changed`. After a network drop or a 1001 it reconnects with
`resume_session_id` (bounded exponential backoff); after 4001/4002/4003/4009/4010 it stops and says
why.

Elsewhere: the local servers and their names in `local_servers.py`, the answers to the server's
frames in `client_frames.py`, the prompters in `consent_prompt.py`, the device id in `device.py`,
the command line in `client_cli.py` (`main` here stays the entry point `scailink_mcp.cli` calls).

Must not: import the server side of the bridge (it speaks only the wire protocol, so it doubles as
the reference for other clients); log the token or tool arguments.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, Literal, TextIO
from urllib.parse import urlsplit, urlunsplit

import anyio
from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from scailink_mcp import __version__
from scailink_mcp.desktop import protocol
from scailink_mcp.desktop.client_errors import FATAL_CLOSES, ConfigError, FatalClose
from scailink_mcp.desktop.client_frames import FrameResponder, SessionAck, answer_deadline_s, json_object
from scailink_mcp.desktop.consent_prompt import ConsentPrompter, auto_approve
from scailink_mcp.desktop.device import default_state_dir, load_device_id, platform_info
from scailink_mcp.desktop.local_servers import LocalServers, ServerSpec
from scailink_mcp.desktop.protocol import Close

# `answer_deadline_s`, `default_state_dir` and `load_device_id` lived here before the split.
__all__ = [
    "Backoff", "DesktopClient", "answer_deadline_s", "default_state_dir", "load_device_id", "main", "ws_url",
]  # fmt: skip

logger = logging.getLogger(__name__)

CLIENT_VERSION = f"scailink-desktop/{__version__}"
WS_PATH = "/v1/scailink/ws"
INIT_ID = 1
INIT_TIMEOUT_S = 30.0
MAX_INCOMING_BYTES = 16 * 1024 * 1024


def ws_url(server: str) -> str:
    """`--server` as the bridge URL: `http(s)` becomes `ws(s)`; a bare host gets `/v1/scailink/ws`."""
    parts = urlsplit(server)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise ConfigError(f"--server must be a ws://, wss://, http:// or https:// URL, not {server!r}")
    path = parts.path if parts.path not in ("", "/") else WS_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


_RANDOM = secrets.SystemRandom()


@dataclass(frozen=True)
class Backoff:
    """Delays between reconnect attempts: from `initial`, times `factor`, at most `maximum`, each with
    up to `jitter` more so devices dropped together by a server restart do not return in lockstep.
    The sequence starts again after a connection the server acknowledged."""

    initial: float = 0.5
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.2

    def delays(self, random: Callable[[], float] | None = None) -> Iterator[float]:
        random = random or _RANDOM.random
        delay = self.initial
        while True:
            yield min(self.maximum, delay * (1 + self.jitter * random()))
            delay = min(self.maximum, delay * self.factor)


# ---- the client -------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Live:
    """One acknowledged connection; `announced` is the tool catalog as the server knows it."""

    ws: ClientConnection
    announced: dict[str, dict[str, Any]]

    async def send(self, text: str) -> bool:
        try:
            await self.ws.send(text)
        except ConnectionClosed:
            return False  # the receive loop sees the close and ends this connection
        return True


@dataclass
class _Attempt:
    """What one connection attempt came to (never an exception: they cross task groups badly)."""

    ws: ClientConnection | None = None
    acked: bool = False
    fatal: FatalClose | None = None
    error: str | None = None


class DesktopClient:
    """Bridges the local servers of `servers` to ScaiLink at `url` until `stop()` or a fatal close.

    `url` may be the bridge URL or the http(s) base URL (`ws_url`); an unusable one is a ConfigError.
    """

    def __init__(
        self,
        url: str,
        token: str,
        servers: Mapping[str, ServerSpec],
        *,
        device_name: str,
        device_id: str,
        consent: ConsentPrompter = auto_approve,
        backoff: Backoff | None = None,
        audit_detail_level: Literal["off", "metadata"] = "metadata",
        errlog: TextIO | None = None,
    ) -> None:
        self.url = ws_url(url)
        self.token = token
        self.local = LocalServers(servers, errlog=errlog)
        self.responder = FrameResponder(self.local, consent)
        self.device_name = device_name.strip()[:128] or "desktop"
        self.device_id = device_id
        self.backoff = backoff or Backoff()
        self.audit_detail_level = audit_detail_level
        self.session_id: str | None = None  # the last acknowledged one: resumed on reconnect
        self.namespace: str | None = None  # where ScaiLink lists this device's tools
        self._connected = anyio.Event()
        self._stop = anyio.Event()
        self._live: _Live | None = None

    @property
    def connected(self) -> anyio.Event:
        """Set while a connection is acknowledged (a fresh event after each disconnect)."""
        return self._connected

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def stop(self) -> None:
        """Ends `run()`: `session_terminate` and a normal close when connected."""
        self._stop.set()

    async def run(self) -> None:
        """Start the local servers, then stay connected, reconnecting with resume after a drop.

        Returns after `stop()`. Raises `FatalClose` when ScaiLink refuses the device for good, and
        `ConfigError` when no local server starts.
        """
        fatal: FatalClose | None = None
        async with AsyncExitStack() as stack:
            await self.local.start(stack)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.local.refresh_tools, self._send_catalog_update)
                fatal = await self._connect_loop()
                tg.cancel_scope.cancel()
        if fatal is not None:
            raise fatal

    async def _send_catalog_update(self) -> None:
        """What changed since the server last heard (session_init or the last update), if anything."""
        live = self._live
        if live is None:
            return  # the next session_init carries the whole catalog
        current = dict(self.local.tools.wire)
        added = [wire for name, wire in current.items() if live.announced.get(name) != wire]
        removed = [name for name in live.announced if name not in current]
        if added or removed:
            live.announced = current
            await live.send(
                protocol.notification(protocol.CATALOG_UPDATE, {"added": added, "removed": removed})
            )

    # ---- the connection ---------------------------------------------------------------------------

    async def _connect_loop(self) -> FatalClose | None:
        delays = self.backoff.delays()
        while not self._stop.is_set():
            attempt = await self._attempt()
            if attempt.fatal is not None:
                logger.error(
                    "ScaiLink refused this device; not reconnecting", extra={"error": str(attempt.fatal)}
                )
                return attempt.fatal
            if attempt.acked:
                delays = self.backoff.delays()
            if self._stop.is_set():
                break
            delay = next(delays)
            logger.warning(
                "disconnected from ScaiLink; reconnecting",
                extra={"error": attempt.error, "retry_in_s": round(delay, 2), "session_id": self.session_id},
            )
            with anyio.move_on_after(delay):
                await self._stop.wait()
        return None

    async def _attempt(self) -> _Attempt:
        """One connection, from the upgrade to its close."""
        attempt = _Attempt()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._watch_stop, tg.cancel_scope)
            try:
                await self._connection(attempt)
            except FatalClose as exc:
                attempt.fatal = exc
            except InvalidStatus as exc:
                status = exc.response.status_code
                attempt.error = f"HTTP {status} on the WebSocket upgrade"
                if 400 <= status < 500 and status not in (408, 429):
                    attempt.fatal = FatalClose(status, "", f"HTTP {status} on the upgrade; check --server")
            except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
                attempt.error = repr(exc)
            tg.cancel_scope.cancel()
        ws = attempt.ws
        if attempt.fatal is None and ws is not None and ws.close_code is not None:
            attempt.error = attempt.error or f"closed {ws.close_code} {ws.close_reason or ''}".strip()
            if ws.close_code in FATAL_CLOSES:
                attempt.fatal = FatalClose(ws.close_code, ws.close_reason or "")
        return attempt

    async def _watch_stop(self, scope: anyio.CancelScope) -> None:
        await self._stop.wait()
        live = self._live
        if live is not None:
            with anyio.move_on_after(5):
                await live.send(protocol.notification(protocol.TERMINATE, {}))
                await live.ws.close()  # ends the receive loop
        scope.cancel()

    async def _connection(self, attempt: _Attempt) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        async with connect(
            self.url,
            additional_headers=headers,
            max_size=MAX_INCOMING_BYTES,
            user_agent_header=CLIENT_VERSION,
        ) as ws:
            attempt.ws = ws
            announced = dict(self.local.tools.wire)
            with anyio.fail_after(INIT_TIMEOUT_S):
                await ws.send(self._init_frame())
                ack = await self._receive_ack(ws)
            attempt.acked = True
            self._accepted(ack)
            live = self._live = _Live(ws, announced)
            self._connected.set()
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._heartbeats, live, ack.heartbeat_interval_ms / 2000)
                    await self._send_catalog_update()  # changes that arrived during the handshake
                    try:
                        async for raw in ws:
                            tg.start_soon(self.responder.handle, raw, live.send)
                    except ConnectionClosed:
                        pass
                    tg.cancel_scope.cancel()  # calls in flight: the server has failed them already
            finally:
                self._live = None
                self._connected = anyio.Event()

    def _init_frame(self) -> str:
        params = {
            "protocol_version": protocol.PROTOCOL_VERSIONS[0],
            "client_version": CLIENT_VERSION,
            "device_name": self.device_name,
            "device_id": self.device_id,
            "platform": platform_info(),
            "capabilities": self.local.capabilities(),
            "audit_detail_level": self.audit_detail_level,
            "resume_session_id": self.session_id,
        }
        return json.dumps({"jsonrpc": "2.0", "id": INIT_ID, "method": protocol.INIT, "params": params})

    async def _receive_ack(self, ws: ClientConnection) -> SessionAck:
        while True:
            message = json_object(await ws.recv())
            if message is None or message.get("id") != INIT_ID or "method" in message:
                continue  # nothing else is expected before the ack; the server closes on real trouble
            if "error" in message:
                raise FatalClose(Close.BAD_INIT, str(message["error"])[:200])
            try:
                return SessionAck.model_validate(message.get("result"))
            except ValidationError as exc:
                reason = protocol.first_error_field(exc)
                raise FatalClose(Close.BAD_INIT, reason, "the session_init_ack is not understood") from None

    def _accepted(self, ack: SessionAck) -> None:
        resumed = ack.session_id == self.session_id
        self.session_id, self.namespace = ack.session_id, ack.namespace
        for item in ack.rejected:
            logger.warning("ScaiLink rejected an item", extra={"rejected": json.dumps(item)[:300]})
        logger.info(
            "connected to ScaiLink",
            extra={"session_id": ack.session_id, "resumed": resumed, "namespace": ack.namespace},
        )

    async def _heartbeats(self, live: _Live, interval_s: float) -> None:
        while True:
            if not await live.send(protocol.notification(protocol.HEARTBEAT, {})):
                return
            await anyio.sleep(max(0.05, interval_s))


def main(argv: Sequence[str] | None = None) -> int:
    """`scailink desktop ...` (see `client_cli.main`), imported on use: the CLI module imports this one."""
    from scailink_mcp.desktop.client_cli import main as cli_main

    return cli_main(argv)
