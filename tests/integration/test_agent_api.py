"""The agent's HTTP API on a real Postgres: every bad-input rule, auth, and what a good
request persists (job + callback subscription, in one transaction)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from dispatcher import secretbox, ssrf
from dispatcher.agent import api, store

SECRET = "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY"
MAX_PROSPECTS = 5
MAX_BODY = 4096
GOOD_URL = "http://127.0.0.1:9/agent-callbacks/lead-status"


def good(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prospects": [{"email": "ana@stripe.com"}, {"email": "lee@dundermifflin.com"}],
        "criteria": {"min_company_size": 50, "industry": "tech"},
        "webhook_url": GOOD_URL,
    }
    body.update(changes)
    return body


class Client:
    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base = base
        self.session = session

    async def post(
        self, body: Any, *, raw: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any], Any]:
        data = raw if raw is not None else orjson.dumps(body)
        async with self.session.post(
            self.base + api.SUBMIT_PATH,
            data=data,
            headers={"content-type": "application/json", **(headers or {})},
        ) as resp:
            return resp.status, dict(resp.headers), await resp.json(content_type=None)

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.session.get(self.base + path, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)


async def _serve(pool: Any, cfg: api.ApiConfig) -> AsyncIterator[Client]:
    runner = web.AppRunner(api.build_app(pool, cfg), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    async with aiohttp.ClientSession() as session:
        yield Client(f"http://127.0.0.1:{port}", session)
    await runner.cleanup()


def _cfg(**changes: Any) -> api.ApiConfig:
    base: dict[str, Any] = {
        "webhook_secret": SECRET,
        "max_prospects": MAX_PROSPECTS,
        "max_body_bytes": MAX_BODY,
        "policy": ssrf.AddressPolicy.from_strings(["127.0.0.1/32"]),
    }
    base.update(changes)
    return api.ApiConfig(**base)


@pytest.fixture
async def client(pool: Any) -> AsyncIterator[Client]:
    async for c in _serve(pool, _cfg()):
        yield c


@pytest.fixture
async def authed(pool: Any) -> AsyncIterator[Client]:
    async for c in _serve(pool, _cfg(api_key="s3cret-token")):
        yield c


async def counts(pool: Any) -> tuple[int, int, int]:
    return (
        await pool.fetchval("SELECT count(*) FROM agent_jobs"),
        await pool.fetchval("SELECT count(*) FROM webhook_outbox"),
        await pool.fetchval("SELECT count(*) FROM webhook_subscriptions"),
    )


TOO_MANY = [{"email": f"p{i}@acme.io"} for i in range(MAX_PROSPECTS + 1)]

# (case id, body, expected status, error code, field)
BAD_INPUT: list[tuple[str, Any, int, str, str]] = [
    ("not-an-object", [], 422, "invalid_request", "body"),
    ("missing-prospects", {"webhook_url": GOOD_URL}, 422, "missing_field", "prospects"),
    ("null-prospects", good(prospects=None), 422, "missing_field", "prospects"),
    ("empty-prospects", good(prospects=[]), 422, "invalid_request", "prospects"),
    ("prospects-not-array", good(prospects="a@b.com"), 422, "invalid_request", "prospects"),
    ("too-many-prospects", good(prospects=TOO_MANY), 422, "too_many_prospects", "prospects"),
    ("prospect-not-object", good(prospects=["a@b.com"]), 422, "invalid_request", "prospects[0]"),
    ("prospect-no-email", good(prospects=[{}]), 422, "missing_field", "prospects[0].email"),
    (
        "prospect-unknown-field",
        good(prospects=[{"email": "a@acme.io", "phone": "1"}]),
        422,
        "unknown_field",
        "prospects[0].phone",
    ),
    (
        "email-wrong-type",
        good(prospects=[{"email": 42}]),
        422,
        "invalid_request",
        "prospects[0].email",
    ),
    (
        "email-empty",
        good(prospects=[{"email": "  "}]),
        422,
        "invalid_request",
        "prospects[0].email",
    ),
    (
        "email-invalid",
        good(prospects=[{"email": "ana@stripe.com"}, {"email": "not-an-email"}]),
        422,
        "invalid_email",
        "prospects[1].email",
    ),
    (
        "email-no-tld",
        good(prospects=[{"email": "ana@localhost"}]),
        422,
        "invalid_email",
        "prospects[0].email",
    ),
    ("url-missing", {"prospects": [{"email": "a@acme.io"}]}, 422, "missing_field", "webhook_url"),
    ("url-wrong-type", good(webhook_url=123), 422, "invalid_request", "webhook_url"),
    ("url-empty", good(webhook_url=""), 422, "invalid_request", "webhook_url"),
    ("url-ftp", good(webhook_url="ftp://example.com/x"), 422, "invalid_url", "webhook_url"),
    ("url-no-scheme", good(webhook_url="example.com/hook"), 422, "invalid_url", "webhook_url"),
    ("url-no-host", good(webhook_url="http:///hook"), 422, "invalid_url", "webhook_url"),
    (
        "url-bad-port",
        good(webhook_url="http://example.com:99999/"),
        422,
        "invalid_url",
        "webhook_url",
    ),
    ("url-whitespace", good(webhook_url="http://exa mple.com/"), 422, "invalid_url", "webhook_url"),
    (
        "url-credentials",
        good(webhook_url="https://user:pw@example.com/"),
        422,
        "invalid_url",
        "webhook_url",
    ),
    ("url-private", good(webhook_url="http://10.1.2.3/hook"), 422, "blocked_url", "webhook_url"),
    (
        "url-metadata",
        good(webhook_url="http://169.254.169.254/"),
        422,
        "blocked_url",
        "webhook_url",
    ),
    ("criteria-wrong-type", good(criteria="big"), 422, "invalid_request", "criteria"),
    (
        "min-size-string",
        good(criteria={"min_company_size": "50"}),
        422,
        "invalid_request",
        "criteria.min_company_size",
    ),
    (
        "min-size-bool",
        good(criteria={"min_company_size": True}),
        422,
        "invalid_request",
        "criteria.min_company_size",
    ),
    (
        "min-size-negative",
        good(criteria={"min_company_size": -1}),
        422,
        "invalid_request",
        "criteria.min_company_size",
    ),
    (
        "industry-wrong-type",
        good(criteria={"industry": 5}),
        422,
        "invalid_request",
        "criteria.industry",
    ),
    (
        "criteria-unknown-field",
        good(criteria={"size": 5}),
        422,
        "unknown_field",
        "criteria.size",
    ),
    ("unknown-top-level-field", good(callback="x"), 422, "unknown_field", "callback"),
    # NUL cannot be stored; it is bad input (422), not an unavailable database (503).
    (
        "industry-nul",
        good(criteria={"industry": "te\x00ch"}),
        422,
        "invalid_value",
        "criteria.industry",
    ),
    (
        "url-nul",
        good(webhook_url="http://127.0.0.1:9/a\x00b"),
        422,
        "invalid_value",
        "webhook_url",
    ),
    (
        "email-nul",
        good(prospects=[{"email": "a\x00@acme.io"}]),
        422,
        "invalid_email",
        "prospects[0].email",
    ),
]


async def test_bad_input_is_rejected_and_nothing_is_written(client: Client, pool: Any) -> None:
    # One database for every rule (cloning one per case costs more than the checks); the
    # counts after each request show that no rejected request wrote anything.
    for name, body, status, code, field in BAD_INPUT:
        got, _headers, answer = await client.post(body)
        assert (got, answer.get("error"), answer.get("field")) == (status, code, field), name
        assert answer["detail"], name
        assert await counts(pool) == (0, 0, 0), name


async def test_upper_case_scheme_is_accepted_lower_case(client: Client, pool: Any) -> None:
    status, _headers, answer = await client.post(good(webhook_url="HTTP://127.0.0.1:9/Callbacks"))
    assert status == 202, answer
    url = await pool.fetchval("SELECT url FROM webhook_subscriptions")
    assert url == "http://127.0.0.1:9/Callbacks"


async def test_malformed_json_is_400(client: Client, pool: Any) -> None:
    for raw in (b'{"prospects": [', b"", b"not json", b"\xff\xfe", b'{"prospects": NaN}'):
        status, _headers, answer = await client.post(None, raw=raw)
        assert status == 400, raw
        assert answer["error"] == "malformed_json", raw
        assert answer["field"] == "body", raw
    assert await counts(pool) == (0, 0, 0)


async def test_oversized_body_is_413(client: Client, pool: Any) -> None:
    padding = [{"email": f"{'x' * 60}{i}@acme.io"} for i in range(100)]
    raw = orjson.dumps(good(prospects=padding))
    assert len(raw) > MAX_BODY
    status, _headers, answer = await client.post(None, raw=raw)
    assert status == 413
    assert answer == {
        "error": "payload_too_large",
        "field": "body",
        "detail": f"request body exceeds {MAX_BODY} bytes",
    }
    assert await counts(pool) == (0, 0, 0)


async def test_accepted_job_persists_job_and_subscription(client: Client, pool: Any) -> None:
    status, headers, answer = await client.post(good())
    assert status == 202
    assert set(answer) == {"job_id", "status"}
    assert answer["status"] == "QUEUED"
    assert api.JOB_ID_RE.fullmatch(answer["job_id"])
    assert headers["Location"] == f"/api/v1/jobs/{answer['job_id']}"
    assert await counts(pool) == (1, 0, 1)

    sub = await pool.fetchrow("SELECT * FROM webhook_subscriptions")
    assert sub["id"] == uuid.uuid5(store.SUBSCRIPTION_NAMESPACE, GOOD_URL)
    assert sub["url"] == GOOD_URL
    assert sub["secret"] == SECRET
    assert sub["signature_header"] == "X-AgentX-Signature"
    job = await pool.fetchrow("SELECT * FROM agent_jobs")
    assert job["subscription_id"] == sub["id"]
    assert orjson.loads(job["prospects"]) == good()["prospects"]

    # The same callback URL reuses its subscription.
    status, _h, _a = await client.post(good())
    assert status == 202
    assert await counts(pool) == (2, 0, 1)

    state, shown = await client.get(f"/api/v1/jobs/{answer['job_id']}")
    assert state == 200
    assert shown["job_id"] == answer["job_id"]
    assert shown["status"] == "QUEUED"
    assert shown["progress"] == {"current_step": "Queued", "percentage": 0}
    assert shown["results"] is None


async def test_email_domain_is_normalised(client: Client, pool: Any) -> None:
    status, _h, _a = await client.post(good(prospects=[{"email": "Ana@Stripe.COM"}]))
    assert status == 202
    stored = orjson.loads(await pool.fetchval("SELECT prospects::text FROM agent_jobs"))
    assert stored == [{"email": "Ana@stripe.com"}]


async def test_changed_agent_secret_rotates_with_grace(pool: Any) -> None:
    async for c in _serve(pool, _cfg()):
        assert (await c.post(good()))[0] == 202
    new_secret = "whsec_" + "WllZWFhYWFhYWFhYWFhYWFhYWFhY"
    async for c in _serve(pool, _cfg(webhook_secret=new_secret)):
        assert (await c.post(good()))[0] == 202
    sub = await pool.fetchrow(
        "SELECT secret, previous_secret, previous_secret_until > now() AS grace"
        " FROM webhook_subscriptions"
    )
    assert (sub["secret"], sub["previous_secret"], sub["grace"]) == (new_secret, SECRET, True)


@pytest.mark.parametrize("path", ["/api/v1/jobs/lq-00000000000000000000", "/api/v1/jobs/nope"])
async def test_unknown_job_is_404_json(client: Client, path: str) -> None:
    status, answer = await client.get(path)
    assert status == 404
    assert answer["error"] == "not_found"
    assert answer["field"] == "job_id"


async def test_unknown_route_and_method_answer_json(client: Client) -> None:
    status, answer = await client.get("/api/v1/nothing-here")
    assert status == 404
    assert answer["error"] == "not_found"
    async with client.session.delete(client.base + api.SUBMIT_PATH) as resp:
        assert resp.status == 405
        assert (await resp.json())["error"] == "method_not_allowed"


async def test_api_key_is_required_when_configured(authed: Client, pool: Any) -> None:
    for authorization in (
        None,
        "Bearer wrong",
        "Basic czNjcmV0LXRva2Vu",
        "Bearer",
        "s3cret-token",
        "Bearer s3cr\u00e9t",
    ):
        headers = {} if authorization is None else {"Authorization": authorization}
        status, resp_headers, answer = await authed.post(good(), headers=headers)
        assert status == 401, authorization
        assert answer["error"] == "unauthorized"
        assert resp_headers["WWW-Authenticate"].startswith("Bearer")
        status, _ = await authed.get("/api/v1/jobs/lq-00000000000000000000", headers=headers)
        assert status == 401, authorization
    assert await counts(pool) == (0, 0, 0)


async def test_right_api_key_is_accepted(authed: Client) -> None:
    bearer = {"Authorization": "Bearer s3cret-token"}
    status, _h, answer = await authed.post(good(), headers=bearer)
    assert status == 202
    status, _shown = await authed.get(f"/api/v1/jobs/{answer['job_id']}", headers=bearer)
    assert status == 200
    # Health stays open for probes.
    assert (await authed.get("/healthz"))[0] == 200


async def test_secret_is_sealed_when_keys_are_configured(pool: Any) -> None:
    box = secretbox.SecretBox.from_spec(f"k1:{secretbox.generate_key()}")
    async for c in _serve(pool, _cfg(box=box)):
        assert (await c.post(good()))[0] == 202
        stored = await pool.fetchval("SELECT secret FROM webhook_subscriptions")
        assert stored.startswith(secretbox.PREFIX)
        assert box.open(stored) == SECRET
        # The same secret again: the sealed row is recognised, nothing rotates.
        assert (await c.post(good()))[0] == 202
        row = await pool.fetchrow("SELECT secret, previous_secret FROM webhook_subscriptions")
        assert (row["secret"], row["previous_secret"]) == (stored, None)
    # An agent without the key cannot read the row and leaves it alone.
    async for c in _serve(pool, _cfg(webhook_secret="whsec_" + "Q" * 32)):
        assert (await c.post(good()))[0] == 202
    assert await pool.fetchval("SELECT secret FROM webhook_subscriptions") == stored
