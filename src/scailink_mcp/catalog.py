"""The aggregated per-principal catalog, its cache, and name resolution.

`RemoteDirectory` is an in-memory snapshot of every registered server and the capabilities its latest
successful discovery saw. It is loaded once at start-up and kept current by registry events (one
server re-read per event), so the MCP hot path never queries the database.

`Catalog.view(principal, style)` returns a `CatalogView`: the principal's tools, prompts, resources and
templates under public (namespaced) names, pre-built and cached per (tenant, user, permissions, naming
style) until the tenant's directory version moves. Hidden: servers in `status: error`, `locked`
servers, and every remote item when the caller lacks `scailink:remote.use`.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any, Literal
from urllib.parse import quote, unquote

from sqlmodel import Session, select

from scailink_mcp import auth
from scailink_mcp.auth import Principal
from scailink_mcp.db import Database
from scailink_mcp.desktop.connections import DesktopRegistry, DesktopSession
from scailink_mcp.errors import ToolNotFound
from scailink_mcp.events import ServerEvent, ServerEventKind
from scailink_mcp.list_pages import PageKey, dumps
from scailink_mcp.models import RemoteServer, same_named
from scailink_mcp.naming import Qualified, compat_names, namespaced_name, remote_namespace
from scailink_mcp.remote.discovery import visible_capabilities
from scailink_mcp.targets import DesktopTarget, RemoteTarget, Target

NameStyle = Literal["dotted", "compat"]
# Pages stay at half the SDK client's 1 MiB cap on one server-sent event, and hold 500 tools of a
# usual size (~700 bytes; 256 KiB cut them at ~360): each page is one request and one answer, so a
# large listing takes fewer round trips.
PAGE_MAX_ITEMS = 500
PAGE_MAX_BYTES = 512 * 1024
URI_SCHEME = "scailink://"


@dataclass(frozen=True)
class ServerSnapshot:
    """A registered server as the hot path needs it (no credentials)."""

    id: str
    tenant_id: str
    owner_user_id: str
    is_tenant_shared: bool
    slug: str
    name: str
    status: str
    consent_tier: str
    credential_version: int
    auth_type: str = "none"  # `oauth2`: each call needs the caller's current token (remote/oauth.py)
    tools: tuple[dict[str, Any], ...] = ()
    prompts: tuple[dict[str, Any], ...] = ()
    resources: tuple[dict[str, Any], ...] = ()
    resource_templates: tuple[dict[str, Any], ...] = ()

    @property
    def namespace(self) -> str:
        return remote_namespace(
            slug=self.slug, owner_user_id=self.owner_user_id, is_tenant_shared=self.is_tenant_shared
        )

    @property
    def listed(self) -> bool:
        return self.status == "active" and self.consent_tier != "locked"

    def visible_to(self, principal: Principal) -> bool:
        return self.tenant_id == principal.tenant_id and (
            self.is_tenant_shared or self.owner_user_id == principal.user_id
        )


def snapshot(session: Session, server: RemoteServer) -> ServerSnapshot:
    kinds: dict[str, list[dict[str, Any]]] = {
        "tool": [],
        "prompt": [],
        "resource": [],
        "resource_template": [],
    }
    for cap in visible_capabilities(session, server):
        kinds[cap.kind].append(cap.payload)
    listed = {
        "tools": tuple(kinds["tool"]),
        "prompts": tuple(kinds["prompt"]),
        "resources": tuple(kinds["resource"]),
        "resource_templates": tuple(kinds["resource_template"]),
    }
    return ServerSnapshot(**same_named(server, (f.name for f in fields(ServerSnapshot)), **listed))


class RemoteDirectory:
    """Every server's snapshot by id, and a version per tenant that moves on every change."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._servers: dict[str, ServerSnapshot] = {}
        self._versions: dict[str, int] = {}
        self._lock = threading.Lock()

    def load(self) -> None:
        with self.db.session() as session:
            servers = {row.id: snapshot(session, row) for row in session.exec(select(RemoteServer)).all()}
        with self._lock:
            self._servers = servers
            for snap in servers.values():
                self._versions[snap.tenant_id] = self._versions.get(snap.tenant_id, 0) + 1

    def _read(self, server_id: str) -> ServerSnapshot | None:
        with self.db.session() as session:
            row = session.get(RemoteServer, server_id)
            return None if row is None else snapshot(session, row)

    async def refresh_server(self, server_id: str, tenant_id: str) -> None:
        fresh = await self.db.run(lambda _s: self._read(server_id))
        with self._lock:
            if fresh is None:
                self._servers.pop(server_id, None)
            else:
                self._servers[server_id] = fresh
            self._versions[tenant_id] = self._versions.get(tenant_id, 0) + 1

    async def on_event(self, event: ServerEvent) -> None:
        if event.kind is ServerEventKind.DELETED:
            with self._lock:
                self._servers.pop(event.server_id, None)
                self._versions[event.tenant_id] = self._versions.get(event.tenant_id, 0) + 1
            return
        await self.refresh_server(event.server_id, event.tenant_id)

    def version(self, tenant_id: str) -> int:
        return self._versions.get(tenant_id, 0)

    def get(self, server_id: str) -> ServerSnapshot | None:
        return self._servers.get(server_id)

    def for_tenant(self, tenant_id: str) -> list[ServerSnapshot]:
        with self._lock:
            return sorted((s for s in self._servers.values() if s.tenant_id == tenant_id), key=lambda s: s.id)


def _with_name(payload: dict[str, Any], key: str, value: str) -> dict[str, Any]:
    out = dict(payload)
    out[key] = value
    return out


def public_uri(namespace: str, upstream_uri: str, *, template: bool = False) -> str:
    return f"{URI_SCHEME}{namespace}/{quote(upstream_uri, safe='{}' if template else '')}"


def split_uri(uri: str) -> tuple[str, str] | None:
    if not uri.startswith(URI_SCHEME):
        return None
    namespace, sep, rest = uri[len(URI_SCHEME) :].partition("/")
    return (namespace, unquote(rest)) if sep and namespace else None


def paginate(items: list[dict[str, Any]]) -> list[tuple[int, int]]:
    """Page boundaries: at most PAGE_MAX_ITEMS items and about PAGE_MAX_BYTES of JSON per page."""
    pages: list[tuple[int, int]] = []
    start, size = 0, 0
    for index, item in enumerate(items):
        item_size = len(dumps(item))  # UTF-8 bytes, as on the wire
        if index > start and (index - start >= PAGE_MAX_ITEMS or size + item_size > PAGE_MAX_BYTES):
            pages.append((start, index))
            start, size = index, 0
        size += item_size
    pages.append((start, len(items)))
    return pages


@dataclass(kw_only=True)
class Listing:
    """What an MCP endpoint lists (the handlers of `mcp_server.py` read only this and `resolve_*`).

    Items are raw JSON objects as the upstream or the device sent them (validated where they entered:
    discovery, the desktop protocol), only the name or URI rewritten, so fields newer than the SDK
    and vendor `_meta` are listed unchanged. `pages` holds the serialized pages (`list_pages.py`); it
    goes with the listing when the catalog replaces it.
    """

    tools: list[dict[str, Any]] = field(default_factory=list)
    tool_pages: list[tuple[int, int]] = field(default_factory=list)
    prompts: list[dict[str, Any]] = field(default_factory=list)
    resources: list[dict[str, Any]] = field(default_factory=list)
    resource_templates: list[dict[str, Any]] = field(default_factory=list)
    pages: dict[PageKey, bytes] = field(default_factory=dict, repr=False)


@dataclass(kw_only=True)
class CatalogView(Listing):
    """One principal's catalog in one naming style, built once and reused until it is stale."""

    version: Any
    tool_targets: dict[str, Target] = field(default_factory=dict)
    prompt_targets: dict[str, Target] = field(default_factory=dict)
    namespaces: dict[str, ServerSnapshot | DesktopSession] = field(default_factory=dict)
    # Per kind (tools, prompts, resources): a digest of what a client would list, for list_changed.
    fingerprint: tuple[str, str, str] = ("", "", "")

    def resolve_tool(self, name: str) -> Target:
        target = self.tool_targets.get(name)
        if target is None:
            raise ToolNotFound(f"unknown tool {name!r}")
        return target

    def resolve_prompt(self, name: str) -> Target:
        target = self.prompt_targets.get(name)
        if target is None:
            raise ToolNotFound(f"unknown prompt {name!r}")
        return target

    def resolve_resource(self, uri: str) -> Target:
        parts = split_uri(uri)
        owner = self.namespaces.get(parts[0]) if parts else None
        if parts is None or owner is None:
            raise ToolNotFound(f"unknown resource {uri!r}")
        if isinstance(owner, ServerSnapshot):
            return RemoteTarget("resource", parts[1], owner)
        return DesktopTarget("resource", parts[1], owner)


def _list_resources(
    view: CatalogView, ns: str, resources: Iterable[dict[str, Any]], templates: Iterable[dict[str, Any]]
) -> None:
    """A server's or a device's resources and templates under `scailink://{ns}/...` URIs."""
    for res in resources:
        view.resources.append(_with_name(res, "uri", public_uri(ns, res["uri"])))
    for tpl in templates:
        public = public_uri(ns, tpl["uriTemplate"], template=True)
        view.resource_templates.append(_with_name(tpl, "uriTemplate", public))


def build_view(
    servers: list[ServerSnapshot],
    version: Any,
    style: NameStyle,
    desktops: list[DesktopSession] | None = None,
) -> CatalogView:
    view = CatalogView(version=version)
    # (namespace, own name): the dotted name is both joined; the compat profile shortens the namespace.
    tools: list[tuple[Qualified, dict[str, Any], ServerSnapshot | DesktopSession]] = []
    prompts: list[tuple[Qualified, dict[str, Any], ServerSnapshot | DesktopSession]] = []
    for session in desktops or []:
        ns = session.namespace
        view.namespaces[ns] = session
        tools += [((ns, name), t, session) for name, t in session.tools.items()]
        prompts += [((ns, p["name"]), p, session) for p in session.prompts]
        _list_resources(view, ns, session.resources, session.resource_templates)
    for server in servers:
        if not server.listed:
            continue
        ns = server.namespace
        view.namespaces[ns] = server
        tools += [((ns, t["name"]), t, server) for t in server.tools]
        prompts += [((ns, p["name"]), p, server) for p in server.prompts]
        _list_resources(view, ns, server.resources, server.resource_templates)
    names = compat_names([q for q, _, _ in tools] + [q for q, _, _ in prompts]) if style == "compat" else {}

    def public_name(qualified: Qualified) -> str:
        return names.get(qualified) or namespaced_name(*qualified)

    payloads: list[dict[str, Any]] = []
    for qualified, payload, owner in sorted(tools, key=lambda t: namespaced_name(*t[0])):
        public = public_name(qualified)
        payloads.append(_with_name(payload, "name", public))
        if isinstance(owner, ServerSnapshot):
            view.tool_targets[public] = RemoteTarget("tool", payload["name"], owner)
        else:
            view.tool_targets[public] = DesktopTarget("tool", payload["name"], owner)
    view.tools = payloads
    view.tool_pages = paginate(payloads)
    for qualified, payload, owner in sorted(prompts, key=lambda t: namespaced_name(*t[0])):
        public = public_name(qualified)
        view.prompts.append(_with_name(payload, "name", public))
        if isinstance(owner, ServerSnapshot):
            view.prompt_targets[public] = RemoteTarget("prompt", payload["name"], owner)
        else:
            view.prompt_targets[public] = DesktopTarget("prompt", payload["name"], owner)
    view.fingerprint = (
        digest(payloads),
        digest(view.prompts),
        digest([*view.resources, *view.resource_templates]),
    )
    return view


def digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def server_fingerprint(server: ServerSnapshot | None) -> tuple[str, str, str]:
    if server is None or not server.listed:
        return (digest(None), digest(None), digest(None))
    return (
        digest(server.tools),
        digest(server.prompts),
        digest([server.resources, server.resource_templates]),
    )


class Catalog:
    """Per-principal views over the directory, cached until the tenant's version moves."""

    def __init__(self, directory: RemoteDirectory, desktop: DesktopRegistry | None = None) -> None:
        self.directory = directory
        self.desktop = desktop
        self._views: dict[tuple[str, str, bool, bool, str], CatalogView] = {}
        self._scopes: dict[str, ServerScope] = {}  # server id -> its per-server endpoint's listing

    def view(self, principal: Principal, style: NameStyle) -> CatalogView:
        remote = principal.has(auth.REMOTE_USE)
        desktop = principal.has(auth.VIEW) and self.desktop is not None
        key = (principal.tenant_id, principal.user_id, remote, desktop, style)
        # The desktop's version read from its dict (not `DesktopRegistry.version`): a warm call's
        # resolution stays in this module.
        version = (
            self.directory.version(principal.tenant_id),
            self.desktop.versions.get((principal.tenant_id, principal.user_id), 0) if self.desktop else 0,
        )
        cached = self._views.get(key)
        if cached is not None and cached.version == version:
            return cached
        servers = (
            [s for s in self.directory.for_tenant(principal.tenant_id) if s.visible_to(principal)]
            if remote
            else []
        )
        sessions = (
            self.desktop.sessions_for(principal.tenant_id, principal.user_id)
            if self.desktop and desktop
            else []
        )
        view = build_view(servers, version, style, sessions)
        self._views[key] = view
        return view

    def single_server_view(self, principal: Principal, server_id: str) -> ServerSnapshot:
        """The per-server endpoint: one visible, listed server with its upstream names."""
        server = self.directory.get(server_id)
        if server is None or not server.visible_to(principal) or not principal.has(auth.REMOTE_USE):
            raise ToolNotFound("unknown server")
        return server

    def server_scope(self, server: ServerSnapshot) -> ServerScope:
        """The per-server endpoint's listing of `server`, kept (with its serialized pages) until the
        directory replaces the snapshot: the same for every principal who may see the server."""
        cached = self._scopes.get(server.id)
        if cached is not None and cached.server is server:
            return cached
        scope = ServerScope.of(server)
        for stale in [sid for sid in self._scopes if self.directory.get(sid) is None]:
            del self._scopes[stale]
        self._scopes[server.id] = scope
        return scope


@dataclass(kw_only=True)
class ServerScope(Listing):
    """What the per-server endpoint lists and resolves: one server, its upstream names unchanged.
    The same interface as `CatalogView`, so both MCP endpoints share one set of handlers."""

    server: ServerSnapshot

    @classmethod
    def of(cls, server: ServerSnapshot) -> ServerScope:
        return cls(
            server=server,
            tools=list(server.tools),
            tool_pages=paginate(list(server.tools)),
            prompts=list(server.prompts),
            resources=list(server.resources),
            resource_templates=list(server.resource_templates),
        )

    def resolve_tool(self, name: str) -> Target:
        if not any(t["name"] == name for t in self.server.tools):
            raise ToolNotFound(f"unknown tool {name!r}")
        return RemoteTarget("tool", name, self.server)

    def resolve_prompt(self, name: str) -> Target:
        return RemoteTarget("prompt", name, self.server)  # the upstream answers for unknown names

    def resolve_resource(self, uri: str) -> Target:
        return RemoteTarget("resource", uri, self.server)
