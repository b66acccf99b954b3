"""Peak RSS of ScaiLink while 3 upstreams answer 300 MiB each, in parallel (issue 11, goal: +< 50 MiB).

Processes, all on 127.0.0.1: 6 upstreams (`bench.upstream --big`, each its own process; 3 answer
with JSON bodies, 3 with SSE streams), ScaiLink (`scailink dev` on a temporary data dir, default
settings: `SCAILINK_MAX_RESULT_BYTES` 10 MiB) and this client. Each upstream is registered through the
REST registry; one warm `echo` per upstream opens the pooled sessions. Then, per kind of answer, the
peak RSS (VmHWM) of the ScaiLink process is reset to its RSS and 3 clients call `big_text` at once: the
figure is the peak minus that RSS. Every call must fail with `SCAILINK_RESULT_TOO_LARGE` and a call
after them must work.

Run alone: `python -m bench.big_answers [--quick]` (`--quick`: 64 MiB answers instead of 300).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anyio
import httpx

from bench.procs import client, free_port, process, wait_http

UPSTREAMS = 3
GOAL_MIB = 50.0
TOO_LARGE = "SCAILINK_RESULT_TOO_LARGE"


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def _reset_peak(pid: int) -> bool:
    """VmHWM := VmRSS (Linux `clear_refs` 5); False if not permitted (then the peak is since start)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


async def _call(url: str, token: str, tool: str, arguments: dict[str, Any]) -> str | None:
    """The call's `scailink/error` code, or None if it succeeded."""
    async with client(url, token, read_timeout=300) as session:
        result = await session.call_tool(tool, arguments)
    if not result.is_error:
        return None
    return str((result.meta or {}).get("scailink/error", {}).get("code", "isError"))


async def _round(pid: int, base: str, token: str, names: list[str], mib: float) -> dict[str, Any]:
    """3 parallel `big_text(mib)` calls; the ScaiLink process's peak RSS over its RSS before them."""
    await anyio.sleep(0.5)  # let the previous round's garbage go
    reset = _reset_peak(pid)
    before = _status_kib(pid, "VmRSS")
    codes: list[str | None] = [None] * len(names)
    started = time.perf_counter()

    async def one(i: int) -> None:
        codes[i] = await _call(base + "/mcp", token, f"{names[i]}.big_text", {"mib": mib})

    async with anyio.create_task_group() as tg:
        for i in range(len(names)):
            tg.start_soon(one, i)
    elapsed = time.perf_counter() - started
    peak = _status_kib(pid, "VmHWM")
    after_ok = await _call(base + "/mcp", token, f"{names[0]}.echo", {"text": "after"}) is None
    growth_mib = (peak - before) / 1024
    return {
        "rss_before_mib": round(before / 1024, 1),
        "peak_mib": round(peak / 1024, 1),
        "peak_growth_mib": round(growth_mib, 1),
        "peak_reset": reset,
        "seconds": round(elapsed, 2),
        "codes": codes,
        "next_call_ok": after_ok,
        "met": growth_mib < GOAL_MIB and all(code == TOO_LARGE for code in codes) and after_ok,
    }


async def measure(quick: bool) -> dict[str, Any]:
    """Two rounds: the upstreams answer with JSON bodies, then with SSE streams (3 upstreams each)."""
    mib = 64 if quick else 300
    data_dir = Path(tempfile.mkdtemp(prefix="scailink-bench-big-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCAILINK_")}
    env["SCAILINK_RATE_LIMIT_PER_S"] = "0"
    modes = {
        "json": [free_port() for _ in range(UPSTREAMS)],
        "sse": [free_port() for _ in range(UPSTREAMS)],
    }
    sl_port = free_port()
    base = f"http://127.0.0.1:{sl_port}"
    results: dict[str, Any] = {"answers": UPSTREAMS, "mib_per_answer": mib, "goal_mib": GOAL_MIB}
    with ExitStack() as stack:
        for mode, ports in modes.items():
            for port in ports:
                up = [sys.executable, "-m", "bench.upstream", "--port", str(port), "--tools", "0", "--big"]
                stack.enter_context(process(up + (["--json"] if mode == "json" else [])))
        command = [sys.executable, "-m", "scailink_mcp.cli", "dev", "--no-demo", "--data-dir", str(data_dir)]
        scailink = stack.enter_context(process([*command, "--port", str(sl_port)], env=env))
        for ports in modes.values():
            for port in ports:
                wait_http(f"http://127.0.0.1:{port}/mcp")
        wait_http(base + "/healthz")
        token = (data_dir / "dev_admin_token").read_text().strip()
        names: dict[str, list[str]] = {}
        async with httpx.AsyncClient(timeout=60) as rest:
            for mode, ports in modes.items():
                names[mode] = []
                for i, port in enumerate(ports):
                    resp = await rest.post(
                        f"{base}/v1/modules/scailink/remote-servers",
                        json={"name": f"big-{mode}-{i}", "endpoint_url": f"http://127.0.0.1:{port}/mcp"},
                        headers={"Authorization": f"Bearer {token}"},
                    )
                    resp.raise_for_status()
                    names[mode].append(f"remote.dev-admin.{resp.json()['data']['slug']}")
        for ns in names["json"] + names["sse"]:  # warm: the pooled sessions exist before measuring
            assert await _call(base + "/mcp", token, f"{ns}.echo", {"text": "warm"}) is None
        for mode in modes:
            results[mode] = await _round(scailink.pid, base, token, names[mode], mib)
    results["met"] = all(results[mode]["met"] for mode in modes)
    return results


def report(result: dict[str, Any]) -> list[str]:
    lines = []
    for mode in ("json", "sse"):
        r = result[mode]
        lines.append(
            f"{mode} answers: peak RSS +{r['peak_growth_mib']} MiB while {result['answers']} upstreams "
            f"answered {result['mib_per_answer']} MiB in parallel (goal +< {GOAL_MIB:g} MiB): "
            f"{'met' if r['met'] else 'NOT met'}; codes {r['codes']}, next call ok: {r['next_call_ok']}"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.big_answers")
    parser.add_argument("--quick", action="store_true", help="64 MiB answers instead of 300 MiB")
    args = parser.parse_args()
    result = anyio.run(measure, args.quick)
    print(json.dumps(result, indent=2))
    for line in report(result):
        print(line)


if __name__ == "__main__":
    main()
