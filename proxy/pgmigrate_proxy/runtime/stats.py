"""The counters that the admin console and the metrics exporter read: per pool (transactions,
queries, bytes, client wait, server assignments) and of the guard (its recent events in a
bounded ring, a count per event name, and per (database, user) the tallies of GuardTally).

The relay bumps the pool counters inline (a few integer additions a chunk, no clock); times
that need a clock are taken off the hot path only (a client's wait for a server).
"""

from __future__ import annotations

import bisect
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields

from pgmigrate_proxy.guard.policy import Reason
from pgmigrate_proxy.guard.retry import is_retryable

#: How many guard events the ring keeps (SHOW EVENTS shows the last ones).
EVENT_RING = 1000
#: Upper bounds (seconds) of the histograms' buckets: a client's wait for a server (up to
#: query_wait_timeout, 120 s by default), a guarded statement's hold.
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0)
HOLD_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)


class Buckets:
    """A histogram's counts: one per bound (and one above the last), their sum; an observation
    is a bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or under it), the last bound +inf (Prometheus's)."""
        found, total = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            found.append((bound, total))
        return found

    def __add__(self, other: Buckets) -> Buckets:
        summed = Buckets(self.bounds)
        summed.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        summed.sum = self.sum + other.sum
        return summed


@dataclass(slots=True)
class PoolStats:
    """Totals of one (database, user) pool since the proxy started (pgbouncer's STATS_TOTALS)."""

    xact_count: int = 0  # transactions ended (ReadyForQuery 'I' seen by the relay)
    query_count: int = 0  # ReadyForQuery messages relayed (one per simple Query or Sync)
    bytes_received: int = 0  # from the clients
    bytes_sent: int = 0  # to the clients
    server_assignment_count: int = 0  # times a client was given a server from the pool
    wait_time: float = 0.0  # seconds the clients waited for a server, summed
    #: seconds its server connections spent in transactions (from the first request that went
    #: out to the ReadyForQuery 'I'), and running queries (request to ReadyForQuery), summed
    xact_time: float = 0.0
    query_time: float = 0.0
    wait_count: int = 0  # waits counted in wait_time
    waits: Buckets = field(default_factory=lambda: Buckets(WAIT_BUCKETS))  # wait_time's spread

    def waited(self, seconds: float) -> None:
        """A client got a server after waiting `seconds` (PoolLink.acquire)."""
        self.wait_time += seconds
        self.wait_count += 1
        self.waits.observe(seconds)

    def assigned_at_once(self) -> None:
        """A client got a server without waiting (transaction pooling's fast paths): an
        assignment and a wait of 0 s (the first bucket), no clock read."""
        self.server_assignment_count += 1
        self.wait_count += 1
        self.waits.counts[0] += 1

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


@dataclass(slots=True)
class GuardCounts:
    """The guard's totals of one (database, user): the held statement's database, its client's
    user (the metrics exporter's labels)."""

    held: int = 0  # statements held
    attempts: int = 0  # sent to PostgreSQL (each retry is one more)
    retries: int = 0
    budgets_spent: int = 0  # gave up, or failed on a lock error once the lock budget was spent
    blockers_found: int = 0  # distinct blocking sessions, per held statement
    terminated: int = 0  # blockers terminated (by the guard, or from the admin console)
    cancelled: int = 0
    shown: int = 0  # blockers reported and left alone (show, none, drain, prepared, ...)
    spared: int = 0  # blockers a filter spared (blocker_states, min_*_age, users, ...)
    holds: Buckets = field(default_factory=lambda: Buckets(HOLD_BUCKETS))  # seconds held


#: The reasons of a "blocked_by" event that mean a filter spared the blocker.
SPARED = frozenset(r.value for r in Reason if r.name.startswith("SPARED_"))
#: The events after which a unit is held no more (events.FINAL_EVENTS).
_FINAL = ("applied", "failed", "gave_up", "dropped", "not_guarded")


@dataclass(slots=True)
class _Unit:
    """What the tally keeps of a statement in the pipeline, until its final event."""

    counts: GuardCounts
    held_at: float  # time.monotonic() of its "held" event
    on_server: float = 0.0  # seconds its attempts ran on the server
    blockers: set[int] = field(default_factory=set)


class GuardTally:
    """The guard's counters per (database, user), bumped from its events (a dispatch table by
    event name); a unit's hold time is observed at its final event: from "held" to then, less
    the time its attempts spent on the server."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], GuardCounts] = {}
        self._units: dict[int, _Unit] = {}
        self._table: dict[str, Callable[[_Unit, Mapping[str, object], float], None]] = {
            "blockers": self._blockers,
            "terminated": self._terminated,
            "console_terminated": self._by_console("terminated"),
            "cancelled": self._cancelled,
            "console_cancelled": self._by_console("cancelled"),
            "blocked_by": self._blocked_by,
            "attempt": self._attempt,
            "retry": self._retry,
            **{name: self._final for name in _FINAL},
            "gave_up": self._gave_up,
            "failed": self._failed,
        }

    def count(self, name: str, fields: Mapping[str, object], now: float) -> None:
        unit_id = fields.get("unit")
        if not isinstance(unit_id, int):
            return  # (admin_down, admin_back: no statement's)
        if name == "held":
            self._held(unit_id, fields, now)
            return
        handler = self._table.get(name)
        unit = self._units.get(unit_id)
        if handler is not None and unit is not None:
            handler(unit, fields, now)
            if name in _FINAL:
                del self._units[unit_id]

    def _held(self, unit_id: int, fields: Mapping[str, object], now: float) -> None:
        key = (str(fields.get("database") or ""), str(fields.get("user") or ""))
        counts = self.counts.get(key)
        if counts is None:
            counts = self.counts[key] = GuardCounts()
        counts.held += 1
        if len(self._units) >= EVENT_RING:  # one that never ended (its server lost)
            self._units.pop(next(iter(self._units)))
        self._units[unit_id] = _Unit(counts, now)

    @staticmethod
    def _blockers(unit: _Unit, fields: Mapping[str, object], now: float) -> None:
        pids = fields.get("pids")
        found = {p for p in pids if isinstance(p, int)} if isinstance(pids, list) else set()
        unit.counts.blockers_found += len(found - unit.blockers)
        unit.blockers |= found

    @staticmethod
    def _terminated(unit: _Unit, fields: Mapping[str, object], now: float) -> None:
        unit.counts.terminated += 1

    @staticmethod
    def _cancelled(unit: _Unit, fields: Mapping[str, object], now: float) -> None:
        unit.counts.cancelled += 1

    @staticmethod
    def _by_console(verb: str) -> Callable[[_Unit, Mapping[str, object], float], None]:
        def counted(unit: _Unit, fields: Mapping[str, object], now: float) -> None:
            if fields.get("outcome") == verb:  # ("gone": it had ended by itself)
                setattr(unit.counts, verb, getattr(unit.counts, verb) + 1)

        return counted

    @staticmethod
    def _blocked_by(unit: _Unit, fields: Mapping[str, object], now: float) -> None:
        if fields.get("reason") in SPARED:
            unit.counts.spared += 1
        else:
            unit.counts.shown += 1

    @staticmethod
    def _attempt(unit: _Unit, fields: Mapping[str, object], now: float) -> None:
        unit.counts.attempts += 1
        took = [fields.get("lock_wait_ms"), fields.get("run_ms")]
        unit.on_server += sum(ms for ms in took if isinstance(ms, int)) / 1000

    @staticmethod
    def _retry(unit: _Unit, fields: Mapping[str, object], now: float) -> None:
        unit.counts.retries += 1

    @staticmethod
    def _final(unit: _Unit, fields: Mapping[str, object], now: float) -> None:
        unit.counts.holds.observe(max(0.0, now - unit.held_at - unit.on_server))

    def _gave_up(self, unit: _Unit, fields: Mapping[str, object], now: float) -> None:
        unit.counts.budgets_spent += 1
        self._final(unit, fields, now)

    def _failed(self, unit: _Unit, fields: Mapping[str, object], now: float) -> None:
        code = fields.get("code")
        if isinstance(code, str) and is_retryable(code):  # its last attempt spent the budget
            unit.counts.budgets_spent += 1
        self._final(unit, fields, now)


@dataclass
class GuardEvents:
    """The guard's recent events (bounded), how many of each kind since the start, and the
    metrics' tallies."""

    size: int = EVENT_RING
    recent: deque[GuardEvent] = field(init=False)
    counts: Counter[str] = field(default_factory=Counter)
    tally: GuardTally = field(default_factory=GuardTally)

    def __post_init__(self) -> None:
        self.recent = deque(maxlen=self.size)

    def record(self, name: str, fields: Mapping[str, object]) -> None:
        self.recent.append(GuardEvent(time.time(), name, dict(fields)))
        self.counts[name] += 1
        self.tally.count(name, fields, time.monotonic())

    def last(self, count: int) -> list[GuardEvent]:
        """The last `count` events, oldest first."""
        if count <= 0:
            return []
        return list(self.recent)[-count:]

    def of_unit(self, unit: int) -> list[GuardEvent]:
        """The events of one held unit still in the ring, oldest first."""
        return [event for event in self.recent if event.fields.get("unit") == unit]
