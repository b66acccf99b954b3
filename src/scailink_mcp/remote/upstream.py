"""Opening an MCP client session to a registered upstream.

Owns: the upstream's outbound headers (built from decrypted credentials, never logged), the choice of
transport (Streamable HTTP or legacy SSE), the SSRF-guarded HTTP client and the mapping of a failure
to the error class name shown in `last_health_status`. Discovery, health checks and the session pool
all connect through `open_session`.
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
from mcp.shared._stream_protocols import ReadStream
from mcp.shared.message import SessionMessage
from mcp.types import Implementation

from scailink_mcp.remote.netguard import guarded_http_client, sse_client_factory
from scailink_mcp.remote.wire import Wire

CLIENT_INFO = Implementation(name="scailink-mcp", version="0.1.0")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class UpstreamTarget:
    """Everything needed to connect to one upstream. `headers` hold secrets: repr hides them."""

    server_id: str
    endpoint_url: str
    transport: str
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)


def upstream_headers(auth_type: str, credentials: Mapping[str, str]) -> dict[str, str]:
    """Outbound headers for an upstream: `bearer` -> Authorization, `api_key_header` -> each field."""
    if auth_type == "bearer":
        token = credentials.get("authorization")
        return {"Authorization": f"Bearer {token}"} if token else {}
    if auth_type == "api_key_header":
        return dict(credentials)
    return {}


class UpstreamSession(ClientSession):
    """The SDK's `ClientSession`, plus the lean `tools/call` path over Streamable HTTP (`wire.py`).

    `wire` is None over the legacy SSE transport, where every call goes through the SDK.
    """

    wire: Wire | None = None


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
    return type(exc).__name__


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
    each HTTP connect/write and `read_timeout` each read. `max_event_bytes` bounds one answer on the
    lean `tools/call` path (the SDK's own reads keep its 1 MiB cap per event).
    """
    headers = dict(target.headers)
    timeout = httpx2.Timeout(connect_timeout, read=read_timeout)
    wire: Wire | None = None
    async with AsyncExitStack() as stack:
        if target.transport == "sse":
            read, write = await stack.enter_async_context(
                sse_client(
                    target.endpoint_url,
                    headers=headers,
                    timeout=connect_timeout,
                    sse_read_timeout=read_timeout,
                    httpx_client_factory=sse_client_factory(allowed),
                )
            )
        else:
            http_client = await stack.enter_async_context(
                guarded_http_client(allowed, headers=headers, timeout=timeout)
            )
            transport_read, write = await stack.enter_async_context(
                streamable_http_client(target.endpoint_url, http_client=http_client)
            )
            inbox, read = anyio.create_memory_object_stream[SessionMessage | Exception](0)
            stack.push_async_callback(read.aclose)
            wire = Wire(http_client, target.endpoint_url, inbox, max_event_bytes)
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
        await session.initialize()
        if wire is not None:
            wire.protocol_version = session.protocol_version
            session.wire = wire
        yield session
