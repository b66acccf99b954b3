"""Routes of `/v1/modules/scailink/remote-servers` (SPEC section 3)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from scailink_mcp.api.envelope import (
    components,
    decode_cursor,
    no_content,
    ok,
    page,
    page_limit,
    parse_body,
    path_param,
    principal,
)
from scailink_mcp.auth import Principal
from scailink_mcp.errors import ValidationFailed
from scailink_mcp.remote.registry import Registry
from scailink_mcp.remote.schemas import CredentialValue, RegisterServer, ServerDetail, UpdateServer

Endpoint = Callable[[Request], Awaitable[Response]]


def _registry(request: Request) -> Registry:
    registry = components(request).registry
    # Every registry call, reads included, answers 503 without a KEK (after authentication).
    registry.ensure_enabled()
    return registry


def _limit(request: Request) -> int:
    return components(request).settings.registry_max_body_bytes


async def create_server(request: Request) -> Response:
    who, registry = await principal(request), _registry(request)
    return ok(
        request,
        await registry.register(who, await parse_body(request, RegisterServer, _limit(request))),
        status_code=201,
    )


async def list_servers(request: Request) -> Response:
    who = await principal(request)
    registry = _registry(request)
    limit = page_limit(request)
    after = decode_cursor(request, 2)
    if after is not None:
        try:  # (created_at, id): a decodable cursor with a bad time is still not one of ours
            datetime.fromisoformat(after[0])
        except ValueError:
            raise ValidationFailed(
                "invalid cursor", details=[{"field": "cursor", "reason": "not a cursor from this API"}]
            ) from None
    result = await registry.list(who, limit=limit, after=(after[0], after[1]) if after else None)
    return page(request, list(result.items), result.next_cursor)


async def update_server(request: Request) -> Response:
    who, registry = await principal(request), _registry(request)
    body = await parse_body(request, UpdateServer, _limit(request))
    return ok(request, await registry.update(who, path_param(request, "server_id"), body))


async def delete_server(request: Request) -> Response:
    who = await principal(request)
    await _registry(request).delete(who, path_param(request, "server_id"))
    return no_content()


def _detail_of(action: Callable[[Registry], Callable[[Principal, str], Awaitable[ServerDetail]]]) -> Endpoint:
    """An endpoint answering one server's detail after `action(registry)` (a read, or a refresh);
    the registry's method is looked up per request, on the app's own registry."""

    async def endpoint(request: Request) -> Response:
        who = await principal(request)
        return ok(request, await action(_registry(request))(who, path_param(request, "server_id")))

    return endpoint


async def put_credential(request: Request) -> Response:
    who, registry = await principal(request), _registry(request)
    body = await parse_body(request, CredentialValue, _limit(request))
    detail = await registry.put_credential(
        who, path_param(request, "server_id"), path_param(request, "field"), body.value.get_secret_value()
    )
    return ok(request, detail)


async def delete_credential(request: Request) -> Response:
    who = await principal(request)
    await _registry(request).delete_credential(
        who, path_param(request, "server_id"), path_param(request, "field")
    )
    return no_content()


BASE = "/v1/modules/scailink/remote-servers"

routes = [
    Route(BASE, create_server, methods=["POST"]),
    Route(BASE, list_servers, methods=["GET"]),
    Route(BASE + "/{server_id}", _detail_of(lambda registry: registry.get), methods=["GET"]),
    Route(BASE + "/{server_id}", update_server, methods=["PATCH"]),
    Route(BASE + "/{server_id}", delete_server, methods=["DELETE"]),
    Route(BASE + "/{server_id}/refresh", _detail_of(lambda registry: registry.refresh), methods=["POST"]),
    Route(BASE + "/{server_id}/credentials/{field}", put_credential, methods=["PUT"]),
    Route(BASE + "/{server_id}/credentials/{field}", delete_credential, methods=["DELETE"]),
]
