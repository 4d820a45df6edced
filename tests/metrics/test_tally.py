"""GuardTally: the guard's counters per (database, user), from the events as the pipeline and
the admin console record them (sans-IO: names, fields and a clock given)."""

from __future__ import annotations

import subprocess
import sys

from pgmigrate_proxy.guard.policy import Reason
from pgmigrate_proxy.runtime.stats import EVENT_RING, GuardEvents, GuardTally

KEY = ("app", "migrator")


def held(tally: GuardTally, unit: int, now: float) -> None:
    tally.count("held", {"unit": unit, "database": "app", "user": "migrator"}, now)


def test_a_statement_with_blockers_retries_and_a_spent_budget() -> None:
    tally = GuardTally()
    held(tally, 1, 100.0)
    tally.count("blockers", {"unit": 1, "pids": [11, 12], "count": 2}, 100.1)
    tally.count("terminated", {"unit": 1, "pid": 11, "reason": Reason.ACTION.value}, 100.1)
    spared = Reason.SPARED_TRANSACTION_AGE.value
    tally.count("blocked_by", {"unit": 1, "pid": 12, "reason": spared}, 100.1)
    tally.count("blockers", {"unit": 1, "pids": [12, 13], "count": 2}, 100.2)  # 12 again
    tally.count("blocked_by", {"unit": 1, "pid": 13, "reason": Reason.PREPARED.value}, 100.2)
    tally.count("attempt", {"unit": 1, "attempt": 1, "lock_wait_ms": 500, "run_ms": 0}, 100.7)
    tally.count("retry", {"unit": 1, "attempt": 1}, 100.7)
    tally.count("attempt", {"unit": 1, "attempt": 2, "lock_wait_ms": 1000, "run_ms": 0}, 102.0)
    tally.count("failed", {"unit": 1, "attempts": 2, "code": "55P03"}, 102.0)
    counts = tally.counts[KEY]
    assert (counts.held, counts.attempts, counts.retries, counts.budgets_spent) == (1, 2, 1, 1)
    assert (counts.blockers_found, counts.terminated, counts.cancelled) == (3, 1, 0)
    assert (counts.shown, counts.spared) == (1, 1)
    assert counts.holds.count == 1
    assert abs(counts.holds.sum - 0.5) < 1e-9  # 2 s in all, 1.5 s of it on the server


def test_gave_up_spends_the_budget_and_applied_does_not() -> None:
    tally = GuardTally()
    held(tally, 1, 0.0)
    tally.count("gave_up", {"unit": 1, "attempts": 0, "code": "55P03"}, 30.0)
    held(tally, 2, 0.0)
    tally.count("attempt", {"unit": 2, "attempt": 1, "lock_wait_ms": 0, "run_ms": 20}, 1.0)
    tally.count("applied", {"unit": 2, "attempts": 1, "code": None}, 1.0)
    held(tally, 3, 0.0)
    tally.count("failed", {"unit": 3, "attempts": 1, "code": "42P01"}, 0.1)  # not a lock error
    counts = tally.counts[KEY]
    assert counts.budgets_spent == 1
    assert counts.holds.count == 3
    assert next(bound for bound, count in counts.holds.cumulative() if count == 3) == 30.0


def test_console_actions_count_and_events_of_no_statement_are_ignored() -> None:
    tally = GuardTally()
    held(tally, 7, 0.0)
    tally.count("console_terminated", {"unit": 7, "pid": 5, "outcome": "terminated"}, 1.0)
    tally.count("console_terminated", {"unit": 7, "pid": 6, "outcome": "gone"}, 1.0)
    tally.count("console_cancelled", {"unit": 7, "pid": 8, "outcome": "cancelled"}, 1.0)
    tally.count("admin_down", {"reason": "x"}, 1.0)
    tally.count("attempt", {"unit": 99, "attempt": 1}, 1.0)  # a unit never seen held
    counts = tally.counts[KEY]
    assert (counts.terminated, counts.cancelled, counts.attempts) == (1, 1, 0)


def test_units_that_never_end_are_bounded() -> None:
    tally = GuardTally()
    for unit in range(EVENT_RING + 10):
        held(tally, unit, 0.0)
    assert len(tally._units) == EVENT_RING
    assert tally.counts[KEY].held == EVENT_RING + 10


def test_guard_events_feed_the_tally() -> None:
    events = GuardEvents()
    events.record("held", {"unit": 1, "database": "app", "user": "migrator"})
    events.record("applied", {"unit": 1, "attempts": 1})
    assert events.tally.counts[KEY].held == 1 and events.tally.counts[KEY].holds.count == 1


def test_prometheus_client_is_imported_only_when_metrics_are_served() -> None:
    code = (
        "import sys, pgmigrate_proxy.cli, pgmigrate_proxy.embedded_proxy;"
        "sys.exit('prometheus_client' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
