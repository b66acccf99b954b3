"""A signed-in dashboard client for tests: an httpx client (in-process or over real HTTP) that signs
in through the login form and POSTs forms with the session's CSRF token, like a browser would."""

from __future__ import annotations

import re
from typing import Any

import httpx

CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')
FIELD_ERROR = re.compile(r'class="field-error"[^>]*>([^<]+)<')
BASE = "/dashboard"


def csrf_of(html: str) -> str:
    found = CSRF.search(html)
    assert found, "no CSRF token in the page"
    return found.group(1)


class DashboardClient:
    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.csrf = ""

    async def sign_in(self, token: str) -> httpx.Response:
        page = await self.client.get(f"{BASE}/login")
        response = await self.client.post(
            f"{BASE}/login", data={"csrf_token": csrf_of(page.text), "token": token, "next": f"{BASE}/"}
        )
        if response.status_code == 303:
            self.csrf = csrf_of((await self.client.get(f"{BASE}/")).text)
        return response

    async def get(self, path: str, **params: Any) -> httpx.Response:
        return await self.client.get(BASE + path, params=params or None)

    async def post(self, path: str, data: dict[str, str | list[str]] | None = None) -> httpx.Response:
        """A form POST with this session's CSRF token (a list value repeats the field)."""
        return await self.client.post(BASE + path, data={"csrf_token": self.csrf, **(data or {})})


def field_errors(html: str) -> list[str]:
    return FIELD_ERROR.findall(html)
