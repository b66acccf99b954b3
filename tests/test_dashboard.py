"""The dashboard in-process (httpx over ASGI, the real app and a real upstream): sign-in, the session
cookie, CSRF, CSP, the REST permission rules on every page and action, field errors, pagination, and
that no token or credential value is ever rendered."""

from __future__ import annotations

import re
from collections.abc import Callable

import httpx
import pytest

from scailink_mcp.audit import AuditRecord
from scailink_mcp.config import Settings
from scailink_mcp.dashboard import find_dashboard
from scailink_mcp.dashboard.pagination import after_key
from scailink_mcp.dashboard.sessions import LoginTickets, SessionStore
from tests.conftest import AppHarness, TokenFactory, start_app
from tests.dashboard_client import DashboardClient, csrf_of, field_errors
from tests.upstream import UpstreamServer

pytestmark = pytest.mark.anyio
SECRET = "sekrit-Value-42"
NEW_SECRET = "rotated-Value-99"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_sessions_expire_and_stay_bounded() -> None:
    clock = Clock()
    store = SessionStore(max_sessions=2, clock=clock)
    sid, session = store.create("tok", expires_at=1010.0, user_id="u", tenant_id="t")
    assert store.get(sid) is session and session.csrf_matches(session.csrf)
    assert not session.csrf_matches("") and not session.csrf_matches(None) and not session.csrf_matches("x")
    store.create("tok2", expires_at=2000.0, user_id="u", tenant_id="t")
    store.create("tok3", expires_at=2000.0, user_id="u", tenant_id="t")  # evicts the oldest
    assert store.get(sid) is None and len(store) == 2
    sid4, _ = store.create("tok4", expires_at=1005.0, user_id="u", tenant_id="t")
    clock.now = 1005.0
    assert store.get(sid4) is None  # expires with the token
    per_user = SessionStore(max_per_user=2, clock=clock)
    first, _ = per_user.create("a", expires_at=2000.0, user_id="u", tenant_id="t")
    other, _ = per_user.create("b", expires_at=2000.0, user_id="u", tenant_id="t2")
    per_user.create("c", expires_at=2000.0, user_id="u", tenant_id="t")
    per_user.create("d", expires_at=2000.0, user_id="u", tenant_id="t")
    assert per_user.get(first) is None and per_user.get(other) is not None and len(per_user) == 3


def test_tickets_work_once_and_expire() -> None:
    clock = Clock()
    tickets = LoginTickets(ttl_s=600, clock=clock)
    ticket = tickets.issue("tok")
    assert tickets.redeem(ticket) == "tok"
    assert tickets.redeem(ticket) is None
    late = tickets.issue("tok")
    clock.now += 600
    assert tickets.redeem(late) is None and tickets.redeem(None) is None


def test_after_key_pages() -> None:
    items = [f"n{i:02d}" for i in range(45)]
    first = after_key(items, str, None, 20)
    second = after_key(items, str, first.next_cursor, 20)
    third = after_key(items, str, second.next_cursor, 20)
    assert first.items + second.items + third.items == items and third.next_cursor is None


@pytest.fixture
async def admin(harness: AppHarness, token: TokenFactory) -> DashboardClient:
    dash = DashboardClient(harness.client)
    assert (await dash.sign_in(token(groups=("tenant_admin",)))).status_code == 303
    return dash


def _client(harness: AppHarness) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=harness.client._transport, base_url="http://scailink.test")


async def test_root_redirects_and_every_page_needs_a_session(harness: AppHarness) -> None:
    root = await harness.client.get("/")
    assert root.status_code == 307 and root.headers["location"] == "/dashboard/"
    page = await harness.client.get("/dashboard/servers")
    assert page.status_code == 303
    assert page.headers["location"] == "/dashboard/login?next=%2Fdashboard%2Fservers"
    forged = await harness.client.post("/dashboard/servers", data={"name": "x"})
    assert forged.status_code == 401
    login = await harness.client.get("/dashboard/login")
    csp = login.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert login.headers["x-frame-options"] == "DENY" and login.headers["cache-control"] == "no-store"
    assert "<script" not in login.text


async def test_sign_in_cookie_ticket_and_sign_out(harness: AppHarness, token: TokenFactory) -> None:
    tok = token(ttl_s=1800)
    dash = DashboardClient(harness.client)
    refused = await dash.sign_in(token(ttl_s=-3600))
    assert refused.status_code == 401 and "token refused: token expired" in refused.text
    response = await dash.sign_in(tok)
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/dashboard" in cookie
    max_age = int(re.search(r"Max-Age=(\d+)", cookie).group(1))  # type: ignore[union-attr]
    assert 1700 < max_age <= 1800  # expires with the token
    for path in ("/", "/servers", "/tools", "/desktops", "/audit", "/access"):
        page = await dash.get(path)
        assert page.status_code == 200, (path, page.text)
        assert tok not in page.text and "<script" not in page.text

    # sign-out is a POST with the CSRF token; the cookie then names nothing
    assert (await harness.client.post("/dashboard/logout")).status_code == 403
    out = await dash.post("/logout")
    assert out.status_code == 303 and out.headers["location"] == "/dashboard/login"
    assert (await dash.get("/servers")).status_code == 303

    # the one-time link of `scailink dev`: a GET only shows a button, the POST works once
    ticket = find_dashboard(harness.app).tickets.issue(tok)
    page = await harness.client.get("/dashboard/login", params={"ticket": ticket})
    assert page.status_code == 200 and ticket in page.text and tok not in page.text
    form = {"csrf_token": csrf_of(page.text), "ticket": ticket, "next": "/dashboard/servers"}
    first = await harness.client.post("/dashboard/login", data=form)
    assert first.status_code == 303 and first.headers["location"] == "/dashboard/servers"
    page = await harness.client.get("/dashboard/login", params={"ticket": ticket})
    again = await harness.client.post("/dashboard/login", data={**form, "csrf_token": csrf_of(page.text)})
    assert again.status_code == 401 and "already used" in again.text
    # the sign-in form's own CSRF value (double-submitted) is checked too
    async with _client(harness) as other:
        stray = await other.post("/dashboard/login", data={"csrf_token": "x", "token": tok})
        assert stray.status_code == 403
    # no open redirect after sign-in
    page = await harness.client.get("/dashboard/login")
    away = await harness.client.post(
        "/dashboard/login", data={"csrf_token": csrf_of(page.text), "token": tok, "next": "//evil.example/"}
    )
    assert away.headers["location"] == "/dashboard/"


async def test_register_field_errors_rotate_and_no_secret_rendered(
    harness: AppHarness, admin: DashboardClient
) -> None:
    with UpstreamServer(required_headers={"authorization": f"Bearer {SECRET}"}) as upstream:
        bad = await admin.post("/servers", {"name": "up", "endpoint_url": "not a url"})
        assert bad.status_code == 422
        assert re.search(r'id="endpoint_url"[^>]*aria-invalid="true"', bad.text)
        assert any("http" in e for e in field_errors(bad.text))
        missing = await admin.post(
            "/servers",
            {"name": "up", "endpoint_url": upstream.url, "auth_type": "bearer", "credential_value": ["", ""]},
        )
        assert missing.status_code == 422 and "authorization" in missing.text
        blocked = await admin.post(
            "/servers",
            {"name": "up", "endpoint_url": "http://169.254.169.254/mcp", "auth_type": "bearer",
             "credential_name": ["", ""], "credential_value": [SECRET, ""]},
        )  # fmt: skip
        assert blocked.status_code == 422 and SECRET not in blocked.text
        assert re.search(r'id="endpoint_url"[^>]*aria-invalid="true"', blocked.text)
        created = await admin.post(
            "/servers",
            {"name": "up", "endpoint_url": upstream.url, "auth_type": "bearer",
             "credential_name": ["", ""], "credential_value": [SECRET, ""]},
        )  # fmt: skip
        assert created.status_code == 303, created.text
        detail_path = created.headers["location"].removeprefix("/dashboard")
        detail = await admin.get(detail_path)
        assert (
            "registered" in detail.text
            and "echo" in detail.text
            and "<code>authorization</code>" in detail.text
        )
        assert "0 days" in detail.text
        again = await admin.post("/servers", {"name": "up", "endpoint_url": upstream.url})
        assert again.status_code == 409
        assert re.search(r'id="name"[^>]*aria-invalid="true"', again.text) and "already exists" in again.text
        rotated = await admin.post(
            detail_path + "/credentials", {"field": "authorization", "value": NEW_SECRET}
        )
        assert rotated.status_code == 303
        refused = await admin.post(detail_path + "/credentials", {"field": "x-api-key", "value": NEW_SECRET})
        assert (
            refused.status_code == 422 and "authorization" in refused.text and NEW_SECRET not in refused.text
        )
        refresh = await admin.post(detail_path + "/refresh")  # the upstream wants the old secret: fails
        after = await admin.get(refresh.headers["location"].removeprefix("/dashboard"))
        assert "discovery failed" in after.text
        await harness.parts.audit.flush()
        for path in (
            "/",
            "/servers",
            detail_path,
            "/tools",
            "/audit",
            detail_path + "/delete",
            detail_path + "/edit",
        ):
            page = await admin.get(path)
            assert page.status_code == 200, path
            assert SECRET not in page.text and NEW_SECRET not in page.text, path


async def test_viewer_sees_no_change_actions_and_forged_posts_are_refused(
    harness: AppHarness, admin: DashboardClient, token: TokenFactory
) -> None:
    created = await admin.post(
        "/servers", {"name": "shared", "endpoint_url": "http://127.0.0.1:9/mcp", "is_tenant_shared": "on"}
    )
    assert created.status_code == 303
    path = created.headers["location"].removeprefix("/dashboard")
    assert "Refresh" in (await admin.get(path)).text
    async with _client(harness) as browser:
        viewer = DashboardClient(browser)
        assert (await viewer.sign_in(token(user="v1", groups=("tenant_viewer",)))).status_code == 303
        listing = await viewer.get("/servers")
        assert "shared" in listing.text and "Register a server" not in listing.text
        detail = await viewer.get(path)
        for action in ("Refresh", "Delete", "Edit", "Rotate", "/credentials"):
            assert action not in detail.text
        assert (await viewer.get(path + "/edit")).status_code == 403
        assert (await viewer.get(path + "/delete")).status_code == 403
        forbidden = await viewer.post(path + "/delete")
        assert forbidden.status_code == 403 and "remote.manage_tenant" in forbidden.text
        assert (
            await viewer.post("/servers", {"name": "x", "endpoint_url": "http://127.0.0.1:9/"})
        ).status_code == 403
        call = await viewer.post("/tools/call", {"name": "nope", "arguments": "{}"})
        assert call.status_code == 404
    # the admin's own session, without or with a wrong token, or from another site
    no_token = await harness.client.post(f"/dashboard{path}/delete")
    wrong = await harness.client.post(f"/dashboard{path}/delete", data={"csrf_token": "wrong"})
    cross = await harness.client.post(
        f"/dashboard{path}/delete",
        data={"csrf_token": admin.csrf},
        headers={"Origin": "https://evil.example"},
    )
    assert no_token.status_code == wrong.status_code == cross.status_code == 403
    assert (await admin.get(path)).status_code == 200  # still there
    # another tenant's server is "not found", as over REST
    async with _client(harness) as browser:
        stranger = DashboardClient(browser)
        await stranger.sign_in(token(user="u1", tenant="t2"))
        assert (await stranger.get(path)).status_code == 404
        assert (await stranger.post(path + "/delete")).status_code == 404


async def test_audit_filters_and_cursor_pages(
    harness: AppHarness, admin: DashboardClient, token: TokenFactory
) -> None:
    for i in range(25):
        harness.parts.audit.record(
            AuditRecord(tenant_id="t1", user_id="u1" if i % 5 else "u2", event="tool_call", outcome="ok",
                        target=f"remote.u1.x.t{i}", detail_level="metadata")
        )  # fmt: skip
    await harness.parts.audit.flush()
    first = await admin.get("/audit", event="tool_call")
    assert first.text.count("<tr>") == 21  # header + 20
    cursor = re.search(r'href="/dashboard/audit\?([^"]+)"', first.text)
    assert cursor
    assert cursor.group(1).startswith("event=tool_call&amp;cursor=")  # the filters left empty stay out
    second = await harness.client.get("/dashboard/audit?" + cursor.group(1).replace("&amp;", "&"))
    assert second.text.count("<tr>") == 6
    assert (await admin.get("/audit", outcome="maybe")).status_code == 422
    assert (await admin.get("/audit", since="yesterday")).status_code == 422
    only_u2 = await admin.get("/audit", user_id="u2")
    assert only_u2.text.count("<tr>") == 6
    async with _client(harness) as browser:
        user = DashboardClient(browser)
        await user.sign_in(token(user="u2", groups=("tenant_user",)))
        own = await user.get("/audit")
        assert own.text.count("<tr>") == 6 and "Your own events" in own.text
        other = await user.get("/audit", user_id="u1")
        assert other.status_code == 422 and "scailink:audit" in other.text


async def test_access_page_evaluates_groups_with_manage_only(
    harness: AppHarness, admin: DashboardClient, token: TokenFactory
) -> None:
    page = await admin.get("/access", user_id="someone", groups="tenant_viewer")
    assert page.status_code == 200
    rows = dict(re.findall(r"<tr><td><code>(scailink:[\w.]+)</code></td><td>(yes|no)</td>", page.text))
    assert rows["scailink:view"] == "yes" and rows["scailink:invoke"] == "no"
    assert "tenant_user" in page.text  # the roles list
    async with _client(harness) as browser:
        viewer = DashboardClient(browser)
        await viewer.sign_in(token(user="v1", groups=("tenant_viewer",)))
        own = await viewer.get("/access")
        assert own.status_code == 200 and "needs <code>scailink:manage</code>" in own.text
        probe = await viewer.get("/access", user_id="someone", groups="tenant_admin")
        assert probe.status_code == 422 and "scailink:manage" in probe.text


async def test_playground_calls_as_the_user(
    settings_factory: Callable[..., Settings], token: TokenFactory
) -> None:
    async with start_app(settings_factory(tool_name_style="dotted")) as harness:
        admin = DashboardClient(harness.client)
        await admin.sign_in(token())
        with UpstreamServer() as upstream:
            created = await admin.post("/servers", {"name": "calc", "endpoint_url": upstream.url})
            assert created.status_code == 303
            tools = await admin.get("/tools", q="add")
            name = re.search(r"<code>(remote\.u1\.calc-[0-9a-f]+\.add)</code>", tools.text)
            assert name and "remote__u1__calc" in tools.text  # both name styles
            result = await admin.post("/tools/call", {"name": name.group(1), "style": "dotted",
                                                       "arguments": '{"a": 2, "b": 3}'})  # fmt: skip
            assert result.status_code == 200 and "&#34;sum&#34;: 5" in result.text
            bad = await admin.post("/tools/call", {"name": name.group(1), "arguments": "[1]"})
            assert bad.status_code == 422 and "must be a JSON object" in bad.text
        await harness.parts.audit.flush()
        audit = await admin.get("/audit", event="tool_call", target=name.group(1))
        assert "ok" in audit.text and name.group(1) in audit.text


async def test_server_list_search_and_pages(harness: AppHarness, admin: DashboardClient) -> None:
    for i in range(23):
        body = {"name": f"{'alpha' if i % 2 else 'beta'}-{i:02d}", "endpoint_url": "http://127.0.0.1:9/mcp"}
        assert (await admin.post("/servers", body)).status_code == 303
    first = await admin.get("/servers")
    names = re.findall(r'<a href="/dashboard/servers/\w+">([\w-]+)</a>', first.text)
    assert len(names) == 20 and first.text.count('<span class="status error">error</span>') == 20
    more = re.search(r'href="/dashboard/servers\?cursor=([\w-]+)"', first.text)
    assert more
    second = await admin.get("/servers", cursor=more.group(1))
    rest = re.findall(r'<a href="/dashboard/servers/\w+">([\w-]+)</a>', second.text)
    assert len(rest) == 3 and not set(rest) & set(names) and "Next page" not in second.text
    alpha = await admin.get("/servers", q="ALPHA")
    found = re.findall(r'<a href="/dashboard/servers/\w+">([\w-]+)</a>', alpha.text)
    assert len(found) == 11 and all(n.startswith("alpha") for n in found)
    assert (await admin.get("/servers", cursor="bogus")).status_code == 422
