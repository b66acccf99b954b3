"""`python -m bench [--quick] [--out bench/results.json]`: ScaiLink vs a direct SDK connection, same run.

Processes: the upstream (`bench.upstream`), ScaiLink (`scailink dev` on a temp data dir) and this
client, each its own process, all on 127.0.0.1. ScaiLink learns the upstream through the REST
registry, as a user would. Figures are printed as ratios against the direct call measured in the same
run; absolute times on a shared machine are noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx

from bench import big_answers, listings
from bench import replicas as several
from bench.calls import concurrent, percentiles
from bench.catalog_flood import catalog_flood
from bench.mcp_proxy import STOP_SIGNAL, mcp_proxy_bin, mcp_proxy_command
from bench.procs import client, free_port, process, wait_http


async def warm_calls(url: str, tool: str, count: int, token: str | None) -> dict[str, float]:
    async with client(url, token) as session:
        for _ in range(20):
            await session.call_tool(tool, {"text": "warm"})
        samples: list[float] = []
        start = time.perf_counter()
        for i in range(count):
            t0 = time.perf_counter()
            await session.call_tool(tool, {"text": f"call {i}"})
            samples.append(time.perf_counter() - t0)
        elapsed = time.perf_counter() - start
    return {**percentiles(samples), "calls_per_s": count / elapsed}


async def cold_calls(url: str, tool: str, count: int, token: str | None) -> dict[str, float]:
    samples: list[float] = []
    for _ in range(count):
        t0 = time.perf_counter()
        async with client(url, token) as session:
            await session.call_tool(tool, {"text": "cold"})
        samples.append(time.perf_counter() - t0)
    return {"median_ms": statistics.median(samples) * 1000}


async def list_tools(url: str, count: int, token: str | None) -> dict[str, float]:
    async with client(url, token) as session:
        await session.list_tools()
        samples: list[float] = []
        for _ in range(count):
            t0 = time.perf_counter()
            cursor = None
            n = 0
            while True:
                from mcp.types import PaginatedRequestParams

                page = await session.list_tools(
                    params=PaginatedRequestParams(cursor=cursor) if cursor else None
                )
                n += len(page.tools)
                cursor = page.next_cursor
                if not cursor:
                    break
            samples.append(time.perf_counter() - t0)
    return {"median_ms": statistics.median(samples) * 1000, "tools": float(n)}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def idle_desktops(base: str, data_dir: Path, pid: int, count: int) -> dict[str, float]:
    """RSS of the ScaiLink process per idle desktop session (5 devices per user, the per-user cap)."""
    from websockets.asyncio.client import connect

    from scailink_mcp.auth import mint_token

    key = (data_dir / "dev_signing_key.pem").read_bytes()
    url = base.replace("http://", "ws://") + "/v1/scailink/ws"
    tool = {"name": "echo", "inputSchema": {"type": "object"}}
    before = rss_kib(pid)
    opened = 0
    stop = anyio.Event()

    async def one(i: int) -> None:
        nonlocal opened
        token = mint_token(key, user_id=f"bench-{i // 5}", tenant_id="bench", groups=["tenant_user"])
        init = {
            "protocol_version": "scailink/1.0", "client_version": "bench", "device_name": f"dev {i}",
            "device_id": f"dev-{i}", "platform": {"os": "linux"}, "capabilities": {"tools": [tool]},
        }  # fmt: skip
        async with connect(
            url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=60
        ) as ws:
            await ws.send(
                json.dumps({"jsonrpc": "2.0", "id": 1, "method": "scailink/session_init", "params": init})
            )
            await ws.recv()
            opened += 1
            await stop.wait()

    async with anyio.create_task_group() as tg:
        for i in range(count):
            tg.start_soon(one, i)
        with anyio.fail_after(120):
            while opened < count:  # noqa: ASYNC110
                await anyio.sleep(0.1)
        await anyio.sleep(1)
        after = rss_kib(pid)
        stop.set()
    return {"sessions": float(count), "rss_before_kib": float(before), "rss_after_kib": float(after),
            "kib_per_session": (after - before) / count}  # fmt: skip


async def measure(
    name: str, results: dict[str, Any], fn: Callable[..., Awaitable[dict[str, float]]], *args: Any
) -> None:
    results[name] = await fn(*args)
    print(f"  {name}: {json.dumps({k: round(v, 2) for k, v in results[name].items()})}", flush=True)


PEERS_DIR = Path(__file__).resolve().parent / ".peers"
FASTMCP_PIN = "fastmcp==4.2.3"


def fastmcp_python(setup: bool) -> Path | None:
    """The FastMCP proxy runs from its own virtualenv (bench/.peers/fastmcp), created on request."""
    python = PEERS_DIR / "fastmcp" / "bin" / "python"
    if python.exists():
        return python
    if not setup:
        return None
    try:
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_DIR / "fastmcp")], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", FASTMCP_PIN], check=True)
    except subprocess.CalledProcessError as exc:
        print(f"fastmcp_proxy: could not be installed ({exc}); skipped", flush=True)
        return None
    return python


async def measure_target(
    label: str,
    url: str,
    tool: str,
    token: str | None,
    counts: dict[str, int],
    results: dict[str, Any],
    calls_only: bool = False,
) -> None:
    print(f"{label}:", flush=True)
    out: dict[str, Any] = {}
    await measure("warm", out, warm_calls, url, tool, counts["warm"], token)
    if not calls_only:
        await measure("cold", out, cold_calls, url, tool, counts["cold"], token)
        await measure("list_100", out, list_tools, url, counts["list"], token)
    await measure("concurrent", out, concurrent, url, tool, counts["clients"], counts["each"], token)
    results[label] = out


async def register(base: str, token: str, name: str, endpoint: str) -> str:
    async with httpx.AsyncClient(timeout=60) as rest:
        resp = await rest.post(
            f"{base}/v1/modules/scailink/remote-servers",
            json={"name": name, "endpoint_url": endpoint},
            headers={"Authorization": f"Bearer {token}"},
        )
    resp.raise_for_status()
    return str(resp.json()["data"]["slug"])


def proxy_command(program: list[str], port: int, upstream: str) -> list[str]:
    """The naive and FastMCP peers take the same two options."""
    return [*program, "--port", str(port), "--upstream", upstream]


def scailink_command(data_dir: Path, port: int) -> list[str]:
    # --no-demo: the measured catalogs hold only the bench upstream's tools.
    return [
        sys.executable,
        "-m",
        "scailink_mcp.cli",
        "dev",
        "--no-demo",
        "--data-dir",
        str(data_dir),
        "--port",
        str(port),
    ]


# ScaiLink as it was before the lean `tools/call` path and the verified-token cache, same code base:
# both switched off by settings, measured in the same run for a before/after comparison.
BEFORE_ENV = {"SCAILINK_POOL_LEAN_CALLS": "false", "SCAILINK_JWT_VERIFIED_CACHE_SIZE": "0"}


async def run(quick: bool, setup_peers: bool) -> dict[str, Any]:
    counts = (
        {"warm": 100, "cold": 3, "list": 3, "clients": 4, "each": 15}
        if quick
        else {"warm": 2000, "cold": 30, "list": 20, "clients": 16, "each": 100}
    )
    data_dir = Path(tempfile.mkdtemp(prefix="scailink-bench-"))
    before_dir = Path(tempfile.mkdtemp(prefix="scailink-bench-before-"))
    up_port, sl_port, before_port = free_port(), free_port(), free_port()
    naive_port, fast_port, proxy_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCAILINK_")}
    # The per-user rate limit (a policy, 20/s by default) would measure itself, not the call path.
    env["SCAILINK_RATE_LIMIT_PER_S"] = "0"
    upstream = f"http://127.0.0.1:{up_port}/mcp"
    fast_python = fastmcp_python(setup_peers)
    proxy_bin = mcp_proxy_bin(PEERS_DIR, setup_peers)
    results: dict[str, Any] = {"quick": quick, "counts": counts}
    peers: dict[str, str] = {}  # label -> URL of the peers that run
    with ExitStack() as stack:
        stack.enter_context(
            process([sys.executable, "-m", "bench.upstream", "--port", str(up_port), "--tools", "100"])
        )
        scailink_proc = stack.enter_context(process(scailink_command(data_dir, sl_port), env=env))
        stack.enter_context(process(scailink_command(before_dir, before_port), env={**env, **BEFORE_ENV}))
        stack.enter_context(
            process(proxy_command([sys.executable, "-m", "bench.naive_proxy"], naive_port, upstream))
        )
        peers["naive_proxy"] = f"http://127.0.0.1:{naive_port}/mcp"
        if fast_python is not None:
            fast_cmd = proxy_command([str(fast_python), "bench/fastmcp_proxy.py"], fast_port, upstream)
            stack.enter_context(process(fast_cmd))
            peers["fastmcp_proxy"] = f"http://127.0.0.1:{fast_port}/mcp"
        wait_http(upstream)  # mcp-proxy opens its one upstream session at start
        if proxy_bin is not None:
            stack.enter_context(process(mcp_proxy_command(proxy_bin, proxy_port, upstream), stop=STOP_SIGNAL))
            peers["mcp_proxy"] = f"http://127.0.0.1:{proxy_port}/mcp"
        scailink = f"http://127.0.0.1:{sl_port}"
        before = f"http://127.0.0.1:{before_port}"
        for url in (scailink + "/healthz", before + "/healthz", *peers.values()):
            wait_http(url)
        token = (data_dir / "dev_admin_token").read_text().strip()
        before_token = (before_dir / "dev_admin_token").read_text().strip()
        slug = await register(scailink, token, "bench", upstream)
        before_slug = await register(before, before_token, "bench", upstream)
        await measure_target("direct", upstream, "echo", None, counts, results)
        await measure_target(
            "scailink", scailink + "/mcp", f"remote.dev-admin.{slug}.echo", token, counts, results
        )
        await measure_target(
            "scailink_before",
            before + "/mcp",
            f"remote.dev-admin.{before_slug}.echo",
            before_token,
            counts,
            results,
            calls_only=True,
        )
        for label, url in peers.items():
            await measure_target(label, url, "echo", None, counts, results)
        for label, why in (
            ("fastmcp_proxy", "bench/.peers/fastmcp"),
            ("mcp_proxy", "bench/.peers/mcp-proxy"),
        ):
            if label not in peers:
                print(f"{label}: skipped (run with --setup-peers to create {why})", flush=True)
        # 50 upstreams of 100 tools (the same upstream registered 50 times): 5,000 aggregated names
        for i in range(1, 50):
            await register(scailink, token, f"bench-{i}", upstream)
        print("scailink, 50 upstreams:", flush=True)
        await measure("list_5000", results["scailink"], list_tools, scailink + "/mcp", counts["list"], token)
        await measure(
            "idle_desktops",
            results["scailink"],
            idle_desktops,
            scailink,
            data_dir,
            scailink_proc.pid,
            200 if quick else 1000,
        )
        print("scailink, /healthz while one desktop floods catalog updates:", flush=True)
        results["catalog_flood"] = await catalog_flood(scailink, token, seconds=3.0 if quick else 15.0)
        print(f"  {results['catalog_flood']}", flush=True)
    print("scailink, 3 upstreams answering big answers in parallel:", flush=True)
    results["big_answers"] = await big_answers.measure(quick)
    results["ratios"] = ratios(results)
    results["targets"] = targets(results["ratios"])
    print("several replicas (issue 13):", flush=True)
    results["replicas"] = await several.measure(quick)
    print("issue 14, listings and idle sessions (bench/listings.py):", flush=True)
    results["listings"] = await listings.measure(quick)
    results["not_measured"] = {}
    if "skipped" in results["replicas"]:
        results["not_measured"]["replicas"] = results["replicas"]["skipped"]
    else:
        results["ratios"].update(results["replicas"]["ratios"])
    return results


def ratios(results: dict[str, Any]) -> dict[str, float]:
    direct, proxied, before = results["direct"], results["scailink"], results["scailink_before"]

    def p50(label: str) -> float:
        return float(results[label]["warm"]["p50_ms"])

    def rate(label: str) -> float:
        return float(results[label]["concurrent"]["calls_per_s"])

    out = {
        "warm_p50_scailink_over_direct": p50("scailink") / p50("direct"),
        "warm_p99_scailink_over_direct": proxied["warm"]["p99_ms"] / direct["warm"]["p99_ms"],
        "warm_over_cold_scailink": p50("scailink") / proxied["cold"]["median_ms"],
        "list_100_scailink_over_direct": proxied["list_100"]["median_ms"] / direct["list_100"]["median_ms"],
        "list_5000_scailink_over_direct_list_100": proxied["list_5000"]["median_ms"]
        / direct["list_100"]["median_ms"],
        "throughput_scailink_over_direct": rate("scailink") / rate("direct"),
        "warm_p50_before_over_direct": p50("scailink_before") / p50("direct"),
        "throughput_before_over_direct": rate("scailink_before") / rate("direct"),
        "warm_p50_after_over_before": p50("scailink") / before["warm"]["p50_ms"],
    }
    for peer in ("naive_proxy", "fastmcp_proxy", "mcp_proxy"):
        if peer not in results:
            continue
        out[f"warm_p50_{peer}_over_direct"] = p50(peer) / p50("direct")
        out[f"added_latency_scailink_over_{peer}"] = (p50("scailink") - p50("direct")) / max(
            1e-9, p50(peer) - p50("direct")
        )
        out[f"throughput_scailink_over_{peer}"] = rate("scailink") / rate(peer)
    return out


def targets(r: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Issue 7's targets against this run's ratios (reported, never asserted)."""
    wanted: list[tuple[str, str, float, str]] = [
        ("warm p50 <= 1.5x direct", "warm_p50_scailink_over_direct", 1.5, "<="),
        ("added latency <= 0.5x FastMCP's", "added_latency_scailink_over_fastmcp_proxy", 0.5, "<="),
        ("warm <= 0.3x cold", "warm_over_cold_scailink", 0.3, "<="),
        ("list of 5,000 <= 3x direct list of 100", "list_5000_scailink_over_direct_list_100", 3.0, "<="),
        ("throughput at C clients >= 0.7x direct", "throughput_scailink_over_direct", 0.7, ">="),
    ]
    out: dict[str, dict[str, Any]] = {}
    for label, key, bound, op in wanted:
        if key not in r:
            out[label] = {"ratio": None, "met": None}
            continue
        value = r[key]
        out[label] = {"ratio": round(value, 3), "met": value <= bound if op == "<=" else value >= bound}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--quick", action="store_true", help="small counts, for CI smoke (< 2 min)")
    parser.add_argument("--setup-peers", action="store_true", help="create bench/.peers/fastmcp if missing")
    parser.add_argument("--out", default="bench/results.json")
    args = parser.parse_args()
    results = anyio.run(run, args.quick, args.setup_peers)
    print("\nratios (same run):")
    for name, value in results["ratios"].items():
        print(f"  {name:45s} {value:7.2f}")
    print("\ntargets (issue 7):")
    for name, verdict in results["targets"].items():
        met = {True: "met", False: "NOT met", None: "not measured"}[verdict["met"]]
        print(f"  {name:45s} {verdict['ratio'] if verdict['ratio'] is not None else '-':>7} {met}")
    for name, why in results["not_measured"].items():
        print(f"  not measured: {name}: {why}")
    Path(args.out).write_text(json.dumps(results, indent=2))
    print("\ntargets (issue 11):")
    for line in big_answers.report(results["big_answers"]):
        print(f"  {line}")
    flood = results["catalog_flood"]["healthz_during_flood"]["p99_ms"]
    verdict = "met" if flood < 50 else "NOT met"
    print(f"  /healthz p99 while one device floods catalog updates: {flood} ms (goal < 50 ms): {verdict}")
    print("\ntargets (issue 14, listings and memory):")
    for line in listings.report(results["listings"]):
        print(f"  {line}")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
