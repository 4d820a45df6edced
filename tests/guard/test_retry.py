"""The retry decision: which SQLSTATEs are retried, and a schedule that keeps to its budget."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pgmigrate_proxy.guard.retry import RetrySchedule, is_retryable

# --- retries -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sqlstate", "retryable"),
    [("55P03", True), ("40P01", True), ("57014", False), ("57P01", False), ("25001", False),
     ("", False), ("55p03", False)],
)  # fmt: skip
def test_is_retryable(sqlstate: str, retryable: bool) -> None:
    assert is_retryable(sqlstate) is retryable


def test_delays_grow_exponentially_to_the_cap() -> None:
    schedule = RetrySchedule(base_delay=0.1, max_delay=1.0, multiplier=2.0, jitter=0.0)
    rng = random.Random(1)
    assert [schedule.next_delay(n, rng) for n in range(1, 7)] == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert schedule.next_delay(10_000, rng) == 1.0  # no overflow


def test_jitter_is_reproducible_and_bounded() -> None:
    schedule = RetrySchedule(base_delay=1.0, max_delay=1.0, jitter=0.5)
    first = [schedule.next_delay(3, random.Random(7)) for _ in range(3)]
    assert len(set(first)) == 1
    rng = random.Random(7)
    delays = [schedule.next_delay(3, rng) for _ in range(200)]
    assert all(0.5 <= d <= 1.0 for d in delays) and len(set(delays)) > 100


def test_attempts_stop_at_the_budget() -> None:
    schedule = RetrySchedule(budget=2.0, lock_timeout=0.5)
    assert schedule.attempts_left(0.0) and schedule.attempt_timeout(0.0) == 0.5
    assert schedule.attempt_timeout(1.8) == pytest.approx(0.2)
    assert schedule.lock_timeout_ms(1.8) == 200
    assert schedule.lock_timeout_ms(1.9999) == 1  # never 0: that would mean no timeout
    assert not schedule.attempts_left(1.995) and not schedule.attempts_left(3.0)
    assert schedule.next_delay(1, random.Random(0), elapsed=5.0) == 0.0


def test_unbounded_budget() -> None:
    schedule = RetrySchedule(budget=math.inf, lock_timeout=0.5)
    assert schedule.attempts_left(1e9) and schedule.lock_timeout_ms(1e9) == 500


@pytest.mark.parametrize(
    "kwargs",
    [{"budget": 0}, {"budget": math.nan}, {"lock_timeout": 0}, {"lock_timeout": math.inf},
     {"base_delay": -1}, {"base_delay": 2, "max_delay": 1}, {"multiplier": 0.5},
     {"jitter": 1.5}, {"min_attempt": 0}, {"min_attempt": 1, "lock_timeout": 0.5}],
)  # fmt: skip
def test_schedule_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetrySchedule(**kwargs)


@given(
    st.floats(0.05, 120),
    st.floats(0.01, 5),
    st.floats(0, 2),
    st.floats(0, 1),
    st.integers(0, 2**32),
    st.lists(st.floats(0, 1), max_size=200),
)
def test_schedule_stays_within_budget(
    budget: float, lock_timeout: float, base: float, jitter: float, seed: int, fails: list[float]
) -> None:
    """Whatever each attempt costs (a failing one up to its lock_timeout), the total of attempts
    and sleeps never passes the budget, and only 55P03 / 40P01 lead to another attempt."""
    schedule = RetrySchedule(
        budget=budget,
        lock_timeout=lock_timeout,
        base_delay=base,
        max_delay=max(base, 1.0),
        jitter=jitter,
        min_attempt=min(0.01, lock_timeout),
    )
    rng, elapsed, attempt = random.Random(seed), 0.0, 0
    outcomes = iter(fails)
    while schedule.attempts_left(elapsed):
        attempt += 1
        timeout = schedule.attempt_timeout(elapsed)
        assert 0 < timeout <= lock_timeout and schedule.lock_timeout_ms(elapsed) >= 1
        elapsed += timeout * next(outcomes, 1.0)
        assert elapsed <= budget + 1e-9
        delay = schedule.next_delay(attempt, rng, elapsed=elapsed)
        assert 0 <= delay <= schedule.max_delay
        elapsed += delay
        assert elapsed <= budget + 1e-9
    assert attempt >= 1 or budget < schedule.min_attempt


def test_policy_module_offers_the_retry_names() -> None:
    from pgmigrate_proxy.guard import policy

    assert policy.RetrySchedule is RetrySchedule and policy.is_retryable is is_retryable
