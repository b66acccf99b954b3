"""Issue 14, listings and memory: `tools/list` of 5,150 aggregated tools, one 500-tool page, and the
RSS of idle downstream MCP sessions and idle desktop sessions.

Processes, all on 127.0.0.1: the bench upstream (`bench.upstream --tools 100`: 103 tools, SSE answers)
and ScaiLink (`scailink dev --no-demo` on a temporary data dir), the upstream registered 50 times
through the REST registry (50 servers x 103 tools = 5,150 names). The listings are measured with a raw
JSON-RPC client (httpx: one POST per page, the body read to its end and parsed with `json.loads`), the
same for the upstream directly and for ScaiLink, in the same run: an SDK client would measure its own
validation of 5,150 tools (the `list_5000` figure of `python -m bench` does that).

- `list_5150_over_direct_list_100`: a full listing through ScaiLink (following cursors, 11 pages) over
  the upstream's own listing of its 103 tools (target <= 3x);
- `page_500_over_direct_list_100`: the first page (500 tools) through ScaiLink over the same direct
  listing (target <= 0.5x);
- `kib_per_mcp_session`: VmRSS of the ScaiLink process (from /proc) before and after N idle handshake-
  era sessions (`initialize` + `notifications/initialized`, no GET stream), spread over 10 principals,
  once they are parked (`session_park.py`: the run waits for the `scailink_mcp_sessions_parked` gauge
  to count them all, at most 60 s); `kib_per_session_opened` is the same 1 s after the last opened;
- `kib_per_desktop_session`: the same for N idle desktop WebSocket sessions (real clients, 5 devices per
  user: the per-user cap), in a second ScaiLink process (goal <= 20 KiB each): opened on top of the
  parked MCP sessions, they reused the memory those freed (11.8 KiB measured so, 23.1 KiB alone).

Settings raised for the run: the SDK manager's and the per-principal MCP session caps, the per-user rate
limit off, the WebSocket heartbeat interval (so an idle device is not closed for silence while the
others connect) and the `session_init` timeout (10 s; 10,000 handshakes on a loaded 2-core machine).
Run alone: `python -m bench.listings [--quick] [--sessions N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx

from bench.procs import free_port, process, wait_http

SERVERS = 50
PAGE_GOAL, LIST_GOAL, KIB_GOAL = 0.5, 3.0, 20.0
PRINCIPALS = 10
ACCEPT = "application/json, text/event-stream"
_NEXT_CURSOR = re.compile(rb'"nextCursor"\s*:\s*"([^"]*)"')


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _answer(response: httpx.Response) -> dict[str, Any]:
    """The JSON-RPC answer of a POST, from a JSON body or the first `data:` of an SSE stream."""
    response.raise_for_status()
    if response.headers.get("content-type", "").startswith("application/json"):
        message: dict[str, Any] = json.loads(response.content)
        return message
    for line in response.content.splitlines():
        if line.startswith(b"data:") and len(line) > 6:
            message = json.loads(line[5:])
            if "id" in message:
                return message
    raise RuntimeError("no answer in the stream")


class RawSession:
    """A handshake-era MCP session driven by hand (what any HTTP client pays, no SDK models)."""

    def __init__(self, http: httpx.AsyncClient, url: str, token: str | None) -> None:
        self.http, self.url = http, url
        self.headers = {"accept": ACCEPT, "content-type": "application/json"}
        if token:
            self.headers["authorization"] = f"Bearer {token}"
        self.ids = 0

    async def open(self) -> None:
        init = {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "bench", "version": "1"},
        }
        response = await self.http.post(
            self.url, headers=self.headers, content=self._body("initialize", init)
        )
        _answer(response)
        self.headers["mcp-session-id"] = response.headers["mcp-session-id"]
        self.headers["mcp-protocol-version"] = "2025-11-25"
        note = json.dumps({"jsonrpc": "2.0", "method": "notifications/initialized"})
        (await self.http.post(self.url, headers=self.headers, content=note)).raise_for_status()

    def _body(self, method: str, params: dict[str, Any]) -> str:
        self.ids += 1
        return json.dumps({"jsonrpc": "2.0", "id": self.ids, "method": method, "params": params})

    async def list_page(self, cursor: str | None) -> dict[str, Any]:
        result: dict[str, Any] = _answer(await self._post_list(cursor))["result"]
        return result

    async def _post_list(self, cursor: str | None) -> httpx.Response:
        params = {"cursor": cursor} if cursor else {}
        body = self._body("tools/list", params)
        return await self.http.post(self.url, headers=self.headers, content=body)

    async def list_all(self) -> int:
        count, cursor = 0, None
        while True:
            page = await self.list_page(cursor)
            count += len(page["tools"])
            cursor = page.get("nextCursor")
            if not cursor:
                return count

    async def fetch_all(self) -> int:
        """Every page received to its last byte; the cursor found without parsing the whole answer
        (`json.loads` of 3.7 MB is the client's cost, 50x that of the direct listing). Bytes read."""
        size, cursor = 0, None
        while True:
            response = await self._post_list(cursor)
            response.raise_for_status()
            size += len(response.content)
            found = _NEXT_CURSOR.search(response.content)
            cursor = found.group(1).decode() if found else None
            if not cursor:
                return size


async def _once(session: RawSession, *, page_only: bool, parse: bool) -> int:
    """One listing (all pages, or the first); tools counted when parsed, else bytes received."""
    if page_only and parse:
        return len((await session.list_page(None))["tools"])
    if page_only:
        response = await session._post_list(None)
        response.raise_for_status()
        return len(response.content)
    return await (session.list_all() if parse else session.fetch_all())


async def listings(upstream: str, scailink: str, token: str, rounds: int) -> dict[str, dict[str, float]]:
    """Median wall times, the targets interleaved round by round (the machine's load drifts): the
    upstream's own listing, ScaiLink's full listing, ScaiLink's first page. Each is received to its
    last byte once without parsing (what the server costs) and once parsed (`json.loads`, as a client
    would)."""
    cases = {"direct_list_100": (False, False), "scailink_list_5150": (True, False),
             "scailink_page_500": (True, True)}  # fmt: skip
    async with httpx.AsyncClient(timeout=120) as http:
        sessions = {False: RawSession(http, upstream, None), True: RawSession(http, scailink, token)}
        for session in sessions.values():
            await session.open()
            await session.list_all()  # warm: the catalog view and its pages are built here
        out: dict[str, dict[str, Any]] = {name: {"received": [], "parsed": []} for name in cases}
        for name, (proxied, page_only) in cases.items():
            out[name]["tools"] = await _once(sessions[proxied], page_only=page_only, parse=True)
            out[name]["bytes"] = await _once(sessions[proxied], page_only=page_only, parse=False)
        for _ in range(rounds):
            for name, (proxied, page_only) in cases.items():
                for kind, parse in (("received", False), ("parsed", True)):
                    t0 = time.perf_counter()
                    await _once(sessions[proxied], page_only=page_only, parse=parse)
                    out[name][kind].append(time.perf_counter() - t0)
    return {
        name: {
            "median_ms": statistics.median(v["received"]) * 1000,
            "parsed_median_ms": statistics.median(v["parsed"]) * 1000,
            "tools": float(v["tools"]),
            "bytes": float(v["bytes"]),
            "rounds": float(rounds),
        }
        for name, v in out.items()
    }


async def _register(http: httpx.AsyncClient, base: str, token: str, name: str, endpoint: str) -> None:
    resp = await http.post(
        f"{base}/v1/modules/scailink/remote-servers",
        json={"name": name, "endpoint_url": endpoint},
        headers={"Authorization": f"Bearer {token}"},
    )
    resp.raise_for_status()


def _tokens(data_dir: Path, users: list[str]) -> list[str]:
    from scailink_mcp.auth import mint_token

    key = (data_dir / "dev_signing_key.pem").read_bytes()
    return [mint_token(key, user_id=u, tenant_id="bench", groups=["tenant_user"]) for u in users]


async def idle_mcp_sessions(url: str, tokens: list[str], pid: int, count: int) -> dict[str, float]:
    before = rss_kib(pid)
    opened = 0

    async def worker(offset: int, step: int) -> None:
        nonlocal opened
        async with httpx.AsyncClient(timeout=60) as http:
            for i in range(offset, count, step):
                await RawSession(http, url, tokens[i % len(tokens)]).open()
                opened += 1

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for w in range(8):
            tg.start_soon(worker, w, 8)
    seconds = time.perf_counter() - started
    await anyio.sleep(1)
    opened_rss = rss_kib(pid)
    parked = await _parked(url.removesuffix("/mcp") + "/metrics", count)
    after = rss_kib(pid)
    return {"sessions": float(opened), "rss_before_kib": float(before), "rss_opened_kib": float(opened_rss),
            "kib_per_session_opened": (opened_rss - before) / count, "parked": parked,
            "rss_after_kib": float(after), "kib_per_session": (after - before) / count,
            "open_s": seconds}  # fmt: skip


async def _parked(metrics_url: str, count: int, *, wait_s: float = 60.0) -> float:
    """Wait (at most `wait_s`) until every idle session is parked (`SCAILINK_MCP_PARK_IDLE_S`, 5 s by
    default; `scailink_mcp_sessions_parked` of /metrics); the parked count (0 where nothing parks)."""
    parked = 0.0
    async with httpx.AsyncClient(timeout=30) as http:
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            text = (await http.get(metrics_url)).text
            found = re.search(r"^scailink_mcp_sessions_parked (\S+)$", text, re.MULTILINE)
            if found is None:
                return 0.0  # a ScaiLink without parking
            parked = float(found.group(1))
            if parked >= count:
                break
            await anyio.sleep(1)
    await anyio.sleep(1)
    return parked


async def idle_desktops(base: str, data_dir: Path, pid: int, count: int) -> dict[str, float]:
    from websockets.asyncio.client import connect

    url = base.replace("http://", "ws://") + "/v1/scailink/ws"
    tokens = _tokens(data_dir, [f"desk-{u}" for u in range((count + 4) // 5)])
    tool = {"name": "echo", "inputSchema": {"type": "object"}}
    before = rss_kib(pid)
    opened = 0
    gate = anyio.Semaphore(32)  # handshakes in flight at once (the accept backlog stays small)
    stop = anyio.Event()

    async def one(i: int) -> None:
        nonlocal opened
        init = {
            "protocol_version": "scailink/1.0", "client_version": "bench", "device_name": f"dev {i}",
            "device_id": f"dev-{i}", "platform": {"os": "linux"}, "capabilities": {"tools": [tool]},
        }  # fmt: skip
        frame = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "scailink/session_init", "params": init})
        async with gate:
            ws = await connect(
                url, additional_headers={"Authorization": f"Bearer {tokens[i // 5]}"}, open_timeout=120
            )
            await ws.send(frame)
            await ws.recv()
        opened += 1
        async with ws:
            await stop.wait()

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(one, i)
        with anyio.fail_after(600):
            while opened < count:  # noqa: ASYNC110  (a bounded poll of the tasks' counter)
                await anyio.sleep(0.2)
        seconds = time.perf_counter() - started
        await anyio.sleep(1)
        after = rss_kib(pid)
        stop.set()
    return {"sessions": float(count), "rss_before_kib": float(before), "rss_after_kib": float(after),
            "kib_per_session": (after - before) / count, "open_s": seconds}  # fmt: skip


def scailink_env(sessions: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCAILINK_")}
    env.update(
        SCAILINK_RATE_LIMIT_PER_S="0",
        SCAILINK_MCP_MAX_SESSIONS=str(2 * sessions + 100),
        SCAILINK_MCP_MAX_SESSIONS_PER_PRINCIPAL=str(sessions + 100),
        SCAILINK_WS_HEARTBEAT_INTERVAL_MS="600000",
        SCAILINK_WS_INIT_TIMEOUT_S="120",
    )
    return env


async def measure(quick: bool, sessions: int | None = None) -> dict[str, Any]:
    rounds = 5 if quick else 30
    count = sessions or (300 if quick else 10_000)
    data_dir = Path(tempfile.mkdtemp(prefix="scailink-bench-lists-"))
    up_port, sl_port = free_port(), free_port()
    upstream = f"http://127.0.0.1:{up_port}/mcp"
    base = f"http://127.0.0.1:{sl_port}"
    out: dict[str, Any] = {"quick": quick, "rounds": rounds}
    with ExitStack() as stack:
        stack.enter_context(
            process([sys.executable, "-m", "bench.upstream", "--port", str(up_port), "--tools", "100"])
        )
        command = [sys.executable, "-m", "scailink_mcp.cli", "dev", "--no-demo", "--data-dir", str(data_dir),
                   "--port", str(sl_port)]  # fmt: skip
        scailink = stack.enter_context(process(command, env=scailink_env(count)))
        wait_http(upstream)
        wait_http(base + "/healthz")
        token = (data_dir / "dev_admin_token").read_text().strip()
        async with httpx.AsyncClient(timeout=120) as http:
            for i in range(SERVERS):
                await _register(http, base, token, f"bench-{i}", upstream)
        out.update(await listings(upstream, base + "/mcp", token, rounds))
        for name in ("direct_list_100", "scailink_list_5150", "scailink_page_500"):
            print(f"  {name}: {json.dumps({k: round(v, 2) for k, v in out[name].items()})}", flush=True)
        tokens = _tokens(data_dir, [f"mcp-{p}" for p in range(PRINCIPALS)])
        out["idle_mcp_sessions"] = await idle_mcp_sessions(base + "/mcp", tokens, scailink.pid, count)
        print(f"  idle_mcp_sessions: {out['idle_mcp_sessions']}", flush=True)
    # Desktop sessions in a ScaiLink process of their own: in the first one, the memory the parked MCP
    # sessions freed stays in CPython's arenas and the desktop sessions would reuse it (RSS then moves
    # by ~half of what they cost).
    desk_dir, desk_port = Path(tempfile.mkdtemp(prefix="scailink-bench-desk-")), free_port()
    command = [sys.executable, "-m", "scailink_mcp.cli", "dev", "--no-demo", "--data-dir", str(desk_dir),
               "--port", str(desk_port)]  # fmt: skip
    with process(command, env=scailink_env(count)) as desk:
        desk_base = f"http://127.0.0.1:{desk_port}"
        wait_http(desk_base + "/healthz")
        out["idle_desktop_sessions"] = await idle_desktops(desk_base, desk_dir, desk.pid, count)
        print(f"  idle_desktop_sessions: {out['idle_desktop_sessions']}", flush=True)
    direct, parsed = out["direct_list_100"]["median_ms"], out["direct_list_100"]["parsed_median_ms"]
    out["ratios"] = {
        "list_5150_over_direct_list_100": out["scailink_list_5150"]["median_ms"] / direct,
        "page_500_over_direct_list_100": out["scailink_page_500"]["median_ms"] / direct,
        "list_5150_over_direct_list_100_parsed": out["scailink_list_5150"]["parsed_median_ms"] / parsed,
        "page_500_over_direct_list_100_parsed": out["scailink_page_500"]["parsed_median_ms"] / parsed,
    }
    out["kib_per_mcp_session"] = out["idle_mcp_sessions"]["kib_per_session"]
    out["kib_per_desktop_session"] = out["idle_desktop_sessions"]["kib_per_session"]
    return out


def report(out: dict[str, Any]) -> list[str]:
    r = out["ratios"]

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    n_mcp, n_desk = int(out["idle_mcp_sessions"]["sessions"]), int(out["idle_desktop_sessions"]["sessions"])
    return [
        f"tools/list of 5,150 over direct list of 100: {r['list_5150_over_direct_list_100']:.2f}x "
        f"(goal <= {LIST_GOAL}x): {verdict(r['list_5150_over_direct_list_100'] <= LIST_GOAL)}",
        f"first page ({int(out['scailink_page_500']['tools'])} tools) over direct list of 100: "
        f"{r['page_500_over_direct_list_100']:.2f}x "
        f"(goal <= {PAGE_GOAL}x): {verdict(r['page_500_over_direct_list_100'] <= PAGE_GOAL)}",
        f"the same, answers parsed by the client: {r['list_5150_over_direct_list_100_parsed']:.2f}x and "
        f"{r['page_500_over_direct_list_100_parsed']:.2f}x",
        f"RSS per idle MCP session ({n_mcp}, {int(out['idle_mcp_sessions']['parked'])} parked): "
        f"{out['kib_per_mcp_session']:.1f} KiB (goal <= {KIB_GOAL:.0f}): "
        f"{verdict(out['kib_per_mcp_session'] <= KIB_GOAL)}; 1 s after the last opened: "
        f"{out['idle_mcp_sessions']['kib_per_session_opened']:.1f} KiB",
        f"RSS per idle desktop session ({n_desk}): {out['kib_per_desktop_session']:.1f} KiB "
        f"(goal <= {KIB_GOAL:.0f}): {verdict(out['kib_per_desktop_session'] <= KIB_GOAL)}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.listings")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sessions", type=int, default=None, help="idle sessions of each kind")
    args = parser.parse_args()
    out = anyio.run(measure, args.quick, args.sessions)
    for line in report(out):
        print(f"  {line}")


if __name__ == "__main__":
    main()
