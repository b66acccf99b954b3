"""Issue 14's warm-call harness: `python -m bench.hotpath [--calls 1000] [--profile out.txt]`.

One upstream (`bench.upstream`) and one ScaiLink (`scailink dev`), each its own process on 127.0.0.1.
For each of direct and ScaiLink: one session, 20 warm-up `echo` calls, then N sequential calls; the
CPU time of each process is read from `/proc/PID/stat` (utime + stime) before and after, so the
figures are CPU per call of the ScaiLink process and of the upstream process, next to p50/p99.
Ratios within one run are what count (the machine is shared).

Throughput: C concurrent clients (16 by default, `--clients`), each its own session doing N calls
(`--each`, 50), against the upstream directly and through ScaiLink, alternately, two rounds, after a
warm-up round of 2 calls each; calls/s of each (`bench.calls.concurrent`, sessions opened inside the
timed span as in `python -m bench`).

`--profile FILE` also records the ScaiLink process with py-spy (when installed) during a second
ScaiLink round and writes its top functions to FILE.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio

from bench.__main__ import percentiles, register, scailink_command
from bench.calls import concurrent
from bench.procs import client, free_port, process, wait_http

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def sequential(
    url: str, tool: str, count: int, token: str | None, pids: dict[str, int]
) -> dict[str, float]:
    """p50/p99 of `count` sequential warm calls and the CPU per call of each process in `pids`."""
    async with client(url, token) as session:
        for _ in range(20):
            await session.call_tool(tool, {"text": "warm"})
        before = {name: cpu_s(pid) for name, pid in pids.items()}
        samples: list[float] = []
        for i in range(count):
            t0 = time.perf_counter()
            await session.call_tool(tool, {"text": f"call {i}"})
            samples.append(time.perf_counter() - t0)
        out: dict[str, float] = dict(percentiles(samples))
        for name, pid in pids.items():
            out[f"{name}_cpu_ms_per_call"] = (cpu_s(pid) - before[name]) * 1000 / count
    return out


async def run(calls: int, profile: str | None, clients: int = 16, each: int = 50) -> dict[str, Any]:
    data_dir = Path(tempfile.mkdtemp(prefix="scailink-hotpath-"))
    up_port, sl_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCAILINK_")}
    env["SCAILINK_RATE_LIMIT_PER_S"] = "0"
    upstream = f"http://127.0.0.1:{up_port}/mcp"
    results: dict[str, Any] = {"calls": calls}
    with (
        process([sys.executable, "-m", "bench.upstream", "--port", str(up_port), "--tools", "100"]) as up,
        process(scailink_command(data_dir, sl_port), env=env) as sl,
    ):
        base = f"http://127.0.0.1:{sl_port}"
        wait_http(upstream)
        wait_http(base + "/healthz")
        token = (data_dir / "dev_admin_token").read_text().strip()
        slug = await register(base, token, "bench", upstream)
        tool = f"remote.dev-admin.{slug}.echo"
        for round_ in (1, 2):
            direct = await sequential(upstream, "echo", calls, None, {"upstream": up.pid})
            results[f"direct_{round_}"] = direct
            results[f"scailink_{round_}"] = await sequential(
                base + "/mcp", tool, calls, token, {"scailink": sl.pid, "upstream": up.pid}
            )
        await concurrent(upstream, "echo", clients, 2, None)
        await concurrent(base + "/mcp", tool, clients, 2, token)
        for round_ in (1, 2):
            direct_rate = await concurrent(upstream, "echo", clients, each, None)
            proxied_rate = await concurrent(base + "/mcp", tool, clients, each, token)
            results[f"throughput_{round_}"] = {
                "clients": clients,
                "each": each,
                "direct_calls_per_s": direct_rate["calls_per_s"],
                "scailink_calls_per_s": proxied_rate["calls_per_s"],
            }
        if profile:
            recorder = start_profile(sl.pid, profile)
            if recorder is not None:
                await anyio.sleep(1)  # py-spy attaches
                await sequential(base + "/mcp", tool, calls, token, {"scailink": sl.pid})
                stop_profile(recorder, profile)
    return results


def start_profile(pid: int, profile: str) -> subprocess.Popen[bytes] | None:
    """py-spy recording `pid` into `profile`.raw (collapsed stacks), or None without py-spy."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        return None
    args = [spy, "record", "-p", str(pid), "-f", "raw", "-o", profile + ".raw", "-r", "200", "--nonblocking"]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop_profile(recorder: subprocess.Popen[bytes], profile: str) -> None:
    recorder.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    _, err = recorder.communicate(timeout=60)
    raw = Path(profile + ".raw")
    Path(profile).write_text(top_functions(raw) if raw.exists() else f"py-spy failed: {err.decode()}")


def top_functions(raw: Path, limit: int = 40) -> str:
    """Self and inclusive sample counts per function from py-spy's collapsed-stack output."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = stack.split(";")
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + count
        own[frames[-1]] = own.get(frames[-1], 0) + count
    lines = [f"samples: {samples}", "", "inclusive:"]
    for frame, n in sorted(total.items(), key=lambda kv: -kv[1])[:limit]:
        lines.append(f"{100 * n / max(1, samples):5.1f}%  {frame}")
    lines += ["", "self:"]
    for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:limit]:
        lines.append(f"{100 * n / max(1, samples):5.1f}%  {frame}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--profile", default=None, help="write py-spy's top functions of ScaiLink here")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients of the throughput figure")
    parser.add_argument("--each", type=int, default=50, help="calls per client of the throughput figure")
    args = parser.parse_args()
    results = anyio.run(run, args.calls, args.profile, args.clients, args.each)
    for round_ in (1, 2):
        direct, proxied = results[f"direct_{round_}"], results[f"scailink_{round_}"]
        results[f"ratios_{round_}"] = {
            "p50_over_direct": proxied["p50_ms"] / direct["p50_ms"],
            "p99_over_direct": proxied["p99_ms"] / direct["p99_ms"],
            "scailink_cpu_over_upstream_cpu": proxied["scailink_cpu_ms_per_call"]
            / max(1e-9, proxied["upstream_cpu_ms_per_call"]),
            "throughput_over_direct": results[f"throughput_{round_}"]["scailink_calls_per_s"]
            / results[f"throughput_{round_}"]["direct_calls_per_s"],
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
