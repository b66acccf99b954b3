"""IAM: role-name and grant rules (pure), the custom-role store and its cache on every real database,
and the routes: effective permissions, role CRUD with validation, and role changes applying to the
next request with the same token (no restart) while surviving one."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import anyio
import anyio.to_thread
import pytest
from pydantic import ValidationError
from sqlalchemy import event

from scailink_mcp import auth
from scailink_mcp.config import Settings
from scailink_mcp.db import Database
from scailink_mcp.errors import NotFound, ValidationFailed
from scailink_mcp.iam import RoleBody, RoleStore, check_name, ungrantable
from tests.conftest import AppHarness, TokenFactory, auth_headers, start_app

pytestmark = pytest.mark.anyio

IAM = "/v1/iam"
SERVERS = "/v1/modules/scailink/remote-servers"


def body(*permissions: str, description: str = "") -> RoleBody:
    return RoleBody(permissions=list(permissions), description=description)


@pytest.fixture
def store(database_url: str) -> Iterator[RoleStore]:
    db = Database(database_url)
    db.migrate()
    yield RoleStore(db)
    db.dispose()


# ---- pure rules --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["auditor", "a", "ops-admins", "team_2", "x" * 64])
def test_valid_role_names(name: str) -> None:
    check_name(name)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("Auditor", "must match"),
        ("2fast", "must match"),
        ("has space", "must match"),
        ("dots.not.allowed", "must match"),
        ("", "must match"),
        ("x" * 65, "must match"),
        *[(builtin, "built-in") for builtin in auth.BUILTIN_ROLES],
    ],
)
def test_invalid_role_names(name: str, reason: str) -> None:
    with pytest.raises(ValidationFailed) as err:
        check_name(name)
    assert err.value.details[0]["field"] == "name" and reason in err.value.details[0]["reason"]


def test_role_body_rules() -> None:
    parsed = body(auth.VIEW, auth.AUDIT, auth.VIEW)
    assert parsed.permissions == [auth.AUDIT, auth.VIEW], "deduplicated and sorted"
    with pytest.raises(ValidationError, match="unknown permissions: scailink:everything"):
        body(auth.VIEW, "scailink:everything")
    with pytest.raises(ValidationError):
        RoleBody.model_validate({"permissions": [], "inherits": "tenant_admin"})


def test_ungrantable() -> None:
    assert ungrantable(auth.ALL_PERMISSIONS, [auth.MANAGE, auth.AUDIT]) == []
    assert ungrantable({auth.MANAGE, auth.VIEW}, [auth.VIEW, auth.REMOTE_USE, auth.AUDIT]) == [
        auth.AUDIT,
        auth.REMOTE_USE,
    ]


# ---- the store ---------------------------------------------------------------------------------------


async def test_store_crud_and_cache(store: RoleStore) -> None:
    assert store.roles_for("t1") == {}
    created = await store.put("t1", "auditor", body(auth.VIEW, auth.AUDIT, description="reads the log"))
    assert created["permissions"] == [auth.AUDIT, auth.VIEW] and created["description"] == "reads the log"
    assert created["builtin"] is False and created["created_at"] and created["updated_at"]
    assert store.roles_for("t1") == {"auditor": frozenset({auth.VIEW, auth.AUDIT})}
    assert store.roles_for("t2") == {}, "roles are per tenant"
    replaced = await store.put("t1", "auditor", body(auth.VIEW))
    assert replaced["permissions"] == [auth.VIEW] and replaced["description"] == ""
    assert store.roles_for("t1")["auditor"] == frozenset({auth.VIEW})
    assert (await store.get("t1", "auditor"))["permissions"] == [auth.VIEW]
    assert (await store.get("t1", "tenant_viewer"))["builtin"] is True
    with pytest.raises(NotFound):
        await store.get("t2", "auditor")
    names = [r["name"] for r in await store.list("t1")]
    assert names == sorted([*auth.BUILTIN_ROLES, "auditor"])
    assert "auditor" not in [r["name"] for r in await store.list("t2")]

    # A second store (another worker, or a restart) sees the database's roles after `load`.
    fresh = RoleStore(store.db)
    assert fresh.roles_for("t1") == {}
    assert fresh.load() is True
    assert fresh.roles_for("t1") == {"auditor": frozenset({auth.VIEW})}

    with pytest.raises(ValidationFailed):
        await store.delete("t1", "tenant_admin")
    await store.delete("t1", "auditor")
    assert store.roles_for("t1") == {}
    with pytest.raises(NotFound):
        await store.delete("t1", "auditor")
    assert fresh.load() and fresh.roles_for("t1") == {}


async def test_store_caps_roles_per_tenant(store: RoleStore) -> None:
    store.max_roles_per_tenant = 2
    await store.put("t1", "one", body(auth.VIEW))
    await store.put("t1", "two", body(auth.VIEW))
    with pytest.raises(ValidationFailed) as err:
        await store.put("t1", "three", body(auth.VIEW))
    assert "2 custom roles" in err.value.details[0]["reason"]
    await store.put("t1", "two", body(auth.INVOKE))  # replacing is not creating
    await store.put("t2", "three", body(auth.VIEW))  # another tenant has its own cap


async def test_concurrent_creation_of_one_name(store: RoleStore) -> None:
    async with anyio.create_task_group() as tg:
        for perms in ([auth.VIEW], [auth.INVOKE], [auth.AUDIT], [auth.VIEW, auth.INVOKE]):
            tg.start_soon(store.put, "t1", "racer", body(*perms))
    rows = [r for r in await store.list("t1") if r["name"] == "racer"]
    assert len(rows) == 1
    assert store.roles_for("t1")["racer"] == frozenset(rows[0]["permissions"]), "cache and database agree"


async def test_a_reload_racing_a_change_does_not_undo_it(sqlite_url: str) -> None:
    db = Database(sqlite_url)
    db.migrate()
    store = RoleStore(db)
    selected, proceed = threading.Event(), threading.Event()
    armed = [True]

    def pause_once_the_load_has_read(dbapi_connection: Any, record: Any) -> None:
        # The load's session hands its connection back once it has read every row.
        if armed[0]:
            armed[0] = False
            selected.set()
            proceed.wait(10)

    event.listen(db.engine, "checkin", pause_once_the_load_has_read)
    results: list[bool] = []

    async def reload() -> None:
        results.append(await anyio.to_thread.run_sync(store.load))

    async with anyio.create_task_group() as tg:
        tg.start_soon(reload)
        assert await anyio.to_thread.run_sync(selected.wait, 10)
        # The load has read the (empty) table; a change lands before it swaps its result in.
        await store.put("t1", "auditor", body(auth.AUDIT))
        proceed.set()
    assert results == [False], "the stale result is discarded"
    assert store.roles_for("t1") == {"auditor": frozenset({auth.AUDIT})}
    assert store.load() is True and store.roles_for("t1") == {"auditor": frozenset({auth.AUDIT})}
    db.dispose()


# ---- the routes --------------------------------------------------------------------------------------


async def perms_of(h: AppHarness, tok: str, user: str, **params: str) -> dict[str, Any]:
    resp = await h.client.get(f"{IAM}/users/{user}/permissions", params=params, headers=auth_headers(tok))
    assert resp.status_code == 200, resp.text
    data: dict[str, Any] = resp.json()["data"]
    return data


async def put_role(h: AppHarness, tok: str, name: str, *permissions: str) -> Any:
    return await h.client.put(
        f"{IAM}/roles/{name}", json={"permissions": list(permissions)}, headers=auth_headers(tok)
    )


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        ("tenant_admin", auth.ALL_PERMISSIONS),
        ("tenant_user", {auth.VIEW, auth.INVOKE, auth.REMOTE_USE, auth.REMOTE_MANAGE_OWN}),
        ("tenant_viewer", {auth.VIEW, auth.REMOTE_USE}),
    ],
)
async def test_permissions_of_builtin_roles(
    harness: AppHarness, token: TokenFactory, group: str, expected: frozenset[str]
) -> None:
    data = await perms_of(harness, token("u1", "t1", (group, "some-idp-group")), "u1")
    assert data["user_id"] == "u1" and data["tenant_id"] == "t1" and data["roles"] == [group]
    assert data["permissions"] == {perm: [group] for perm in sorted(expected)}


async def test_permissions_of_a_custom_role_and_of_several_roles(
    harness: AppHarness, token: TokenFactory
) -> None:
    admin = token("admin", "t1", ("tenant_admin",))
    assert (await put_role(harness, admin, "auditor", auth.VIEW, auth.AUDIT)).status_code == 200
    data = await perms_of(harness, token("u5", "t1", ("auditor",)), "u5")
    assert data["roles"] == ["auditor"]
    assert data["permissions"] == {auth.AUDIT: ["auditor"], auth.VIEW: ["auditor"]}, "exactly its list"
    both = await perms_of(harness, token("u6", "t1", ("tenant_viewer", "auditor")), "u6")
    assert both["roles"] == ["tenant_viewer", "auditor"]
    assert both["permissions"][auth.VIEW] == ["tenant_viewer", "auditor"]
    assert set(both["permissions"]) == {auth.VIEW, auth.REMOTE_USE, auth.AUDIT}
    # The same group name in another tenant grants nothing: t1's role is invisible there.
    assert (await perms_of(harness, token("u5", "t2", ("auditor",)), "u5"))["permissions"] == {}


async def test_permissions_of_another_user(harness: AppHarness, token: TokenFactory) -> None:
    c = harness.client
    admin = token("admin", "t1", ("tenant_admin",))
    await put_role(harness, admin, "auditor", auth.AUDIT)
    evaluated = await perms_of(harness, admin, "u9", groups="auditor, tenant_viewer,unknown")
    assert evaluated["user_id"] == "u9" and evaluated["roles"] == ["auditor", "tenant_viewer"]
    assert set(evaluated["permissions"]) == {auth.AUDIT, auth.VIEW, auth.REMOTE_USE}
    # Without the groups ScaiLink cannot know them: 422 saying so, not a guess.
    resp = await c.get(f"{IAM}/users/u9/permissions", headers=auth_headers(admin))
    assert resp.status_code == 422 and resp.json()["error"]["details"][0]["field"] == "groups"
    too_many = ",".join(f"g{i}" for i in range(101))
    resp = await c.get(
        f"{IAM}/users/u9/permissions", params={"groups": too_many}, headers=auth_headers(admin)
    )
    assert resp.status_code == 422
    # Without scailink:manage: oneself only (and evaluating groups for oneself is an evaluation too).
    user = auth_headers(token("u1", "t1", ("tenant_user",)))
    for path in (f"{IAM}/users/u9/permissions?groups=auditor", f"{IAM}/users/u1/permissions?groups=auditor"):
        resp = await c.get(path, headers=user)
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "SCAILINK_FORBIDDEN"
    # Another tenant's admin evaluates against its own tenant's roles only.
    other = await perms_of(harness, token("a2", "t2", ("tenant_admin",)), "u9", groups="auditor")
    assert other["tenant_id"] == "t2" and other["roles"] == [] and other["permissions"] == {}


async def test_role_routes_crud_and_validation(harness: AppHarness, token: TokenFactory) -> None:
    c = harness.client
    admin = token("admin", "t1", ("tenant_admin",))
    h = auth_headers(admin)

    def field_of(resp: Any) -> str:
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"]["code"] == "SCAILINK_VALIDATION_ERROR"
        return str(resp.json()["error"]["details"][0]["field"])

    assert field_of(await put_role(harness, admin, "auditor", "scailink:everything")) == "permissions"
    assert field_of(await put_role(harness, admin, "tenant_user", auth.VIEW)) == "name"
    assert field_of(await put_role(harness, admin, "Bad", auth.VIEW)) == "name"
    assert field_of(await put_role(harness, admin, "Bad Name")) == "name"
    assert (
        field_of(await c.put(f"{IAM}/roles/auditor", json={"permissions": "x"}, headers=h)) == "permissions"
    )
    assert field_of(await c.put(f"{IAM}/roles/auditor", json={"perms": []}, headers=h)) == "permissions"
    assert field_of(await c.put(f"{IAM}/roles/auditor", content=b"{", headers=h)) == "body"
    too_long = {"permissions": [], "description": "x" * 501}
    assert field_of(await c.put(f"{IAM}/roles/auditor", json=too_long, headers=h)) == "description"
    assert (await c.get(f"{IAM}/roles/auditor", headers=h)).status_code == 404

    created = await c.put(
        f"{IAM}/roles/auditor", json={"permissions": [auth.VIEW, auth.AUDIT], "description": "d"}, headers=h
    )
    assert created.status_code == 200
    assert created.json()["data"] | {"created_at": None, "updated_at": None} == {
        "name": "auditor",
        "description": "d",
        "permissions": [auth.AUDIT, auth.VIEW],
        "builtin": False,
        "created_at": None,
        "updated_at": None,
    }
    got = (await c.get(f"{IAM}/roles/auditor", headers=h)).json()["data"]
    assert got["permissions"] == [auth.AUDIT, auth.VIEW]
    builtin = (await c.get(f"{IAM}/roles/tenant_viewer", headers=h)).json()["data"]
    assert builtin["builtin"] is True and builtin["permissions"] == sorted([auth.VIEW, auth.REMOTE_USE])
    await put_role(harness, admin, "zeta", auth.VIEW)

    # list: paginated by name
    names: list[str] = []
    cursor: str | None = None
    while True:
        params = {"limit": "3"} | ({"cursor": cursor} if cursor else {})
        data = (await c.get(f"{IAM}/roles", params=params, headers=h)).json()["data"]
        names += [r["name"] for r in data["items"]]
        cursor = data["next_cursor"]
        if not cursor:
            break
    assert names == sorted([*auth.BUILTIN_ROLES, "auditor", "zeta"])

    # another tenant sees none of it
    t2 = auth_headers(token("a2", "t2", ("tenant_admin",)))
    assert (await c.get(f"{IAM}/roles/auditor", headers=t2)).status_code == 404
    assert (await c.delete(f"{IAM}/roles/auditor", headers=t2)).status_code == 404

    assert field_of(await c.delete(f"{IAM}/roles/tenant_admin", headers=h)) == "name"
    assert (await c.delete(f"{IAM}/roles/auditor", headers=h)).status_code == 204
    assert (await c.delete(f"{IAM}/roles/auditor", headers=h)).status_code == 404
    assert (await c.get(f"{IAM}/roles/auditor", headers=h)).status_code == 404

    # every role route needs scailink:manage
    user = auth_headers(token("u1", "t1", ("tenant_user",)))
    for method, path in (("GET", "/roles"), ("GET", "/roles/zeta"), ("DELETE", "/roles/zeta")):
        assert (await c.request(method, IAM + path, headers=user)).status_code == 403
    assert (await c.put(f"{IAM}/roles/zeta", json={"permissions": []}, headers=user)).status_code == 403


async def test_no_granting_what_one_does_not_hold(harness: AppHarness, token: TokenFactory) -> None:
    admin = token("admin", "t1", ("tenant_admin",))
    await put_role(harness, admin, "role-admin", auth.MANAGE, auth.VIEW)
    delegate = token("d1", "t1", ("role-admin",))
    # Adding scailink:audit to one's own role would be a way around the admin.
    resp = await put_role(harness, delegate, "role-admin", auth.MANAGE, auth.VIEW, auth.AUDIT)
    assert resp.status_code == 403
    assert resp.json()["error"]["details"] == [{"field": "permissions", "reason": "not held: scailink:audit"}]
    assert (await put_role(harness, delegate, "viewers", auth.VIEW)).status_code == 200


async def test_role_change_applies_without_restart_and_survives_one(
    settings_factory: Callable[..., Settings], token: TokenFactory
) -> None:
    settings = settings_factory()
    admin = token("admin", "t1", ("tenant_admin",))
    member = auth_headers(token("u5", "t1", ("auditor",)))  # one token for the whole test
    async with start_app(settings) as h:
        assert (await put_role(h, admin, "auditor", auth.VIEW, auth.AUDIT)).status_code == 200
        denied = await h.client.get(SERVERS, headers=member)
        assert denied.status_code == 403 and auth.REMOTE_USE in denied.json()["error"]["message"]
        assert (await put_role(h, admin, "auditor", auth.VIEW, auth.REMOTE_USE)).status_code == 200
        assert (await h.client.get(SERVERS, headers=member)).status_code == 200
        evaluated = await perms_of(h, admin, "u5", groups="auditor")
        assert set(evaluated["permissions"]) == {auth.VIEW, auth.REMOTE_USE}, "evaluated as it is now"
        other_tenant = auth_headers(token("u5", "t2", ("auditor",)))
        assert (await h.client.get(SERVERS, headers=other_tenant)).status_code == 403, "t1's role only"
    async with start_app(settings) as h:  # a restart loads the roles from the database
        assert (await h.client.get(SERVERS, headers=member)).status_code == 200
        assert (await h.client.delete(f"{IAM}/roles/auditor", headers=auth_headers(admin))).status_code == 204
        assert (await h.client.get(SERVERS, headers=member)).status_code == 403


async def test_user_roles_never_add_up_to_the_catch_all(harness: AppHarness, token: TokenFactory) -> None:
    got = (await perms_of(harness, token("u7", "t1", ("tenant_user", "tenant_viewer")), "u7"))["permissions"]
    assert auth.MANAGE not in got and auth.REMOTE_MANAGE_TENANT not in got
    assert set(got) == {auth.VIEW, auth.INVOKE, auth.REMOTE_USE, auth.REMOTE_MANAGE_OWN}
