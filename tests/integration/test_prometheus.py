"""A real Prometheus scraping a real dispatcher: every dashboard query and alert expression
must evaluate, without error and with data, against what the dispatcher actually exports.

The dispatcher delivers, retries and dead-letters real traffic to real receivers while
Prometheus (the Debian ``prometheus`` binary, see .ci/tools.sh) scrapes it every second and
loads ``deploy/prometheus/alerts.yml``. Then, through the HTTP API (``/api/v1/query``):

- every panel query of both dashboards (``grafana/generate.py``'s ``panel_queries()``, the
  drill-down pointed at a real subscription) must return at least one series, and not only
  NaN;
- every alert expression must evaluate without error. An alert expression is a condition and
  is rightly empty while nothing is wrong, so emptiness proves nothing: each condition is
  split at its top-level ``and``/``or``/``unless`` and the measured side of each comparison
  (the expression with its threshold stripped) must return series. A typo in a metric or
  label name, or a label the dispatcher does not export, leaves that side empty and fails.
  The dead-letter alert, whose condition this traffic really meets, must also match as a whole;
- Prometheus's own rule evaluation must report every alert rule healthy.

Without the binary the test skips with a reason, except in CI (``CI=true``) where it fails.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
import yaml

import dispatcher
from dispatcher import config, ports
from dispatcher.db import repository
from tests import support

ROOT = support.ROOT
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
SECRET = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
WAVES = 3
_COMPARISON = re.compile(r"==|!=|>=|<=|>|<")
_SET_OPERATOR = re.compile(r"\b(?:and|or|unless)\b")


def _load_generator() -> ModuleType:
    path = ROOT / "grafana" / "generate.py"
    spec = importlib.util.spec_from_file_location("dispatcher_grafana_generate", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _top_level(expr: str) -> Iterator[tuple[int, str]]:
    """(index, char) of the characters outside (), {}, [] and string literals."""
    depth = 0
    quote = ""
    escaped = False
    for index, char in enumerate(expr):
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = ""
            continue
        if char in "\"'`":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0:
            yield index, char


def _split_top_level(expr: str, pattern: re.Pattern[str]) -> list[tuple[str, str, str]]:
    """Split at the first top-level match of ``pattern``: [(left, operator, right)] or []."""
    # Blank out everything nested, so the pattern only ever matches at the top level.
    outside = [" "] * len(expr)
    for index, char in _top_level(expr):
        outside[index] = char
    match = pattern.search("".join(outside))
    if match is None:
        return []
    return [(expr[: match.start()], match.group(), expr[match.end() :])]


def _strip_parens(expr: str) -> str:
    expr = expr.strip()
    while expr.startswith("(") and expr.endswith(")"):
        inner = expr[1:-1]
        depth = 0
        for char in inner:
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth < 0:
                return expr  # "(a) / (b)": the outer parentheses are not a pair
        expr = inner.strip()
    return expr


def measured_operands(expr: str) -> list[str]:
    """The value side of every comparison in an alert condition (thresholds stripped)."""
    expr = _strip_parens(expr)
    split = _split_top_level(expr, _SET_OPERATOR)
    if split:
        left, _, right = split[0]
        return measured_operands(left) + measured_operands(right)
    split = _split_top_level(expr, _COMPARISON)
    if not split:
        return [expr]
    left, _, right = split[0]
    right = re.sub(r"^\s*bool\b", "", right)
    left, right = _strip_parens(left), _strip_parens(right)
    # Keep the side that is not a plain number (`0 < x` as well as `x > 0`).
    return [right if re.fullmatch(r"[-+]?[\d.eE+]+", left) else left]


def test_measured_operands_strip_thresholds_and_split_conditions() -> None:
    expr = """
      (
          sum by (s) (rate(a_total{o!="x",p=~"a|b"}[10m]))
        /
          sum by (s) (rate(a_total[10m]))
      ) > 0.5
      and
      sum by (s) (increase(a_total[10m])) >= 20
    """
    assert [" ".join(o.split()) for o in measured_operands(expr)] == [
        'sum by (s) (rate(a_total{o!="x",p=~"a|b"}[10m])) / sum by (s) (rate(a_total[10m]))',
        "sum by (s) (increase(a_total[10m]))",
    ]
    assert measured_operands('up{job="d"} == 0') == ['up{job="d"}']
    assert measured_operands("x > 1000 and deriv(x[15m]) > 0") == ["x", "deriv(x[15m])"]
    assert measured_operands("0 < bool y") == ["y"]
    assert measured_operands("max by (s) (z)") == ["max by (s) (z)"]


# -- the real thing --------------------------------------------------------------------------


@pytest.fixture
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        reason = "prometheus not installed (Debian package `prometheus`; see .ci/tools.sh)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


class Prometheus:
    def __init__(self, binary: str, workdir: Path, target_port: int) -> None:
        self.port = ports.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": "dispatcher",
                    "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                }
            ],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log_path = workdir / "prometheus.log"
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def close(self) -> None:
        await self.session.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    async def ready(self) -> bool:
        assert self.process.poll() is None, f"prometheus exited:\n{self.log()}"
        try:
            async with self.session.get(f"{self.url}/-/ready") as response:
                return response.status == 200
        except aiohttp.ClientConnectionError:
            return False

    async def query(self, expr: str) -> dict[str, Any]:
        """The API answer for an instant query now; error answers are returned, not raised."""
        params = {"query": expr, "time": f"{time.time():.3f}"}
        async with self.session.get(f"{self.url}/api/v1/query", params=params) as response:
            body: dict[str, Any] = await response.json()
            return body

    async def series(self, expr: str) -> list[dict[str, Any]]:
        body = await self.query(expr)
        assert body["status"] == "success", f"{expr}: {body.get('error')}"
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    async def scalar(self, expr: str) -> float:
        result = await self.series(expr)
        return float(result[0]["value"][1]) if result else 0.0

    async def rules(self) -> list[dict[str, Any]]:
        async with self.session.get(f"{self.url}/api/v1/rules") as response:
            body = await response.json()
        return [rule for group in body["data"]["groups"] for rule in group["rules"]]


async def test_every_dashboard_query_and_alert_expression_returns_data(
    pool: Any,
    make_receiver: Any,
    start_dispatcher: Any,
    prometheus_binary: str,
    tmp_path: Path,
) -> None:
    ok, flaky, broken = [await make_receiver() for _ in range(3)]
    seen: set[str] = set()

    def first_attempt_fails(_n: int, headers: dict[str, str], _b: bytes) -> tuple[int, Any, float]:
        event = headers.get("webhook-id", "")
        status = 200 if event in seen else 500
        seen.add(event)
        return status, {}, 0.0

    flaky.respond = first_attempt_fails
    broken.respond = lambda _n, _h, _b: (503, {}, 0.0)
    repo = repository.Repository(pool)
    subs = {}
    for name, receiver in (("ok", ok), ("flaky", flaky), ("broken", broken)):
        sub = await repo.create_subscription(
            url=receiver.url, event_types=["t.*"], secret=SECRET, description=f"{name} hook"
        )
        subs[name] = str(sub["id"])
    # One whose request cannot be built (a header value HTTP refuses): parked, config_error.
    unsendable = await repo.create_subscription(
        url=ok.url, event_types=["t.*"], secret=SECRET, headers={"X-Tenant": "a\x0bb"}
    )
    subs["unsendable"] = str(unsendable["id"])
    # Circuit breaker off: the broken endpoint must keep failing through to dead letters.
    running = await start_dispatcher(
        gauge_interval_seconds=0.2,
        endpoint_health=config.EndpointHealthPolicy(breaker_failure_ratio=0),
    )
    max_attempts = running.dispatcher.settings.retry.max_attempts
    prometheus = Prometheus(prometheus_binary, tmp_path, running.dispatcher.bound_port)
    try:
        await support.wait_for(prometheus.ready, timeout=20, message="prometheus ready")

        async def scrapes() -> float:
            return await prometheus.scalar('count_over_time(up{job="dispatcher"}[5m])')

        await support.wait_for(scrapes, timeout=10, message="a first scrape")
        # Waves of traffic between scrapes, so every counter and histogram is seen growing.
        for wave in range(1, WAVES + 1):
            async with pool.acquire() as conn:
                await dispatcher.publish(conn, "t.wave", {"wave": wave})

            def finished(wave: int = wave) -> bool:
                return (
                    len(broken.requests) >= wave * max_attempts
                    and len(ok.ok()) >= wave
                    and len(flaky.ok()) >= wave
                )

            await support.wait_for(finished, timeout=10, message=f"wave {wave} delivered")
            before = await scrapes()
            await support.wait_for(
                lambda before=before: _more(scrapes, before), timeout=10, message="a scrape"
            )
        dead = 'sum(dispatcher_deliveries_total{result="dead"})'

        async def dead_lettered() -> bool:
            return await prometheus.scalar(dead) >= WAVES

        await support.wait_for(dead_lettered, timeout=10, message="dead letters scraped")
        # Two more scrapes after the last wave: rates and derivatives see its settled state.
        settled = await scrapes()
        await support.wait_for(
            lambda: _more(scrapes, settled + 1), timeout=10, message="settling scrapes"
        )

        failures: list[str] = []
        queries = _load_generator().panel_queries(subscription=subs["flaky"], rate_interval="1m")
        assert queries
        for uid, title, expr in queries:
            body = await prometheus.query(expr)
            if body["status"] != "success":
                failures.append(f"{uid} / {title}: error {body.get('error')}: {expr}")
                continue
            values = [float(s["value"][1]) for s in body["data"]["result"]]
            if not values:
                failures.append(f"{uid} / {title}: no series: {expr}")
            elif all(math.isnan(v) for v in values):
                failures.append(f"{uid} / {title}: only NaN: {expr}")

        alerts = [
            rule
            for group in yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
            for rule in group["rules"]
            if "alert" in rule
        ]
        assert len(alerts) >= 6
        for rule in alerts:
            body = await prometheus.query(rule["expr"])
            if body["status"] != "success":
                failures.append(f"alert {rule['alert']}: error {body.get('error')}")
            for operand in measured_operands(rule["expr"]):
                body = await prometheus.query(operand)
                if body["status"] != "success" or not body["data"]["result"]:
                    failures.append(f"alert {rule['alert']}: no series for {operand!r}")
        firing = await prometheus.series(
            next(r["expr"] for r in alerts if r["alert"] == "DispatcherDeadLettersIncreasing")
        )
        assert {s["metric"]["subscription"] for s in firing} == {subs["broken"]}

        # Zero successes is 0 %, not a missing line; legends get the host and description.
        by_subscription = next(
            expr
            for uid, title, expr in _load_generator().panel_queries(rate_interval="1m")
            if uid == "dispatcher-overview" and title == "Success ratio by subscription"
        )
        ratios = {
            r["metric"]["subscription"]: (r["metric"], float(r["value"][1]))
            for r in await prometheus.series(by_subscription)
        }
        labels, broken_ratio = ratios[subs["broken"]]
        assert broken_ratio == 0.0
        assert labels["host"] == "127.0.0.1"
        assert labels["description"] == "broken hook"
        assert ratios[subs["ok"]][1] == 1.0
        assert set(ratios) == set(subs.values())
        # Prometheus asked for OpenMetrics and got it; no _created series were exposed.
        assert not await prometheus.series('{__name__=~"dispatcher_.*_created"}')

        evaluated = {r["name"]: r for r in await prometheus.rules() if r["type"] == "alerting"}
        assert set(evaluated) == {r["alert"] for r in alerts}
        for name, rule in evaluated.items():
            if rule["health"] != "ok":
                failures.append(f"alert {name}: Prometheus reports {rule.get('lastError')}")
        assert not failures, "\n".join(failures)
    finally:
        await prometheus.close()


async def _more(scrapes: Any, than: float) -> bool:
    return bool(await scrapes() > than)
