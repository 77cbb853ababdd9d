"""The oracle: after a scenario, compare the database, the receiver's log and /metrics.

- lost: a delivery that should have been delivered, with no 2xx in the receiver's log or
  not ``delivered`` in the database;
- duplicates: extra receipts of one (subscription, webhook-id) that the receiver may have acted
  on (answered 2xx, or never answered because the sender went away or timed out);
- mismatched: one webhook-id seen with different bodies (must never happen);
- inversions: per (subscription, ordering key), first-success order against insert order;
- counters: ``dispatcher_deliveries_total{result="delivered"}`` and successful
  ``dispatcher_attempts_total`` against the database and the receiver (when every process
  that did work is still there to be scraped).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.chaos.receiver import ChaosReceiver


@dataclasses.dataclass
class Verdict:
    expected: int = 0
    delivered: int = 0
    lost: int = 0
    duplicates: int = 0
    mismatched: int = 0
    inversions: int = 0
    counters_ok: bool | None = None
    problems: list[str] = dataclasses.field(default_factory=list)

    def assert_sound(self, *, max_duplicates: int = 0) -> None:
        assert self.lost == 0, self
        assert self.mismatched == 0, self
        assert self.inversions == 0, self
        assert self.duplicates <= max_duplicates, self
        assert self.counters_ok is not False, self


def metric_sum(texts: Iterable[str], name: str, **labels: str) -> float:
    total = 0.0
    for text in texts:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
    return total


async def check(
    pool: Any,
    receiver: ChaosReceiver,
    names: dict[str, str],
    *,
    metrics_texts: list[str] | None = None,
    expect_delivered: bool = True,
) -> Verdict:
    """``names`` maps subscription id → receiver path name for the subscriptions to judge."""
    rows = await pool.fetch(
        """
        SELECT d.subscription_id::text AS sid, d.state, o.id AS outbox_id, o.event_id,
               o.ordering_key, o.payload::text AS payload
        FROM webhook_deliveries d JOIN webhook_outbox o ON o.id = d.outbox_id
        WHERE d.subscription_id::text = ANY($1::text[])
        """,
        list(names),
    )
    v = Verdict(expected=len(rows))
    receipts: dict[tuple[str, str], list[Any]] = {}
    for e in receiver.log:
        receipts.setdefault((e.name, e.webhook_id), []).append(e)
    first_ok: dict[tuple[str, str], float] = {}
    for row in rows:
        name = names[row["sid"]]
        got = receipts.get((name, row["event_id"]), [])
        oks = [e for e in got if 200 <= e.status < 300]
        if row["state"] == "delivered":
            v.delivered += 1
        if expect_delivered and (row["state"] != "delivered" or not oks):
            v.lost += 1
            v.problems.append(f"lost {row['event_id']} state={row['state']} oks={len(oks)}")
        acted_on = [e for e in got if 200 <= e.status < 300 or e.status == -1]
        v.duplicates += max(0, len(acted_on) - 1)
        if len({e.body for e in got}) > 1:
            v.mismatched += 1
            v.problems.append(f"bodies differ for {row['event_id']}")
        if oks:
            first_ok[(name, row["event_id"])] = min(e.at for e in oks)
    keyed: dict[tuple[str, str], list[tuple[float, int]]] = {}
    for row in rows:
        name = names[row["sid"]]
        at = first_ok.get((name, row["event_id"]))
        if row["ordering_key"] is not None and at is not None:
            keyed.setdefault((name, row["ordering_key"]), []).append((at, row["outbox_id"]))
    for key, seq in keyed.items():
        ordered = sorted(seq)
        for (at_a, a), (at_b, b) in itertools.pairwise(ordered):
            if a > b:
                v.inversions += 1
                v.problems.append(f"{key}: outbox {b} first delivered {at_b - at_a:.3f}s after {a}")
    if metrics_texts is not None:
        delivered_metric = metric_sum(
            metrics_texts, "dispatcher_deliveries_total", result="delivered"
        )
        success_metric = metric_sum(metrics_texts, "dispatcher_attempts_total", outcome="success")
        oks_total = sum(
            1 for e in receiver.log if 200 <= e.status < 300 and e.name in names.values()
        )
        v.counters_ok = delivered_metric == v.delivered and success_metric == oks_total
        if not v.counters_ok:
            v.problems.append(
                f"metrics delivered={delivered_metric} db={v.delivered}; "
                f"success attempts={success_metric} receiver 2xx={oks_total}"
            )
    return v
