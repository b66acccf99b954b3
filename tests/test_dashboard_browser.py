"""The dashboard in a real browser: Playwright (PyPI) driving Debian's Chromium against ScaiLink on
127.0.0.1 (`LiveApp`, a real uvicorn) with a real upstream MCP server and a real desktop WebSocket
client. One admin walk through every page, then a viewer, then forged POSTs over plain HTTP.

Each page is screenshotted into the test's tmp dir; with `SCAILINK_UPDATE_SCREENSHOTS=1` one per main
page is copied to `docs/dashboard/` (the README's pictures). Skipped only when /usr/bin/chromium is
missing (`.ci/run` installs it and sets `SCAILINK_TEST_REQUIRE_CHROMIUM`, which turns the skip into a
failure).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from scailink_mcp.config import Settings
from tests import oauth_harness
from tests.conftest import LiveApp, TokenFactory, auth_headers
from tests.dashboard_client import csrf_of
from tests.oauth_harness import text_of
from tests.oauth_server import AuthServer, ProtectedUpstream
from tests.upstream import UpstreamServer

pytestmark = pytest.mark.anyio
CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "dashboard"
SECRET = "up-Secret-7731"
NEW_SECRET = "up-Rotated-5512"

if not CHROMIUM.exists():
    reason = f"{CHROMIUM} is missing (apt-get install chromium); the browser tests need it"
    if os.environ.get("SCAILINK_TEST_REQUIRE_CHROMIUM"):
        raise RuntimeError(f"{reason}, but SCAILINK_TEST_REQUIRE_CHROMIUM is set (CI)")
    pytest.skip(reason, allow_module_level=True)

from playwright.async_api import Browser, Page, async_playwright, expect  # noqa: E402


class Shots:
    """Screenshots into tmp_path; the main pages also into docs/dashboard/ when asked to."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.update = os.environ.get("SCAILINK_UPDATE_SCREENSHOTS") == "1"
        self.taken = 0

    async def take(self, page: Page, name: str, *, docs: bool = False) -> None:
        path = self.folder / f"{name}.png"
        await page.screenshot(path=str(path), full_page=True)
        self.taken += 1
        if docs and self.update:
            DOCS.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, DOCS / f"{name}.png")


@pytest.fixture
def live_app(settings_factory: Callable[..., Settings]) -> Iterator[LiveApp]:
    with LiveApp(settings_factory()) as app:
        yield app


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


async def sign_in(page: Page, base: str, token: str) -> None:
    await page.goto(f"{base}/dashboard/")
    await page.get_by_label("Token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_role("heading", name="Overview")).to_be_visible()


async def nav(page: Page, label: str) -> None:
    await page.get_by_role("navigation", name="Main").get_by_role("link", name=label).click()


async def no_secret(page: Page) -> None:
    source = await page.content()
    assert SECRET not in source and NEW_SECRET not in source


async def reload_until(page: Page, text: str, timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while text not in await page.content():
            await anyio.sleep(0.2)  # a deadline-bounded poll: the audit log is written in batches
            await page.reload()


def init_frame() -> str:
    echo = {"name": "echo", "description": "echo text", "inputSchema": {"type": "object"}}
    params = {
        "protocol_version": "scailink/1.0",
        "client_version": "test/1",
        "device_name": "Ada's Laptop",
        "device_id": "dev-1",
        "platform": {"os": "linux", "arch": "x86_64"},
        "capabilities": {"tools": [echo], "resources": [], "prompts": []},
    }
    return json.dumps({"jsonrpc": "2.0", "id": 1, "method": "scailink/session_init", "params": params})


async def test_admin_walk_viewer_and_forged_posts(
    live_app: LiveApp, browser: Browser, token: TokenFactory, tmp_path: Path
) -> None:
    base = live_app.base_url
    shots = Shots(tmp_path)
    admin_token = token(user="u1", groups=("tenant_admin",))
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    page.set_default_timeout(10_000)

    await page.goto(f"{base}/dashboard/login")
    await shots.take(page, "login")
    await sign_in(page, base, admin_token)

    with UpstreamServer(required_headers={"authorization": f"Bearer {SECRET}"}) as upstream:
        # register: a field error for a bad URL, then for real (bearer credential)
        await nav(page, "Servers")
        await page.get_by_role("link", name="Register a server").click()
        await page.get_by_label("Name", exact=True).fill("calc")
        await page.get_by_label("Endpoint URL").fill("ftp://nowhere")
        await page.get_by_role("button", name="Register and discover").click()
        await expect(page.locator("#endpoint_url-error")).to_contain_text("http")
        await shots.take(page, "register-error", docs=True)
        await page.get_by_label("Endpoint URL").fill(upstream.url)
        await page.get_by_label("Authentication to the upstream").select_option("bearer")
        await page.get_by_label("Secret value 1").fill(SECRET)
        await page.get_by_role("button", name="Register and discover").click()
        await expect(page.get_by_role("heading", name="calc")).to_be_visible()
        await expect(page.locator(".flash")).to_contain_text("registered")
        await no_secret(page)
        server_url = page.url
        await shots.take(page, "server", docs=True)
        await nav(page, "Servers")
        await expect(page.get_by_role("link", name="calc")).to_be_visible()
        await shots.take(page, "servers", docs=True)

        # the catalog lists its tools; the playground calls one as u1
        await nav(page, "Tools")
        await page.get_by_label("Search names and descriptions").fill("add")
        await page.get_by_role("button", name="Search").click()
        row = page.get_by_role("row").filter(has_text=".add")
        tool = (await row.locator("code").first.inner_text()).strip()
        assert re.fullmatch(r"remote\.u1\.calc-[0-9a-f]{6}\.add", tool)
        await nav(page, "Tools")
        await shots.take(page, "tools", docs=True)
        await page.get_by_role("link", name=f"Try {tool}").click()
        await page.get_by_label("Arguments (a JSON object)").fill('{"a": 2, "b": 40}')
        await page.get_by_role("button", name="Call as u1").click()
        await expect(page.locator("#result")).to_contain_text('"sum": 42')
        await shots.take(page, "playground", docs=True)

        # the call is in the audit log (written in batches: reload until it shows)
        await nav(page, "Audit log")
        await reload_until(page, tool)
        await expect(page.get_by_role("row").filter(has_text=tool).first).to_contain_text("ok")
        await shots.take(page, "audit", docs=True)

        # a real desktop client: listed, then terminated from the dashboard (it sees the close)
        async with connect(
            base.replace("http://", "ws://") + "/v1/scailink/ws", additional_headers=auth_headers(admin_token)
        ) as ws:
            await ws.send(init_frame())
            assert "session_id" in json.loads(await ws.recv())["result"]
            await nav(page, "Overview")
            await expect(page.locator('[data-figure="sessions-online"]')).to_have_text("1")
            await expect(page.locator('[data-figure="calls"]')).to_have_text("1")
            await shots.take(page, "overview", docs=True)
            await nav(page, "Desktop sessions")
            await expect(page.get_by_role("cell", name="Ada's Laptop", exact=True)).to_be_visible()
            await shots.take(page, "desktops", docs=True)
            await page.get_by_role("button", name="Terminate the session of Ada's Laptop").click()
            await expect(page.locator(".flash")).to_contain_text("terminated")
            with anyio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000

        # rotate the credential: only its name and age are ever shown
        await page.goto(server_url)
        await page.get_by_label("New value").fill(NEW_SECRET)
        await page.get_by_role("button", name="Set").click()
        await expect(page.locator(".flash")).to_contain_text("credential authorization: set")
        await expect(page.get_by_role("cell", name="authorization", exact=True)).to_be_visible()
        await no_secret(page)

        await nav(page, "Access")
        await page.get_by_label("User id").fill("someone")
        await page.get_by_label("Groups (comma-separated)").fill("tenant_user")
        await page.get_by_role("button", name="Evaluate").click()
        await expect(page.get_by_role("row", name="scailink:invoke yes")).to_be_visible()
        await shots.take(page, "access", docs=True)

        # delete after the confirmation that names what cascades
        await page.goto(server_url)
        await page.get_by_role("link", name="Delete…").click()
        confirm = page.locator(".warning-box")
        await expect(confirm).to_contain_text("1 credential field (authorization)")
        await expect(confirm).to_contain_text("tools")
        await shots.take(page, "delete", docs=True)
        await page.get_by_role("button", name="Delete calc").click()
        await expect(page.locator(".flash")).to_contain_text("deleted")
        await expect(page.get_by_text("No servers yet.")).to_be_visible()

    # a shared server, then a tenant_viewer: it sees it, but no change action anywhere
    async with httpx.AsyncClient(base_url=base, timeout=30) as rest:
        created = await rest.post(
            "/v1/modules/scailink/remote-servers",
            json={"name": "team", "endpoint_url": "http://127.0.0.1:9/mcp", "is_tenant_shared": True},
            headers=auth_headers(admin_token),
        )
        server_id = created.json()["data"]["id"]
    # the viewer signs in with the keyboard only, in dark mode
    viewer_context = await browser.new_context(viewport={"width": 1280, "height": 800}, color_scheme="dark")
    viewer = await viewer_context.new_page()
    await viewer.goto(f"{base}/dashboard/")
    # autofocus lands at the next rendering update, which may follow the load event: wait for it,
    # or the first keystrokes go nowhere and the token arrives truncated
    await expect(viewer.get_by_label("Token (a JWT, as for the REST API)")).to_be_focused()
    await viewer.keyboard.type(token(user="v1", groups=("tenant_viewer",)))
    await viewer.keyboard.press("Tab")
    await viewer.keyboard.press("Enter")
    await expect(viewer.get_by_role("heading", name="Overview")).to_be_visible()
    await shots.take(viewer, "overview-dark", docs=True)
    await nav(viewer, "Servers")
    await expect(viewer.get_by_role("link", name="team")).to_be_visible()
    assert await viewer.get_by_role("link", name="Register a server").count() == 0
    await viewer.get_by_role("link", name="team").click()
    for name in ("Refresh (re-run discovery)", "Set", "Remove"):
        assert await viewer.get_by_role("button", name=name).count() == 0
    for name in ("Edit", "Delete…"):
        assert await viewer.get_by_role("link", name=name).count() == 0
    await shots.take(viewer, "viewer-server")

    # forged POSTs over plain HTTP: the viewer's own cookie and CSRF token, the admin's cookie
    # without a token or with a wrong one
    delete = f"/dashboard/servers/{server_id}/delete"
    for ctx, with_csrf in ((viewer_context, True), (context, False), (context, None)):
        cookies = {c["name"]: c["value"] for c in await ctx.cookies()}
        async with httpx.AsyncClient(base_url=base, cookies=cookies) as forger:
            csrf = csrf_of((await forger.get("/dashboard/")).text)
            data = {"csrf_token": csrf if with_csrf else "forged"} if with_csrf is not None else {}
            assert (await forger.post(delete, data=data)).status_code == 403
    async with httpx.AsyncClient(base_url=base) as rest:
        still = await rest.get(
            f"/v1/modules/scailink/remote-servers/{server_id}", headers=auth_headers(admin_token)
        )
        assert still.status_code == 200
    await viewer_context.close()
    await context.close()
    assert shots.taken >= 10


# ---- Connect an upstream OAuth server (SPEC sections 11 and 12) ---------------------------------------

world, gateway = oauth_harness.world, oauth_harness.gateway


@pytest.fixture
def oauth_upstream(world: AuthServer) -> Iterator[ProtectedUpstream]:
    with ProtectedUpstream(world) as server:
        yield server


async def test_connect_an_oauth_server_in_the_browser(
    browser: Browser,
    gateway: oauth_harness.Gateway,
    world: AuthServer,
    oauth_upstream: ProtectedUpstream,
    token: TokenFactory,
    tmp_path: Path,
) -> None:
    """Bob clicks "Connect" on the servers page: Chromium goes to the authorization server (which
    approves the user of its `as_user` cookie) and back through the callback's page to the dashboard,
    signed in still; "Disconnect" forgets the token."""
    alice, bob = token("alice", groups=("tenant_admin",)), token("bob", groups=("tenant_user",))
    server_id, name = await oauth_harness.authorized(gateway, world, oauth_upstream, alice)
    shots = Shots(tmp_path)
    context = await browser.new_context(viewport={"width": 1280, "height": 800})
    await context.add_cookies([{"name": "as_user", "value": "bob", "url": world.base_url}])
    page = await context.new_page()
    await sign_in(page, gateway.base_url, bob)
    await nav(page, "Servers")
    await shots.take(page, "oauth-connect", docs=True)
    await page.get_by_role("link", name="Connect hosted").click()
    await page.wait_for_url(f"{gateway.base_url}/dashboard/servers/{server_id}")
    await expect(page.get_by_role("button", name="Disconnect hosted")).to_be_visible()
    await expect(page.locator(".status.connected")).to_have_text("connected")
    await shots.take(page, "oauth-connected", docs=True)
    assert text_of(await oauth_harness.call_whoami(gateway, bob, name)) == "bob"
    await page.get_by_role("button", name="Disconnect hosted").click()
    await expect(page.get_by_role("link", name="Connect hosted")).to_be_visible()
    assert "bob" not in {t.subject for t in world.issued if not t.revoked}
    await context.close()
