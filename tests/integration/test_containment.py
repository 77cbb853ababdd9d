"""Per-row containment on the delivery path: a subscription whose request cannot be built (a
secret sealed under a key this process does not hold, a header value the HTTP library refuses,
an unsignable secret, a signer plug-in that raises) parks its own deliveries with a reason, a
metric and a log line, while the process stays up and every other subscription delivers with
one attempt each. Real Postgres, real receivers, and the real ``dispatcher run`` for the crash."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import prometheus_client
import pytest

import dispatcher
from dispatcher import ports, secretbox, signing
from dispatcher.db import repository
from tests import support

K1 = secretbox.generate_key()
K2 = secretbox.generate_key()
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


async def _subscribe(pool: Any, url: str, box: secretbox.SecretBox, **kw: Any) -> str:
    sub = await repository.Repository(pool, box=box).create_subscription(
        url=url, event_types=["t.*"], secret=SECRET, **kw
    )
    return str(sub["id"])


async def _publish(pool: Any, n: int) -> None:
    async with pool.acquire() as conn:
        for i in range(n):
            await dispatcher.publish(conn, "t.x", {"n": i})


async def _by_subscription(pool: Any) -> dict[str, list[tuple[str, int, str | None]]]:
    rows = await pool.fetch(
        "SELECT subscription_id, state, attempt, last_error FROM webhook_deliveries ORDER BY id"
    )
    out: dict[str, list[tuple[str, int, str | None]]] = {}
    for r in rows:
        out.setdefault(str(r["subscription_id"]), []).append(
            (r["state"], r["attempt"], r["last_error"])
        )
    return out


def _settled(states: dict[str, list[tuple[str, int, str | None]]], expect: dict[str, str]) -> bool:
    return all(
        sid in states and all(s == state for s, _a, _e in states[sid])
        for sid, state in expect.items()
    )


async def _scrape(port: int) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as r:
        return await r.text()


def _attempts_metric(text: str, sid: str, outcome: str) -> float:
    for line in text.splitlines():
        if (
            line.startswith("dispatcher_attempts_total{")
            and f'subscription="{sid}"' in line
            and f'outcome="{outcome}"' in line
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_foreign_key_secret_parks_its_deliveries_and_the_process_stays_up(
    pool: Any, dsn: str, make_receiver: Any, tmp_path: Path
) -> None:
    good_rx, foreign_rx = await make_receiver(), await make_receiver()
    k1 = secretbox.SecretBox.from_spec(f"k1:{K1}")
    # Sealed by a process that already holds k2 (the agent restarted first during a rotation).
    k2 = secretbox.SecretBox.from_spec(f"k2:{K2},k1:{K1}")
    good = await _subscribe(pool, good_rx.url, k1)
    foreign = await _subscribe(pool, foreign_rx.url, k2)
    await _publish(pool, 5)
    port = ports.free_port()
    log = tmp_path / "run.log"
    proc = support.spawn_dispatcher(
        dsn,
        extra_env={"DISPATCHER_SECRET_KEYS": f"k1:{K1}", "DISPATCHER_LISTEN": f"127.0.0.1:{port}"},
        log_path=log,
    )
    try:

        async def settled_or_exited() -> bool:
            return proc.poll() is not None or _settled(
                await _by_subscription(pool), {good: "delivered", foreign: "parked"}
            )

        await support.wait_for(settled_or_exited, timeout=30, message="deliveries settle")
        assert proc.poll() is None, "dispatcher run exited:\n" + log.read_text()[-2000:]
        states = await _by_subscription(pool)
        # The others deliver with one attempt each; nothing of the foreign one went out.
        assert [(s, a) for s, a, _e in states[good]] == [("delivered", 1)] * 5
        assert len(good_rx.ok()) == 5
        assert foreign_rx.requests == []
        for state, attempt, error in states[foreign]:
            assert (state, attempt) == ("parked", 1)
            assert error is not None
            assert "'k2'" in error
            assert "not configured" in error
        text = await _scrape(port)
        assert _attempts_metric(text, foreign, "config_error") == 5
        lines = [orjson.loads(x) for x in log.read_bytes().splitlines() if x.startswith(b"{")]
        unsendable = [x for x in lines if x.get("event") == "delivery_unsendable"]
        assert len(unsendable) == 5
        assert {x["subscription"] for x in unsendable} == {foreign}
        assert SECRET.encode() not in log.read_bytes()
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


async def test_foreign_key_secret_on_the_probe_path_is_contained(
    pool: Any, make_receiver: Any, start_dispatcher: Any
) -> None:
    good_rx, foreign_rx = await make_receiver(), await make_receiver()
    k1 = secretbox.SecretBox.from_spec(f"k1:{K1}")
    k2 = secretbox.SecretBox.from_spec(f"k2:{K2}")
    good = await _subscribe(pool, good_rx.url, k1)
    foreign = await _subscribe(pool, foreign_rx.url, k2)
    # The breaker paused the foreign subscription; its probe is due now.
    await pool.execute(
        "UPDATE webhook_subscriptions SET paused_until = now() + interval '1 hour', "
        "probe_at = now(), pause_count = pause_count + 1 WHERE id = $1::uuid",
        foreign,
    )
    await _publish(pool, 3)
    running = await start_dispatcher(secret_keys=f"k1:{K1}")
    await support.wait_for(lambda: _by_subscription(pool), message="routing", timeout=10)

    async def probed() -> bool:
        states = await _by_subscription(pool)
        return running.task.done() or (
            _settled({good: states.get(good, [])}, {good: "delivered"})
            and any(s == "parked" for s, _a, _e in states.get(foreign, []))
        )

    await support.wait_for(probed, timeout=20, message="probe settles")
    assert not running.task.done(), running.task.exception()
    parked = [e for s, _a, e in (await _by_subscription(pool))[foreign] if s == "parked"]
    assert parked
    assert all(e is not None and "'k2'" in e for e in parked)
    assert foreign_rx.requests == []


class _Raising:
    name = "raising"

    def headers(self, item: signing.SigningInput) -> dict[str, str]:
        raise RuntimeError("plug-in bug")


@pytest.mark.parametrize(
    ("column", "value", "reason"),
    [
        ("headers", '{"X-Tenant": "a\\u000bb"}', "header"),
        ("secret", "whsec_not*base64*at*all*", "signing"),
        ("signers", "{raising}", "signer 'raising'"),
    ],
)
async def test_unbuildable_request_parks_only_its_subscription(  # noqa: PLR0917 (fixtures)
    pool: Any,
    make_receiver: Any,
    start_dispatcher: Any,
    monkeypatch: pytest.MonkeyPatch,
    column: str,
    value: str,
    reason: str,
) -> None:
    loaded = signing.SignerRegistry.load

    def with_plugin() -> signing.SignerRegistry:
        registry = loaded()
        registry._signers["raising"] = _Raising()
        return registry

    monkeypatch.setattr(signing.SignerRegistry, "load", with_plugin)
    good_rx, bad_rx = await make_receiver(), await make_receiver()
    good = await _subscribe(pool, good_rx.url, secretbox.PLAINTEXT)
    bad = await _subscribe(pool, bad_rx.url, secretbox.PLAINTEXT)
    # Written behind the validation's back, as a producer with plain SQL or an older version
    # could have: the dispatcher must still contain it.
    cast = {"headers": "jsonb", "secret": "text", "signers": "text[]"}[column]
    await pool.execute(
        f"UPDATE webhook_subscriptions SET {column} = $2::text::{cast} WHERE id = $1::uuid",
        bad,
        value,
    )
    await _publish(pool, 4)
    running = await start_dispatcher()

    async def settled() -> bool:
        return running.task.done() or _settled(
            await _by_subscription(pool), {good: "delivered", bad: "parked"}
        )

    await support.wait_for(settled, timeout=20, message="deliveries settle")
    assert not running.task.done(), running.task.exception()
    states = await _by_subscription(pool)
    assert [(s, a) for s, a, _e in states[good]] == [("delivered", 1)] * 4
    for state, attempt, error in states[bad]:
        assert (state, attempt) == ("parked", 1)
        assert error is not None
        assert reason in error
    assert bad_rx.requests == []
    text = prometheus_client.generate_latest(running.dispatcher.registry).decode()
    assert _attempts_metric(text, bad, "config_error") == 4
