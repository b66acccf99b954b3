"""Names: server and device slugs, namespaced tool/prompt names, resource URIs and the `compat` profile.

Pure functions; the aggregated per-principal catalog and its cache build on them.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterable
from urllib.parse import quote

_NON_SLUG = re.compile(r"[^a-z0-9-]+")
SERVER_SLUG_BASE = 48
# A device's slug is part of every name of its tools (`desktop.{user}.{device_slug}.{tool}`): its
# readable part is kept short so the tool's own name, not the device's, fills a 64-char compat name.
DEVICE_SLUG_BASE = 16


def slugify(
    name: str, *, tenant_id: str, owner_user_id: str, server_id: str, max_base: int = SERVER_SLUG_BASE
) -> str:
    """`name` lower-cased to `[a-z0-9-]` (at most `max_base` chars, cut at a `-` where one is near the
    end), then `-` and 6 hex chars of a hash of (tenant, owner, id).

    Fixed at creation, so namespaced tool names stay stable across renames.
    """
    base = re.sub("-{2,}", "-", _NON_SLUG.sub("-", name.lower()).strip("-")) or "server"
    if len(base) > max_base:
        cut = base[: max_base + 1]
        boundary = cut.rfind("-")
        base = cut[:boundary] if boundary >= max_base // 2 else cut[:max_base]
    base = base.rstrip("-")
    digest = hashlib.sha256(f"{tenant_id}\x00{owner_user_id}\x00{server_id}".encode()).hexdigest()[:6]
    return f"{base}-{digest}"


def device_slug(device_name: str, *, tenant_id: str, user_id: str, device_id: str) -> str:
    """A desktop device's slug: like a server's, with a shorter readable part (`DEVICE_SLUG_BASE`)."""
    return slugify(
        device_name,
        tenant_id=tenant_id,
        owner_user_id=user_id,
        server_id=device_id,
        max_base=DEVICE_SLUG_BASE,
    )


def remote_namespace(*, slug: str, owner_user_id: str, is_tenant_shared: bool) -> str:
    """`remote.tenant.{slug}` for shared servers, `remote.{user_id}.{slug}` for personal ones."""
    return f"remote.tenant.{slug}" if is_tenant_shared else f"remote.{owner_user_id}.{slug}"


def namespaced_name(namespace: str, upstream_name: str) -> str:
    return f"{namespace}.{upstream_name}"


def namespaced_uri(namespace: str, upstream_uri: str) -> str:
    """A resource keeps its upstream URI inside `scailink://{namespace}/{percent-encoded uri}`."""
    return f"scailink://{namespace}/{quote(upstream_uri, safe='')}"


# ---- the `compat` naming profile ----------------------------------------------------------------
#
# `{namespace}__{tool}` with dots as `__`. A name that is still not `^[a-zA-Z0-9_-]{1,64}$` (too long,
# another character, or the same as another name's) becomes `{namespace cut}_{hash8}__{tool}`: the
# namespace gives up what does not fit and an 8-char hash of the whole dotted pair stands for it,
# while the tool's own name (other characters as `_`) stays whole and last: an agent chooses tools by
# that name. Only a tool name over `TOOL_MAX` chars (64 minus the hash and `__`) is cut, at its end,
# and then nothing of the namespace is left but the hash.

COMPAT_MAX = 64
HASH_LEN = 8
TOOL_MAX = COMPAT_MAX - HASH_LEN - 2
_COMPAT_OK = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_COMPAT_BAD = re.compile(r"[^a-zA-Z0-9_-]")
_B32 = "abcdefghijklmnopqrstuvwxyz234567"

Qualified = tuple[str, str]  # (namespace, the tool's or prompt's own name)


def _hash8(value: str) -> str:
    digest = int.from_bytes(hashlib.sha256(value.encode()).digest()[:5], "big")  # 40 bits
    return "".join(_B32[(digest >> shift) & 31] for shift in range(35, -1, -5))


def _clean(part: str) -> str:
    return _COMPAT_BAD.sub("_", part.replace(".", "__"))


def _plain(namespace: str, tool: str) -> str:
    return f"{namespace.replace('.', '__')}__{tool.replace('.', '__')}"


def compat_shortened(namespace: str, tool: str, salt: int = 0) -> str:
    """The shortened form: `{namespace cut}_{hash8}__{tool}`, 64 chars at most."""
    key = f"{namespace}\x00{tool}" if salt == 0 else f"{namespace}\x00{tool}#{salt}"
    suffix, own = _hash8(key), _clean(tool)
    if len(own) > TOOL_MAX - 1:  # no room for even one char of the namespace before `_{hash}`
        return f"{suffix}__{own[:TOOL_MAX]}"
    room = COMPAT_MAX - len(own) - 2 - HASH_LEN - 1
    return f"{_clean(namespace)[:room]}_{suffix}__{own}"


def compat_candidate(namespace: str, tool: str) -> str:
    """`{namespace}__{tool}` with dots as `__` when that is a valid compat name, else the shortened form."""
    plain = _plain(namespace, tool)
    return plain if _COMPAT_OK.match(plain) else compat_shortened(namespace, tool)


def compat_names(items: Iterable[Qualified]) -> dict[Qualified, str]:
    """An exact, collision-free mapping (namespace, name) -> compat name for one principal's catalog.

    Deterministic for a given set (assigned in sorted order), so names are stable across restarts.
    When two items would produce the same plain candidate (`a.b` and a tool literally named `a__b`),
    both take the shortened form; a (40-bit) hash collision is resolved by re-hashing with a salt.
    """
    ordered = sorted(set(items))
    counts = Counter(compat_candidate(ns, tool) for ns, tool in ordered)
    taken: set[str] = set()
    mapping: dict[Qualified, str] = {}
    for ns, tool in ordered:
        candidate = compat_candidate(ns, tool)
        if counts[candidate] > 1:
            candidate = compat_shortened(ns, tool)
        salt = 0
        while candidate in taken:
            salt += 1
            candidate = compat_shortened(ns, tool, salt)
        taken.add(candidate)
        mapping[(ns, tool)] = candidate
    return mapping
