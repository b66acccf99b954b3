"""The desktop bridge with real WebSocket clients against ScaiLink on 127.0.0.1: close codes, the
handshake, catalog integration (MCP and REST), resume within the grace period, consent."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from scailink_mcp.config import Settings
from tests.conftest import LiveApp, TokenFactory, auth_headers
from tests.test_mcp_gateway import list_all_tools, mcp_client

pytestmark = pytest.mark.anyio

ECHO = {
    "name": "echo",
    "description": "echo text",
    "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}},
}
GUARDED = {**ECHO, "name": "rm", "description": "deletes things", "_meta": {"scailink/consent": "confirm"}}


def init_frame(**overrides: Any) -> str:
    params: dict[str, Any] = {
        "protocol_version": "scailink/1.0",
        "client_version": "test/1",
        "device_name": "Ada's Laptop",
        "device_id": "dev-1",
        "platform": {"os": "linux", "arch": "x86_64"},
        "capabilities": {"tools": [ECHO, GUARDED], "resources": [], "prompts": []},
    }
    params.update(overrides)
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "scailink/session_init", "params": params})


@pytest.fixture
def fast(settings_factory: Callable[..., Settings]) -> Iterator[LiveApp]:
    settings = settings_factory(ws_heartbeat_interval_ms=300, ws_grace_period_ms=1500, ws_init_timeout_s=1.0)
    with LiveApp(settings) as app:
        yield app


def ws_url(live: LiveApp) -> str:
    return live.base_url.replace("http://", "ws://") + "/v1/scailink/ws"


@asynccontextmanager
async def device(
    live: LiveApp, tok: str, **init: Any
) -> AsyncIterator[tuple[ClientConnection, dict[str, Any]]]:
    async with connect(ws_url(live), additional_headers=auth_headers(tok), max_size=4 * 1024 * 1024) as ws:
        await ws.send(init_frame(**init))
        ack = json.loads(await ws.recv())
        yield ws, ack["result"]


async def closed_with(ws: ClientConnection) -> int | None:
    with anyio.fail_after(10):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None


async def serve_tools(ws: ClientConnection, results: dict[str, Any], consent: str = "approved") -> None:
    """A minimal device: answers tool_invoke with an echo, consent_request with `consent`."""
    async for raw in ws:
        msg = json.loads(raw)
        if msg.get("method") == "scailink/tool_invoke":
            params = msg["params"]
            results.setdefault("calls", []).append(params["tool"])
            text = json.dumps(params["arguments"])
            await ws.send(
                json.dumps(
                    {
                        "jsonrpc": "2.0",
                        "id": msg["id"],
                        "result": {"content": [{"type": "text", "text": text}]},
                    }
                )
            )
        elif msg.get("method") == "scailink/consent_request":
            results.setdefault("consents", []).append(msg["params"]["tool"])
            remember = results.get("remember", "once")
            await ws.send(
                json.dumps(
                    {
                        "jsonrpc": "2.0",
                        "method": "scailink/consent_response",
                        "params": {
                            "consent_id": msg["params"]["consent_id"],
                            "decision": consent,
                            "remember": remember,
                        },
                    }
                )
            )


@pytest.mark.parametrize("case", ["missing", "malformed", "expired", "audience", "groups"])
async def test_bad_tokens_close_4001(fast: LiveApp, token: TokenFactory, case: str) -> None:
    """Each failing check closes 4001 with a reason that names it (never the token)."""
    headers = {
        "missing": {},
        "malformed": {"Authorization": "Bearer abc"},
        "expired": auth_headers(token(ttl_s=-3600)),
        "audience": auth_headers(token(extra_claims={"aud": "other"})),
        "groups": auth_headers(token(extra_claims={"groups": None})),  # null, not a list of groups
    }[case]
    async with connect(ws_url(fast), additional_headers=headers) as ws:
        assert await closed_with(ws) == 4001


@pytest.mark.parametrize(
    "frame",
    [
        json.dumps({"jsonrpc": "2.0", "method": "scailink/heartbeat"}),
        init_frame(device_name=""),
        init_frame(platform={"arch": "x86_64"}),
        init_frame(capabilities={"tools": [{"no": "name"}]}),
        init_frame(capabilities={"tools": [], "resource_templates": [{"name": "no uriTemplate"}]}),
        init_frame(protocol_version="scailink/9"),
        "not json",
    ],
)
async def test_bad_first_frame_closes_4002(fast: LiveApp, token: TokenFactory, frame: str) -> None:
    async with connect(ws_url(fast), additional_headers=auth_headers(token())) as ws:
        await ws.send(frame)
        assert await closed_with(ws) == 4002


async def test_empty_capabilities_accepted_and_silence_closes_4008(
    fast: LiveApp, token: TokenFactory
) -> None:
    async with device(fast, token(), capabilities={"tools": [], "resources": [], "prompts": []}) as (ws, ack):
        assert ack["session_id"].startswith("slink_") and len(ack["session_id"]) == 28
        assert ack["heartbeat_interval_ms"] == 300
        assert await closed_with(ws) == 4008


async def test_no_init_closes_4002_after_timeout(fast: LiveApp, token: TokenFactory) -> None:
    async with connect(ws_url(fast), additional_headers=auth_headers(token())) as ws:
        assert await closed_with(ws) == 4002


async def test_protocol_violations_4003(fast: LiveApp, token: TokenFactory) -> None:
    async with device(fast, token()) as (ws, _):
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": 7, "method": "scailink/whatever"}))
        assert await closed_with(ws) == 4003
    async with device(fast, token()) as (ws, _):
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": "nope", "result": {}}))
        assert await closed_with(ws) == 4003


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"progress": 1}, "invocation_id"),
        ({"invocation_id": "x", "progress": "much"}, "progress"),
        ({"invocation_id": "x", "progress": 1, "total": "Infinity"}, "total"),
    ],
)
async def test_malformed_progress_closes_4003_naming_the_field(
    fast: LiveApp, token: TokenFactory, params: dict[str, Any], field: str
) -> None:
    from tests.test_desktop_security import close_of

    async with device(fast, token()) as (ws, _):
        await ws.send(json.dumps({"jsonrpc": "2.0", "method": "scailink/progress", "params": params}))
        code, reason = await close_of(ws)
    assert code == 4003 and reason.startswith(field), reason


async def test_progress_for_no_waiting_call_is_dropped(fast: LiveApp, token: TokenFactory) -> None:
    """A progress frame can cross its call's answer on the wire: ignored, never a 4003."""
    tok = token()
    async with device(fast, tok) as (ws, ack), anyio.create_task_group() as tg:
        frame = {"invocation_id": "gone", "progress": 1, "total": 2, "message": "late"}
        await ws.send(json.dumps({"jsonrpc": "2.0", "method": "scailink/progress", "params": frame}))
        results: dict[str, Any] = {}
        tg.start_soon(serve_tools, ws, results)
        async with mcp_client(fast.mcp_url, tok) as s:  # the socket is still served
            result = await s.call_tool(f"{ack['namespace']}.echo", {"text": "still here"})
            assert not result.is_error and results["calls"] == ["echo"]
        tg.cancel_scope.cancel()


async def test_sixth_connection_4009_and_same_device_4010(fast: LiveApp, token: TokenFactory) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    async with (
        device(fast, tok, device_id="d1") as (w1, _),
        device(fast, tok, device_id="d2") as (_w2, _),
        device(fast, tok, device_id="d3") as (_w3, _),
        device(fast, tok, device_id="d4") as (_w4, _),
        device(fast, tok, device_id="d5") as (_w5, _),
    ):
        async with connect(ws_url(fast), additional_headers=auth_headers(tok)) as w6:
            await w6.send(init_frame(device_id="d6"))
            assert await closed_with(w6) == 4009
        # the same device reconnecting replaces the old connection
        async with device(fast, tok, device_id="d1") as (_again, ack):
            assert await closed_with(w1) == 4010
            assert ack["resumed"] is True


async def test_frame_over_1mib_closes_1009(fast: LiveApp, token: TokenFactory) -> None:
    async with device(fast, token()) as (ws, _):
        await ws.send(
            json.dumps(
                {"jsonrpc": "2.0", "method": "scailink/heartbeat", "params": {"pad": "x" * (2 * 1024 * 1024)}}
            )
        )
        assert await closed_with(ws) == 1009


async def test_desktop_tools_in_mcp_and_rest(fast: LiveApp, token: TokenFactory) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    results: dict[str, Any] = {}
    async with device(fast, tok) as (ws, ack), anyio.create_task_group() as tg:
        tg.start_soon(serve_tools, ws, results)

        async def beat() -> None:
            while True:
                await ws.send(json.dumps({"jsonrpc": "2.0", "method": "scailink/heartbeat"}))
                await anyio.sleep(0.1)

        tg.start_soon(beat)
        ns = ack["namespace"]
        assert ns.startswith("desktop.u1.ada-s-laptop-")
        async with mcp_client(fast.mcp_url, tok) as s:
            names = {t.name for t in await list_all_tools(s)}
            assert f"{ns}.echo" in names
            result = await s.call_tool(f"{ns}.echo", {"text": "from mcp"})
            assert json.loads(result.content[0].text) == {"text": "from mcp"}  # type: ignore[union-attr]
        async with httpx.AsyncClient(base_url=fast.base_url, timeout=20) as c:
            resp = await c.post(
                f"/v1/modules/scailink/users/u1/tools/{ns}.echo/invoke",
                json={"arguments": {"text": "from rest"}},
                headers=auth_headers(tok),
            )
            assert resp.status_code == 200, resp.text
            assert json.loads(resp.json()["data"]["content"][0]["text"]) == {"text": "from rest"}
            caps = (await c.get("/v1/modules/scailink/capabilities", headers=auth_headers(tok))).json()[
                "data"
            ]
            expected = {"kind": "tool", "namespaced_name": f"{ns}.echo", "upstream_name": "echo"}
            expected |= {"source": "desktop", "session_id": ack["session_id"], "server_id": None}
            assert expected in caps["items"]
            sessions = (await c.get("/v1/modules/scailink/sessions", headers=auth_headers(tok))).json()[
                "data"
            ]
            assert [s["session_id"] for s in sessions["items"]] == [ack["session_id"]]
            # another user never sees nor reaches them
            other = token("u2", "t1", ("tenant_user",))
            resp = await c.post(
                f"/v1/modules/scailink/users/u2/tools/{ns}.echo/invoke", json={}, headers=auth_headers(other)
            )
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "SCAILINK_TOOL_NOT_FOUND"
            resp = await c.get(
                f"/v1/modules/scailink/sessions/{ack['session_id']}", headers=auth_headers(other)
            )
            assert resp.status_code == 404
        async with mcp_client(fast.mcp_url, token("u2", "t1", ("tenant_user",))) as s:
            assert not any(n.startswith("desktop.u1.") for n in {t.name for t in await list_all_tools(s)})
        tg.cancel_scope.cancel()
    assert results["calls"] == ["echo", "echo"]


async def test_consent_approve_deny_and_remember(
    fast: LiveApp, token: TokenFactory, settings_factory: Any
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    for decision, remember in (("approved", "session"), ("denied", "once")):
        results: dict[str, Any] = {"remember": remember}
        async with (
            device(fast, tok, device_id=f"dev-{decision}") as (ws, ack),
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(serve_tools, ws, results, decision)
            ns = ack["namespace"]
            async with mcp_client(fast.mcp_url, tok) as s:
                first = await s.call_tool(f"{ns}.rm", {"path": "/tmp/x"})
                second = await s.call_tool(f"{ns}.rm", {"path": "/tmp/y"})
            tg.cancel_scope.cancel()
        if decision == "approved":
            assert not first.is_error and not second.is_error
            assert results["consents"] == ["rm"], "remember=session skips the second prompt"
            assert results["calls"] == ["rm", "rm"]
        else:
            assert first.is_error and first.meta["scailink/error"]["code"] == "SCAILINK_CONSENT_DENIED"  # type: ignore[index]
            assert "calls" not in results, "a denied tool is not run"
            assert results["consents"] == ["rm", "rm"]


async def test_resume_within_grace_and_expiry(fast: LiveApp, token: TokenFactory) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    changed: list[str] = []

    async def on_message(message: Any) -> None:
        import mcp_types as types

        if isinstance(message, types.ToolListChangedNotification):
            changed.append("tools")

    async with mcp_client(fast.mcp_url, tok, on_message=on_message) as s:
        async with device(fast, tok) as (_ws, ack):
            session_id, ns = ack["session_id"], ack["namespace"]
        # dropped: the tools stay listed during the grace period
        assert f"{ns}.echo" in {t.name for t in await list_all_tools(s)}
        results: dict[str, Any] = {}

        async def call_during_gap() -> None:
            result = await s.call_tool(f"{ns}.echo", {"text": "gap"})
            results["gap"] = result

        async with anyio.create_task_group() as tg:
            tg.start_soon(call_during_gap)
            await anyio.sleep(0.3)
            async with device(fast, tok, resume_session_id=session_id) as (ws2, ack2):
                assert ack2["session_id"] == session_id and ack2["resumed"] is True
                tg.start_soon(serve_tools, ws2, results)
                with anyio.fail_after(10):
                    while "gap" not in results:  # noqa: ASYNC110
                        await anyio.sleep(0.05)
                tg.cancel_scope.cancel()
        assert json.loads(results["gap"].content[0].text) == {"text": "gap"}
        # after the grace period the tools leave and list_changed arrives
        before = len(changed)
        with anyio.fail_after(10):
            while len(changed) == before:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        assert f"{ns}.echo" not in {t.name for t in await list_all_tools(s)}
    assert fast.parts.desktop.sessions == {}


async def test_device_drop_mid_call_is_clean(fast: LiveApp, token: TokenFactory) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    async with mcp_client(fast.mcp_url, tok) as s:
        async with device(fast, tok) as (ws, ack):
            ns = ack["namespace"]

            async def drop_on_invoke() -> None:
                async for raw in ws:
                    if json.loads(raw).get("method") == "scailink/tool_invoke":
                        await ws.close()
                        return

            async with anyio.create_task_group() as tg:
                tg.start_soon(drop_on_invoke)
                with anyio.fail_after(10):
                    result = await s.call_tool(f"{ns}.echo", {"text": "x"})
        assert result.is_error
        assert result.meta["scailink/error"]["code"] == "SCAILINK_UPSTREAM_ERROR"  # type: ignore[index]
    for session in fast.parts.desktop.sessions.values():
        assert session.pending == {} and session.consents == {}


async def test_a_thousand_idle_sessions_stay_connected(
    settings_factory: Callable[..., Settings], token: TokenFactory
) -> None:
    """1,000 concurrent idle desktop sessions (200 users x 5 devices) through several heartbeat
    intervals, driven fast by settings: no error, no close."""
    # 1,000 clients and the server share one process here: a 2 s interval (4 s of silence closes) with
    # a heartbeat every 0.5 s per client keeps the check about liveness, not about how fast a loaded
    # 2-core CI machine pushes thousands of frames a second through one event loop (at 1 s and a
    # heartbeat every 0.2 s, 5,000 frames/s, CI saw 829 of 1,000 sessions left connected).
    interval_s = 2.0
    settings = settings_factory(
        ws_heartbeat_interval_ms=int(interval_s * 1000), ws_max_connections_per_user=5
    )
    users = [token(f"user-{i}", "t1", ("tenant_user",)) for i in range(200)]
    closed: list[Any] = []
    ready = 0
    with LiveApp(settings) as live:

        async def idle(tok: str, device_id: str, stop: anyio.Event) -> None:
            nonlocal ready
            async with connect(ws_url(live), additional_headers=auth_headers(tok), open_timeout=60) as ws:
                await ws.send(init_frame(device_id=device_id, capabilities={"tools": [ECHO]}))
                json.loads(await ws.recv())
                ready += 1
                try:
                    while not stop.is_set():
                        await ws.send(json.dumps({"jsonrpc": "2.0", "method": "scailink/heartbeat"}))
                        with anyio.move_on_after(interval_s / 4):
                            await stop.wait()
                except ConnectionClosed as exc:
                    closed.append(exc.rcvd.code if exc.rcvd else None)

        stop = anyio.Event()
        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                for i, tok in enumerate(users):
                    for d in range(5):
                        tg.start_soon(idle, tok, f"u{i}-d{d}", stop)
                while ready < 1000:  # noqa: ASYNC110
                    await anyio.sleep(0.1)
                assert len(live.parts.desktop.sessions) == 1000
                await anyio.sleep(3 * interval_s)  # three heartbeat intervals, all connected
                assert sum(1 for s in live.parts.desktop.sessions.values() if s.send is not None) == 1000
                stop.set()
    assert closed == []


async def test_desktop_prompts_and_resources(fast: LiveApp, token: TokenFactory) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    caps = {
        "tools": [],
        "resources": [{"uri": "file:///home/ada/notes.md", "name": "notes", "mimeType": "text/markdown"}],
        "prompts": [{"name": "summarize", "description": "summarize a file"}],
    }

    async def device_side(ws: ClientConnection) -> None:
        async for raw in ws:
            msg = json.loads(raw)
            if msg.get("method") == "scailink/resource_read":
                uri = msg["params"]["uri"]
                answer = {"contents": [{"uri": uri, "mimeType": "text/markdown", "text": "# notes"}]}
            elif msg.get("method") == "scailink/prompt_get":
                text = f"summarize {msg['params']['arguments']}"
                answer = {"messages": [{"role": "user", "content": {"type": "text", "text": text}}]}
            else:
                continue
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": answer}))

    async with device(fast, tok, capabilities=caps) as (ws, ack), anyio.create_task_group() as tg:
        tg.start_soon(device_side, ws)
        ns = ack["namespace"]
        async with mcp_client(fast.mcp_url, tok) as s:
            resources = (await s.list_resources()).resources
            uri = next(str(r.uri) for r in resources if str(r.uri).startswith(f"scailink://{ns}/"))
            read = await s.read_resource(uri)
            assert read.contents[0].text == "# notes"  # type: ignore[union-attr]
            prompts = (await s.list_prompts()).prompts
            assert f"{ns}.summarize" in [p.name for p in prompts]
            got = await s.get_prompt(f"{ns}.summarize", {"path": "notes.md"})
            assert "notes.md" in got.messages[0].content.text  # type: ignore[union-attr]
        tg.cancel_scope.cancel()


async def test_consent_timeout_denies(settings_factory: Callable[..., Settings], token: TokenFactory) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    with LiveApp(settings_factory(consent_timeout_s=0.5)) as live:
        async with device(live, tok) as (ws, ack):
            asked: list[str] = []

            async def silent_device() -> None:  # sees the consent request, never answers
                async for raw in ws:
                    msg = json.loads(raw)
                    asked.append(msg.get("method", ""))
                    if msg.get("method") == "scailink/tool_invoke":
                        raise AssertionError("a tool must not run without consent")

            async with anyio.create_task_group() as tg:
                tg.start_soon(silent_device)
                async with mcp_client(live.mcp_url, tok) as s:
                    with anyio.fail_after(10):
                        result = await s.call_tool(f"{ack['namespace']}.rm", {"path": "/"})
                tg.cancel_scope.cancel()
    assert result.is_error and result.meta["scailink/error"]["code"] == "SCAILINK_CONSENT_DENIED"  # type: ignore[index]
    assert asked == ["scailink/consent_request"]


async def test_late_answer_after_timeout_is_ignored(fast: LiveApp, token: TokenFactory) -> None:
    """A device answering after the caller gave up is not a protocol violation: no 4003."""
    tok = token("u1", "t1", ("tenant_user",))
    async with device(fast, tok) as (ws, ack):
        session = fast.parts.desktop.sessions[ack["session_id"]]
        with pytest.raises(Exception, match="did not answer"):
            await fast.parts.desktop.invoke(
                session, "scailink/tool_invoke", {"tool": "echo", "arguments": {}}, timeout=0.3
            )
        invoke = json.loads(await ws.recv())
        await ws.send(json.dumps({"jsonrpc": "2.0", "id": invoke["id"], "result": {"content": []}}))
        await ws.send(json.dumps({"jsonrpc": "2.0", "method": "scailink/heartbeat"}))
        with anyio.move_on_after(0.5) as still_open:
            await ws.recv()
        assert still_open.cancelled_caught, "the connection stays open"
        assert session.send is not None
