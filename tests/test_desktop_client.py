"""The reference desktop client (`scailink desktop`).

Most tests run the real client against `FakeScaiLink`: a minimal WebSocket server on 127.0.0.1 (the
`websockets` library) on which the test itself plays ScaiLink's side of SPEC section 4 frame by frame:
it acks `session_init`, sends `tool_invoke` / `consent_request` / closes, and checks what comes back.
The local MCP servers are real: `tests/stdio_server.py`, started by the client from its config. Two
tests at the end run the client against ScaiLink itself. Pure pieces (config, names, backoff,
device id, prompts) are table-tested.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from scailink_mcp.desktop.client import (
    Backoff,
    DesktopClient,
    answer_deadline_s,
    default_state_dir,
    load_device_id,
    main,
    ws_url,
)
from scailink_mcp.desktop.client_errors import ConfigError, DesktopClientError, FatalClose
from scailink_mcp.desktop.consent_prompt import Decision, Remember, TerminalConsent, parse_answer
from scailink_mcp.desktop.local_servers import ServerSpec, parse_config, public_name
from scailink_mcp.naming import namespaced_uri
from tests.conftest import LiveApp, TokenFactory, auth_headers
from tests.test_mcp_gateway import list_all_tools, mcp_client

pytestmark = pytest.mark.anyio

STDIO_SERVER = str(Path(__file__).with_name("stdio_server.py"))
FAST = Backoff(initial=0.05, maximum=0.2)
SESSION = "slink_" + "A" * 22
BASE_TOOLS = {"echo", "add", "whoami", "slow", "toggle_extra", "count"}


def local(marker: str = "local") -> ServerSpec:
    return ServerSpec(command=sys.executable, args=[STDIO_SERVER, "--marker", marker])


# ---- the fake server side ---------------------------------------------------------------------------


@dataclass
class Peer:
    """One client connection as the fake server sees it."""

    ws: ServerConnection
    heartbeats: int = 0
    held: list[dict[str, Any]] = field(default_factory=list)  # frames set aside while awaiting a reply
    next_id: int = 100

    @property
    def authorization(self) -> str | None:
        return self.ws.request.headers.get("Authorization") if self.ws.request else None

    async def frame(self) -> dict[str, Any]:
        """The next frame that is not a heartbeat (heartbeats are counted)."""
        if self.held:
            return self.held.pop(0)
        while True:
            message: dict[str, Any] = json.loads(await self.ws.recv())
            if message.get("method") == "scailink/heartbeat":
                self.heartbeats += 1
                continue
            return message

    async def init(self, session_id: str = SESSION, heartbeat_ms: int = 30000) -> dict[str, Any]:
        """Receive `session_init`, answer the ack, return the init params."""
        message = await self.frame()
        assert message["method"] == "scailink/session_init" and message["id"] == 1, message
        ack = {
            "session_id": session_id,
            "heartbeat_interval_ms": heartbeat_ms,
            "grace_period_ms": 120000,
            "accepted": {"tools": len(message["params"]["capabilities"]["tools"])},
            "rejected": [],
            "server_version": "fake/1",
            "namespace": "desktop.u1.fake-abc123",
        }
        await self.ws.send(json.dumps({"jsonrpc": "2.0", "id": message["id"], "result": ack}))
        params: dict[str, Any] = message["params"]
        return params

    async def send_request(self, method: str, params: dict[str, Any]) -> str:
        self.next_id += 1
        request_id = f"inv-{self.next_id}"
        await self.ws.send(
            json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
        )
        return request_id

    async def reply(self, request_id: str) -> dict[str, Any]:
        """The response to `request_id`; other frames are kept for `frame()`."""
        kept: list[dict[str, Any]] = []
        try:
            while True:
                message = await self.frame()
                if message.get("id") == request_id and "method" not in message:
                    return message
                kept.append(message)
        finally:
            self.held = kept + self.held

    async def request(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        return await self.reply(await self.send_request(method, params))

    async def invoke(self, tool: str, arguments: dict[str, Any], timeout_ms: int = 10000) -> dict[str, Any]:
        params = {"invocation_id": "x", "tool": tool, "arguments": arguments, "timeout_ms": timeout_ms}
        return await self.request("scailink/tool_invoke", {**params, "caller": {"user_id": "u1"}})

    async def notify(self, method: str, params: dict[str, Any]) -> None:
        await self.ws.send(json.dumps({"jsonrpc": "2.0", "method": method, "params": params}))


class FakeScaiLink:
    """Accepts WebSockets and hands each one to the test, which plays the server's part."""

    def __init__(self) -> None:
        self._send, self._receive = anyio.create_memory_object_stream[Peer](16)
        self.connections = 0
        self.url = ""

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        await self._send.send(Peer(ws))
        await ws.wait_closed()  # the socket lives until the test or the client closes it

    async def accept(self) -> Peer:
        return await self._receive.receive()


@asynccontextmanager
async def fake_scailink(
    process_request: Callable[[ServerConnection, Request], Response | None] | None = None,
) -> AsyncIterator[FakeScaiLink]:
    fake = FakeScaiLink()
    async with serve(fake.handler, "127.0.0.1", 0, process_request=process_request) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        fake.url = f"ws://127.0.0.1:{port}/v1/scailink/ws"
        yield fake


@dataclass
class Running:
    client: DesktopClient
    done: anyio.Event = field(default_factory=anyio.Event)
    error: BaseException | None = None


@asynccontextmanager
async def running(client: DesktopClient) -> AsyncIterator[Running]:
    """`client.run()` in the background; on exit, `stop()` and wait for it to return."""
    state = Running(client)

    async def run() -> None:
        try:
            await client.run()
        except DesktopClientError as exc:
            state.error = exc
        finally:
            state.done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run)
        yield state
        await client.stop()
        with anyio.fail_after(15):
            await state.done.wait()


def make_client(url: str, servers: dict[str, ServerSpec], **kwargs: Any) -> DesktopClient:
    kwargs.setdefault("device_id", "dev-test-0001")
    kwargs.setdefault("backoff", FAST)
    return DesktopClient(url, "tok-123", servers, device_name="Ada Laptop", **kwargs)


def text_of(reply: dict[str, Any]) -> str:
    assert "result" in reply, reply
    text: str = reply["result"]["content"][0]["text"]
    return text


# ---- against the fake server ------------------------------------------------------------------------


async def test_session_init_registers_local_tools_and_answers_calls() -> None:
    with anyio.fail_after(25):
        async with fake_scailink() as fake, running(make_client(fake.url, {"local": local()})) as run:
            peer = await fake.accept()
            init = await peer.init()
            assert peer.authorization == "Bearer tok-123"
            assert init["protocol_version"] == "scailink/1.0" and init["client_version"].startswith(
                "scailink-"
            )
            assert init["device_name"] == "Ada Laptop" and init["device_id"] == "dev-test-0001"
            assert init["resume_session_id"] is None and init["audit_detail_level"] == "metadata"
            assert init["platform"]["os"]
            caps = init["capabilities"]
            # one local server: names kept; five tools over three pages of two
            assert {t["name"] for t in caps["tools"]} == BASE_TOOLS
            assert all("inputSchema" in t for t in caps["tools"])
            assert [r["uri"] for r in caps["resources"]] == ["note://local/hello"]
            assert [p["name"] for p in caps["prompts"]] == ["greet"]
            await run.client.connected.wait()
            assert run.client.session_id == SESSION and run.client.namespace == "desktop.u1.fake-abc123"

            assert text_of(await peer.invoke("echo", {"text": "hi"})) == "hi"
            added = await peer.invoke("add", {"a": 2, "b": 3})
            assert added["result"]["structuredContent"] == {"result": 5}
            assert added["result"]["isError"] is False
            who = text_of(await peer.invoke("whoami", {}))
            assert who.startswith("pid ") and who != f"pid {os.getpid()} (local)"  # it ran in the child
            failed = await peer.invoke("echo", {})  # the local tool's own error result passes through
            assert failed["result"]["isError"] is True

            assert (await peer.invoke("nope", {}))["error"]["code"] == -32002
            assert (await peer.request("scailink/tool_invoke", {"arguments": {}}))["error"]["code"] == -32602
            assert (await peer.request("scailink/frobnicate", {}))["error"]["code"] == -32601
            await peer.ws.send("this is not json")
            await peer.notify("scailink/policy_update", {"audit_detail_level": "off"})

            read = await peer.request(
                "scailink/resource_read", {"uri": "note://local/hello", "timeout_ms": 5000}
            )
            assert read["result"]["contents"][0]["text"] == "hello from local"
            prompt = await peer.request(
                "scailink/prompt_get", {"name": "greet", "arguments": {"name": "Ada"}}
            )
            assert prompt["result"]["messages"][0]["content"]["text"] == "Hello, Ada! (local)"
        assert run.error is None


async def test_calls_run_concurrently_without_holding_up_heartbeats() -> None:
    with anyio.fail_after(25):
        async with fake_scailink() as fake, running(make_client(fake.url, {"local": local()})):
            peer = await fake.accept()
            await peer.init(heartbeat_ms=200)  # the client beats every ~100 ms
            slow = await peer.send_request(
                "scailink/tool_invoke", {"tool": "slow", "arguments": {"ms": 1500}, "timeout_ms": 10000}
            )
            quick = await peer.send_request(
                "scailink/tool_invoke", {"tool": "echo", "arguments": {"text": "q"}}
            )
            first = await peer.frame()
            assert first["id"] == quick and text_of(first) == "q"
            beats = peer.heartbeats
            second = await peer.frame()
            assert second["id"] == slow and text_of(second) == "slept 1500 ms"
            assert peer.heartbeats - beats >= 5  # kept beating while the slow call ran

            # a local call past the caller's timeout is cut short, and answered before that timeout
            started = anyio.current_time()
            timed_out = await peer.invoke("slow", {"ms": 8000}, timeout_ms=2000)
            assert timed_out["error"]["code"] == -32001
            assert 1.7 < anyio.current_time() - started < 2.0
            assert text_of(await peer.invoke("echo", {"text": "still here"})) == "still here"


async def test_consent_requests_are_put_to_the_prompter() -> None:
    asked: list[tuple[str, Any]] = []
    expired = anyio.Event()

    async def prompter(tool: str, arguments: Any) -> tuple[Decision, Remember]:
        asked.append((tool, arguments))
        if tool == "hang":
            try:
                await anyio.sleep_forever()
            finally:
                expired.set()
        if tool == "boom":
            raise RuntimeError("prompter broke")
        return ("approved", "session") if tool == "remote.tenant.files.delete" else ("denied", "once")

    with anyio.fail_after(25):
        async with fake_scailink() as fake, running(make_client(fake.url, {}, consent=prompter)):
            peer = await fake.accept()
            await peer.init()
            await peer.notify(
                "scailink/consent_request", {"consent_id": "c-hang", "tool": "hang", "expires_ms": 200}
            )
            await peer.notify(
                "scailink/consent_request",
                {"consent_id": "c1", "tool": "remote.tenant.files.delete", "arguments": {"path": "/tmp/x"}},
            )
            response = await peer.frame()
            assert response == {
                "jsonrpc": "2.0",
                "method": "scailink/consent_response",
                "params": {"consent_id": "c1", "decision": "approved", "remember": "session"},
            }
            for consent_id, tool in (("c2", "other"), ("c3", "boom")):
                await peer.notify("scailink/consent_request", {"consent_id": consent_id, "tool": tool})
                denied = await peer.frame()
                assert denied["params"] == {
                    "consent_id": consent_id,
                    "decision": "denied",
                    "remember": "once",
                }
            # the expired question is never answered: the next frame is the reply to this call
            await expired.wait()
            request_id = await peer.send_request("scailink/frobnicate", {})
            assert (await peer.frame())["id"] == request_id
    assert asked[1] == ("remote.tenant.files.delete", {"path": "/tmp/x"})
    assert [tool for tool, _ in asked] == ["hang", "remote.tenant.files.delete", "other", "boom"]


async def test_reconnects_with_resume_after_1001_and_after_a_drop() -> None:
    with anyio.fail_after(25):
        async with fake_scailink() as fake, running(make_client(fake.url, {"local": local()})) as run:
            first = await fake.accept()
            assert (await first.init())["resume_session_id"] is None
            await run.client.connected.wait()
            await first.ws.close(1001, "server shutting down")

            second = await fake.accept()
            init = await second.init()
            assert init["resume_session_id"] == SESSION and init["device_id"] == "dev-test-0001"
            assert {t["name"] for t in init["capabilities"]["tools"]} == BASE_TOOLS
            assert text_of(await second.invoke("echo", {"text": "after resume"})) == "after resume"

            second.ws.transport.abort()  # a network drop: no close frame at all
            third = await fake.accept()
            assert (await third.init())["resume_session_id"] == SESSION
            assert text_of(await third.invoke("echo", {"text": "again"})) == "again"

            await run.client.stop()  # a clean stop: session_terminate, then a normal close
            assert (await third.frame())["method"] == "scailink/session_terminate"
            await run.done.wait()
        assert run.error is None and fake.connections == 3


async def test_replaced_by_a_newer_connection_4010_is_final() -> None:
    with anyio.fail_after(25):
        async with fake_scailink() as fake, running(make_client(fake.url, {"local": local()})) as run:
            peer = await fake.accept()
            await peer.init()
            await peer.ws.close(4010, "replaced by a newer connection of the same device")
            await run.done.wait()
            assert isinstance(run.error, FatalClose) and run.error.code == 4010
            assert "replaced" in str(run.error)
        assert fake.connections == 1  # run() has returned: nothing can reconnect any more


@pytest.mark.parametrize("code", [4001, 4002, 4003, 4009])
async def test_other_fatal_closes_stop_the_client(code: int) -> None:
    with anyio.fail_after(15):
        async with fake_scailink() as fake, running(make_client(fake.url, {})) as run:
            peer = await fake.accept()
            await peer.frame()  # session_init, unanswered
            await peer.ws.close(code, "no")
            await run.done.wait()
        assert isinstance(run.error, FatalClose) and run.error.code == code and fake.connections == 1


async def test_refused_upgrade_is_final() -> None:
    def not_found(ws: ServerConnection, request: Request) -> Response:
        return ws.respond(HTTPStatus.NOT_FOUND, "no bridge here\n")

    with anyio.fail_after(15):
        async with fake_scailink(not_found) as fake, running(make_client(fake.url, {})) as run:
            await run.done.wait()
    assert isinstance(run.error, FatalClose) and run.error.code == 404 and "check --server" in str(run.error)


async def test_server_errors_on_the_upgrade_are_retried() -> None:
    upgrades: list[int] = []

    def unavailable_twice(ws: ServerConnection, request: Request) -> Response | None:
        upgrades.append(1)
        return ws.respond(HTTPStatus.SERVICE_UNAVAILABLE, "starting\n") if len(upgrades) <= 2 else None

    with anyio.fail_after(15):
        async with fake_scailink(unavailable_twice) as fake, running(make_client(fake.url, {})) as run:
            peer = await fake.accept()
            assert (await peer.init())["resume_session_id"] is None
            await run.client.connected.wait()
    assert len(upgrades) == 3 and run.error is None


async def test_several_servers_are_prefixed_and_catalog_updates_follow_list_changed() -> None:
    servers = {"alpha": local("alpha"), "beta box": local("beta")}
    with anyio.fail_after(25):
        async with fake_scailink() as fake, running(make_client(fake.url, servers)):
            peer = await fake.accept()
            caps = (await peer.init())["capabilities"]
            names = {t["name"] for t in caps["tools"]}
            assert names == {f"alpha__{t}" for t in BASE_TOOLS} | {f"beta-box__{t}" for t in BASE_TOOLS}
            assert {p["name"] for p in caps["prompts"]} == {"alpha__greet", "beta-box__greet"}
            assert {r["uri"] for r in caps["resources"]} == {"note://alpha/hello", "note://beta/hello"}

            assert text_of(await peer.invoke("beta-box__whoami", {})).endswith("(beta)")
            assert text_of(await peer.invoke("alpha__whoami", {})).endswith("(alpha)")
            read = await peer.request("scailink/resource_read", {"uri": "note://beta/hello"})
            assert read["result"]["contents"][0]["text"] == "hello from beta"
            prompt = await peer.request(
                "scailink/prompt_get", {"name": "alpha__greet", "arguments": {"name": "B"}}
            )
            assert prompt["result"]["messages"][0]["content"]["text"] == "Hello, B! (alpha)"

            assert text_of(await peer.invoke("alpha__toggle_extra", {})) == "extra on"
            update = await peer.frame()
            assert update["method"] == "scailink/catalog_update"
            assert [t["name"] for t in update["params"]["added"]] == ["alpha__extra"]
            assert update["params"]["removed"] == []
            assert text_of(await peer.invoke("alpha__extra", {})) == "extra"
            assert text_of(await peer.invoke("alpha__toggle_extra", {})) == "extra off"
            update = await peer.frame()
            assert update["params"] == {"added": [], "removed": ["alpha__extra"]}


async def test_a_local_server_that_does_not_start_is_left_out(tmp_path: Path) -> None:
    broken = ServerSpec(command=str(tmp_path / "no-such-binary"))
    with anyio.fail_after(25):
        async with fake_scailink() as fake, running(make_client(fake.url, {"ok": local(), "bad": broken})):
            peer = await fake.accept()
            names = {t["name"] for t in (await peer.init())["capabilities"]["tools"]}
            assert names == {f"ok__{t}" for t in BASE_TOOLS}
        with pytest.raises(ConfigError, match="no local MCP server started"):
            await make_client(fake.url, {"bad": broken}).run()


async def test_cli_reports_a_refused_token_and_keeps_the_device_id(tmp_path: Path) -> None:
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"local": local().model_dump()}}))
    with anyio.fail_after(40):
        async with fake_scailink() as fake, anyio.create_task_group() as tg:

            async def refuse() -> None:
                peer = await fake.accept()
                await peer.frame()
                await peer.ws.close(4001, "token expired")

            tg.start_soon(refuse)
            command = [sys.executable, "-m", "scailink_mcp.cli", "desktop", "--server", fake.url]
            command += ["--token", "t", "--config", str(config), "--state-dir", str(tmp_path / "state")]
            proc = await anyio.run_process([*command, "--auto-approve"], check=False)
    assert proc.returncode == 1, proc.stderr.decode()
    assert "4001: the token was refused): token expired" in proc.stderr.decode()
    assert (tmp_path / "state" / "device_id").read_text().strip() == load_device_id(tmp_path / "state")


def test_cli_rejects_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--server", "ws://127.0.0.1:9/v1/scailink/ws", "--state-dir", str(tmp_path)]
    assert main([*common, "--token", "t", "--config", str(tmp_path / "missing.json")]) == 2
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "empty.json").write_text('{"mcpServers": {"remote": {"url": "https://x"}}}')
    assert main([*common, "--token", "t", "--config", str(tmp_path / "empty.json")]) == 2
    assert "no stdio server" in capsys.readouterr().err
    (tmp_path / "token").write_text("\n")
    assert (
        main([*common, "--token-file", str(tmp_path / "token"), "--config", str(tmp_path / "empty.json")])
        == 2
    )


# ---- pure pieces ------------------------------------------------------------------------------------


def test_parse_config() -> None:
    servers = parse_config(
        {
            "mcpServers": {
                "files": {"command": "npx", "args": ["-y", "srv"], "env": {"K": "v"}, "type": "stdio"},
                "web": {"url": "https://example.com/mcp"},
                "off": {"command": "x", "disabled": True},
            }
        }
    )
    assert list(servers) == ["files"]
    assert servers["files"] == ServerSpec(command="npx", args=["-y", "srv"], env={"K": "v"})
    for document, message in [
        ([], "mcpServers"),
        ({"mcpServers": {"a": 1}}, "mcpServers.a: must be an object"),
        ({"mcpServers": {"a": {"command": ""}}}, "mcpServers.a.command"),
        ({"mcpServers": {"a": {"command": "x", "args": "not-a-list"}}}, "mcpServers.a.args"),
        ({"mcpServers": {}}, "no stdio server"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_config(document)


@pytest.mark.parametrize(
    ("server", "name", "prefixed", "public"),
    [
        ("files", "read", False, "read"),
        ("files", "read", True, "files__read"),
        ("My Files!", "read.all", True, "My-Files__read.all"),
        ("***", "x", True, "server__x"),
    ],
)
def test_public_name(server: str, name: str, prefixed: bool, public: str) -> None:
    assert public_name(server, name, prefixed=prefixed) == public


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("ws://h:8080/v1/scailink/ws", "ws://h:8080/v1/scailink/ws"),
        ("https://scailink.example.com", "wss://scailink.example.com/v1/scailink/ws"),
        ("http://127.0.0.1:8080/", "ws://127.0.0.1:8080/v1/scailink/ws"),
    ],
)
def test_ws_url(given: str, url: str) -> None:
    assert ws_url(given) == url


def test_ws_url_rejects_other_schemes() -> None:
    for bad in ("ftp://h/x", "h:8080", ""):
        with pytest.raises(ConfigError):
            ws_url(bad)


def test_default_state_dir() -> None:
    home = Path("/home/ada")
    assert default_state_dir("Linux", {}, home) == home / ".config" / "scailink"
    assert default_state_dir("Linux", {"XDG_CONFIG_HOME": "/cfg"}, home) == Path("/cfg/scailink")
    assert default_state_dir("Linux", {"XDG_CONFIG_HOME": "rel"}, home) == home / ".config" / "scailink"
    assert default_state_dir("Darwin", {}, home) == home / "Library" / "Application Support" / "ScaiLink"
    assert default_state_dir("Windows", {"APPDATA": "/appdata"}, home) == Path("/appdata/ScaiLink")


def test_device_id_is_stable_and_remade_when_unusable(tmp_path: Path) -> None:
    first = load_device_id(tmp_path / "state")
    assert first == load_device_id(tmp_path / "state") and first.startswith("dev_")
    (tmp_path / "state" / "device_id").write_text("bad id!")
    again = load_device_id(tmp_path / "state")
    assert again != first and again == load_device_id(tmp_path / "state")


def test_backoff_is_exponential_and_bounded() -> None:
    plain = Backoff(initial=0.5, maximum=4, jitter=0.2).delays(random=lambda: 0.0)
    assert [next(plain) for _ in range(6)] == [0.5, 1, 2, 4, 4, 4]
    jittered = Backoff(initial=0.5, maximum=4, jitter=0.2).delays(random=lambda: 1.0)
    assert [round(next(jittered), 3) for _ in range(5)] == [0.6, 1.2, 2.4, 4, 4]


@pytest.mark.parametrize(("timeout_ms", "deadline"), [(60000, 59.0), (5000, 4.5), (600, 0.54), (10, 0.05)])
def test_answer_deadline_is_just_inside_the_callers_timeout(timeout_ms: int, deadline: float) -> None:
    assert answer_deadline_s(timeout_ms) == pytest.approx(deadline)


@pytest.mark.parametrize(
    ("line", "answer"),
    [
        ("y\n", ("approved", "once")),
        ("YES\n", ("approved", "once")),
        ("s\n", ("approved", "session")),
        ("n\n", ("denied", "once")),
        ("sure\n", ("denied", "once")),
        ("", ("denied", "once")),
    ],
)
def test_parse_answer(line: str, answer: tuple[str, str]) -> None:
    assert parse_answer(line) == answer


async def test_terminal_consent_asks_and_reads_the_answer() -> None:
    out = io.StringIO()
    prompter = TerminalConsent(stdin=io.StringIO("s\n"), stdout=out)
    with anyio.fail_after(5):
        assert await prompter("files__delete", {"path": "/tmp/x"}) == ("approved", "session")
    assert 'Allow tool files__delete with {"path": "/tmp/x"}? [y]es / [n]o / [s]ession' in out.getvalue()


async def test_terminal_consent_never_applies_a_late_answer_to_the_next_question() -> None:
    read_fd, write_fd = os.pipe()
    with os.fdopen(read_fd) as stdin, os.fdopen(write_fd, "w") as typed:
        prompter = TerminalConsent(stdin=stdin, stdout=io.StringIO())
        with anyio.move_on_after(0.1):
            await prompter("first", {})  # expires unanswered
        typed.write("y\n")  # typed for the expired question
        typed.flush()
        with anyio.fail_after(5):
            while prompter.reading:  # noqa: ASYNC110 (the stray line is delivered to no question)
                await anyio.sleep(0.01)
            async with anyio.create_task_group() as tg:
                answers: list[tuple[str, str]] = []

                async def ask() -> None:
                    answers.append(await prompter("second", {}))

                tg.start_soon(ask)
                typed.write("n\n")  # waits in the pipe until the question's reader takes it
                typed.flush()
        assert answers == [("denied", "once")]


# ---- against ScaiLink itself ------------------------------------------------------------------------


def live_ws_url(live: LiveApp) -> str:
    return live.base_url.replace("http://", "ws://") + "/v1/scailink/ws"


async def test_end_to_end_with_scailink(live: LiveApp, token: TokenFactory) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    client = DesktopClient(
        live_ws_url(live), tok, {"local": local()}, device_name="Ada", device_id="dev-e2e-0001"
    )
    async with running(client) as run:
        with anyio.fail_after(30):
            await client.connected.wait()
        ns = live.parts.desktop.sessions[client.session_id or ""].namespace
        assert client.namespace == ns
        async with mcp_client(live.mcp_url, tok) as s:
            assert {f"{ns}.echo", f"{ns}.add", f"{ns}.whoami"} <= {t.name for t in await list_all_tools(s)}
            result = await s.call_tool(f"{ns}.add", {"a": 2, "b": 3})
            assert result.content[0].text == "5" and not result.is_error  # type: ignore[union-attr]
            text = (await s.call_tool(f"{ns}.whoami", {})).content[0].text  # type: ignore[union-attr]
            assert text.startswith("pid ")
            note = await s.read_resource(namespaced_uri(ns, "note://local/hello"))
            assert note.contents[0].text == "hello from local"  # type: ignore[union-attr]
            prompt = await s.get_prompt(f"{ns}.greet", {"name": "Ada"})
            assert prompt.messages[0].content.text == "Hello, Ada! (local)"  # type: ignore[union-attr]
            # a local list_changed reaches ScaiLink's catalog as a catalog_update
            await s.call_tool(f"{ns}.toggle_extra", {})
            with anyio.fail_after(10):
                while f"{ns}.extra" not in {t.name for t in await list_all_tools(s)}:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            assert (await s.call_tool(f"{ns}.extra", {})).content[0].text == "extra"  # type: ignore[union-attr]
        async with httpx.AsyncClient(base_url=live.base_url, timeout=30) as c:
            resp = await c.post(
                f"/v1/modules/scailink/users/u1/tools/{ns}.echo/invoke",
                json={"arguments": {"text": "via rest"}},
                headers=auth_headers(tok),
            )
            assert resp.status_code == 200 and resp.json()["data"]["content"][0]["text"] == "via rest"
        first = client.session_id
        session = live.parts.desktop.sessions[first or ""]
        assert session.close is not None
        await session.close(1001, "going away")  # resumed: the same session id, attached again
        with anyio.fail_after(30):
            while not (client.connected.is_set() and session.send is not None):  # noqa: ASYNC110
                await anyio.sleep(0.05)
        assert client.session_id == first
    assert run.error is None


async def test_consent_through_scailink(live: LiveApp, token: TokenFactory) -> None:
    """A `confirm` remote server asks the user's connected desktop; the client's prompter answers."""
    from tests.test_mcp_gateway import register
    from tests.upstream import UpstreamServer

    tok = token("u1", "t1", ("tenant_user",))
    asked: list[str] = []

    async def prompter(tool: str, arguments: Any) -> tuple[Decision, Remember]:
        asked.append(tool)
        return ("approved" if len(asked) == 1 else "denied"), "once"

    client = DesktopClient(
        live_ws_url(live),
        tok,
        {"local": local()},
        device_name="Ada",
        device_id="dev-consent-1",
        consent=prompter,
    )
    with UpstreamServer() as upstream:
        server = await register(live, tok, name="guarded", endpoint_url=upstream.url, consent_tier="confirm")
        tool = f"remote.u1.{server['slug']}.echo"
        async with running(client):
            with anyio.fail_after(30):
                await client.connected.wait()
            async with mcp_client(live.mcp_url, tok) as s:
                approved = await s.call_tool(tool, {"text": "yes"})
                denied = await s.call_tool(tool, {"text": "no"})
    assert not approved.is_error and approved.content[0].text == "yes"  # type: ignore[union-attr]
    assert denied.is_error and denied.meta["scailink/error"]["code"] == "SCAILINK_CONSENT_DENIED"  # type: ignore[index]
    assert asked == [tool, tool]
