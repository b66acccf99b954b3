"""Names: server slugs, namespaced tool/prompt names, resource URIs and the `compat` profile.

Pure functions; the aggregated per-principal catalog and its cache build on them.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from urllib.parse import quote

_NON_SLUG = re.compile(r"[^a-z0-9-]+")


def slugify(name: str, *, tenant_id: str, owner_user_id: str, server_id: str) -> str:
    """`name` lower-cased to `[a-z0-9-]`, then `-` and 6 hex chars of a hash of (tenant, owner, id).

    Fixed at creation, so namespaced tool names stay stable across renames.
    """
    base = _NON_SLUG.sub("-", name.lower()).strip("-") or "server"
    base = re.sub("-{2,}", "-", base)[:48].rstrip("-")
    digest = hashlib.sha256(f"{tenant_id}\x00{owner_user_id}\x00{server_id}".encode()).hexdigest()[:6]
    return f"{base}-{digest}"


def remote_namespace(*, slug: str, owner_user_id: str, is_tenant_shared: bool) -> str:
    """`remote.tenant.{slug}` for shared servers, `remote.{user_id}.{slug}` for personal ones."""
    return f"remote.tenant.{slug}" if is_tenant_shared else f"remote.{owner_user_id}.{slug}"


def namespaced_name(namespace: str, upstream_name: str) -> str:
    return f"{namespace}.{upstream_name}"


def namespaced_uri(namespace: str, upstream_uri: str) -> str:
    """A resource keeps its upstream URI inside `scailink://{namespace}/{percent-encoded uri}`."""
    return f"scailink://{namespace}/{quote(upstream_uri, safe='')}"


# ---- the `compat` naming profile ----------------------------------------------------------------

COMPAT_MAX = 64
_COMPAT_OK = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_COMPAT_BAD = re.compile(r"[^a-zA-Z0-9_-]")
_B32 = "abcdefghijklmnopqrstuvwxyz234567"


def _hash8(value: str) -> str:
    digest = int.from_bytes(hashlib.sha256(value.encode()).digest()[:5], "big")  # 40 bits
    return "".join(_B32[(digest >> shift) & 31] for shift in range(35, -1, -5))


def _hashed(dotted: str, salt: int) -> str:
    suffix = _hash8(dotted if salt == 0 else f"{dotted}#{salt}")
    prefix = _COMPAT_BAD.sub("_", dotted.replace(".", "__"))[: COMPAT_MAX - len(suffix) - 1]
    return f"{prefix}_{suffix}"


def compat_candidate(dotted: str) -> str:
    """Dots become `__`; a name still invalid or over 64 chars keeps a readable prefix + an 8-char hash."""
    plain = dotted.replace(".", "__")
    return plain if _COMPAT_OK.match(plain) else _hashed(dotted, 0)


def compat_names(dotted_names: list[str]) -> dict[str, str]:
    """An exact, collision-free mapping dotted -> compat for one principal's catalog.

    Deterministic for a given set (assigned in sorted order), so names are stable across restarts. When
    two names would produce the same plain candidate (`a.b` and a tool literally named `a__b`), both take
    the hashed form; a (40-bit) hash collision is resolved by re-hashing with a salt.
    """
    ordered = sorted(set(dotted_names))
    counts = Counter(compat_candidate(name) for name in ordered)
    taken: set[str] = set()
    mapping: dict[str, str] = {}
    for name in ordered:
        candidate = compat_candidate(name)
        if counts[candidate] > 1:
            candidate = _hashed(name, 0)
        salt = 0
        while candidate in taken:
            salt += 1
            candidate = _hashed(name, salt)
        taken.add(candidate)
        mapping[name] = candidate
    return mapping
