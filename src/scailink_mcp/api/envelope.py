"""Success envelopes, request bodies under a size cap, pagination and the caller's identity.

The error envelope lives in `errors.py`; this module only builds successes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from scailink_mcp import cursors
from scailink_mcp.auth import Principal, bearer_token
from scailink_mcp.cursors import encode_cursor as encode_cursor  # re-exported for the routes
from scailink_mcp.errors import NotFound, PayloadTooLarge, ValidationFailed, from_validation
from scailink_mcp.jsondepth import too_deep

if TYPE_CHECKING:  # app.py imports the routes: the type only, no import cycle
    from scailink_mcp.app import Components

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


def ok(request: Request, data: Any, status_code: int = 200) -> JSONResponse:
    if isinstance(data, BaseModel):
        data = data.model_dump(mode="json", by_alias=True)
    return JSONResponse(
        {"status": "ok", "data": data, "meta": {"request_id": request_id(request)}}, status_code
    )


def no_content() -> Response:
    return Response(status_code=204)


def page(request: Request, items: list[Any], next_key: Sequence[str] | None) -> JSONResponse:
    """One page of a list; `next_key` (the keyset of its last item when more follow) becomes the
    opaque `next_cursor`."""
    dumped = [i.model_dump(mode="json", by_alias=True) if isinstance(i, BaseModel) else i for i in items]
    next_cursor = encode_cursor(tuple(next_key)) if next_key else None
    return ok(request, {"items": dumped, "next_cursor": next_cursor})


def sorted_page(request: Request, items: Sequence[T], key: Callable[[T], str]) -> JSONResponse:
    """A page of a list held in memory (not a query): sorted by `key`, the items after `?cursor=`,
    at most `?limit=` of them."""
    limit, after = page_limit(request), decode_cursor(request, 1)
    ordered = sorted((i for i in items if after is None or key(i) > after[0]), key=key)
    more = len(ordered) > limit
    return page(request, list(ordered[:limit]), (key(ordered[limit - 1]),) if more else None)


def _invalid_json(reason: str) -> ValidationFailed:
    return ValidationFailed("body is not valid JSON", details=[{"field": "body", "reason": reason}])


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(raw: bytes, max_depth: int) -> Any:
    """Strict JSON (RFC 8259) from a request body, or `ValidationFailed`: UTF-8 only, no NaN or
    Infinity, no lone surrogate escapes, nested at most `max_depth` arrays/objects deep (checked
    before parsing: a deep body never reaches the recursive parser)."""
    if not raw.strip():
        raise _invalid_json("empty body")
    if too_deep(raw, max_depth):
        raise _invalid_json(f"nested deeper than {max_depth} levels")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid_json("not UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError:  # unreachable below the depth limit; never a 500 if it is set too high
        raise _invalid_json(f"nested deeper than {max_depth} levels") from None
    except ValueError:  # JSONDecodeError, NaN/Infinity, integers over the int-digits limit
        raise _invalid_json("invalid JSON") from None
    if "\\u" in text:  # rare: only escapes can smuggle a lone surrogate, which nothing can store
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise _invalid_json("a string holds a lone UTF-16 surrogate") from None
    return value


async def read_json(request: Request, limit: int) -> Any:
    """Read the body (refusing more than `limit` bytes, even without Content-Length) and parse it
    (`parse_json`, with the `max_json_depth` setting)."""
    return parse_json(await read_body(request, limit), components(request).settings.max_json_depth)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than `limit` bytes (even without Content-Length) while reading."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_body(request: Request, model: type[M], limit: int) -> M:
    raw = await read_json(request, limit)
    if not isinstance(raw, dict):
        raise ValidationFailed(
            "body must be a JSON object", details=[{"field": "body", "reason": "not an object"}]
        )
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise from_validation(exc) from None
    except RecursionError:  # a validator recursing on a value the depth limit let through
        raise ValidationFailed(
            "request validation failed", details=[{"field": "body", "reason": "nested too deeply"}]
        ) from None


def path_param(request: Request, name: str) -> str:
    """A path parameter. One holding NUL names nothing that can exist (PostgreSQL text cannot even
    hold it, and psycopg refuses to send it), so it is a 404 before any query."""
    value = str(request.path_params[name])
    if "\x00" in value:
        raise NotFound(f"no such {name}")
    return value


def components(request: Request) -> Components:
    """The app's parts, typed: the one place REST routes reach `app.state` (set by `create_app`)."""
    return cast("Components", request.app.state.scailink)


async def principal(request: Request) -> Principal:
    parts = components(request)
    token = bearer_token(request.headers.get("authorization"))
    result: Principal = await parts.verifier.verify(token)
    await parts.limiter.admit(f"{result.tenant_id}/{result.user_id}")
    return result


def page_limit(request: Request) -> int:
    """The `?limit=` of a list request: 1 to the app's `page_limit_max`, `page_limit_default` if absent."""
    settings = components(request).settings
    raw, maximum = request.query_params.get("limit"), settings.page_limit_max
    if raw is None:
        return settings.page_limit_default
    # isascii: str.isdigit() is also true for digits int() refuses ("²")
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= maximum:
        raise ValidationFailed(
            "invalid limit", details=[{"field": "limit", "reason": f"must be an integer from 1 to {maximum}"}]
        )
    return int(raw)


def decode_cursor(request: Request, size: int) -> tuple[str, ...] | None:
    """The `?cursor=` of a list request (cursors.py)."""
    return cursors.decode_cursor(request.query_params.get("cursor"), size)
