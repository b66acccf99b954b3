"""IAM: effective permissions per role, custom roles per tenant (CRUD, validation, applied without a
restart), the catch-all only for admin roles."""

from __future__ import annotations

import pytest

from scailink_mcp import auth
from tests.conftest import AppHarness, TokenFactory, auth_headers

pytestmark = pytest.mark.anyio

IAM = "/v1/iam"
SERVERS = "/v1/modules/scailink/remote-servers"


async def perms(h: AppHarness, tok: str, user: str, query: str = "") -> dict[str, list[str]]:
    resp = await h.client.get(f"{IAM}/users/{user}/permissions{query}", headers=auth_headers(tok))
    assert resp.status_code == 200, resp.text
    data: dict[str, list[str]] = resp.json()["data"]["permissions"]
    return data


@pytest.mark.parametrize(
    ("group", "expected"),
    [
        ("tenant_admin", auth.ALL_PERMISSIONS),
        ("tenant_user", {auth.VIEW, auth.INVOKE, auth.REMOTE_USE, auth.REMOTE_MANAGE_OWN}),
        ("tenant_viewer", {auth.VIEW, auth.REMOTE_USE}),
    ],
)
async def test_builtin_effective_permissions(
    harness: AppHarness, token: TokenFactory, group: str, expected: frozenset[str]
) -> None:
    got = await perms(harness, token("u1", "t1", (group,)), "u1")
    assert set(got) == set(expected)
    assert all(roles == [group] for roles in got.values())


async def test_custom_role_lifecycle(harness: AppHarness, token: TokenFactory) -> None:
    c = harness.client
    admin = auth_headers(token("admin", "t1", ("tenant_admin",)))
    bad = await c.put(f"{IAM}/roles/auditor", json={"permissions": ["scailink:everything"]}, headers=admin)
    assert bad.status_code == 422 and bad.json()["error"]["details"][0]["field"] == "permissions"
    builtin = await c.put(f"{IAM}/roles/tenant_user", json={"permissions": []}, headers=admin)
    assert builtin.status_code == 422
    bad_name = await c.put(f"{IAM}/roles/Bad Name", json={"permissions": []}, headers=admin)
    assert bad_name.status_code == 422
    created = await c.put(
        f"{IAM}/roles/auditor", json={"permissions": ["scailink:view", "scailink:audit"]}, headers=admin
    )
    assert created.status_code == 200 and created.json()["data"]["permissions"] == [
        "scailink:audit",
        "scailink:view",
    ]

    member = token("u5", "t1", ("auditor",))
    got = await perms(harness, member, "u5")
    assert set(got) == {auth.VIEW, auth.AUDIT}, "a custom role gets exactly its list"
    # without remote.use the member cannot list servers ...
    assert (await c.get(SERVERS, headers=auth_headers(member))).status_code == 403
    # ... and can once the role is updated, without a restart
    await c.put(
        f"{IAM}/roles/auditor", json={"permissions": ["scailink:view", "scailink:remote.use"]}, headers=admin
    )
    assert (await c.get(SERVERS, headers=auth_headers(member))).status_code == 200
    # the role is per tenant
    other_tenant = token("u5", "t2", ("auditor",))
    assert (await c.get(SERVERS, headers=auth_headers(other_tenant))).status_code == 403
    listed = (await c.get(f"{IAM}/roles", headers=admin)).json()["data"]["items"]
    assert {"auditor", "tenant_admin", "tenant_user"} <= {r["name"] for r in listed}
    # another user's permissions: manage + their groups
    evaluated = await perms(harness, token("admin", "t1", ("tenant_admin",)), "u5", "?groups=auditor")
    assert set(evaluated) == {auth.VIEW, auth.REMOTE_USE}
    user = auth_headers(token("u1", "t1", ("tenant_user",)))
    assert (await c.get(f"{IAM}/users/u5/permissions?groups=auditor", headers=user)).status_code == 403
    assert (await c.get(f"{IAM}/roles", headers=user)).status_code == 403
    assert (await c.delete(f"{IAM}/roles/auditor", headers=admin)).status_code == 204
    assert (await c.delete(f"{IAM}/roles/auditor", headers=admin)).status_code == 404
    assert (await c.get(SERVERS, headers=auth_headers(member))).status_code == 403
    # a user whose token names tenant_user never gets the catch-all, whatever else it carries
    mixed = await perms(harness, token("u7", "t1", ("tenant_user", "tenant_viewer")), "u7")
    assert auth.MANAGE not in mixed and auth.REMOTE_MANAGE_TENANT not in mixed
