"""When a guarded statement is tried again: retryable SQLSTATEs and the lock-timeout schedule."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from pgmigrate_proxy.protocol.sqlstate import SqlState
from pgmigrate_proxy.settings import default

RETRYABLE: frozenset[str] = frozenset(
    {SqlState.LOCK_NOT_AVAILABLE.value, SqlState.DEADLOCK_DETECTED.value}
)

_NO_LIMIT = math.inf
#: Exponents past this cannot change a capped delay and would overflow a float.
_MAX_EXPONENT = 64


def is_retryable(sqlstate: str) -> bool:
    """True for lock_not_available (55P03) and deadlock_detected (40P01), and only those."""
    return sqlstate in RETRYABLE


@dataclass(frozen=True)
class RetrySchedule:
    """Attempts with a short lock_timeout each, jittered exponential sleeps between them, and an
    overall budget (PGMIGRATE_LOCK_TIMEOUT) that the attempts and sleeps together never exceed.

    Attempts are numbered from 1; times are seconds; `budget` may be math.inf.
    """

    budget: float = _NO_LIMIT if default("lock_budget") is None else default("lock_budget")
    lock_timeout: float = default("lock_timeout")  # per attempt
    base_delay: float = default("retry_delay")
    max_delay: float = default("retry_max_delay")
    multiplier: float = 2.0
    jitter: float = 0.5  # a delay is drawn from ((1 - jitter) * d, d]
    min_attempt: float = 0.01  # an attempt shorter than this is not worth making

    def __post_init__(self) -> None:
        if not self.budget > 0 or not 0 < self.lock_timeout < math.inf:
            raise ValueError("need budget > 0 and a finite lock_timeout > 0")
        if self.base_delay < 0 or self.max_delay < self.base_delay or self.multiplier < 1:
            raise ValueError("need 0 <= base_delay <= max_delay and multiplier >= 1")
        if not 0 <= self.jitter <= 1 or not 0 < self.min_attempt <= self.lock_timeout:
            raise ValueError("need 0 <= jitter <= 1 and 0 < min_attempt <= lock_timeout")

    def remaining(self, elapsed: float) -> float:
        """Seconds of the budget left after `elapsed` seconds (never negative)."""
        return max(0.0, self.budget - elapsed)

    def attempts_left(self, elapsed: float) -> bool:
        """True while another attempt of at least `min_attempt` seconds fits in the budget."""
        return self.remaining(elapsed) >= self.min_attempt

    def attempt_timeout(self, elapsed: float) -> float:
        """The lock_timeout of an attempt that starts after `elapsed` seconds: cut to the budget."""
        return min(self.lock_timeout, self.remaining(elapsed))

    def lock_timeout_ms(self, elapsed: float) -> int:
        """attempt_timeout in whole milliseconds for SET lock_timeout; at least 1 (0 means off)."""
        return max(1, math.floor(self.attempt_timeout(elapsed) * 1000 + 1e-6))

    def next_delay(self, attempt: int, rng: random.Random, *, elapsed: float = 0.0) -> float:
        """Seconds to sleep after failed attempt `attempt`: exponential from base_delay, capped at
        max_delay, jittered with `rng`, and never past the budget counted from `elapsed`."""
        exponent = min(max(attempt, 1) - 1, _MAX_EXPONENT)
        delay = min(self.max_delay, self.base_delay * self.multiplier**exponent)
        delay *= 1.0 - self.jitter * rng.random()
        return min(delay, max(0.0, self.remaining(elapsed) - self.min_attempt))
