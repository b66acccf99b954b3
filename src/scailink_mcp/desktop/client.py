"""The reference desktop client (`scailink desktop`): local stdio MCP servers bridged to ScaiLink.

Owns: one WebSocket to `/v1/scailink/ws` at a time: `session_init` with the local catalog,
heartbeats, `tool_invoke` / `resource_read` / `prompt_get` each answered in its own task within its
`timeout_ms`, `consent_request` put to the `ConsentPrompter`, `catalog_update` after a local server's
`tools/list_changed`. After a network drop or a 1001 it reconnects with `resume_session_id`
(bounded exponential backoff); after 4001/4002/4003/4009/4010 it stops and says why. Also the device
id (a random id kept in the state dir) and the `scailink desktop` command (`main`).

The local servers and their names live in `local_servers.py`, the prompters in `consent_prompt.py`.

Must not: import the server side of the bridge (it speaks only the wire protocol, so it doubles as
the reference for other clients); log the token or tool arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import secrets
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
from mcp.shared.exceptions import MCPError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from scailink_mcp import __version__
from scailink_mcp.desktop import protocol
from scailink_mcp.desktop.client_errors import FATAL_CLOSES, ConfigError, DesktopClientError, FatalClose
from scailink_mcp.desktop.consent_prompt import (
    ConsentPrompter,
    Decision,
    Remember,
    TerminalConsent,
    auto_approve,
)
from scailink_mcp.desktop.local_servers import LocalServers, ServerSpec, UnknownItem, load_config
from scailink_mcp.desktop.protocol import Close

logger = logging.getLogger(__name__)

CLIENT_VERSION = f"scailink-desktop/{__version__}"
WS_PATH = "/v1/scailink/ws"
INIT_ID = 1
INIT_TIMEOUT_S = 30.0
MAX_FRAME_BYTES = 1024 * 1024  # the bridge closes 1009 above this: a bigger answer becomes an error
MAX_INCOMING_BYTES = 16 * 1024 * 1024

# JSON-RPC error codes of the answers to the server's requests (-32000..-32003: the local side's).
TOOL_FAILED = -32000
TOOL_TIMEOUT = -32001
NOT_FOUND = -32002
TOO_LARGE = -32003
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602


def ws_url(server: str) -> str:
    """`--server` as the bridge URL: `http(s)` becomes `ws(s)`; a bare host gets `/v1/scailink/ws`."""
    parts = urlsplit(server)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise ConfigError(f"--server must be a ws://, wss://, http:// or https:// URL, not {server!r}")
    path = parts.path if parts.path not in ("", "/") else WS_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def default_state_dir(system: str, environ: Mapping[str, str], home: Path) -> Path:
    """The per-user config dir for `platform.system()`; `environ` is read only for its location."""
    if system == "Windows" and environ.get("APPDATA"):
        return Path(environ["APPDATA"]) / "ScaiLink"
    if system == "Darwin":
        return home / "Library" / "Application Support" / "ScaiLink"
    xdg = environ.get("XDG_CONFIG_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else home / ".config") / "scailink"


_DEVICE_ID = re.compile(r"^[A-Za-z0-9_-]{8,128}$")


def load_device_id(state_dir: Path) -> str:
    """A random id made once per install and kept in `state_dir/device_id` (remade if unusable)."""
    path = state_dir / "device_id"
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        value = ""
    if _DEVICE_ID.match(value):
        return value
    value = "dev_" + secrets.token_urlsafe(18)
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("device_id.tmp")
    tmp.write_text(value + "\n", encoding="utf-8")
    os.replace(tmp, path)  # a crash mid-write leaves the old file or the new one, never half of one
    return value


def platform_info() -> dict[str, str]:
    return {
        "os": platform.system().lower() or "unknown",
        "arch": platform.machine() or "unknown",
        "version": platform.release() or "unknown",
    }


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


def answer_deadline_s(timeout_ms: int) -> float:
    """How long a local call may take: a little less than the caller's timeout, so the answer (or the
    timeout error) arrives while ScaiLink still waits for it rather than after it gave up."""
    timeout = timeout_ms / 1000
    return max(0.05, timeout - min(1.0, timeout * 0.1))


# ---- wire shapes of what the server sends ---------------------------------------------------------


class _Params(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SessionAck(_Params):
    session_id: str = Field(min_length=1)
    heartbeat_interval_ms: int = Field(default=30000, gt=0)
    grace_period_ms: int = 120000
    rejected: list[Any] = Field(default_factory=list)
    namespace: str | None = None


class _Call(_Params):
    invocation_id: str | None = None
    timeout_ms: int = Field(default=60000, gt=0)


class ToolInvoke(_Call):
    tool: str
    arguments: dict[str, Any] | None = None


class ResourceRead(_Call):
    uri: str


class PromptGet(_Call):
    name: str
    arguments: dict[str, str] | None = None


class ConsentRequest(_Params):
    consent_id: str
    tool: str
    arguments: Any = None
    expires_ms: int | None = Field(default=None, gt=0)


C = TypeVar("C", bound=_Call)


def _json_object(raw: str | bytes) -> dict[str, Any] | None:
    try:
        message = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return message if isinstance(message, dict) else None


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
        self.device_name = device_name.strip()[:128] or "desktop"
        self.device_id = device_id
        self.consent = consent
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
                            tg.start_soon(self._dispatch, live, raw)
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
            message = _json_object(await ws.recv())
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

    # ---- frames from the server -------------------------------------------------------------------

    async def _dispatch(self, live: _Live, raw: str | bytes) -> None:
        """One frame, in its own task: a slow tool never holds up heartbeats or other calls."""
        message = _json_object(raw)
        if message is None:
            logger.warning("ignored a frame that is not a JSON object")
            return
        method, params = message.get("method"), message.get("params") or {}
        if "id" not in message:
            if method == protocol.CONSENT_REQUEST:
                await self._consent(live, params)
            elif method == protocol.POLICY_UPDATE:
                logger.info("policy update from ScaiLink", extra={"policy": json.dumps(params)[:500]})
            return  # other notifications: nothing to do
        request_id = message["id"]
        if method is None:
            return  # a response: this client sends no requests after session_init
        if method == protocol.TOOL_INVOKE:
            reply = await self._answer(request_id, ToolInvoke, params, self._call_tool)
        elif method == protocol.RESOURCE_READ:
            reply = await self._answer(request_id, ResourceRead, params, self._read_resource)
        elif method == protocol.PROMPT_GET:
            reply = await self._answer(request_id, PromptGet, params, self._get_prompt)
        else:
            reply = protocol.error(request_id, METHOD_NOT_FOUND, f"unknown method {str(method)[:60]!r}")
        if len(reply) > MAX_FRAME_BYTES // 4 and len(reply.encode()) > MAX_FRAME_BYTES:
            reply = protocol.error(
                request_id, TOO_LARGE, f"the answer is over the {MAX_FRAME_BYTES}-byte frame limit"
            )
        await live.send(reply)

    async def _answer(
        self, request_id: Any, shape: type[C], params: Any, call: Callable[[C], Awaitable[BaseModel]]
    ) -> str:
        try:
            request = shape.model_validate(params)
        except ValidationError as exc:
            return protocol.error(
                request_id, INVALID_PARAMS, f"invalid params: {protocol.first_error_field(exc)}"
            )
        deadline = answer_deadline_s(request.timeout_ms)
        try:
            with anyio.fail_after(deadline):
                result = await call(request)
        except UnknownItem as exc:
            return protocol.error(request_id, NOT_FOUND, str(exc))
        except TimeoutError:
            return protocol.error(
                request_id, TOOL_TIMEOUT, f"the local server did not answer within {deadline:g} s"
            )
        except MCPError as exc:
            return protocol.error(request_id, TOOL_FAILED, f"the local server answered: {exc.message[:200]}")
        except Exception as exc:
            logger.warning("a local call failed", extra={"error": repr(exc)})
            return protocol.error(request_id, TOOL_FAILED, f"the local server failed ({type(exc).__name__})")
        return protocol.result(request_id, result.model_dump(by_alias=True, exclude_none=True, mode="json"))

    async def _call_tool(self, request: ToolInvoke) -> BaseModel:
        return await self.local.call_tool(request.tool, request.arguments)

    async def _read_resource(self, request: ResourceRead) -> BaseModel:
        return await self.local.read_resource(request.uri)

    async def _get_prompt(self, request: PromptGet) -> BaseModel:
        return await self.local.get_prompt(request.name, request.arguments)

    async def _consent(self, live: _Live, params: Any) -> None:
        try:
            request = ConsentRequest.model_validate(params)
        except ValidationError as exc:
            logger.warning(
                "ignored a malformed consent_request", extra={"error": protocol.first_error_field(exc)}
            )
            return
        decision: Decision = "denied"
        remember: Remember = "once"
        with anyio.move_on_after(request.expires_ms / 1000 if request.expires_ms else None) as scope:
            try:
                decision, remember = await self.consent(request.tool, request.arguments)
            except Exception as exc:
                logger.warning("the consent prompter failed: denied", extra={"error": repr(exc)})
        if scope.cancelled_caught:
            logger.info("a consent request expired unanswered", extra={"tool": request.tool})
            return  # the server has already counted the silence as a denial
        if decision != "approved":
            decision, remember = "denied", "once"
        response = {
            "consent_id": request.consent_id,
            "decision": decision,
            "remember": remember if remember in ("once", "session") else "once",
        }
        await live.send(protocol.notification(protocol.CONSENT_RESPONSE, response))


# ---- the command ------------------------------------------------------------------------------------


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
