"""Actions on one remote server: refresh, delete (after a confirmation naming what cascades), rotate
or remove a credential field. Each calls the registry with the signed-in `Principal`; a refusal is
shown next to the action on the server's page (never a stack trace, never a secret value)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from scailink_mcp.dashboard import forms
from scailink_mcp.dashboard.servers import credential_ages, detail_page, manage_permission, registry_of
from scailink_mcp.dashboard.web import signed_in
from scailink_mcp.errors import ScaiLinkError


def _message(err: ScaiLinkError) -> str:
    reasons = [
        f"{d.get('field')}: {d.get('reason')}"
        for d in (err.details if isinstance(err.details, list) else [])
        if isinstance(d, dict)
    ]
    return "; ".join([err.message, *reasons]) if reasons else err.message


async def refresh(request: Request) -> Response:
    visit = await signed_in(request)
    await visit.form()
    server_id = request.path_params["server_id"]
    try:
        server = await registry_of(visit).refresh(visit.who, server_id)
    except ScaiLinkError as err:
        return await detail_page(visit, server_id, err.status, action_errors={"refresh": _message(err)})
    note = (
        "discovery ok"
        if server.last_health_status == "ok"
        else f"discovery failed: {server.last_health_status}"
    )
    return visit.redirect(f"/servers/{server_id}", f"{server.name}: refreshed, {note}")


async def confirm_delete(request: Request) -> Response:
    visit = await signed_in(request)
    server = await registry_of(visit).get(visit.who, request.path_params["server_id"])
    visit.who.require(manage_permission(server))
    return visit.render(
        "server_delete.html", server=server, credentials=await credential_ages(visit, server.id)
    )


async def delete(request: Request) -> Response:
    visit = await signed_in(request)
    await visit.form()
    server_id = request.path_params["server_id"]
    registry = registry_of(visit)
    try:
        server = await registry.get(visit.who, server_id)
        await registry.delete(visit.who, server_id)
    except ScaiLinkError as err:
        return await detail_page(visit, server_id, err.status, action_errors={"delete": _message(err)})
    return visit.redirect("/servers", f"{server.name}: deleted with its credentials and capabilities")


async def rotate_credential(request: Request) -> Response:
    visit = await signed_in(request)
    form = await visit.form()
    server_id = request.path_params["server_id"]
    field, body, err = forms.credential_body(form)
    if body is not None:
        try:
            await registry_of(visit).put_credential(
                visit.who, server_id, field, body.value.get_secret_value()
            )
        except ScaiLinkError as exc:
            err = exc
        else:
            return visit.redirect(
                f"/servers/{server_id}", f"credential {field}: set (pooled sessions closed)"
            )
    assert err is not None
    return await detail_page(visit, server_id, err.status, action_errors={"rotate": _message(err)})


async def remove_credential(request: Request) -> Response:
    visit = await signed_in(request)
    await visit.form()
    server_id, field = request.path_params["server_id"], request.path_params["field"]
    try:
        await registry_of(visit).delete_credential(visit.who, server_id, field)
    except ScaiLinkError as err:
        return await detail_page(
            visit, server_id, err.status, action_errors={f"remove:{field}": _message(err)}
        )
    return visit.redirect(f"/servers/{server_id}", f"credential {field}: removed")
