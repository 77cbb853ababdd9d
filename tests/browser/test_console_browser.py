"""The console in a real browser: Debian's Chromium driven by Playwright, against a running
dispatcher, a real Postgres and a real receiver on 127.0.0.1.

One dispatcher, one browser and one page serve the whole module (the tests run in file
order and build on each other: sign in, look, replay, sign out). Every console message of
type error, page error and dialog is recorded; the last test asserts there were none, so a
Content-Security-Policy violation or a script error anywhere fails the run.

Set CONSOLE_SCREENSHOTS=1 to write docs/console-*.png along the way.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import urllib.parse
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
import pytest_asyncio

from dispatcher import app, config, producer
from tests import support
from tests.conftest import TEMPLATE, fast_settings
from tests.integration.api_support import TOKEN
from tests.integration.console_support import XSS_ATTR, XSS_SCRIPT

pytestmark = pytest.mark.asyncio(loop_scope="module")

SCREENSHOTS = os.environ.get("CONSOLE_SCREENSHOTS") == "1"


def _chromium_or_skip() -> str:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        reason = "playwright is not installed (pip install -e '.[dev]')"
    else:
        path = shutil.which("chromium") or shutil.which("chromium-browser")
        if path is not None:
            return path
        reason = "chromium is not installed (Debian package `chromium`; see .ci/tools.sh)"
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@dataclasses.dataclass
class World:
    base: str
    browser: Any
    page: Any
    receiver: support.Receiver
    main_sub: dict[str, Any]
    xss_sub: dict[str, Any]
    dead_event: str
    xss_event: str
    errors: list[str]

    async def goto(self, path: str) -> Any:
        return await self.page.goto(self.base + path)

    async def main_text(self) -> str:
        text: str = await self.page.locator("main").inner_text()
        return text


async def _dead(pool: Any, event_id: str) -> int | None:
    value: int | None = await pool.fetchval(
        """
        SELECT d.id FROM webhook_deliveries d JOIN webhook_outbox o ON o.id = d.outbox_id
        WHERE o.event_id = $1 AND d.state = 'dead'
        """,
        event_id,
    )
    return value


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def world(server_dsn: str, template_dsn: str) -> AsyncIterator[World]:
    chromium = _chromium_or_skip()
    from playwright.async_api import async_playwright

    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(server_dsn)
    await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
    await admin.close()
    dsn = support.with_database(server_dsn, name)
    receiver = await support.Receiver().start()
    receiver.respond = lambda _n, _h, _b: (500, {}, 0.0)
    dispatcher = app.Dispatcher(
        fast_settings(
            dsn,
            admin_token=TOKEN,
            retry=config.RetryPolicy(base_seconds=0.01, cap_seconds=0.05, max_attempts=2),
        )
    )
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    await support.wait_for(dispatcher.ready.is_set, timeout=20, message="dispatcher ready")
    base = f"http://127.0.0.1:{dispatcher.bound_port}"
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:

        async def create(body: dict[str, Any]) -> dict[str, Any]:
            async with http.post(f"{base}/v1/subscriptions", json=body) as resp:
                assert resp.status == 201, await resp.text()
                created: dict[str, Any] = await resp.json()
                return created

        main_sub = await create(
            {"url": receiver.url, "event_types": ["order.*"], "description": "orders to CRM"}
        )
        xss_sub = await create(
            {
                "url": receiver.url + "/x?q=" + XSS_ATTR.replace(" ", "%20"),
                "event_types": ["*"],
                "description": XSS_SCRIPT + XSS_ATTR,
                "headers": {"X-Note": XSS_ATTR},
            }
        )
    async with pool.acquire() as conn:
        dead_event = await producer.publish(
            conn, "order.created", {"order": 42, "total": 9.5}, subscription_id=main_sub["id"]
        )
        xss_event = await producer.publish(
            conn, XSS_SCRIPT, {"note": XSS_ATTR, XSS_SCRIPT: [XSS_ATTR]}, event_id="e" + XSS_ATTR
        )
    for event_id in (dead_event, xss_event):
        await support.wait_for(
            lambda e=event_id: _dead(pool, e), timeout=20, message=f"{event_id} dead"
        )

    errors: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        context = await browser.new_context(viewport={"width": 1280, "height": 860})
        page = await context.new_page()
        page.set_default_timeout(10_000)
        page.on(
            "console",
            lambda msg: (
                errors.append(f"console: {msg.text} {msg.location}")
                if msg.type == "error"
                else None
            ),
        )
        page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))

        async def dialog(d: Any) -> None:
            errors.append(f"dialog: {d.message}")
            await d.dismiss()

        page.on("dialog", dialog)
        w = World(base, browser, page, receiver, main_sub, xss_sub, dead_event, xss_event, errors)
        try:
            yield w
        finally:
            await browser.close()
    await pool.close()
    stop.set()
    await asyncio.wait_for(task, 30)
    await receiver.stop()
    admin = await asyncpg.connect(server_dsn)
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


async def _shot(w: World, name: str) -> None:
    if SCREENSHOTS:
        await w.page.screenshot(path=str(support.ROOT / "docs" / f"console-{name}.png"))


async def test_every_page_is_refused_before_signing_in(world: World) -> None:
    await _assert_refused(world)


async def _assert_refused(w: World) -> None:
    for path in _data_pages(w):
        await w.goto(path)
        assert w.page.url.startswith(f"{w.base}/ui/sign-in"), path
        text = await w.main_text()
        assert "Sign in" in text
        html = await w.page.content()
        for value in (w.main_sub["url"], w.main_sub["id"], w.dead_event, "orders to CRM"):
            # The requested path comes back in the form's next field; nothing else may.
            assert value in path or value not in html, (path, value)
    fragment = await w.page.request.get(
        f"{w.base}/ui/overview/stats", headers={"HX-Request": "true"}, max_redirects=0
    )
    assert fragment.status == 401


def _data_pages(w: World) -> list[str]:
    return [
        "/ui/",
        "/ui/overview/stats",
        "/ui/subscriptions",
        f"/ui/subscriptions/{w.main_sub['id']}",
        "/ui/deliveries",
        "/ui/dead-letters",
        f"/ui/events?event_id={w.dead_event}",
    ]


async def test_signs_in_with_the_keyboard_and_sees_a_subscription_and_its_health(
    world: World,
) -> None:
    w = world
    await w.goto("/ui/subscriptions")
    await _shot(w, "sign-in")
    await w.page.get_by_label("Admin token").fill(TOKEN)
    await w.page.get_by_label("Admin token").press("Enter")
    await w.page.wait_for_url(f"{w.base}/ui/subscriptions")

    async def failing_badge() -> bool:
        await w.page.reload()
        row = w.page.locator("tr", has_text="orders to CRM")
        return await row.locator(".badge").inner_text() == "failing"

    await support.wait_for(failing_badge, timeout=10, interval=0.2, message="health shown")
    row = w.page.locator("tr", has_text="orders to CRM")
    assert "100.0%" in await row.inner_text()  # every attempt in the window failed
    await _shot(w, "subscriptions")
    await row.get_by_role("link").click()
    await w.page.wait_for_url(f"{w.base}/ui/subscriptions/{w.main_sub['id']}")
    text = await w.main_text()
    assert "Health and audit history" in text
    assert w.main_sub["url"] in text
    assert w.main_sub["secret"] not in await w.page.content()


async def test_opens_a_dead_delivery_replays_it_and_it_arrives(world: World) -> None:
    w = world
    await w.goto("/ui/")
    await w.page.locator("main h1", has_text="Overview").wait_for()
    dead_tile = w.page.locator(".tiles div", has_text="Dead letters")
    assert await dead_tile.locator("dd").inner_text() == "2"
    await _shot(w, "overview")

    await w.page.get_by_role("link", name="Dead letters", exact=True).first.click()
    await w.page.wait_for_url(f"{w.base}/ui/dead-letters")
    await w.page.locator("tr", has_text=w.dead_event).get_by_role("link").first.click()
    await w.page.locator("main h1", has_text="Delivery #").wait_for()
    attempts = w.page.locator("section.attempt")
    assert await attempts.count() == 2
    for i in range(2):
        assert "500" in await attempts.nth(i).inner_text()
    await _shot(w, "delivery")
    headers = w.page.locator("section.attempt").first.locator("details").first
    await headers.locator("summary").click()
    header_text = await headers.inner_text()
    assert f"webhook-id: {w.dead_event}" in header_text
    assert "webhook-signature: [redacted]" in header_text

    before = len(w.receiver.requests)
    w.receiver.respond = lambda _n, _h, _b: (200, {}, 0.0)
    await w.page.get_by_role("button", name="Replay now").click()
    await w.page.get_by_role("status").filter(has_text="queued").wait_for()
    arrived = await support.wait_for(
        lambda: [r for r in w.receiver.requests[before:] if r.status == 200],
        timeout=20,
        message="the replayed delivery at the receiver",
    )
    assert arrived[0].headers["webhook-id"] == w.dead_event
    failed_ids = {r.headers["webhook-id"] for r in w.receiver.requests[:before]}
    assert w.dead_event in failed_ids  # the same webhook-id as the attempts that failed

    async def delivered() -> bool:
        await w.page.reload()
        return await w.page.locator("main .badge").first.inner_text() == "delivered"

    await support.wait_for(delivered, timeout=10, interval=0.2, message="delivered shown")


async def test_hostile_values_render_as_text(world: World) -> None:
    w = world
    for path in (
        f"/ui/subscriptions/{w.xss_sub['id']}",
        "/ui/subscriptions?search=%3Cscript",
        "/ui/events?" + urllib.parse.urlencode({"event_id": w.xss_event}),
        "/ui/dead-letters",
    ):
        await w.goto(path)
        text = await w.main_text()
        assert XSS_SCRIPT in text or XSS_ATTR in text, path
        assert await w.page.locator("main img").count() == 0, path
        assert await w.page.locator("main script").count() == 0, path
    await w.page.locator("tr", has_text=XSS_SCRIPT).get_by_role("link").first.click()
    await w.page.locator("main h1", has_text="Delivery #").wait_for()
    text = await w.main_text()
    assert XSS_SCRIPT in text
    assert XSS_ATTR in text
    assert await w.page.locator("main img").count() == 0
    assert w.xss_sub["secret"] not in await w.page.content()


UNLABELLED_JS = """
() => [...document.querySelectorAll('input, select, textarea, button')]
    .filter(e => e.type !== 'hidden')
    .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                 && !(e.tagName === 'BUTTON' && e.textContent.trim()))
    .map(e => e.outerHTML)
"""


async def test_every_control_is_labelled_and_the_keyboard_reaches_the_content(
    world: World,
) -> None:
    w = world
    for path in (
        "/ui/",
        "/ui/subscriptions",
        f"/ui/subscriptions/{w.main_sub['id']}",
        "/ui/deliveries",
        "/ui/dead-letters",
        "/ui/events",
    ):
        await w.goto(path)
        assert await w.page.evaluate(UNLABELLED_JS) == [], path
    await w.page.keyboard.press("Tab")
    assert await w.page.evaluate("document.activeElement.textContent") == "Skip to content"
    await w.page.keyboard.press("Enter")
    assert await w.page.evaluate("document.activeElement.id") == "main"
    await w.page.keyboard.press("Tab")  # the first control inside the content
    assert await w.page.evaluate("document.activeElement.id") == "event-id"


async def test_overview_refreshes_itself(world: World) -> None:
    w = world
    await w.goto("/ui/")
    async with w.page.expect_response(
        lambda r: r.url.endswith("/ui/overview/stats") and r.status == 200, timeout=12_000
    ):
        pass
    assert await w.page.locator("#stats .tiles").count() == 1


async def test_readable_without_javascript(world: World) -> None:
    w = world
    context = await w.browser.new_context(java_script_enabled=False)
    try:
        page = await context.new_page()
        await page.goto(f"{w.base}/ui/deliveries")
        await page.get_by_label("Admin token").fill(TOKEN)
        await page.get_by_role("button", name="Sign in").click()
        await page.wait_for_url(f"{w.base}/ui/deliveries")
        await page.get_by_label("State").select_option("dead")
        await page.get_by_role("button", name="Filter").click()
        await page.wait_for_url(f"{w.base}/ui/deliveries?state=dead**")
        rows = page.locator("main tbody tr")
        assert await rows.count() == 1  # the XSS event's delivery; the other was replayed
        await rows.first.get_by_role("link").first.click()
        await page.locator("main h1", has_text="Delivery #").wait_for()
        assert await page.locator("section.attempt").count() == 2
    finally:
        await context.close()


async def test_signing_out_refuses_every_page_again(world: World) -> None:
    w = world
    await w.goto("/ui/")
    await w.page.get_by_role("button", name="Sign out").click()
    await w.page.wait_for_url(f"{w.base}/ui/sign-in?done=signed_out")
    assert "Signed out." in await w.main_text()
    await _assert_refused(w)


async def test_no_javascript_errors_were_logged(world: World) -> None:
    assert world.errors == []
