"""How deeply a JSON text nests, measured on the bytes before parsing.

Why before: `json.loads` recurses once per level and raises `RecursionError` near 1,000 levels (a 2 KB
body), and code that later walks a parsed value (validation, redaction, `json.dumps`) recurses too.
Measuring first lets every surface refuse such a body with its own clear error. Strings are removed
first (brackets inside them do not nest), then only brackets are scanned; a body with fewer opening
brackets than the limit needs no scan at all.
"""

from __future__ import annotations

import re
from itertools import accumulate

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def too_deep(text: bytes | str, limit: int) -> bool:
    """True when `text` nests arrays/objects deeper than `limit` levels."""
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if data.count(b"[") + data.count(b"{") <= limit:
        return False
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    if brackets.count(b"[") + brackets.count(b"{") <= limit:
        return False
    return max(accumulate(_STEP[b] for b in brackets)) > limit
