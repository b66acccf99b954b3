"""Names: server slugs, namespaced tool/prompt names and resource URIs.

Pure functions; the aggregated per-principal catalog and its cache build on them.
"""

from __future__ import annotations

import hashlib
import re
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
