"""The ack writer's batching: whatever queued up while the last write ran, at most ``batch``
per statement, in order; ``close()`` returns ``run()`` once everything queued is written."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import prometheus_client as prom

from dispatcher import claimer, metrics, model


class _Repo:
    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    async def ack(self, acks: Sequence[model.Ack], worker: str) -> set[int]:
        self.batches.append([a.delivery_id for a in acks])
        await asyncio.sleep(0)  # a round trip: more acks queue up meanwhile
        return {a.delivery_id for a in acks}


def _ack(delivery_id: int) -> model.Ack:
    return model.Ack(
        delivery_id, 1, 1, model.DeliveryState.DELIVERED, None, 200, None, 0.0, 1.0, "success", None
    )


async def test_batches_are_what_queued_meanwhile_capped_and_in_order() -> None:
    repo = _Repo()
    written: list[None] = []
    writer = claimer.AckWriter(
        repo,  # type: ignore[arg-type]
        "w",
        metrics.Metrics(prom.CollectorRegistry()),
        batch=3,
        on_written=lambda: written.append(None),
    )
    running = asyncio.create_task(writer.run())
    writer.put(_ack(1))
    await asyncio.sleep(0)
    for n in range(2, 7):
        writer.put(_ack(n))
    writer.close()
    writer.put(_ack(7))  # queued before run() saw the close: written too
    await asyncio.wait_for(running, 5)
    assert [n for batch in repo.batches for n in batch] == list(range(1, 8))
    assert all(len(batch) <= 3 for batch in repo.batches)
    assert len(written) == len(repo.batches)
    assert writer.pending() == 0


async def test_close_with_nothing_queued_returns_at_once() -> None:
    writer = claimer.AckWriter(
        _Repo(),  # type: ignore[arg-type]
        "w",
        metrics.Metrics(prom.CollectorRegistry()),
        batch=3,
        on_written=lambda: None,
    )
    running = asyncio.create_task(writer.run())
    await asyncio.sleep(0)
    writer.close()
    await asyncio.wait_for(running, 5)
