"""Several replicas (issue 13): throughput of 1 replica vs 2 behind HAProxy, and the added latency of
a desktop call routed over Redis to the replica holding the device, in one run.

Processes (`bench/cluster.py`, `bench/haproxy.py`, the tests' harness): the upstream, two `scailink
serve` replicas A and B on one SQLite file and the local Redis (a prefix of this run's own), one
HAProxy in front of A alone and one in front of A and B (round robin, no stickiness: a handshake-era
session's requests land on both replicas, which revive it from Redis), and this client.

Throughput: C concurrent MCP clients (each its own session, a fixed count of `echo` calls) against
the upstream directly (the floor), replica A directly, HAProxy over A, HAProxy over A and B; the
targets in turn, `rounds` times, the median kept. Desktop: a WebSocket device on B; N sequential
`tools/call` of its tool through B (the same replica) and through A (routed over Redis), in
alternating blocks. Skipped with a note when Redis or haproxy is missing; times are never asserted.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import ExitStack, asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import anyio
import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from bench.calls import concurrent, percentiles
from bench.cluster import SCAILINK, ClusterEnv, redis_reason, replicas, wait_for
from bench.haproxy import haproxy_reason, load_balancer
from bench.procs import client, free_port, process, wait_http

USER, TENANT = "bench", "bench"


def skip_reason() -> str | None:
    return redis_reason() or haproxy_reason()


@asynccontextmanager
async def desktop(base_url: str, token: str) -> AsyncIterator[str]:
    """A device on `base_url` answering `echo` and heartbeating; yields its tool's namespaced name."""
    url = base_url.replace("http://", "ws://") + "/v1/scailink/ws"
    init = {
        "protocol_version": "scailink/1.0", "client_version": "bench", "device_name": "bench desktop",
        "device_id": "bench-desktop", "platform": {"os": "linux"},
        "capabilities": {"tools": [{"name": "echo", "inputSchema": {"type": "object"}}]},
    }  # fmt: skip
    async with connect(url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
        await ws.send(
            json.dumps({"jsonrpc": "2.0", "id": 1, "method": "scailink/session_init", "params": init})
        )
        ack = json.loads(await ws.recv())["result"]
        async with anyio.create_task_group() as tg:
            tg.start_soon(_answer, ws)
            yield f"{ack['namespace']}.echo"
            tg.cancel_scope.cancel()


async def _answer(ws: ClientConnection) -> None:
    async def beat() -> None:
        while True:
            await ws.send(json.dumps({"jsonrpc": "2.0", "method": "scailink/heartbeat"}))
            await anyio.sleep(2)

    with suppress(ConnectionClosed):
        async with anyio.create_task_group() as tg:
            tg.start_soon(beat)
            async for raw in ws:
                msg = json.loads(raw)
                if msg.get("method") == "scailink/tool_invoke":
                    text = json.dumps(msg["params"]["arguments"])
                    result = {"content": [{"type": "text", "text": text}]}
                    await ws.send(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": result}))


def _listed(base_url: str, token: str, name: str) -> bool:
    resp = httpx.get(
        f"{base_url}/v1/modules/scailink/capabilities?limit=200",
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
    )
    return resp.status_code == 200 and name in {i["namespaced_name"] for i in resp.json()["data"]["items"]}


async def _sequential(url: str, tool: str, token: str, count: int) -> list[float]:
    samples: list[float] = []
    async with client(url, token) as session:
        for i in range(count):
            t0 = time.perf_counter()
            result = await session.call_tool(tool, {"text": f"call {i}"})
            samples.append(time.perf_counter() - t0)
            assert not result.is_error, result
    return samples


async def desktop_latency(local: str, routed: str, tool: str, token: str, n: int) -> dict[str, Any]:
    """N calls through each, in alternating blocks of n/5 (after 10 warm-ups each)."""
    for url in (local, routed):
        await _sequential(url, tool, token, 10)
    samples: dict[str, list[float]] = {"same_replica": [], "routed": []}
    for _ in range(5):
        samples["same_replica"] += await _sequential(local, tool, token, n // 5)
        samples["routed"] += await _sequential(routed, tool, token, n // 5)
    out: dict[str, Any] = {k: percentiles(v) for k, v in samples.items()}
    for q in ("p50_ms", "p99_ms"):
        out[f"added_{q}"] = out["routed"][q] - out["same_replica"][q]
    return out


async def throughput(
    targets: dict[str, tuple[str, str, str | None]], counts: dict[str, int]
) -> dict[str, float]:
    """Median calls/s of each target (url, tool, token) over `rounds`, the targets taken in turn."""
    rates: dict[str, list[float]] = {label: [] for label in targets}
    for url, tool, token in targets.values():  # warm every replica's pool and session caches
        await concurrent(url, tool, counts["clients"], 2, token)
    for _ in range(counts["rounds"]):
        for label, (url, tool, token) in targets.items():
            got = await concurrent(url, tool, counts["clients"], counts["each"], token)
            rates[label].append(got["calls_per_s"])
    return {label: statistics.median(r) for label, r in rates.items()}


async def measure(quick: bool) -> dict[str, Any]:
    """The figures, or `{"skipped": why}` when Redis or haproxy is missing here."""
    reason = skip_reason()
    if reason:
        print(f"replicas: skipped ({reason})", flush=True)
        return {"skipped": reason}
    from scailink_mcp.crypto import generate_kek
    from scailink_mcp.dev_issuer import generate_dev_key, mint_token, public_pem_from_private

    counts = (
        {"clients": 4, "each": 10, "rounds": 1, "desktop_calls": 50}
        if quick
        else {"clients": 16, "each": 50, "rounds": 3, "desktop_calls": 500}
    )
    with tempfile.TemporaryDirectory(prefix="scailink-bench-replicas-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        key = work / "key.pem"
        generate_dev_key(key)
        token = mint_token(key.read_bytes(), user_id=USER, tenant_id=TENANT, groups=["tenant_user"])
        env = ClusterEnv(
            work,
            database_url=f"sqlite:///{work / 'scailink.db'}",
            jwt_public_key=public_pem_from_private(key),
            kek=generate_kek(),
            RATE_LIMIT_PER_S="0",  # the policy would measure itself
        )
        migrate = [*SCAILINK, "migrate"]  # once, as a deployment does before starting its replicas
        await anyio.to_thread.run_sync(
            lambda: subprocess.run(migrate, env=env.environ(), check=True, timeout=120, capture_output=True)
        )
        up_port = free_port()
        upstream = f"http://127.0.0.1:{up_port}/mcp"
        stack.enter_context(
            process([*SCAILINK[:1], "-m", "bench.upstream", "--port", str(up_port), "--tools", "0"])
        )
        wait_http(upstream)
        a, b = stack.enter_context(replicas(env, 2))
        lb1_dir, lb2_dir = work / "lb1", work / "lb2"
        lb1_dir.mkdir()
        lb2_dir.mkdir()
        lb1 = stack.enter_context(load_balancer([a], lb1_dir))
        lb2 = stack.enter_context(load_balancer([a, b], lb2_dir))
        async with httpx.AsyncClient(timeout=60) as rest:
            resp = await rest.post(
                f"{a.base_url}/v1/modules/scailink/remote-servers",
                json={"name": "bench", "endpoint_url": upstream},
                headers={"Authorization": f"Bearer {token}"},
            )
        resp.raise_for_status()
        remote = f"remote.{USER}.{resp.json()['data']['slug']}.echo"
        await anyio.to_thread.run_sync(
            lambda: wait_for(lambda: _listed(b.base_url, token, remote), 10, "on B")
        )
        print("replicas, throughput:", flush=True)
        rates = await throughput(
            {
                "direct": (upstream, "echo", None),
                "one_replica": (f"{a.base_url}/mcp", remote, token),
                "one_replica_lb": (f"{lb1.base_url}/mcp", remote, token),
                "two_replicas_lb": (f"{lb2.base_url}/mcp", remote, token),
            },
            counts,
        )
        print(f"  calls/s: {json.dumps({k: round(v, 1) for k, v in rates.items()})}", flush=True)
        print("replicas, desktop on B:", flush=True)
        async with desktop(b.base_url, token) as tool:
            await anyio.to_thread.run_sync(
                lambda: wait_for(lambda: _listed(a.base_url, token, tool), 10, "on A")
            )
            latency = await desktop_latency(
                f"{b.base_url}/mcp", f"{a.base_url}/mcp", tool, token, counts["desktop_calls"]
            )
        for label in ("same_replica", "routed"):
            print(f"  {label}: {json.dumps({q: round(x, 2) for q, x in latency[label].items()})}", flush=True)
        print(
            f"  routed minus same replica: p50 {latency['added_p50_ms']:.2f} ms, "
            f"p99 {latency['added_p99_ms']:.2f} ms",
            flush=True,
        )
    return {
        "counts": counts,
        "throughput_calls_per_s": rates,
        "desktop": latency,
        "ratios": {
            "throughput_2_replicas_lb_over_1_replica": rates["two_replicas_lb"] / rates["one_replica"],
            "throughput_2_replicas_lb_over_1_replica_lb": rates["two_replicas_lb"] / rates["one_replica_lb"],
            "throughput_1_replica_over_direct": rates["one_replica"] / rates["direct"],
            "desktop_p50_routed_over_same_replica": latency["routed"]["p50_ms"]
            / latency["same_replica"]["p50_ms"],
        },
    }
