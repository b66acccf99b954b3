"""Server-side pagination of the dashboard's lists: opaque cursors in the query string, and slicing
of in-memory lists (tools, sessions, roles) by the sort key of the last item shown."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from scailink_mcp.cursors import decode_cursor, encode_cursor

T = TypeVar("T")


encode = encode_cursor
decode = decode_cursor


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
