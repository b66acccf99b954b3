"""`python -m conformance.desktop --url ws://HOST:PORT/v1/scailink/ws --token JWT [--fast]`

Scenario tests of ScaiLink's desktop WebSocket protocol (SPEC section 4), for ScaiLink itself and for
anyone writing a desktop client or another server. Each scenario opens real WebSocket connections and
checks one rule: a close code, a frame, resume, consent. The token must carry `scailink:view` and
`scailink:invoke`; with `--fast` the server is expected to run with a short heartbeat interval (the
liveness scenario waits two intervals). Exit status 0 when every scenario passes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

TOOL = {
    "name": "echo",
    "description": "echo",
    "inputSchema": {"type": "object", "properties": {"text": {"type": "string"}}},
}


def init(**overrides: Any) -> str:
    params: dict[str, Any] = {
        "protocol_version": "scailink/1.0",
        "client_version": "conformance/1",
        "device_name": "Conformance Device",
        "device_id": "conformance-1",
        "platform": {"os": "linux"},
        "capabilities": {"tools": [TOOL], "resources": [], "prompts": []},
    }
    params.update(overrides)
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "scailink/session_init", "params": params})


class Runner:
    def __init__(self, url: str, token: str, liveness_s: float) -> None:
        self.url = url
        self.token = token
        self.liveness_s = liveness_s

    def connect(self, token: str | None = "") -> Any:
        headers = {} if token is None else {"Authorization": f"Bearer {token or self.token}"}
        return connect(self.url, additional_headers=headers, max_size=8 * 1024 * 1024, open_timeout=20)

    async def close_code(self, ws: ClientConnection, within: float = 15) -> int | None:
        with anyio.fail_after(within):
            try:
                while True:
                    await ws.recv()
            except ConnectionClosed as exc:
                return exc.rcvd.code if exc.rcvd else None

    async def handshake(self, ws: ClientConnection, **overrides: Any) -> dict[str, Any]:
        await ws.send(init(**overrides))
        ack: dict[str, Any] = json.loads(await ws.recv())
        assert "result" in ack, f"session_init answered {ack}"
        return dict(ack["result"])

    # ---- scenarios ---------------------------------------------------------------------------------

    async def missing_token_4001(self) -> None:
        async with self.connect(None) as ws:
            assert await self.close_code(ws) == 4001

    async def malformed_token_4001(self) -> None:
        async with self.connect("not-a-jwt") as ws:
            assert await self.close_code(ws) == 4001

    async def heartbeat_first_4002(self) -> None:
        async with self.connect() as ws:
            await ws.send(json.dumps({"jsonrpc": "2.0", "method": "scailink/heartbeat"}))
            assert await self.close_code(ws) == 4002

    async def missing_device_name_4002(self) -> None:
        async with self.connect() as ws:
            frame = json.loads(init())
            del frame["params"]["device_name"]
            await ws.send(json.dumps(frame))
            assert await self.close_code(ws) == 4002

    async def missing_platform_os_4002(self) -> None:
        async with self.connect() as ws:
            await ws.send(init(platform={"arch": "arm64"}))
            assert await self.close_code(ws) == 4002

    async def malformed_capabilities_4002(self) -> None:
        async with self.connect() as ws:
            await ws.send(init(capabilities={"tools": "echo"}))
            assert await self.close_code(ws) == 4002

    async def unsupported_protocol_4002(self) -> None:
        async with self.connect() as ws:
            await ws.send(init(protocol_version="scailink/0.1"))
            assert await self.close_code(ws) == 4002

    async def ack_shape(self) -> None:
        async with self.connect() as ws:
            ack = await self.handshake(ws, capabilities={"tools": [], "resources": [], "prompts": []})
            sid = ack["session_id"]
            assert sid.startswith("slink_") and len(sid) == 28, sid
            for key in ("heartbeat_interval_ms", "grace_period_ms", "accepted", "rejected", "server_version"):
                assert key in ack, key
            await ws.send(json.dumps({"jsonrpc": "2.0", "method": "scailink/session_terminate"}))
            assert await self.close_code(ws) == 1000

    async def unknown_request_4003(self) -> None:
        async with self.connect() as ws:
            await self.handshake(ws)
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": 2, "method": "scailink/nope"}))
            assert await self.close_code(ws) == 4003

    async def response_to_nothing_4003(self) -> None:
        async with self.connect() as ws:
            await self.handshake(ws)
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": "never-sent", "result": {}}))
            assert await self.close_code(ws) == 4003

    async def silence_4008(self) -> None:
        async with self.connect() as ws:
            await self.handshake(ws, device_id="conformance-silent")
            assert await self.close_code(ws, within=self.liveness_s + 10) == 4008

    async def same_device_4010_and_resume(self) -> None:
        async with self.connect() as first:
            ack = await self.handshake(first, device_id="conformance-same")
            async with self.connect() as second:
                ack2 = await self.handshake(second, device_id="conformance-same")
                assert await self.close_code(first) == 4010
                assert ack2["session_id"] == ack["session_id"], "a replacing connection resumes the session"
                await second.send(json.dumps({"jsonrpc": "2.0", "method": "scailink/session_terminate"}))

    async def sixth_connection_4009(self) -> None:
        async with anyio.create_task_group() as tg:
            opened: list[ClientConnection] = []
            done = anyio.Event()

            async def hold(i: int) -> None:
                async with self.connect() as ws:
                    await self.handshake(ws, device_id=f"conformance-cap-{i}")
                    opened.append(ws)
                    await done.wait()

            for i in range(5):
                tg.start_soon(hold, i)
            with anyio.fail_after(20):
                while len(opened) < 5:  # noqa: ASYNC110
                    await anyio.sleep(0.05)
            async with self.connect() as sixth:
                await sixth.send(init(device_id="conformance-cap-6"))
                assert await self.close_code(sixth) == 4009
            done.set()

    async def frame_over_1mib_1009(self) -> None:
        async with self.connect() as ws:
            await self.handshake(ws, device_id="conformance-big")
            pad = "x" * (2 * 1024 * 1024)
            await ws.send(
                json.dumps({"jsonrpc": "2.0", "method": "scailink/heartbeat", "params": {"pad": pad}})
            )
            assert await self.close_code(ws) == 1009

    async def resume_by_id(self) -> None:
        async with self.connect() as ws:
            ack = await self.handshake(ws, device_id="conformance-resume")
        async with self.connect() as ws:
            again = await self.handshake(
                ws, device_id="conformance-resume", resume_session_id=ack["session_id"]
            )
            assert again["session_id"] == ack["session_id"]
            await ws.send(json.dumps({"jsonrpc": "2.0", "method": "scailink/session_terminate"}))


SCENARIOS: list[str] = [name for name in vars(Runner) if not name.startswith("_") and name not in {
    "connect", "close_code", "handshake"}]  # fmt: skip


async def run(url: str, token: str, liveness_s: float, only: list[str] | None) -> int:
    runner = Runner(url, token, liveness_s)
    failures = 0
    for name in SCENARIOS:
        if only and name not in only:
            continue
        scenario: Callable[[], Awaitable[None]] = getattr(runner, name)
        started = time.perf_counter()
        try:
            await scenario()
            outcome = "PASS"
        except Exception as exc:  # report every scenario, then fail
            failures += 1
            outcome = f"FAIL ({type(exc).__name__}: {exc})"
        print(f"{outcome[:4]}  {name:32s} {time.perf_counter() - started:6.2f}s  {outcome[5:]}", flush=True)
    print(f"{len(SCENARIOS) - failures} passed, {failures} failed")
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.desktop")
    parser.add_argument("--url", required=True, help="ws://HOST:PORT/v1/scailink/ws")
    parser.add_argument("--token", required=True, help="a JWT with scailink:view and scailink:invoke")
    parser.add_argument(
        "--liveness-s", type=float, default=60.0, help="two heartbeat intervals of the server"
    )
    parser.add_argument("--only", nargs="*", help="scenario names")
    args = parser.parse_args(argv)
    return anyio.run(run, args.url, args.token, args.liveness_s, args.only)


if __name__ == "__main__":
    sys.exit(main())
