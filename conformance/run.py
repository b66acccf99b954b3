"""`python -m conformance.run [--target scailink|direct]`: the official MCP conformance suite.

Starts the upstream (`conformance.upstream_server`), and for `scailink` (default) ScaiLink itself
(`scailink dev` in a temporary data dir), registers the upstream through the REST registry, and runs
`@modelcontextprotocol/conformance server` against ScaiLink's per-server endpoint
(`/v1/modules/scailink/remote-servers/{id}/mcp`) through `conformance.forwarder`, which adds the token.
Compares the result with `conformance/expected-failures.txt`: a failure not listed fails the run; a
listed scenario that passes is reported so the baseline only shrinks. Node 22 comes from the pinned
npm package `node` (the machine's Node 20 is too old for the suite).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn

HERE = Path(__file__).resolve().parent
NODE = HERE / "node_modules" / "node" / "bin" / "node"
SUITE = HERE / "node_modules" / "@modelcontextprotocol" / "conformance" / "dist" / "index.js"
BASELINE = HERE / "expected-failures.txt"
RESULT = re.compile(r"^[✓✗]\s+([\w-]+):\s+(\d+) passed,\s+(\d+) failed", re.MULTILINE)
ONE_RESULT = re.compile(r"^Passed: \d+/\d+, (\d+) failed", re.MULTILINE)
UNSCORED = re.compile(r"^\s+[✓✗]\s+([\w-]+) \(", re.MULTILINE)
# The two requirement sets of the suite: each spec revision's scenarios, frozen at its release.
REQUIREMENTS = ("2025-11-25", "2026-07-28")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise TimeoutError(url)


@contextmanager
def process(args: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def forwarder(target: str, token: str) -> Iterator[str]:
    from conformance.forwarder import build

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build(target, token), host="127.0.0.1", port=port, log_config=None,
                                           timeout_graceful_shutdown=2))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def ensure_npm() -> None:
    if NODE.exists() and SUITE.exists():
        return
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=HERE, check=True)


def scored(output: str) -> dict[str, bool]:
    """The scenarios the requirement set scores (those under "Not scored for ..." are left out)."""
    head, _, tail = output.partition("Not scored for")
    unscored = set(UNSCORED.findall(tail))
    return {m.group(1): int(m.group(3)) == 0 for m in RESULT.finditer(head) if m.group(1) not in unscored}


def run_suite(
    url: str, revisions: tuple[str, ...] = REQUIREMENTS, scenario: str | None = None
) -> dict[str, bool]:
    """Each requirement set (`--requirements`), each scenario as `{revision}:{scenario}`."""
    results: dict[str, bool] = {}
    logs: list[str] = []
    for revision in revisions:
        # The suite takes one scenario with the revision as `--spec-version`, not `--requirements`.
        which = (
            ["--scenario", scenario, "--spec-version", revision] if scenario else ["--requirements", revision]
        )
        proc = subprocess.run([str(NODE), str(SUITE), "server", "--url", url, *which],
                              capture_output=True, text=True, timeout=900)  # fmt: skip
        output = proc.stdout + proc.stderr
        logs.append(f"==== --requirements {revision}\n{output}")
        found = scored(output)
        single = ONE_RESULT.search(output) if scenario else None
        if scenario and single:  # one scenario prints its checks' totals only
            found = {scenario: int(single.group(1)) == 0}
        if not found:
            raise RuntimeError(f"the conformance suite printed no results:\n{output[-3000:]}")
        results |= {f"{revision}:{name}": ok for name, ok in found.items()}
    (HERE / "last-run.log").write_text("\n".join(logs))
    return results


def baseline() -> set[str]:
    if not BASELINE.exists():
        return set()
    lines = (line.split("#", 1)[0].strip() for line in BASELINE.read_text().splitlines())
    return {line for line in lines if line}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.run")
    parser.add_argument("--target", choices=["scailink", "direct"], default="scailink")
    parser.add_argument("--requirements", choices=REQUIREMENTS, help="one requirement set (default: both)")
    parser.add_argument("--scenario", help="one scenario (the baseline is then not compared)")
    args = parser.parse_args(argv)
    revisions = (args.requirements,) if args.requirements else REQUIREMENTS
    ensure_npm()
    up_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCAILINK_")}
    # The suite checks the protocol, not the per-user rate limit (one token sends every scenario).
    env["SCAILINK_RATE_LIMIT_PER_S"] = "0"
    with process([sys.executable, "-m", "conformance.upstream_server", "--port", str(up_port)]):
        upstream = f"http://127.0.0.1:{up_port}/mcp"
        wait_http(upstream)
        if args.target == "direct":
            results = run_suite(upstream, revisions, args.scenario)
        else:
            data_dir = Path(tempfile.mkdtemp(prefix="scailink-conformance-"))
            port = free_port()
            cmd = [
                sys.executable,
                "-m",
                "scailink_mcp.cli",
                "dev",
                "--no-demo",  # the suite expects the conformance upstream's catalog only
                "--data-dir",
                str(data_dir),
                "--port",
                str(port),
            ]
            with process(cmd, env=env):
                base = f"http://127.0.0.1:{port}"
                wait_http(base + "/healthz")
                token = (data_dir / "dev_admin_token").read_text().strip()
                resp = httpx.post(f"{base}/v1/modules/scailink/remote-servers", timeout=60,
                                  json={"name": "conformance", "endpoint_url": upstream},
                                  headers={"Authorization": f"Bearer {token}"})  # fmt: skip
                resp.raise_for_status()
                server_id = resp.json()["data"]["id"]
                with forwarder(base, token) as front:
                    url = f"{front}/v1/modules/scailink/remote-servers/{server_id}/mcp"
                    results = run_suite(url, revisions, args.scenario)
    expected = baseline()
    failed = {name for name, ok in results.items() if not ok}
    for name, ok in sorted(results.items()):
        note = " (expected, in the baseline)" if name in expected and not ok else ""
        print(f"{'PASS' if ok else 'FAIL'}  {name}{note}")
    fixed = sorted(expected & {name for name, ok in results.items() if ok})
    if fixed:
        print(f"now passing, remove from {BASELINE.name}: {', '.join(fixed)}")
    unexpected = sorted(failed - expected)
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if unexpected:
        print(f"unexpected failures: {', '.join(unexpected)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
