"""The caller's tool catalog (search, both name styles, source, consent tier) and the playground, which
calls a tool as the signed-in user and shows the raw JSON result (or the error envelope's fields).

The catalog is `Catalog.view(principal, style)`, the same per-principal view `/mcp` lists and
`GET /capabilities` reads; the call is `calls.invoke_tool`, the REST invoke path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from scailink_mcp.catalog import NameStyle
from scailink_mcp.dashboard import pagination
from scailink_mcp.dashboard.calls import ToolSource, invoke_tool, source_of
from scailink_mcp.dashboard.web import Visit, request_id, signed_in
from scailink_mcp.errors import ScaiLinkError, ToolNotFound, ValidationFailed
from scailink_mcp.jsondepth import too_deep

STYLES: tuple[NameStyle, ...] = ("dotted", "compat")
MAX_QUERY = 200


@dataclass(frozen=True)
class Entry:
    dotted: str
    compat: str
    description: str
    source: ToolSource
    input_schema: dict[str, Any]


def catalog_entries(visit: Visit) -> list[Entry]:
    """Every tool of the caller's catalog, named in both styles (paired by source and upstream name)."""
    views = {style: visit.parts.catalog.view(visit.who, style) for style in STYLES}
    compat: dict[tuple[str, str], str] = {}
    for public, target in views["compat"].tool_targets.items():
        compat[(source_of(target).owner_id, target.upstream_name)] = public
    entries: list[Entry] = []
    for tool in views["dotted"].tools:  # raw items (catalog.Listing)
        name = str(tool["name"])
        target = views["dotted"].tool_targets[name]
        source = source_of(target)
        description, schema = tool.get("description"), tool.get("inputSchema")
        entries.append(
            Entry(
                dotted=name,
                compat=compat.get((source.owner_id, target.upstream_name), name),
                description=description if isinstance(description, str) else "",
                source=source,
                input_schema=dict(schema) if isinstance(schema, dict) else {},
            )
        )
    return entries


def _style(raw: str | None) -> NameStyle:
    return "compat" if raw == "compat" else "dotted"


def _lookup(visit: Visit, name: str) -> Entry | None:
    return next((e for e in catalog_entries(visit) if name in (e.dotted, e.compat)), None)


async def list_tools(request: Request) -> Response:
    visit = await signed_in(request)
    query = request.query_params.get("q", "").strip()[:MAX_QUERY].casefold()
    style = _style(request.query_params.get("style"))
    entries = [
        e
        for e in catalog_entries(visit)
        if not query or any(query in text.casefold() for text in (e.dotted, e.compat, e.description))
    ]
    page = pagination.after_key(
        entries, lambda e: e.dotted, request.query_params.get("cursor"), visit.dash.options.page_size
    )
    return visit.render(
        "tools.html", tools=page.items, total=page.total, next_cursor=page.next_cursor, q=query, style=style
    )


def _skeleton(schema: dict[str, Any]) -> str:
    """A starting point for the arguments box: each property with an empty value of its type."""
    empty = {"string": "", "integer": 0, "number": 0, "boolean": False, "array": [], "object": {}}
    props = schema.get("properties")
    if not isinstance(props, dict):
        return "{}"
    values = {k: empty.get(v.get("type", "")) if isinstance(v, dict) else None for k, v in props.items()}
    return json.dumps(values, indent=2)


def _playground(
    visit: Visit, entry: Entry, style: NameStyle, status_code: int = 200, **extra: Any
) -> Response:
    values = {"arguments": _skeleton(entry.input_schema), "timeout_s": "", **extra.pop("values", {})}
    return visit.render(
        "playground.html",
        status_code,
        tool=entry,
        style=style,
        values=values,
        can_invoke=visit.who.has("scailink:invoke"),
        **extra,
    )


async def playground(request: Request) -> Response:
    visit = await signed_in(request)
    entry = _lookup(visit, request.query_params.get("name", ""))
    if entry is None:
        raise ToolNotFound("unknown tool")
    return _playground(visit, entry, _style(request.query_params.get("style")))


def _arguments(raw: str, max_depth: int) -> dict[str, Any]:
    def bad(reason: str) -> ValidationFailed:
        return ValidationFailed("invalid arguments", details=[{"field": "arguments", "reason": reason}])

    if too_deep(raw.encode(), max_depth):
        raise bad(f"nested deeper than {max_depth} levels")
    try:
        value = json.loads(raw or "{}")
    except ValueError:
        raise bad("not valid JSON") from None
    if not isinstance(value, dict):
        raise bad("must be a JSON object")
    return value


def _timeout_ms(raw: str) -> float | None:
    """The form's seconds as the REST body's `timeout_ms` (None: the default)."""
    if not raw.strip():
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 300:
        reason = "a number of seconds from 0 to 300"
        raise ValidationFailed("invalid timeout", details=[{"field": "timeout_s", "reason": reason}])
    return value * 1000


async def call(request: Request) -> Response:
    visit = await signed_in(request)
    settings = visit.parts.settings
    form = await visit.form(settings.max_body_bytes)
    style, name = _style(form.get("style")), form.get("name")
    values = {"arguments": form.get("arguments"), "timeout_s": form.get("timeout_s")}
    outcome: dict[str, Any]
    status_code = 200
    try:
        arguments = _arguments(form.get("arguments"), settings.max_json_depth)
        result = await invoke_tool(
            visit.parts,
            visit.who,
            name,
            style,
            arguments,
            timeout_ms=_timeout_ms(form.get("timeout_s")),
            request_id=request_id(request),
        )
        outcome = {"result": result}
    except ScaiLinkError as err:
        outcome = {"failure": {"code": err.code, "message": err.message, "details": err.details}}
        status_code = err.status
    entry = _lookup(visit, name)
    if entry is None:  # not (or no longer) in the caller's catalog: the call was refused and audited
        raise ToolNotFound(f"unknown tool {name!r}")
    return _playground(visit, entry, style, status_code, values=values, **outcome)
