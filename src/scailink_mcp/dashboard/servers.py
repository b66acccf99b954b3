"""Remote server pages: list (search, pagination), detail, register, edit (SPEC sections 3 and 11).

Every read and change goes through `Registry` with the signed-in `Principal`, exactly as the REST
routes do, so visibility (another tenant's or user's server is "not found"), the manage permission
of the owner scope, SSRF checks and the tenant cap are the registry's, not this module's. Change
actions are only drawn for a caller who holds the permission; the registry refuses them anyway.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlmodel import Session, col, select
from starlette.requests import Request
from starlette.responses import Response

from scailink_mcp import auth
from scailink_mcp.auth import Principal
from scailink_mcp.dashboard import forms, pagination
from scailink_mcp.dashboard.web import Visit, signed_in
from scailink_mcp.errors import ScaiLinkError, ValidationFailed
from scailink_mcp.models import Credential, utcnow
from scailink_mcp.remote.discovery import aware
from scailink_mcp.remote.registry import Registry
from scailink_mcp.remote.schemas import ServerDetail

MAX_QUERY = 200


def registry_of(visit: Visit) -> Registry:
    registry = visit.parts.registry
    registry.ensure_enabled()  # REST answers 503 without a KEK, reads included: so does every page
    return registry


def manage_permission(server: ServerDetail) -> str:
    return auth.REMOTE_MANAGE_TENANT if server.is_tenant_shared else auth.REMOTE_MANAGE_OWN


def can_manage(who: Principal, server: ServerDetail) -> bool:
    return who.has(manage_permission(server))


def can_register(who: Principal) -> bool:
    return who.has(auth.REMOTE_MANAGE_OWN) or who.has(auth.REMOTE_MANAGE_TENANT)


def _matches(server: ServerDetail, query: str) -> bool:
    needle = query.casefold()
    return any(needle in text.casefold() for text in (server.name, server.slug, server.endpoint_url))


async def search(
    registry: Registry, who: Principal, query: str, cursor: str | None, size: int, batch: int
) -> pagination.Page[ServerDetail]:
    """Keyset pages of the registry's own list (created_at, id), filtered by `query`."""
    raw = pagination.decode(cursor, 2)
    position: tuple[str, str] | None = (raw[0], raw[1]) if raw else None
    if position is not None and not _iso(position[0]):
        raise ValidationFailed("invalid cursor", details=[{"field": "cursor", "reason": "not a cursor"}])
    found: list[ServerDetail] = []
    while len(found) <= size:
        page = await registry.list(who, limit=batch if query else size + 1, after=position)
        for item in page.items:
            if not query or _matches(item, query):
                found.append(item)
                if len(found) > size:
                    break
        if page.next_cursor is None:
            break
        position = page.next_cursor
    shown = found[:size]
    more = len(found) > size
    last = shown[-1] if shown else None
    next_cursor = pagination.encode([last.created_at.isoformat(), last.id]) if more and last else None
    return pagination.Page(shown, next_cursor)


def _iso(value: str) -> bool:
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


async def list_servers(request: Request) -> Response:
    visit = await signed_in(request)
    settings = visit.parts.settings
    query = request.query_params.get("q", "").strip()[:MAX_QUERY]
    page = await search(
        registry_of(visit),
        visit.who,
        query,
        request.query_params.get("cursor"),
        visit.dash.options.page_size,
        settings.page_limit_max,
    )
    return visit.render(
        "servers.html",
        servers=page.items,
        next_cursor=page.next_cursor,
        q=query,
        can_register=can_register(visit.who),
    )


async def credential_ages(visit: Visit, server_id: str) -> list[tuple[str, int]]:
    """(field, days since set) of a server the caller may see (checked by the registry first)."""

    def read(session: Session) -> list[tuple[str, int]]:
        rows = session.exec(
            select(Credential.field, Credential.updated_at).where(col(Credential.server_id) == server_id)
        ).all()
        now = utcnow()
        return sorted((name, (now - aware(updated)).days) for name, updated in rows)

    return await visit.parts.db.run(read)


async def detail_page(visit: Visit, server_id: str, status_code: int = 200, **extra: Any) -> Response:
    server = await registry_of(visit).get(visit.who, server_id)
    return visit.render(
        "server_detail.html",
        status_code,
        server=server,
        credentials=await credential_ages(visit, server_id),
        can_manage=can_manage(visit.who, server),
        action_errors=extra.pop("action_errors", {}),
        **extra,
    )


async def show_server(request: Request) -> Response:
    visit = await signed_in(request)
    return await detail_page(visit, request.path_params["server_id"])


def _blank_form() -> forms.FormValues:
    values = {"transport": "streamable_http", "auth_type": "none", "consent_tier": "auto"}
    return forms.FormValues(
        {**dict.fromkeys(forms.SERVER_FIELDS, ""), **values, "is_tenant_shared": False}, []
    )


def _register_page(
    visit: Visit, shown: forms.FormValues, errors: forms.FieldErrors, status_code: int
) -> Response:
    return visit.render(
        "server_form.html",
        status_code,
        mode="register",
        form=shown.values,
        credential_names=shown.credential_names
        + [""] * (forms.CREDENTIAL_ROWS - len(shown.credential_names)),
        errors=errors,
        can_share=visit.who.has(auth.REMOTE_MANAGE_TENANT),
    )


async def new_server(request: Request) -> Response:
    visit = await signed_in(request)
    registry_of(visit)
    return _register_page(visit, _blank_form(), forms.FieldErrors(), 200)


async def register(request: Request) -> Response:
    visit = await signed_in(request)
    form = await visit.form()
    registry = registry_of(visit)
    body, shown, err = forms.register_body(form)
    if body is not None:
        try:
            created = await registry.register(visit.who, body)
        except ScaiLinkError as exc:
            err = exc
        else:
            note = (
                "registered"
                if created.status == "active"
                else f"registered, discovery failed: {created.last_health_status}"
            )
            return visit.redirect(f"/servers/{created.id}", f"{created.name}: {note}")
    assert err is not None
    return _register_page(visit, shown, forms.field_errors(err), err.status)


def _edit_values(server: ServerDetail) -> dict[str, Any]:
    return {name: getattr(server, name) for name in forms.EDIT_FIELDS}


async def edit_form(request: Request) -> Response:
    visit = await signed_in(request)
    server = await registry_of(visit).get(visit.who, request.path_params["server_id"])
    visit.who.require(manage_permission(server))  # the form of a change the caller cannot make is not shown
    return visit.render(
        "server_form.html", mode="edit", server=server, form=_edit_values(server), errors=forms.FieldErrors()
    )


async def edit(request: Request) -> Response:
    visit = await signed_in(request)
    form = await visit.form()
    registry = registry_of(visit)
    server = await registry.get(visit.who, request.path_params["server_id"])
    body, shown, err = forms.update_body(form, _edit_values(server))
    if body is not None:
        try:
            updated = await registry.update(visit.who, server.id, body)
        except ScaiLinkError as exc:
            err = exc
        else:
            return visit.redirect(f"/servers/{updated.id}", f"{updated.name}: saved")
    assert err is not None
    return visit.render(
        "server_form.html",
        err.status,
        mode="edit",
        server=server,
        form=shown.values,
        errors=forms.field_errors(err, forms.EDIT_FIELDS),
    )
