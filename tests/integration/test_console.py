"""The console over plain HTTP: sign-in cookies, sign-out, CSRF, the sign-in rate limit,
security headers, escaping and the absence of secrets and signatures. (The browser tests
in tests/browser drive the same pages through Chromium.)"""

from __future__ import annotations

import re
import ssl
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import pytest
import trustme
from aiohttp import web

from dispatcher import producer, signing
from dispatcher.db import management
from dispatcher.web.console import pages
from dispatcher.web.console import session as console_session
from tests import support
from tests.integration.api_support import TOKEN, Client
from tests.integration.console_support import XSS_ATTR, XSS_SCRIPT, ConsoleClient

PAGES = ("/ui/", "/ui/subscriptions", "/ui/deliveries", "/ui/dead-letters", "/ui/events")


@pytest.fixture
async def console(start_dispatcher: Any) -> AsyncIterator[tuple[ConsoleClient, Client]]:
    running = await start_dispatcher(admin_token=TOKEN)
    base = f"http://127.0.0.1:{running.dispatcher.bound_port}"
    client = ConsoleClient(base)
    async with aiohttp.ClientSession() as s:
        yield client, Client(s, base + "/v1")
    await client.close()


async def _subscription(v1: Client, url: str, **extra: Any) -> dict[str, Any]:
    created = await v1.post("/subscriptions", {"url": url, "event_types": ["*"], **extra})
    assert created.status == 201, created
    body: dict[str, Any] = created.body
    return body


async def test_without_a_token_the_console_says_how_to_enable_it(start_dispatcher: Any) -> None:
    running = await start_dispatcher()
    client = ConsoleClient(f"http://127.0.0.1:{running.dispatcher.bound_port}")
    try:
        for path in ("/ui/", "/ui/sign-in", "/ui/subscriptions"):
            page = await client.get(path)
            assert page.status == 503, (path, page.status)
            assert "DISPATCHER_ADMIN_TOKEN" in page.text
            assert "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
        refused = await client.post("/ui/sign-in", {"token": "", "nonce": ""})
        assert refused.status == 503
        assert client.cookie(console_session.SESSION_COOKIE) is None
    finally:
        await client.close()


async def test_sign_in_sets_a_strict_http_only_cookie_and_sign_out_ends_it(
    console: tuple[ConsoleClient, Client],
) -> None:
    client, _ = console
    for path in PAGES:
        page = await client.get(path)
        assert page.status == 303, path
        assert page.headers["Location"].startswith("/ui/sign-in")

    wrong = await client.sign_in("not-the-token-at-all")
    assert wrong.status == 401
    assert client.cookie(console_session.SESSION_COOKIE) is None

    signed = await client.sign_in()
    assert signed.status == 303
    assert signed.headers["Location"] == "/ui/"
    cookie = signed.headers["Set-Cookie"]
    assert console_session.SESSION_COOKIE in cookie
    assert "HttpOnly" in cookie
    assert "SameSite=Strict" in cookie
    assert "Path=/ui/" in cookie
    assert "Secure" not in cookie  # plain HTTP here: a Secure cookie would never come back
    behind_tls = ConsoleClient(client.base)
    try:
        form = await behind_tls.get("/ui/sign-in", headers={"X-Forwarded-Proto": "https"})
        assert "Secure" in form.headers["Set-Cookie"]
    finally:
        await behind_tls.close()
    assert TOKEN not in cookie
    value = client.cookie(console_session.SESSION_COOKIE)
    assert value is not None

    overview = await client.get("/ui/")
    assert overview.status == 200
    assert "Overview" in overview.text

    # A cookie with a forged MAC or a pushed-out expiry is no session.
    sid_and_expiry, _, mac = value.rpartition(".")
    sid, _, expiry = sid_and_expiry.partition(":")
    for forged in (f"{sid_and_expiry}.{mac[:-2]}AA", f"{sid}:{int(expiry) + 99999}.{mac}"):
        other = ConsoleClient(client.base)
        try:
            page = await other.get("/ui/", cookies={console_session.SESSION_COOKIE: forged})
            assert page.status == 303
        finally:
            await other.close()

    # Sign-out needs the page's CSRF token, clears the cookie and revokes the session.
    assert (await client.post("/ui/sign-out", {})).status == 403
    out = await client.post("/ui/sign-out", {"csrf": overview.csrf()})
    assert out.status == 303
    assert client.cookie(console_session.SESSION_COOKIE) in (None, "")
    for path in PAGES:
        assert (await client.get(path)).status == 303
    replayed = ConsoleClient(client.base)
    try:
        page = await replayed.get("/ui/", cookies={console_session.SESSION_COOKIE: value})
        assert page.status == 303, "a signed-out session must not come back"
    finally:
        await replayed.close()


async def test_state_changes_need_the_sessions_csrf_token(
    console: tuple[ConsoleClient, Client], receiver: support.Receiver
) -> None:
    client, v1 = console
    sub = await _subscription(v1, receiver.url)
    await client.sign_in()
    detail = await client.get(f"/ui/subscriptions/{sub['id']}")
    assert detail.status == 200
    path = f"/ui/subscriptions/{sub['id']}/disable"

    other = ConsoleClient(client.base)
    try:
        await other.sign_in()
        foreign = (await other.get("/ui/")).csrf()
    finally:
        await other.close()
    for form in ({"reason": "no token"}, {"reason": "other", "csrf": foreign}):
        refused = await client.post(path, form)
        assert refused.status == 403, form
    for headers in (
        {"Origin": "https://evil.example"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site", "Origin": client.base},
    ):
        cross_site = await client.post(
            path, {"reason": "x", "csrf": detail.csrf()}, headers=headers
        )
        assert cross_site.status == 403, headers
    assert (await v1.get(f"/subscriptions/{sub['id']}")).body["enabled"] is True

    # A TLS-terminating proxy in front: the browser's Origin says https, the listener http.
    done = await client.post(
        path,
        {"reason": "maintenance window", "csrf": detail.csrf()},
        headers={"Origin": client.base.replace("http://", "https://")},
    )
    assert done.status == 303
    after = (await v1.get(f"/subscriptions/{sub['id']}")).body
    assert after["enabled"] is False
    assert after["disabled_reason"] == "maintenance window"


async def test_sign_in_is_rate_limited(console: tuple[ConsoleClient, Client]) -> None:
    client, _ = console
    for _ in range(console_session.SIGN_IN_FAILURES_PER_WINDOW):
        assert (await client.sign_in("wrong-token-wrong-token")).status == 401
    limited = await client.sign_in()  # even the right token waits now
    assert limited.status == 429
    assert int(limited.headers["Retry-After"]) >= 1
    assert client.cookie(console_session.SESSION_COOKIE) is None


async def test_every_page_carries_the_security_headers(
    console: tuple[ConsoleClient, Client],
) -> None:
    client, _ = console
    await client.sign_in()
    for path in (*PAGES, "/ui/sign-in", "/ui/no-such-page", "/ui/deliveries/99"):
        page = await client.get(path)
        csp = page.headers["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in csp
        assert "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert "unsafe-eval" not in csp
        assert page.headers["X-Frame-Options"] == "DENY"
        assert page.headers["X-Content-Type-Options"] == "nosniff"
        assert page.headers["Cache-Control"] == "no-store"
        assert re.fullmatch(r"app;dur=[0-9.]+", page.headers["Server-Timing"])
        assert "<script>" not in page.text  # no inline script anywhere
    static = await client.get("/ui/static/htmx.min.js")
    assert static.status == 200
    assert static.text.startswith("/*! htmx")


async def test_hostile_values_are_escaped_and_secrets_never_shown(
    console: tuple[ConsoleClient, Client], receiver: support.Receiver, pool: Any
) -> None:
    client, v1 = console
    receiver.respond = lambda n, h, b: (500, {}, 0)  # type: ignore[assignment]
    sub = await _subscription(
        v1,
        receiver.url + "/x?q=" + XSS_ATTR.replace(" ", "%20"),
        description=XSS_SCRIPT + XSS_ATTR,
        headers={"X-Api-Key": "hdr-credential-value-123", "X-Tenant": XSS_ATTR},
        retry_policy={"max_attempts": 1},
    )
    secret = sub["secret"]
    async with pool.acquire() as conn:
        event_id = await producer.publish(
            conn, XSS_SCRIPT, {"note": XSS_ATTR, XSS_SCRIPT: 1}, event_id="evt-" + XSS_ATTR
        )
    found = await support.wait_for(
        lambda: _dead(v1, sub["id"]), timeout=20, message="the delivery to die"
    )
    await client.sign_in()
    pages = [
        *PAGES,
        f"/ui/subscriptions/{sub['id']}",
        f"/ui/subscriptions?search={XSS_ATTR}",
        f"/ui/deliveries/{found['id']}",
        f"/ui/deliveries?event_type={XSS_SCRIPT}",
        f"/ui/events?event_id={event_id}",
    ]
    texts = []
    for path in pages:
        page = await client.get(path)
        assert page.status == 200, (path, page.status, page.text[:300])
        texts.append(page.text)
    html = "\n".join(texts)
    assert "<script>alert" not in html
    assert "<img src=x" not in html
    assert "&lt;script&gt;alert(&#39;xss&#39;)&lt;/script&gt;" in html
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in html
    assert secret not in html
    assert secret.removeprefix("whsec_") not in html
    assert "hdr-credential-value-123" not in html
    delivery_page = texts[pages.index(f"/ui/deliveries/{found['id']}")]
    assert "webhook-signature: [redacted]" in delivery_page
    signatures = [r.headers["webhook-signature"] for r in receiver.requests]
    assert signatures
    assert all(sig.split(",", 1)[1] not in html for sig in signatures)

    # A rotation shows the new secret once, in its own answer, and nowhere after.
    detail = await client.get(f"/ui/subscriptions/{sub['id']}")
    rotated = await client.post(
        f"/ui/subscriptions/{sub['id']}/rotate-secret",
        {"grace_period_seconds": "60", "csrf": detail.csrf()},
    )
    assert rotated.status == 200
    new_secret = re.search(r'value="(whsec_[^"]+)"', rotated.text)
    assert new_secret is not None
    assert new_secret.group(1) != secret
    assert rotated.headers["Cache-Control"] == "no-store"
    for path in pages:
        assert new_secret.group(1) not in (await client.get(path)).text


async def _dead(v1: Client, sid: str) -> dict[str, Any] | None:
    page = await v1.get("/deliveries", subscription_id=sid, state="dead")
    items: list[dict[str, Any]] = page.body["items"]
    return items[0] if items else None


async def test_bad_form_input_is_a_page_not_a_failure(
    console: tuple[ConsoleClient, Client], receiver: support.Receiver
) -> None:
    client, v1 = console
    sub = await _subscription(v1, receiver.url)
    await client.sign_in()
    detail = await client.get(f"/ui/subscriptions/{sub['id']}")
    csrf = detail.csrf()
    cases = [
        ("GET", "/ui/deliveries?state=exploded", None, 400, "state"),
        ("GET", "/ui/deliveries?created_after=yesterday", None, 400, "created_after"),
        ("GET", "/ui/deliveries?cursor=%%%", None, 400, "cursor"),
        ("GET", "/ui/deliveries/abc", None, 404, "does not exist"),
        ("GET", f"/ui/subscriptions/{uuid.uuid4()}", None, 404, "does not exist"),
        ("GET", "/ui/events?event_id=nope", None, 404, "does not exist"),
        ("POST", f"/ui/subscriptions/{sub['id']}/test", {"payload": "{"}, 400, "payload"),
        ("POST", f"/ui/subscriptions/{sub['id']}/test", {"payload": "[1]"}, 400, "payload"),
        (
            "POST",
            f"/ui/subscriptions/{sub['id']}/rotate-secret",
            {"grace_period_seconds": "-5"},
            400,
            "grace_period_seconds",
        ),
        ("POST", "/ui/dead-letters/replay", {"subscription_id": "x", "since": ""}, 400, "uuid"),
        (
            "POST",
            "/ui/dead-letters/replay",
            {"subscription_id": sub["id"], "since": "soon"},
            400,
            "since",
        ),
    ]
    for method, path, form, status, words in cases:
        if method == "GET":
            page = await client.get(path)
        else:
            page = await client.post(path, {**(form or {}), "csrf": csrf})
        assert page.status == status, (path, page.status)
        assert words.lower() in page.text.lower(), (path, page.text[:500])
        assert "Traceback" not in page.text


async def test_replay_of_dead_letters_and_test_event_reach_the_receiver(
    console: tuple[ConsoleClient, Client], receiver: support.Receiver, dsn: str
) -> None:
    client, v1 = console
    failing = True
    receiver.respond = lambda n, h, b: (500 if failing else 200, {}, 0)  # type: ignore[assignment]
    sub = await _subscription(v1, receiver.url, retry_policy={"max_attempts": 1})
    conn = await asyncpg.connect(dsn)
    try:
        ids = [await producer.publish(conn, "order.created", {"n": i}) for i in range(3)]
    finally:
        await conn.close()

    async def all_dead() -> bool:
        page = await v1.get("/deliveries", subscription_id=sub["id"], state="dead")
        return len(page.body["items"]) == 3

    await support.wait_for(all_dead, timeout=20, message="three dead deliveries")
    failing = False
    await client.sign_in()
    dead = await client.get("/ui/dead-letters")
    assert dead.status == 200
    started = await client.post(
        "/ui/dead-letters/replay",
        {"subscription_id": sub["id"], "since": "2000-01-01T00:00", "csrf": dead.csrf()},
    )
    assert started.status == 303
    job = started.headers["Location"]
    progress = await support.wait_for(
        lambda: _finished(client, job + "/progress"), message="the replay to finish"
    )
    assert "3 of 3" in progress
    await support.wait_for(
        lambda: {r.headers["webhook-id"] for r in receiver.ok()} == set(ids),
        timeout=20,
        message="the replayed events to arrive",
    )

    detail = await client.get(f"/ui/subscriptions/{sub['id']}")
    sent = await client.post(
        f"/ui/subscriptions/{sub['id']}/test",
        {"payload": '{"hello": "console"}', "csrf": detail.csrf()},
    )
    assert sent.status == 303
    test_id = re.search(r"event_id=([^&]+)", sent.headers["Location"])
    assert test_id is not None
    await support.wait_for(
        lambda: test_id.group(1) in {r.headers["webhook-id"] for r in receiver.ok()},
        message="the test event",
    )


async def _finished(client: ConsoleClient, path: str) -> str | None:
    page = await client.get(path)
    return page.text if "Finished" in page.text else None


async def test_sign_in_only_follows_console_paths(console: tuple[ConsoleClient, Client]) -> None:
    client, _ = console
    form = await client.get("/ui/sign-in?next=https://evil.example/")
    assert 'name="next" value="/ui/"' in form.text
    for target, expected in (
        ("//evil.example/", "/ui/"),
        ("/ui//evil.example", "/ui/"),
        ("/ui/deliveries?state=dead", "/ui/deliveries?state=dead"),
    ):
        form = await client.get("/ui/sign-in")
        nonce = re.search(r'name="nonce" value="([^"]+)"', form.text)
        assert nonce is not None
        page = await client.post(
            "/ui/sign-in", {"token": TOKEN, "nonce": nonce.group(1), "next": target}
        )
        assert page.headers["Location"] == expected


async def test_redirects_carry_the_headers_and_bare_ui_leads_to_the_console(
    console: tuple[ConsoleClient, Client],
) -> None:
    client, _ = console
    bare = await client.get("/ui")
    assert bare.status == 302
    assert bare.headers["Location"] == "/ui/"
    to_sign_in = await client.get("/ui/")
    assert to_sign_in.status == 303
    assert "frame-ancestors 'none'" in to_sign_in.headers["Content-Security-Policy"]


async def test_over_https_the_session_cookie_is_secure(pool: Any) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    root = web.Application()
    root.add_subapp(
        pages.PREFIX,
        pages.build(
            management.Management(pool), token=TOKEN, signers=signing.SignerRegistry.load()
        ),
    )
    runner = web.AppRunner(root, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context)
    await site.start()
    client = ConsoleClient(f"https://127.0.0.1:{runner.addresses[0][1]}")
    try:
        form = await client.get("/ui/sign-in", ssl=client_context)
        assert "Secure" in form.headers["Set-Cookie"]
        nonce = re.search(r'name="nonce" value="([^"]+)"', form.text)
        assert nonce is not None
        signed = await client.post(
            "/ui/sign-in", {"token": TOKEN, "nonce": nonce.group(1)}, ssl=client_context
        )
        assert signed.status == 303
        cookie = signed.headers["Set-Cookie"]
        assert "Secure" in cookie
        assert "HttpOnly" in cookie
        assert (await client.get("/ui/", ssl=client_context)).status == 200
    finally:
        await client.close()
        await runner.cleanup()


async def test_enable_cancel_and_keyset_paging(
    console: tuple[ConsoleClient, Client], receiver: support.Receiver, pool: Any
) -> None:
    client, v1 = console
    sub = await _subscription(v1, receiver.url)
    assert (await v1.post(f"/subscriptions/{sub['id']}/disable", {"reason": "r"})).status == 200
    # Deliveries that are routed already and not due: the running dispatcher leaves them be.
    await pool.execute(
        """
        WITH o AS (
            INSERT INTO webhook_outbox (event_type, payload, routed_at, route_result)
            SELECT 'page.test', jsonb_build_object('n', g), now(), 'routed'
            FROM generate_series(1, $2) g RETURNING id
        )
        INSERT INTO webhook_deliveries (outbox_id, subscription_id, event_created_at,
                                        next_attempt_at)
        SELECT id, $1, now(), now() + interval '1 day' FROM o
        """,
        uuid.UUID(sub["id"]),
        pages.PAGE_SIZE + 3,
    )
    await client.sign_in()
    detail = await client.get(f"/ui/subscriptions/{sub['id']}")
    assert "Enable" in detail.text
    enabled = await client.post(f"/ui/subscriptions/{sub['id']}/enable", {"csrf": detail.csrf()})
    assert enabled.status == 303
    assert (await v1.get(f"/subscriptions/{sub['id']}")).body["enabled"] is True

    first = await client.get(f"/ui/deliveries?event_type=page.test&subscription_id={sub['id']}")
    ids = [int(i) for i in re.findall(r'href="/ui/deliveries/(\d+)"', first.text)]
    assert len(ids) == pages.PAGE_SIZE
    assert ids == sorted(ids, reverse=True)
    older = re.search(r'href="([^"]+)" rel="next"', first.text)
    assert older is not None
    second = await client.get(older.group(1).replace("&amp;", "&"))
    rest = [int(i) for i in re.findall(r'href="/ui/deliveries/(\d+)"', second.text)]
    assert len(rest) == 3
    assert max(rest) < min(ids)
    assert 'rel="next"' not in second.text

    target = rest[0]
    page = await client.get(f"/ui/deliveries/{target}")
    cancelled = await client.post(f"/ui/deliveries/{target}/cancel", {"csrf": page.csrf()})
    assert cancelled.status == 303
    assert (await v1.get(f"/deliveries/{target}")).body["state"] == "cancelled"
    again = await client.post(f"/ui/deliveries/{target}/cancel", {"csrf": page.csrf()})
    assert again.status == 409
    assert "only pending, retrying or parked" in again.text
