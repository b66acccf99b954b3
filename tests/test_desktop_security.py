"""Issue 11, the desktop bridge: real WebSocket clients of two tenants against ScaiLink served by a real
uvicorn on 127.0.0.1. Identity is (tenant, user) for replace, resume and the connection cap; catalog
updates are capped and coalesced; binary and deeply nested frames close cleanly; oversized upgrade
headers are answered; an expired token closes an established socket."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import httpx
import jwt
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from scailink_mcp.config import Settings
from tests.conftest import LiveApp, TokenFactory, auth_headers
from tests.test_desktop_bridge import ECHO, device, init_frame, serve_tools, ws_url

pytestmark = pytest.mark.anyio

SESSION_TOOLS, USER_TOOLS, CHANGE_MS = 5, 8, 300
HEARTBEAT = json.dumps({"jsonrpc": "2.0", "method": "scailink/heartbeat"})


def tools(*names: str) -> list[dict[str, Any]]:
    return [{**ECHO, "name": name} for name in names]


def caps(*names: str) -> dict[str, Any]:
    return {"tools": tools(*names), "resources": [], "prompts": []}


def catalog_update(added: list[Any] | None = None, removed: list[Any] | None = None) -> str:
    params = {"added": added or [], "removed": removed or []}
    return json.dumps({"jsonrpc": "2.0", "method": "scailink/catalog_update", "params": params})


async def close_of(ws: ClientConnection, timeout: float = 5.0) -> tuple[int | None, str]:
    """The close code and reason the server sent, within `timeout` (else the test fails)."""
    with anyio.fail_after(timeout):
        try:
            while True:
                await ws.recv()
        except ConnectionClosed as exc:
            return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (None, "")


async def poll(check: Callable[[], bool], timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not check():  # noqa: ASYNC110
            await anyio.sleep(0.02)


@pytest.fixture
def live(settings_factory: Callable[..., Settings]) -> Iterator[LiveApp]:
    settings = settings_factory(
        ws_init_timeout_s=2.0,
        ws_max_connections_per_user=2,
        ws_max_tools_per_session=SESSION_TOOLS,
        ws_max_tools_per_user=USER_TOOLS,
        ws_catalog_change_min_interval_ms=CHANGE_MS,
        jwt_leeway_s=0,
    )
    with LiveApp(settings) as app:
        yield app


# ---- item 1: identity is (tenant, user) ------------------------------------------------------------


async def test_same_user_and_device_of_another_tenant_neither_replaces_nor_receives_calls(
    live: LiveApp, token: TokenFactory
) -> None:
    tok_a, tok_b = token("u1", "tA", ("tenant_user",)), token("u1", "tB", ("tenant_user",))
    seen_a: dict[str, Any] = {}
    seen_b: dict[str, Any] = {}
    async with (
        device(live, tok_a, device_id="d1") as (ws_a, ack_a),
        device(live, tok_b, device_id="d1") as (ws_b, ack_b),
        anyio.create_task_group() as tg,
    ):
        assert ack_b["session_id"] != ack_a["session_id"] and ack_b["resumed"] is False
        tg.start_soon(serve_tools, ws_a, seen_a)
        tg.start_soon(serve_tools, ws_b, seen_b)
        async with httpx.AsyncClient(base_url=live.base_url, timeout=20) as http:
            resp = await http.post(
                f"/v1/modules/scailink/users/u1/tools/{ack_a['namespace']}.echo/invoke",
                json={"arguments": {"secret": "of tenant A"}},
                headers=auth_headers(tok_a),
            )
            assert resp.status_code == 200, resp.text
            for method in ("GET", "DELETE"):  # REST never reaches the other tenant's session
                other = await http.request(
                    method,
                    f"/v1/modules/scailink/sessions/{ack_a['session_id']}",
                    headers=auth_headers(tok_b),
                )
                assert other.status_code == 404
        tg.cancel_scope.cancel()
    assert seen_a.get("calls") == ["echo"], "tenant A's call is answered by tenant A's device"
    assert "calls" not in seen_b, "never by the device of the same user id in tenant B"


async def test_resume_session_id_of_another_tenant_opens_a_new_session(
    live: LiveApp, token: TokenFactory
) -> None:
    tok_a, tok_b = token("u1", "tA", ("tenant_user",)), token("u1", "tB", ("tenant_user",))
    async with device(live, tok_a, device_id="d1") as (_ws_a, ack_a):
        resume = {"device_id": None, "resume_session_id": ack_a["session_id"]}  # no device: any matches
        async with device(live, tok_b, **resume) as (_, ack_b):
            assert ack_b["resumed"] is False and ack_b["session_id"] != ack_a["session_id"]
            session_a = live.parts.desktop.sessions[ack_a["session_id"]]
            assert session_a.tenant_id == "tA" and session_a.state == "connected"


async def test_connection_cap_is_per_tenant_and_user(live: LiveApp, token: TokenFactory) -> None:
    tok_a, tok_b = token("u1", "tA", ("tenant_user",)), token("u1", "tB", ("tenant_user",))
    async with device(live, tok_a, device_id="d1"), device(live, tok_a, device_id="d2"):
        async with device(live, tok_b, device_id="d9") as (_, ack_b):
            assert ack_b["session_id"].startswith("slink_"), "tenant A's connections do not count for B"
        async with connect(ws_url(live), additional_headers=auth_headers(tok_a)) as third:
            await third.send(init_frame(device_id="d3"))
            assert (await close_of(third))[0] == 4009


# ---- item 4: catalog_update limits and coalescing ---------------------------------------------------


async def test_catalog_update_over_the_session_limit_closes_4003_and_keeps_the_catalog(
    live: LiveApp, token: TokenFactory
) -> None:
    async with device(live, token(), capabilities=caps("a", "b")) as (ws, ack):
        await ws.send(catalog_update(added=tools("c", "d", "e", "f")))  # 6 > 5
        code, reason = await close_of(ws)
    assert code == 4003 and "ws_max_tools_per_session" in reason
    assert sorted(live.parts.desktop.sessions[ack["session_id"]].tools) == ["a", "b"]


async def test_catalog_update_over_the_user_limit_closes_4003_and_init_over_it_4002(
    live: LiveApp, token: TokenFactory
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    async with (
        device(live, tok, device_id="d1", capabilities=caps("a1", "a2", "a3", "a4")),
        device(live, token("u1", "t2", ("tenant_user",)), capabilities=caps("x1", "x2", "x3", "x4")),
        device(live, tok, device_id="d2", capabilities=caps("b1", "b2", "b3", "b4")) as (ws, _),
    ):
        await ws.send(catalog_update(added=tools("b5")))  # 5 in the session, 9 > 8 for t1/u1
        code, reason = await close_of(ws)
        assert code == 4003 and "ws_max_tools_per_user" in reason
        # d2 is in its grace period with its 4 tools: a new device bringing one more is refused too
        async with connect(ws_url(live), additional_headers=auth_headers(tok)) as late:
            await late.send(init_frame(device_id="d3", capabilities=caps("c1")))
            code, reason = await close_of(late)
        assert code == 4002 and "ws_max_tools_per_user" in reason


@pytest.mark.parametrize("key", ["added", "removed"])
async def test_huge_catalog_update_is_refused_cheaply(live: LiveApp, token: TokenFactory, key: str) -> None:
    """20,000 items in one frame (the 400,000-tool attack, in frames under 1 MiB): refused by length."""
    items: list[Any] = [{"name": f"t{i}", "inputSchema": {}} for i in range(20_000)]
    if key == "removed":
        items = [f"t{i}" for i in range(20_000)]
    async with device(live, token()) as (ws, ack):
        started = time.monotonic()
        await ws.send(catalog_update(**{key: items}))
        code, reason = await close_of(ws)
    assert code == 4003 and key in reason and "ws_max_tools_per_session" in reason
    assert time.monotonic() - started < 2.0
    assert len(live.parts.desktop.sessions[ack["session_id"]].tools) == 2


@pytest.fixture
def unthrottled(settings_factory: Callable[..., Settings]) -> Iterator[LiveApp]:
    with LiveApp(settings_factory(ws_catalog_updates_per_s=0)) as app:  # the rate limit is off
        yield app


async def test_catalog_update_flood_is_coalesced_and_nothing_is_lost(
    unthrottled: LiveApp, token: TokenFactory
) -> None:
    live = unthrottled
    tok = token("u1", "t1", ("tenant_user",))
    registry = live.parts.desktop
    async with device(live, tok, capabilities=caps("a")) as (ws, ack):
        session = registry.sessions[ack["session_id"]]
        before, started = registry.version("t1", "u1"), time.monotonic()
        for i in range(100):
            await ws.send(catalog_update(added=tools(f"f{i % 3}"), removed=[f"f{(i + 1) % 3}"]))
        await ws.send(catalog_update(added=tools("last")))
        await poll(lambda: "last" in session.tools)
        async with httpx.AsyncClient(base_url=live.base_url, timeout=20) as http:

            async def listed() -> set[str]:
                resp = await http.get("/v1/modules/scailink/capabilities", headers=auth_headers(tok))
                return {item["namespaced_name"] for item in resp.json()["data"]["items"]}

            with anyio.fail_after(5):  # the trailing change is published
                while f"{ack['namespace']}.last" not in await listed():  # noqa: ASYNC110
                    await anyio.sleep(0.05)
        changes = registry.version("t1", "u1") - before
        assert changes <= (time.monotonic() - started) / (CHANGE_MS / 1000) + 2, changes
        await ws.send(HEARTBEAT)  # the flooding socket itself stays open: a pong still comes back
        with anyio.fail_after(5):
            await (await ws.ping())


async def test_catalog_updates_over_the_rate_close_4003_and_reconnecting_gets_no_new_budget(
    settings_factory: Callable[..., Settings], token: TokenFactory
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    with LiveApp(settings_factory(ws_catalog_updates_per_s=0.01, ws_catalog_updates_burst=3)) as live:
        async with device(live, tok, capabilities=caps("a")) as (ws, ack):
            session = live.parts.desktop.sessions[ack["session_id"]]
            for i in range(3):
                await ws.send(catalog_update(added=tools(f"ok{i}")))
            await poll(lambda: "ok2" in session.tools)
            await ws.send(catalog_update(added=tools("over")))
            code, reason = await close_of(ws)
        assert code == 4003 and "catalog_update rate" in reason
        assert "over" not in session.tools, "the frame over the rate is not applied"
        async with device(live, tok, capabilities=caps("a")) as (ws, _):
            await ws.send(catalog_update(added=tools("again")))
            code, reason = await close_of(ws)
        assert code == 4003, "the budget is the user's, not the socket's"
        other = token("u2", "t1", ("tenant_user",))
        async with device(live, other, capabilities=caps("a")) as (ws, ack):
            await ws.send(catalog_update(added=tools("theirs")))
            await poll(lambda: "theirs" in live.parts.desktop.sessions[ack["session_id"]].tools)


# ---- item 6: binary and deeply nested frames ---------------------------------------------------------

DEEP = json.loads("[" * 100 + "]" * 100)  # valid JSON, deeper than max_json_depth (64)
FRAMES: dict[str, tuple[bytes | str, bytes | str]] = {  # (before init, after init)
    "binary": (b"\x00\x01binary", b"\x00\x01binary"),
    "depth-5000": ("[" * 5000, "[" * 5000),
    "depth-100": (
        init_frame(capabilities={"tools": [{**ECHO, "inputSchema": {"type": "object", "x": DEEP}}]}),
        json.dumps({"jsonrpc": "2.0", "method": "scailink/heartbeat", "params": {"x": DEEP}}),
    ),
}


@pytest.mark.parametrize("after_init", [False, True], ids=["before-init", "after-init"])
@pytest.mark.parametrize("case", sorted(FRAMES))
async def test_binary_and_nested_frames_close_cleanly(
    live: LiveApp, token: TokenFactory, caplog: pytest.LogCaptureFixture, case: str, after_init: bool
) -> None:
    """1003 for a binary frame; 4002 before init / 4003 after for nesting (never a dropped socket)."""
    caplog.set_level(logging.INFO)
    frame = FRAMES[case][after_init]
    async with connect(ws_url(live), additional_headers=auth_headers(token())) as ws:
        if after_init:
            await ws.send(init_frame())
            assert "result" in json.loads(await ws.recv())
        await ws.send(frame)
        code, reason = await close_of(ws)
    expected = 1003 if isinstance(frame, bytes) else 4003 if after_init else 4002
    assert code == expected, reason
    assert any(r.getMessage() == "desktop socket refused" for r in caplog.records)
    assert not [r for r in caplog.records if r.exc_info], "a clean log line, no traceback"


# ---- item 9: oversized upgrade headers -----------------------------------------------------------------


async def test_oversized_upgrade_headers_are_answered_431(live: LiveApp, token: TokenFactory) -> None:
    """Header lines over the `websockets` limit (8 KiB) are answered 431 at once and the connection
    closed; a large header under the limit still upgrades."""
    statuses: list[int] = []

    async def oversized() -> None:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(
                ws_url(live),
                additional_headers={**auth_headers(token()), "X-Pad": "a" * 9000},
                open_timeout=5,
            ):
                pass
        statuses.append(refused.value.response.status_code)

    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(oversized)
    assert statuses == [431] * 20
    headers = {**auth_headers(token()), "X-Pad": "a" * 4000}
    async with connect(ws_url(live), additional_headers=headers, open_timeout=5) as ws:
        await ws.send(init_frame())
        assert "result" in json.loads(await ws.recv())


# ---- item 10: the token expires while the socket is open -------------------------------------------


async def test_established_socket_closes_4001_at_token_expiry_and_resumes_with_a_fresh_token(
    live: LiveApp, token: TokenFactory
) -> None:
    short = token("u1", "t1", ("tenant_user",), ttl_s=2)  # jwt_leeway_s is 0 here
    exp = jwt.decode(short, options={"verify_signature": False})["exp"]
    async with device(live, short) as (ws, ack):
        code, reason = await close_of(ws, timeout=6)
        closed_at = time.time()
    assert code == 4001 and reason == "token expired"
    assert closed_at >= exp - 0.05, "not before exp + leeway"
    async with device(live, token("u1", "t1", ("tenant_user",)), resume_session_id=ack["session_id"]) as (
        _,
        again,
    ):
        assert again["resumed"] is True and again["session_id"] == ack["session_id"]
