"""Server-side pagination of the dashboard's lists: opaque cursors in the query string, and slicing
of in-memory lists (tools, sessions, roles) by the sort key of the last item shown."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from scailink_mcp.errors import ValidationFailed

T = TypeVar("T")


def encode(position: Sequence[str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(position)).encode()).decode().rstrip("=")


def decode(raw: str | None, size: int) -> tuple[str, ...] | None:
    """A cursor from `encode`, or None when there is none; anything else is a validation error."""
    if not raw:
        return None
    try:
        value = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        value = None
    if not (isinstance(value, list) and len(value) == size and all(isinstance(v, str) for v in value)):
        raise ValidationFailed("invalid cursor", details=[{"field": "cursor", "reason": "not a cursor"}])
    return tuple(value)


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None
    total: int | None = None


def after_key(items: Sequence[T], key: Callable[[T], str], cursor: str | None, size: int) -> Page[T]:
    """`items` sorted by `key`; the page after the cursor's key."""
    position = decode(cursor, 1)
    ordered = sorted(items, key=key)
    rest = [i for i in ordered if position is None or key(i) > position[0]]
    shown = rest[:size]
    more = len(rest) > size
    return Page(shown, encode([key(shown[-1])]) if more and shown else None, len(ordered))
