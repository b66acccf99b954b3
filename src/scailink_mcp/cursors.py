"""Opaque list cursors (REST and the dashboard): a position of sort keys, base64url of a JSON list.

A cursor that does not decode to `size` strings (or holds NUL, which no stored key can) is a
validation error, never a 500.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence

from scailink_mcp.errors import ValidationFailed


def encode_cursor(position: Sequence[str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(position)).encode()).decode().rstrip("=")


def decode_cursor(raw: str | None, size: int) -> tuple[str, ...] | None:
    """The position of a cursor from `encode_cursor`, or None when there is none."""
    if not raw:
        return None
    try:
        value = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        value = None
    if not (
        isinstance(value, list)
        and len(value) == size
        and all(isinstance(v, str) and "\x00" not in v for v in value)
    ):
        raise ValidationFailed(
            "invalid cursor", details=[{"field": "cursor", "reason": "not a cursor from this API"}]
        )
    return tuple(value)
