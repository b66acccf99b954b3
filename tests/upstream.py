"""Real upstream MCP servers for ScaiLink's tests, served over HTTP on 127.0.0.1.

Owns: an MCP server built on the SDK's lowlevel `Server` (a mutable tool set, fixed resources,
resource templates and prompts, every listing paginated with `nextCursor`), the Starlette app that
serves it over Streamable HTTP (`/mcp`) and legacy SSE (`/sse`, posting to `/messages/`), and the
uvicorn thread that runs it. The port is reserved for the object's whole life, so `restart()` comes
back at the same URL and a registered `endpoint_url` stays valid.

`big_answers=True` adds answers of any size (`mib`, a number of MiB): the tool `big_text`, the
prompt `big` and the resources `file:///big/<mib>`. `python -m tests.upstream [--big-answers]
[--json-response]` serves one in a process of its own (prints its URL, stops when stdin closes), for
measuring a client's memory without this server's.

Must not: import ScaiLink or patch anything. Tests reach it only over the wire, like a real upstream.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import jsonschema  # type: ignore[import-untyped]
import mcp_types as types
import uvicorn
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.lowlevel import NotificationOptions, Server
from mcp.server.models import InitializationOptions
from mcp.server.session import ServerSession
from mcp.server.sse import SseServerTransport
from mcp.server.streamable_http_manager import StreamableHTTPASGIApp, StreamableHTTPSessionManager
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

HOST = "127.0.0.1"
RESOURCE_NOT_FOUND = -32002  # the spec's code for resources/read of an unknown URI
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0

T = TypeVar("T")


# --- tools ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """One `tools/call` as a tool handler sees it, with the HTTP headers of the request carrying it."""

    name: str
    arguments: dict[str, Any]
    headers: dict[str, str]


ToolHandler = Callable[[ToolCall], Awaitable[types.CallToolResult]]


def text_result(text: str, *, is_error: bool = False) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=text)], is_error=is_error)


def _schema(properties: dict[str, Any], required: Sequence[str] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


async def _echo(call: ToolCall) -> types.CallToolResult:
    return text_result(str(call.arguments["text"]))


async def _add(call: ToolCall) -> types.CallToolResult:
    structured = {"sum": call.arguments["a"] + call.arguments["b"]}
    return types.CallToolResult(
        content=[types.TextContent(text=json.dumps(structured))], structured_content=structured
    )


async def _echo_headers(call: ToolCall) -> types.CallToolResult:
    return text_result(json.dumps(call.headers, sort_keys=True))


async def _sleep_ms(call: ToolCall) -> types.CallToolResult:
    await anyio.sleep(call.arguments["ms"] / 1000)
    return text_result(f"slept {call.arguments['ms']} ms")


async def _fail(call: ToolCall) -> types.CallToolResult:
    return text_result("fail: this tool always fails", is_error=True)


MIB = 1024 * 1024


def big_text(mib: float) -> str:
    return "x" * int(mib * MIB)


async def _big_text(call: ToolCall) -> types.CallToolResult:
    return text_result(big_text(float(call.arguments["mib"])))


BIG_TEXT_TOOL = types.Tool(
    name="big_text",
    description="Answer `mib` MiB of text.",
    input_schema=_schema({"mib": {"type": "number", "minimum": 0}}, ["mib"]),
)
BIG_PROMPT = types.Prompt(
    name="big",
    description="A prompt of `mib` MiB.",
    arguments=[types.PromptArgument(name="mib", required=True)],
)
BIG_RESOURCES = "file:///big/"


async def describe_call(call: ToolCall) -> types.CallToolResult:
    """The default handler of added and generated tools: the call itself, as JSON text."""
    return text_result(json.dumps({"tool": call.name, "arguments": call.arguments}, sort_keys=True))


def default_tools() -> list[tuple[types.Tool, ToolHandler]]:
    text = {"type": "string", "description": "Text to send back unchanged."}
    return [
        (
            types.Tool(
                name="echo", description="Echo the text back.", input_schema=_schema({"text": text}, ["text"])
            ),
            _echo,
        ),
        (
            types.Tool(
                name="add",
                description="Add two integers.",
                input_schema=_schema({"a": {"type": "integer"}, "b": {"type": "integer"}}, ["a", "b"]),
                output_schema=_schema({"sum": {"type": "integer"}}, ["sum"]),
            ),
            _add,
        ),
        (
            types.Tool(
                name="echo_headers",
                description="Return, as JSON text, the HTTP request headers this call arrived with.",
                input_schema=_schema({}),
            ),
            _echo_headers,
        ),
        (
            types.Tool(
                name="sleep_ms",
                description="Wait the given number of milliseconds, then answer.",
                input_schema=_schema({"ms": {"type": "integer", "minimum": 0}}, ["ms"]),
            ),
            _sleep_ms,
        ),
        (types.Tool(name="fail", description="Always fail (isError).", input_schema=_schema({})), _fail),
    ]


def generated_tool(i: int) -> types.Tool:
    """`gen_<i>`: schemas shaped like real SaaS tools (nested objects, enums, arrays, bounds)."""
    kind = i % 3
    if kind == 0:
        description = (
            f"Search the records of collection {i} by free text and filters. Returns at most `limit` "
            "matches ordered by relevance, each with its id, title, owner and last update time."
        )
        schema = _schema(
            {
                "query": {"type": "string", "description": "Free-text query; quoted phrases match exactly."},
                "limit": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                "filters": _schema(
                    {
                        "status": {"type": "string", "enum": ["open", "closed", "all"], "default": "open"},
                        "labels": {"type": "array", "items": {"type": "string"}, "maxItems": 10},
                        "updated_after": {"type": "string", "format": "date-time"},
                    }
                ),
            },
            ["query"],
        )
    elif kind == 1:
        description = (
            f"Create a record in collection {i}. The title is required; the body accepts Markdown. "
            "Assignees must be existing user logins. Returns the new record's id and URL."
        )
        schema = _schema(
            {
                "title": {"type": "string", "minLength": 1, "maxLength": 256},
                "body": {"type": "string", "description": "Markdown body."},
                "assignees": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                "priority": {"type": "string", "enum": ["low", "normal", "high", "urgent"]},
            },
            ["title"],
        )
    else:
        description = (
            f"Update the status of record `id` in collection {i} and optionally leave a comment "
            "explaining the change. Fails if the record is locked or archived."
        )
        schema = _schema(
            {
                "id": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
                "status": {"type": "string", "enum": ["open", "in_progress", "blocked", "done"]},
                "comment": {"type": "string", "maxLength": 4000},
                "notify": {"type": "boolean", "default": True},
            },
            ["id", "status"],
        )
    return types.Tool(name=f"gen_{i}", description=description, input_schema=schema)


class ToolSet:
    """The tools an upstream offers. Changed from the test thread while the server thread reads it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tools: dict[str, tuple[types.Tool, ToolHandler]] = {}

    def add(self, tool: types.Tool, handler: ToolHandler) -> None:
        with self._lock:
            self._tools[tool.name] = (tool, handler)

    def remove(self, name: str) -> None:
        with self._lock:
            del self._tools[name]

    def get(self, name: str) -> tuple[types.Tool, ToolHandler] | None:
        with self._lock:
            return self._tools.get(name)

    def listing(self) -> list[types.Tool]:
        with self._lock:
            return [tool for tool, _ in self._tools.values()]


# --- the MCP server ---------------------------------------------------------------------------------

NOTES = {
    "readme.md": "# Notes\n\nRead me first.\n",
    "todo.md": "- [ ] write tests\n- [x] start an upstream\n",
    "data.json": '{"items": [1, 2, 3]}',
}


def _resources() -> list[types.Resource]:
    return [
        types.Resource(
            name=name,
            uri=f"file:///notes/{name}",
            mime_type="application/json" if name.endswith(".json") else "text/markdown",
        )
        for name in NOTES
    ]


def _templates() -> list[types.ResourceTemplate]:
    return [
        types.ResourceTemplate(name="note", uri_template="file:///notes/{name}", mime_type="text/markdown"),
        types.ResourceTemplate(
            name="daily_log", uri_template="file:///logs/{day}.log", mime_type="text/plain"
        ),
    ]


def _prompts() -> list[types.Prompt]:
    def arg(name: str, required: bool = True) -> types.PromptArgument:
        return types.PromptArgument(name=name, required=required)

    return [
        types.Prompt(name="greet", description="Greet someone by name.", arguments=[arg("name")]),
        types.Prompt(
            name="summarize", description="Summarize a text.", arguments=[arg("text"), arg("style", False)]
        ),
        types.Prompt(name="review", description="Review a change.", arguments=[arg("diff")]),
    ]


def paginate(
    items: Sequence[T], params: types.PaginatedRequestParams | None, size: int | None
) -> tuple[list[T], str | None]:
    """One page of `items` and the cursor of the next (None on the last). Cursors are offsets."""
    cursor = params.cursor if params is not None else None
    start = 0
    if cursor is not None:
        if not cursor.isdigit() or int(cursor) > len(items):
            raise MCPError(types.INVALID_PARAMS, f"invalid cursor: {cursor!r}")
        start = int(cursor)
    if size is None:
        return list(items[start:]), None
    end = start + size
    return list(items[start:end]), (str(end) if end < len(items) else None)


def _request_headers(ctx: ServerRequestContext[Any, Any]) -> dict[str, str]:
    return dict(ctx.request.headers) if isinstance(ctx.request, Request) else {}


class _ListChangedServer(Server[Any]):
    # The HTTP session manager asks for initialization options without arguments; this upstream
    # can announce tool-list changes (`UpstreamServer.notify_tools_changed`), so it says so.
    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        return super().create_initialization_options(
            notification_options or NotificationOptions(tools_changed=True),
            experimental_capabilities,
            extensions,
        )


def build_mcp_server(
    name: str,
    tools: ToolSet,
    log: RequestLog,
    page_size: int | None,
    in_flight: set[anyio.CancelScope],
    *,
    big_answers: bool = False,
) -> Server[Any]:
    """The MCP server. `in_flight` holds the cancel scopes of running tool calls (server loop only)."""
    prompts = [*_prompts(), BIG_PROMPT] if big_answers else _prompts()

    async def list_tools(ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
        page, cursor = paginate(tools.listing(), params, page_size)
        return types.ListToolsResult(tools=page, next_cursor=cursor)

    async def call_tool(ctx: Any, params: types.CallToolRequestParams) -> types.CallToolResult:
        entry = tools.get(params.name)
        if entry is None:
            raise MCPError(types.INVALID_PARAMS, f"Unknown tool: {params.name}")
        tool, handler = entry
        arguments = params.arguments or {}
        try:
            jsonschema.validate(arguments, tool.input_schema)
        except jsonschema.ValidationError as exc:
            return text_result(f"invalid arguments for {tool.name}: {exc.message}", is_error=True)
        with anyio.CancelScope() as scope:
            in_flight.add(scope)
            try:
                return await handler(ToolCall(tool.name, arguments, _request_headers(ctx)))
            finally:
                in_flight.discard(scope)
        return text_result(f"{tool.name}: the upstream stopped during the call", is_error=True)

    async def list_resources(
        ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        page, cursor = paginate(_resources(), params, page_size)
        return types.ListResourcesResult(resources=page, next_cursor=cursor)

    async def list_templates(
        ctx: Any, params: types.PaginatedRequestParams | None
    ) -> types.ListResourceTemplatesResult:
        page, cursor = paginate(_templates(), params, page_size)
        return types.ListResourceTemplatesResult(resource_templates=page, next_cursor=cursor)

    async def read_resource(ctx: Any, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        uri = str(params.uri)
        if big_answers and uri.startswith(BIG_RESOURCES):
            text = big_text(float(uri[len(BIG_RESOURCES) :]))
            return types.ReadResourceResult(
                contents=[types.TextResourceContents(uri=uri, mime_type="text/plain", text=text)]
            )
        prefix = "file:///notes/"
        if not uri.startswith(prefix) or "/" in uri[len(prefix) :]:
            raise MCPError(RESOURCE_NOT_FOUND, f"Resource not found: {uri}")
        note = uri[len(prefix) :]
        text = NOTES.get(note, f"# {note}\n\n(an empty note)\n")  # the template serves any other name
        return types.ReadResourceResult(
            contents=[types.TextResourceContents(uri=uri, mime_type="text/markdown", text=text)]
        )

    async def list_prompts(ctx: Any, params: types.PaginatedRequestParams | None) -> types.ListPromptsResult:
        page, cursor = paginate(prompts, params, page_size)
        return types.ListPromptsResult(prompts=page, next_cursor=cursor)

    async def get_prompt(ctx: Any, params: types.GetPromptRequestParams) -> types.GetPromptResult:
        prompt = next((p for p in prompts if p.name == params.name), None)
        if prompt is None:
            raise MCPError(types.INVALID_PARAMS, f"Unknown prompt: {params.name}")
        arguments = params.arguments or {}
        missing = [a.name for a in prompt.arguments or [] if a.required and a.name not in arguments]
        if missing:
            raise MCPError(types.INVALID_PARAMS, f"Missing prompt arguments: {', '.join(missing)}")
        if prompt.name == "big":
            text = big_text(float(arguments["mib"]))
        elif prompt.name == "greet":
            text = f"Hello, {arguments['name']}!"
        else:
            text = f"{prompt.name}: {arguments}"
        message = types.PromptMessage(role="user", content=types.TextContent(text=text))
        return types.GetPromptResult(description=prompt.description, messages=[message])

    server = _ListChangedServer(
        name,
        version="1.0.0",
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_resources=list_resources,
        on_list_resource_templates=list_templates,
        on_read_resource=read_resource,
        on_list_prompts=list_prompts,
        on_get_prompt=get_prompt,
    )
    server.middleware.append(_Observer(log))
    return server


class RequestLog:
    """What the upstream has seen, written by the server thread and read by tests: thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.http_requests = 0
        self.initializes = 0
        self.last_headers: dict[str, str] = {}
        self.sessions: list[ServerSession] = []  # MCP sessions opened, for list_changed

    def record_http(self, headers: Headers) -> None:
        with self._lock:
            self.http_requests += 1
            self.last_headers = dict(headers)

    def record_initialize(self) -> None:
        with self._lock:
            self.initializes += 1

    def add_session(self, session: ServerSession) -> None:
        with self._lock:
            self.sessions.append(session)

    def take_sessions(self) -> list[ServerSession]:
        with self._lock:
            sessions, self.sessions = self.sessions, []
            return sessions

    def reset(self) -> None:
        with self._lock:
            self.http_requests = self.initializes = 0
            self.last_headers = {}


class _Observer:
    """Server middleware: counts `initialize` and remembers each session it opens (for list_changed).

    The session is remembered before the `initialize` response leaves, so a test that has finished
    its handshake can notify at once; notifications without `related_request_id` use the
    connection's standalone channel, so the request-scoped session object keeps working.
    """

    def __init__(self, log: RequestLog) -> None:
        self._log = log

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method != "initialize":
            return await call_next(ctx)
        self._log.record_initialize()
        result = await call_next(ctx)
        self._log.add_session(ctx.session)
        return result


# --- the HTTP app -----------------------------------------------------------------------------------


@dataclass
class HttpPolicy:
    """How the upstream answers at the HTTP level, before MCP. Mutable while it runs."""

    required_headers: dict[str, str] = field(default_factory=dict)
    redirect_to: str | None = None


class _Gate:
    """Outermost ASGI middleware: records every request, then redirects or refuses as the policy says."""

    def __init__(self, app: ASGIApp, log: RequestLog, policy: HttpPolicy) -> None:
        self._app = app
        self._log = log
        self._policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        self._log.record_http(headers)
        response: Response | None = None
        if self._policy.redirect_to is not None:
            response = Response(status_code=307, headers={"Location": self._policy.redirect_to})
        elif any(headers.get(k) != v for k, v in self._policy.required_headers.items()):
            response = JSONResponse({"error": "unauthorized"}, 401, headers={"WWW-Authenticate": "Bearer"})
        if response is not None:
            await response(scope, receive, send)
            return
        await self._app(scope, receive, send)


class _SseEndpoint:
    """GET /sse: one legacy-SSE MCP connection per request (an ASGI app, so Starlette passes send)."""

    def __init__(self, transport: SseServerTransport, server: Server[Any]) -> None:
        self._transport = transport
        self._server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with self._transport.connect_sse(scope, receive, send) as (read, write):
                await self._server.run(read, write, self._server.create_initialization_options())
        except ValueError:
            # connect_sse has already answered a request failing its Host/Origin check, then raises.
            return


def build_app(
    server: Server[Any], log: RequestLog, policy: HttpPolicy, *, json_response: bool, stateless: bool
) -> ASGIApp:
    """A fresh app per start: a session manager runs only once."""
    security = TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[f"{HOST}:*", "localhost:*"],
        allowed_origins=[f"http://{HOST}:*", "http://localhost:*"],
    )
    manager = StreamableHTTPSessionManager(
        app=server, json_response=json_response, stateless=stateless, security_settings=security
    )
    sse = SseServerTransport("/messages/", security_settings=security)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with manager.run():
            yield

    routes = [
        Route("/mcp", endpoint=StreamableHTTPASGIApp(manager)),
        Route("/sse", endpoint=_SseEndpoint(sse, server), methods=["GET"]),
        Mount("/messages/", app=sse.handle_post_message),
    ]
    return _Gate(Starlette(routes=routes, lifespan=lifespan), log, policy)


# --- the server thread ------------------------------------------------------------------------------


class _Uvicorn(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, in_flight: set[anyio.CancelScope]) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._in_flight = in_flight

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.loop = asyncio.get_running_loop()
        self.ready.set()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # Stopping drops every connection the way a killed process would. Open SSE and Streamable
        # HTTP GET streams would otherwise hold a graceful shutdown until its timeout.
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.transport.abort()
        # Tool calls still running would make the SDK's session teardown wait a second per session
        # for a response write nobody reads; end them first (each answers isError).
        for scope in list(self._in_flight):
            scope.cancel()
        await super().shutdown(sockets)


def _reserve_port(port: int) -> socket.socket:
    """A bound, not listening socket: it keeps the port ours and refuses connections meanwhile."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Connections the last run accepted may linger in TIME_WAIT; SO_REUSEADDR lets us bind anyway.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError:
        sock.close()
        raise
    return sock


class UpstreamServer:
    """A real MCP server on 127.0.0.1 serving Streamable HTTP at `url` and legacy SSE at `sse_url`.

    The port is bound when the object is made and kept until `close()`, so `stop()` + `start()` (or
    `restart()`) serve the same URLs and, while stopped, connections are refused. `start`, `stop` and
    `restart` block for a few hundred milliseconds at most; use it as a context manager.
    """

    def __init__(
        self,
        *,
        name: str = "upstream",
        page_size: int | None = 2,
        extra_tools: int = 0,
        required_headers: Mapping[str, str] | None = None,
        redirect_to: str | None = None,
        json_response: bool = False,
        stateless: bool = False,
        big_answers: bool = False,
    ) -> None:
        self.tools = ToolSet()
        for tool, handler in default_tools():
            self.tools.add(tool, handler)
        for i in range(extra_tools):
            self.tools.add(generated_tool(i), describe_call)
        if big_answers:
            self.tools.add(BIG_TEXT_TOOL, _big_text)
        self.log = RequestLog()
        self.policy = HttpPolicy(dict(required_headers or {}), redirect_to)
        self._in_flight: set[anyio.CancelScope] = set()
        self._mcp = build_mcp_server(
            name, self.tools, self.log, page_size, self._in_flight, big_answers=big_answers
        )
        self._json_response = json_response
        self._stateless = stateless
        self._socket: socket.socket | None = _reserve_port(0)
        self.port: int = self._socket.getsockname()[1]
        self._uvicorn: _Uvicorn | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # URLs
    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def url(self) -> str:
        """The Streamable HTTP endpoint."""
        return f"{self.base_url}/mcp"

    @property
    def sse_url(self) -> str:
        """The legacy SSE endpoint; its `endpoint` event points the client at `/messages/?session_id=...`."""
        return f"{self.base_url}/sse"

    @property
    def running(self) -> bool:
        return self._thread is not None

    # What it has seen
    @property
    def initialize_count(self) -> int:
        return self.log.initializes

    @property
    def request_count(self) -> int:
        """Every HTTP request, refused ones and the SDK client's GET streams and DELETEs included."""
        return self.log.http_requests

    @property
    def last_headers(self) -> dict[str, str]:
        """Headers of the last HTTP request (names lower-cased), whether or not it was let through."""
        return dict(self.log.last_headers)

    def reset_counters(self) -> None:
        self.log.reset()

    # Behaviour
    @property
    def required_headers(self) -> dict[str, str]:
        return self.policy.required_headers

    @required_headers.setter
    def required_headers(self, value: Mapping[str, str]) -> None:
        self.policy.required_headers = dict(value)

    @property
    def redirect_to(self) -> str | None:
        return self.policy.redirect_to

    @redirect_to.setter
    def redirect_to(self, value: str | None) -> None:
        self.policy.redirect_to = value

    def add_tool(self, tool: types.Tool | str, handler: ToolHandler = describe_call) -> types.Tool:
        """Offer `tool` (a name alone gets a one-string-argument schema) from the next `tools/list` on."""
        if isinstance(tool, str):
            tool = types.Tool(
                name=tool, description=f"The {tool} tool.", input_schema=_schema({"text": {"type": "string"}})
            )
        self.tools.add(tool, handler)
        return tool

    def remove_tool(self, name: str) -> None:
        self.tools.remove(name)

    def tool_names(self) -> list[str]:
        return [tool.name for tool in self.tools.listing()]

    def notify_tools_changed(self, timeout: float = 5.0) -> int:
        """Send `notifications/tools/list_changed` to every session opened since `start()`.

        Returns how many sends did not fail. The SDK accepts a send to a connection the client has
        closed, so closed sessions may still count. Streamable HTTP delivers on the client's
        standalone GET stream, which the SDK client opens shortly after `initialize`: a session
        whose stream is not open yet misses the notification, so repeat until it arrives.
        """
        if self._uvicorn is None or self._uvicorn.loop is None:
            return 0
        future = asyncio.run_coroutine_threadsafe(self._notify_all(), self._uvicorn.loop)
        return future.result(timeout)

    async def _notify_all(self) -> int:
        delivered = []
        for session in self.log.take_sessions():
            with anyio.move_on_after(1):
                try:
                    await session.send_tool_list_changed()
                except Exception:
                    continue  # the connection is gone: forget the session
                delivered.append(session)
        for session in delivered:
            self.log.add_session(session)
        return len(delivered)

    # Lifetime
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("upstream already running")
        if self._socket is None:
            raise RuntimeError("upstream closed")
        app = build_app(
            self._mcp, self.log, self.policy, json_response=self._json_response, stateless=self._stateless
        )
        config = uvicorn.Config(
            app,
            loop="asyncio",
            http="h11",
            ws="none",
            lifespan="on",
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
        self._uvicorn = _Uvicorn(config, self._in_flight)
        self._error = None
        self._thread = threading.Thread(
            target=self._serve, args=(self._uvicorn, self._socket), name=f"upstream-{self.port}", daemon=True
        )
        self._thread.start()
        if not self._uvicorn.ready.wait(START_TIMEOUT_S) or not self._uvicorn.started:
            error = self._error
            self.stop()
            raise RuntimeError(f"upstream on port {self.port} did not start") from error

    def _serve(self, server: _Uvicorn, sock: socket.socket) -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # a startup failure exits with SystemExit; report it to start()
            self._error = exc
        finally:
            server.ready.set()

    def stop(self) -> None:
        """Drop every connection and stop listening; the port stays reserved for `start()`."""
        if self._thread is None or self._uvicorn is None:
            return
        self._uvicorn.should_exit = True
        self._thread.join(STOP_TIMEOUT_S)
        if self._thread.is_alive():
            raise RuntimeError(f"upstream on port {self.port} did not stop within {STOP_TIMEOUT_S} s")
        self._thread = None
        self._uvicorn = None
        self.log.take_sessions()
        if self._socket is not None:
            self._socket.close()  # uvicorn closed it already unless startup failed early
            self._socket = self._rebind()

    def _rebind(self) -> socket.socket:
        # Nothing else holds the port now but connections closing; retry briefly past them.
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while True:
            try:
                return _reserve_port(self.port)
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop, then give the port back."""
        self.stop()
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"UpstreamServer(url={self.url!r}, running={self.running})"


def main() -> None:
    """Serve one upstream in this process until stdin closes; its URL is the first line printed."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m tests.upstream")
    parser.add_argument("--big-answers", action="store_true")
    parser.add_argument("--json-response", action="store_true")
    args = parser.parse_args()
    with UpstreamServer(big_answers=args.big_answers, json_response=args.json_response) as server:
        print(server.url, flush=True)
        sys.stdin.read()


if __name__ == "__main__":
    main()
