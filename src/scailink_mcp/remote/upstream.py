"""Opening an MCP client session to a registered upstream.

Owns: the upstream's outbound headers (built from decrypted credentials, never logged), the choice of
transport (Streamable HTTP or legacy SSE), the SSRF-guarded HTTP client whose answers are bounded
(`answers.py`; the lean call path's own client is `lean_http.py`) and the mapping of a failure to the
error class name shown in `last_health_status`. Discovery, health checks and the session pool all
connect through `open_session`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx2
from anyio.streams.memory import MemoryObjectSendStream
from mcp.client.session import ClientSession, MessageHandlerFnT
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from mcp.types import Implementation
from pydantic import ValidationError

from scailink_mcp.errors import ResultTooLarge
from scailink_mcp.remote.answers import AnswerLimit, AnswerTooLarge, LimitedTransport
from scailink_mcp.remote.lean_http import LeanHTTP
from scailink_mcp.remote.netguard import GuardedTransport
from scailink_mcp.remote.wire import Wire
from scailink_mcp.sdk_sessions import (
    MCP_DEFAULT_SSE_READ_TIMEOUT,
    MCP_DEFAULT_TIMEOUT,
    McpHttpClientFactory,
    ReadStream,
)

CLIENT_INFO = Implementation(name="scailink-mcp", version="0.1.0")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# The SDK's legacy SSE client reads every message with httpx2's default of 1 MiB per event and has no
# option to change it; over that transport the bound is the smaller of the two, so ours trips first.
LEGACY_SSE_MAX_EVENT_BYTES = 1024 * 1024
# The SDK's (and the lean path's) own SSE event limit, a backstop behind `LimitedTransport`: it counts
# decoded text, which invalid UTF-8 can make up to 3x the bytes counted here, so it must be larger.
SSE_BACKSTOP_FACTOR = 4


@dataclass(frozen=True)
class UpstreamTarget:
    """Everything needed to connect to one upstream. `headers` hold secrets: repr hides them.

    `auth` (an OAuth upstream's, `oauth_tokens.BearerAuth`) adds the current token to each request.
    """

    server_id: str
    endpoint_url: str
    transport: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    auth: httpx2.Auth | None = field(default=None, repr=False, compare=False)


def upstream_headers(auth_type: str, credentials: Mapping[str, str]) -> dict[str, str]:
    """Outbound headers for an upstream: `bearer` -> Authorization, `api_key_header` -> each field."""
    if auth_type == "bearer":
        token = credentials.get("authorization")
        return {"Authorization": f"Bearer {token}"} if token else {}
    if auth_type == "api_key_header":
        return dict(credentials)
    return {}


def limited_http_client(
    allowed: Sequence[Network],
    limit: AnswerLimit,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: httpx2.Timeout | None = None,
    auth: httpx2.Auth | None = None,
) -> httpx2.AsyncClient:
    """`netguard.guarded_http_client`'s client (checked connections, no redirects, no proxies, no
    environment) whose answers are read through `limit`."""
    return httpx2.AsyncClient(
        headers=dict(headers or {}),
        timeout=timeout or httpx2.Timeout(MCP_DEFAULT_TIMEOUT, read=MCP_DEFAULT_SSE_READ_TIMEOUT),
        auth=auth,
        transport=LimitedTransport(GuardedTransport(allowed), limit),
        follow_redirects=False,
        trust_env=False,
    )


def _limited_sse_factory(allowed: Sequence[Network], limit: AnswerLimit) -> McpHttpClientFactory:
    def factory(
        headers: dict[str, str] | None = None,
        timeout: httpx2.Timeout | None = None,
        auth: httpx2.Auth | None = None,
    ) -> httpx2.AsyncClient:
        return limited_http_client(allowed, limit, headers=headers, timeout=timeout, auth=auth)

    return factory


class UpstreamSession(ClientSession):
    """The SDK's `ClientSession`, plus the lean `tools/call` path over Streamable HTTP (`wire.py`).

    `wire` is None over the legacy SSE transport, where every call goes through the SDK.
    `answer_limit` bounds every answer of this session; a read it stopped leaves the session in an
    unknown state (the pool drops it).
    """

    wire: Wire | None = None
    answer_limit: AnswerLimit | None = None


async def _pump(
    source: ReadStream[SessionMessage | Exception], sink: MemoryObjectSendStream[SessionMessage | Exception]
) -> None:
    """Feed the transport's inbound messages to the session; `Wire.inject` feeds the same stream."""
    async with sink:
        async for item in source:
            await sink.send(item)


def parse_networks(cidrs: Sequence[str]) -> list[Network]:
    return [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]


def error_class_name(exc: BaseException) -> str:
    """The class name of the root failure: exception groups (anyio task groups) are unwrapped."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, httpx2.TimeoutException):
        return "TimeoutError"
    if isinstance(exc, AnswerTooLarge):
        return ResultTooLarge.__name__
    return type(exc).__name__


def tripped_since(session: Any, before: int) -> AnswerLimit | None:
    """The session's `AnswerLimit` if it stopped a read since it counted `before`, else None."""
    limit = getattr(session, "answer_limit", None)
    if isinstance(limit, AnswerLimit) and limit.tripped > before:
        return limit
    return None


def trip_count(session: Any) -> int:
    limit = getattr(session, "answer_limit", None)
    return limit.tripped if isinstance(limit, AnswerLimit) else 0


async def _negotiate(session: ClientSession, *, modern_fallback: bool) -> None:
    """The `initialize` handshake; an upstream that refuses it but answers `server/discover` with a
    2026-07-28 version (it speaks only that era) is adopted in that era instead, so discovery, the
    pool and health checks can use it (every later request then carries that era's envelope)."""
    try:
        await session.initialize()
    except MCPError:
        if not modern_fallback:
            raise
        try:
            await session.discover()
        except (MCPError, RuntimeError, ValidationError):
            pass
        else:
            return
        raise


@asynccontextmanager
async def open_session(
    target: UpstreamTarget,
    allowed: Sequence[Network],
    *,
    connect_timeout: float,
    read_timeout: float,
    message_handler: MessageHandlerFnT | None = None,
    session_options: Mapping[str, Any] | None = None,
    max_event_bytes: int = 16 * 1024 * 1024,
) -> AsyncIterator[UpstreamSession]:
    """Connect, run the `initialize` handshake and yield a ready session.

    The caller bounds the whole operation (e.g. with `anyio.fail_after`); `connect_timeout` bounds
    each HTTP connect/write and `read_timeout` each read. `max_event_bytes` bounds every answer of the
    session, on the SDK's paths and the lean `tools/call` path alike (one JSON body or one SSE event;
    over legacy SSE at most the SDK's 1 MiB per event). A failure of the handshake or of the caller's
    body after a stopped read is raised as `errors.ResultTooLarge`.
    """
    headers = dict(target.headers)
    timeout = httpx2.Timeout(connect_timeout, read=read_timeout)
    legacy = target.transport == "sse"
    limit = AnswerLimit(min(max_event_bytes, LEGACY_SSE_MAX_EVENT_BYTES) if legacy else max_event_bytes)
    wire: Wire | None = None
    try:
        async with AsyncExitStack() as stack:
            if legacy:
                read, write = await stack.enter_async_context(
                    sse_client(
                        target.endpoint_url,
                        headers=headers,
                        timeout=connect_timeout,
                        sse_read_timeout=read_timeout,
                        httpx_client_factory=_limited_sse_factory(allowed, limit),
                        auth=target.auth,
                    )
                )
            else:
                http_client = await stack.enter_async_context(
                    limited_http_client(allowed, limit, headers=headers, timeout=timeout, auth=target.auth)
                )
                transport_read, write = await stack.enter_async_context(
                    streamable_http_client(
                        target.endpoint_url,
                        http_client=http_client,
                        max_sse_event_size=SSE_BACKSTOP_FACTOR * max_event_bytes,
                    )
                )
                inbox, read = anyio.create_memory_object_stream[SessionMessage | Exception](0)
                stack.push_async_callback(read.aclose)
                # The lean client carries the warm calls; an OAuth upstream's calls keep httpx2's auth flow.
                lean = (
                    None
                    if target.auth is not None
                    else LeanHTTP(target.endpoint_url, allowed, limit, timeout)
                )
                wire = Wire(
                    http_client, target.endpoint_url, inbox, SSE_BACKSTOP_FACTOR * max_event_bytes, lean=lean
                )
                stack.push_async_callback(wire.aclose)
                http_client.event_hooks["response"].append(wire.observe)
                pumps = await stack.enter_async_context(anyio.create_task_group())
                pumps.start_soon(_pump, transport_read, inbox)
                stack.callback(pumps.cancel_scope.cancel)  # runs after the session has closed
            session = await stack.enter_async_context(
                UpstreamSession(
                    read,
                    write,
                    read_timeout_seconds=read_timeout,
                    client_info=CLIENT_INFO,
                    message_handler=message_handler,
                    **dict(session_options or {}),
                )
            )
            session.answer_limit = limit
            await _negotiate(session, modern_fallback=wire is not None)
            if wire is not None:
                wire.protocol_version = session.protocol_version
                session.wire = wire
            yield session
    except Exception as exc:
        if limit.tripped and not isinstance(exc, ResultTooLarge):
            raise limit.error() from None
        raise
