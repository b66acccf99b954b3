"""`/healthz` latency while one desktop floods `scailink/catalog_update` frames (issue 11, goal p99 < 50 ms).

One device connects with a real WebSocket and sends catalog updates as fast as the socket takes them
(each adds and removes `batch` tools); when ScaiLink closes it for flooding, it reconnects and goes on.
Meanwhile a second client measures `/healthz` every 10 ms. The same probe without the flood gives the
baseline of the same run.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import anyio
import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

INIT = {
    "protocol_version": "scailink/1.0",
    "client_version": "bench/1",
    "device_name": "flooder",
    "device_id": "flooder-1",
    "platform": {"os": "linux"},
    "capabilities": {"tools": [], "resources": [], "prompts": []},
}


def _tool(name: str) -> dict[str, Any]:
    return {"name": name, "description": "flood", "inputSchema": {"type": "object"}}


def _update(round_no: int, batch: int) -> str:
    added = [_tool(f"t{round_no}_{i}") for i in range(batch)]
    removed = [f"t{round_no - 1}_{i}" for i in range(batch)]
    params = {"added": added, "removed": removed}
    return json.dumps({"jsonrpc": "2.0", "method": "scailink/catalog_update", "params": params})


async def _probe(base: str, seconds: float) -> list[float]:
    samples: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            started = time.perf_counter()
            await c.get("/healthz")
            samples.append((time.perf_counter() - started) * 1000)
            await anyio.sleep(0.01)
    return samples


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": round(ordered[-1], 2), "samples": len(ordered)}


async def _flood(ws_url: str, token: str, stop: anyio.Event, batch: int, counts: dict[str, int]) -> None:
    round_no = 0
    while not stop.is_set():
        try:
            async with connect(ws_url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
                counts["connections"] += 1
                await ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "scailink/session_init",
                                          "params": INIT}))  # fmt: skip
                await ws.recv()
                while not stop.is_set():
                    round_no += 1
                    await ws.send(_update(round_no, batch))
                    counts["frames"] += 1
        except (ConnectionClosed, InvalidStatus, OSError):
            counts["closed"] += 1
            await anyio.sleep(0.01)


async def catalog_flood(base: str, token: str, *, seconds: float, batch: int = 1000) -> dict[str, Any]:
    baseline = _summary(await _probe(base, min(seconds, 3.0)))
    counts = {"connections": 0, "frames": 0, "closed": 0}
    ws_url = base.replace("http://", "ws://") + "/v1/scailink/ws"
    # The flooder runs in its own thread and event loop: serialising 1,000-tool frames back to back
    # would otherwise starve this loop's probe, measuring the client instead of ScaiLink.
    stop = threading.Event()

    async def flood() -> None:
        done = anyio.Event()

        async def watch() -> None:
            while not stop.is_set():  # noqa: ASYNC110  (a threading.Event set by the other thread)
                await anyio.sleep(0.05)
            done.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            tg.start_soon(_flood, ws_url, token, done, batch, counts)
            await done.wait()
            tg.cancel_scope.cancel()

    flooder = threading.Thread(target=anyio.run, args=(flood,), daemon=True)
    flooder.start()
    try:
        flooded = _summary(await _probe(base, seconds))
    finally:
        stop.set()
        flooder.join(timeout=10)
    return {
        "healthz_idle": baseline,
        "healthz_during_flood": flooded,
        "flood": {**counts, "tools_per_frame": batch, "seconds": seconds},
    }
