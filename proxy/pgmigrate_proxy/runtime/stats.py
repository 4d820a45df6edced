"""The counters that the admin console and a metrics exporter read: per pool (transactions,
queries, bytes, client wait, server assignments) and of the guard (its recent events in a
bounded ring, and a count per event name).

The relay bumps the pool counters inline (a few integer additions a chunk, no clock); times
that need a clock are taken off the hot path only (a client's wait for a server).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields

#: How many guard events the ring keeps (SHOW EVENTS shows the last ones).
EVENT_RING = 1000


@dataclass(slots=True)
class PoolStats:
    """Totals of one (database, user) pool since the proxy started (pgbouncer's STATS_TOTALS)."""

    xact_count: int = 0  # transactions ended (ReadyForQuery 'I' seen by the relay)
    query_count: int = 0  # ReadyForQuery messages relayed (one per simple Query or Sync)
    bytes_received: int = 0  # from the clients
    bytes_sent: int = 0  # to the clients
    server_assignment_count: int = 0  # times a client was given a server from the pool
    wait_time: float = 0.0  # seconds the clients waited for a server, summed
    wait_count: int = 0  # waits counted in wait_time

    def add(self, other: PoolStats) -> None:
        for item in fields(self):
            setattr(self, item.name, getattr(self, item.name) + getattr(other, item.name))

    @classmethod
    def total(cls, many: Iterable[PoolStats]) -> PoolStats:
        summed = cls()
        for one in many:
            summed.add(one)
        return summed


#: Where the counters of a server connection go before it joins a pool (not shown anywhere).
UNPOOLED = PoolStats()


@dataclass(frozen=True, slots=True)
class GuardEvent:
    """One guard event as the log has it: wall-clock time, name, fields."""

    ts: float
    name: str
    fields: Mapping[str, object]


@dataclass
class GuardEvents:
    """The guard's recent events (bounded) and how many of each kind since the start."""

    size: int = EVENT_RING
    recent: deque[GuardEvent] = field(init=False)
    counts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self.recent = deque(maxlen=self.size)

    def record(self, name: str, fields: Mapping[str, object]) -> None:
        self.recent.append(GuardEvent(time.time(), name, dict(fields)))
        self.counts[name] += 1

    def last(self, count: int) -> list[GuardEvent]:
        """The last `count` events, oldest first."""
        if count <= 0:
            return []
        return list(self.recent)[-count:]

    def of_unit(self, unit: int) -> list[GuardEvent]:
        """The events of one held unit still in the ring, oldest first."""
        return [event for event in self.recent if event.fields.get("unit") == unit]
