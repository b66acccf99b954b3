"""Upstream answers are read up to `SCAILINK_MAX_RESULT_BYTES` and no further (issue 11, item 3).

Real parts: ScaiLink served by uvicorn on 127.0.0.1 (`LiveApp`), real SDK clients on its `/mcp`, real
upstream MCP servers (`tests/upstream.py`, `big_answers=True`) answering any number of MiB over
Streamable HTTP (SSE and JSON answers) and legacy SSE. The 300 MiB upstream runs in a process of its
own so this process's peak RSS is ScaiLink's (and the test client's) alone.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2
import mcp_types as types
import pytest
from mcp.shared.exceptions import MCPError

from scailink_mcp.config import Settings
from scailink_mcp.errors import ResultTooLarge
from scailink_mcp.naming import namespaced_uri
from scailink_mcp.remote.answers import AnswerLimit, AnswerTooLarge, LimitedTransport
from tests.conftest import LiveApp, TokenFactory
from tests.test_mcp_gateway import mcp_client, register
from tests.upstream import MIB, UpstreamServer

pytestmark = pytest.mark.anyio

TOO_LARGE = ResultTooLarge.code
ROOT = Path(__file__).resolve().parent.parent


def error_code(result: types.CallToolResult) -> str | None:
    meta = result.meta or {}
    return meta.get("scailink/error", {}).get("code") if result.is_error else None


# --- a 300 MiB answer, this process's memory measured -----------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise LookupError(field)


def reset_peak_rss() -> int:
    """Reset this process's peak RSS (VmHWM) to its current RSS; returns that RSS in KiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as exc:
        pytest.skip(f"cannot reset the peak RSS through /proc/self/clear_refs ({exc})")
    return _status_kib("VmRSS")


@pytest.fixture(params=[False, True], ids=["sse-answer", "json-answer"])
def big_upstream_process(request: pytest.FixtureRequest) -> Iterator[str]:
    """A `big_answers` upstream in its own process; yields its Streamable HTTP URL."""
    args = [sys.executable, "-m", "tests.upstream", "--big-answers"]
    if request.param:
        args.append("--json-response")
    proc = subprocess.Popen(
        args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()  # the upstream prints its URL once it serves
        assert url.startswith("http://127.0.0.1:"), f"upstream did not start ({proc.poll()})"
        yield url
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # it stops when stdin closes
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


async def test_300_mib_answer_stops_at_the_limit(
    live: LiveApp, token: TokenFactory, big_upstream_process: str
) -> None:
    tok = token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="big", endpoint_url=big_upstream_process)
    ns = f"remote.u1.{server['slug']}"
    async with mcp_client(live.mcp_url, tok) as s:
        assert (await s.call_tool(f"{ns}.echo", {"text": "warm"})).is_error is not True
        baseline = reset_peak_rss()
        with anyio.fail_after(60):
            result = await s.call_tool(f"{ns}.big_text", {"mib": 300})
        grown_mib = (_status_kib("VmHWM") - baseline) / 1024
        assert error_code(result) == TOO_LARGE, result
        assert grown_mib < 100, f"peak RSS grew by {grown_mib:.0f} MiB for a 300 MiB answer"
        after = await s.call_tool(f"{ns}.echo", {"text": "next"})
        assert after.is_error is not True and after.content[0].text == "next"  # type: ignore[union-attr]


# --- every kind of answer, both transports ----------------------------------------------------------

SMALL_LIMIT = 1 * MIB  # SCAILINK_MAX_RESULT_BYTES for the tests below; answers of 5 MiB exceed it


@pytest.fixture
def small_limit_live(settings_factory: Callable[..., Settings]) -> Iterator[LiveApp]:
    with LiveApp(settings_factory(max_result_bytes=SMALL_LIMIT)) as app:
        yield app


@pytest.fixture(params=[False, True], ids=["sse-answer", "json-answer"])
def big_upstream(request: pytest.FixtureRequest) -> Iterator[UpstreamServer]:
    with UpstreamServer(big_answers=True, json_response=request.param) as server:
        yield server


async def test_calls_reads_and_prompts_stop_at_the_limit(
    small_limit_live: LiveApp, token: TokenFactory, big_upstream: UpstreamServer
) -> None:
    live, tok = small_limit_live, token("u1", "t1", ("tenant_user",))
    server = await register(live, tok, name="big", endpoint_url=big_upstream.url)
    ns = f"remote.u1.{server['slug']}"
    async with mcp_client(live.mcp_url, tok) as s:
        with anyio.fail_after(30):
            result = await s.call_tool(f"{ns}.big_text", {"mib": 5})
            assert error_code(result) == TOO_LARGE, result
            with pytest.raises(MCPError, match=TOO_LARGE):
                await s.read_resource(namespaced_uri(ns, "file:///big/5"))
            with pytest.raises(MCPError, match=TOO_LARGE):
                await s.get_prompt(f"{ns}.big", {"mib": "5"})
            # under the limit everything passes, on a fresh upstream session
            small = await s.call_tool(f"{ns}.big_text", {"mib": 0.5})
            assert small.is_error is not True and len(small.content[0].text) == MIB // 2  # type: ignore[union-attr]
            read = await s.read_resource(namespaced_uri(ns, "file:///big/0.5"))
            assert len(read.contents[0].text) == MIB // 2  # type: ignore[union-attr]
            prompt = await s.get_prompt(f"{ns}.big", {"mib": "0.5"})
            assert len(prompt.messages[0].content.text) == MIB // 2  # type: ignore[union-attr]


async def test_legacy_sse_upstream_answers_stop_at_the_limit(
    small_limit_live: LiveApp, token: TokenFactory
) -> None:
    live, tok = small_limit_live, token("u1", "t1", ("tenant_user",))
    with UpstreamServer(big_answers=True) as upstream:
        server = await register(live, tok, name="legacy", endpoint_url=upstream.sse_url, transport="sse")
        ns = f"remote.u1.{server['slug']}"
        async with mcp_client(live.mcp_url, tok) as s:
            with anyio.fail_after(30):
                result = await s.call_tool(f"{ns}.big_text", {"mib": 5})
                assert error_code(result) == TOO_LARGE, result
                with pytest.raises(MCPError, match=TOO_LARGE):
                    await s.read_resource(namespaced_uri(ns, "file:///big/5"))
                after = await s.call_tool(f"{ns}.echo", {"text": "next"})
                assert after.is_error is not True and after.content[0].text == "next"  # type: ignore[union-attr]


async def test_discovery_of_a_huge_listing_fails_cleanly(
    small_limit_live: LiveApp, token: TokenFactory, big_upstream: UpstreamServer
) -> None:
    live, tok = small_limit_live, token("u1", "t1", ("tenant_user",))
    huge = big_upstream.add_tool(
        types.Tool(name="huge", description="x" * (3 * MIB), input_schema={"type": "object"})
    )
    async with httpx2.AsyncClient(base_url=live.base_url, timeout=60) as c:
        headers = {"Authorization": f"Bearer {tok}"}
        resp = await c.post(
            "/v1/modules/scailink/remote-servers",
            json={"name": "huge-listing", "endpoint_url": big_upstream.url},
            headers=headers,
        )
        assert resp.status_code == 201, resp.text
        data = resp.json()["data"]
        assert data["status"] == "error" and data["last_health_status"] == "ResultTooLarge", data
        assert data["capabilities"]["tools"] == []
        big_upstream.remove_tool(huge.name)
        refreshed = await c.post(f"/v1/modules/scailink/remote-servers/{data['id']}/refresh", headers=headers)
        assert refreshed.status_code == 200, refreshed.text
        assert refreshed.json()["data"]["status"] == "active"
        assert refreshed.json()["data"]["last_health_status"] == "ok"


# --- the bound itself, chunk by chunk -----------------------------------------------------------------


class _Chunks(httpx2.AsyncByteStream):
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk

    async def aclose(self) -> None:
        self.closed = True


class _Canned(httpx2.AsyncBaseTransport):
    def __init__(self, headers: dict[str, str], chunks: list[bytes]) -> None:
        self.headers, self.stream = headers, _Chunks(chunks)
        self.requests: list[httpx2.Request] = []

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        return httpx2.Response(200, headers=self.headers, stream=self.stream, request=request)


async def read_through(limit: int, headers: dict[str, str], chunks: list[bytes]) -> tuple[bytes, Any]:
    canned = _Canned(headers, chunks)
    answer_limit = AnswerLimit(limit)
    async with (
        httpx2.AsyncClient(transport=LimitedTransport(canned, answer_limit)) as client,
        client.stream("GET", "http://upstream.test/mcp") as response,
    ):
        try:
            body = await response.aread()
        except AnswerTooLarge:
            body = b""
    assert canned.requests[0].headers["accept-encoding"] == "identity"
    return body, (answer_limit.tripped, canned.stream.closed)


SSE = {"content-type": "text/event-stream"}


async def test_sse_events_are_bounded_one_by_one() -> None:
    small = b"event: message\r\ndata: " + b"x" * 40 + b"\r\n\r\n"
    # many small events in a long stream pass, however the chunks cut them (even mid-boundary)
    stream = small * 50
    for size in (1, 3, 7, 64):
        chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
        body, (tripped, _) = await read_through(100, SSE, chunks)
        assert body == stream and tripped == 0, size
    # one event over the limit stops the read at the chunk that crosses it, even when that chunk ends it
    big = b"data: " + b"y" * 200 + b"\n\n"
    for chunks in ([small, big, small], [small + big + small], [big[:150], big[150:]]):
        body, (tripped, closed) = await read_through(100, SSE, chunks)
        assert body == b"" and tripped == 1 and closed, chunks


async def test_json_bodies_are_bounded_whole_and_compressed_ones_refused() -> None:
    body, (tripped, _) = await read_through(100, {"content-type": "application/json"}, [b"1" * 60] * 2)
    assert body == b"" and tripped == 1
    body, (tripped, _) = await read_through(100, {"content-type": "application/json"}, [b"1" * 50] * 2)
    assert body == b"1" * 100 and tripped == 0
    declared = {"content-type": "application/json", "content-length": "5000"}
    body, (tripped, _) = await read_through(100, declared, [b"1" * 10])
    assert body == b"" and tripped == 1, "a declared length over the limit fails before reading"
    canned = _Canned({"content-type": "application/json", "content-encoding": "gzip"}, [b"\x1f\x8b"])
    async with (
        httpx2.AsyncClient(transport=LimitedTransport(canned, AnswerLimit(100))) as client,
        client.stream("GET", "http://upstream.test/mcp") as response,
    ):
        with pytest.raises(httpx2.StreamError, match="identity"):
            await response.aread()
