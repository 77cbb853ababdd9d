"""Helpers for the console tests: a cookie-keeping HTTP client that signs in like a browser,
and the hostile strings every page must show as text."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import aiohttp

from tests.integration.api_support import TOKEN

# Markup that would run or load something if a page echoed it unescaped.
XSS_SCRIPT = "<script>alert('xss')</script>"
XSS_ATTR = '"><img src=x onerror=alert(1)>'
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')
_NONCE = re.compile(r'name="nonce" value="([^"]+)"')


@dataclasses.dataclass
class Page:
    status: int
    headers: dict[str, str]
    text: str
    url: str

    def csrf(self) -> str:
        found = _CSRF.search(self.text)
        assert found is not None, "no CSRF token on the page"
        return found.group(1)


class ConsoleClient:
    """A browser-like client of one dispatcher's ``/ui/``: keeps cookies, follows no redirect
    unless asked."""

    def __init__(self, base: str) -> None:
        self.base = base
        # unsafe=True: keep cookies set by an IP-address host (127.0.0.1).
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))

    async def close(self) -> None:
        await self.session.close()

    async def get(self, path: str, *, follow: bool = False, **kw: Any) -> Page:
        async with self.session.get(self.base + path, allow_redirects=follow, **kw) as resp:
            return Page(resp.status, dict(resp.headers), await resp.text(), str(resp.url))

    async def post(
        self, path: str, data: dict[str, str], *, follow: bool = False, **kw: Any
    ) -> Page:
        async with self.session.post(
            self.base + path, data=data, allow_redirects=follow, **kw
        ) as resp:
            return Page(resp.status, dict(resp.headers), await resp.text(), str(resp.url))

    async def sign_in(self, token: str = TOKEN) -> Page:
        form = await self.get("/ui/sign-in")
        nonce = _NONCE.search(form.text)
        assert nonce is not None
        return await self.post("/ui/sign-in", {"token": token, "nonce": nonce.group(1)})

    def cookie(self, name: str) -> str | None:
        for morsel in self.session.cookie_jar:
            if morsel.key == name:
                return morsel.value
        return None
