"""Measurements shared by the benchmarks: percentiles of samples, C concurrent MCP clients."""

from __future__ import annotations

import time

import anyio

from bench.procs import client


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000

    return {"p50_ms": pick(0.5), "p90_ms": pick(0.9), "p99_ms": pick(0.99)}


async def concurrent(
    url: str, tool: str, clients: int, per_client: int, token: str | None
) -> dict[str, float]:
    async def one() -> None:
        async with client(url, token) as session:
            for i in range(per_client):
                await session.call_tool(tool, {"text": str(i)})

    start = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(clients):
            tg.start_soon(one)
    return {"calls_per_s": clients * per_client / (time.perf_counter() - start)}
