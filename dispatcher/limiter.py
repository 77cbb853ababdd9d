"""The process-wide cap on requests in flight.

Per-subscription caps are enforced by the database at claim time (they must hold across
replicas, see ``dispatcher_claim``); this only bounds what one process puts on the wire.
"""

from __future__ import annotations


class GlobalLimiter:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0

    def free(self) -> int:
        return self.capacity - self.in_use

    def acquire(self, n: int = 1) -> None:
        if n > self.free():
            raise RuntimeError("acquired more slots than are free")
        self.in_use += n

    def release(self, n: int = 1) -> None:
        self.in_use -= n
