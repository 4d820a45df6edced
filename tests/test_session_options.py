"""Session startup options `-c pgmigrate.<name>=<value>` override the proxy's guard settings."""

from __future__ import annotations

import math

import pytest
from pgmigrate_proxy.guard.blockers import BackendState
from pgmigrate_proxy.guard.policy import BlockingAction
from pgmigrate_proxy.runtime.guarding import GuardSettings
from pgmigrate_proxy.runtime.options import NAMES, parse, seconds, with_options

BASE = GuardSettings()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ("-c pgmigrate.blocking_action=show", [("blocking_action", "show")]),
        ("-cpgmigrate.lock_timeout=100ms", [("lock_timeout", "100ms")]),
        ("--pgmigrate.lock-budget=2s", [("lock_budget", "2s")]),
        (r"-c pgmigrate.blocker_states=idle\ in", [("blocker_states", "idle in")]),
        ("-c statement_timeout=5s -c pgmigrate.role=migrate", [("role", "migrate")]),
        ("-c search_path=x", []),
        ("", []),
    ],
)  # fmt: skip
def test_parse(options: str, expected: list[tuple[str, str]]) -> None:
    assert list(parse(options)) == expected


def test_every_setting_applies() -> None:
    options = " ".join(
        [
            "-c pgmigrate.blocking_action=cancel",
            "-c pgmigrate.lock_timeout=250ms",
            "-c pgmigrate.lock_budget=3",
            "-c pgmigrate.retry_delay=0",
            "-c pgmigrate.retry_max_delay=1s",
            "-c pgmigrate.max_hold=7",
            "-c pgmigrate.watch_interval=20ms",
            "-c pgmigrate.cancel_grace=0",
            "-c pgmigrate.min_transaction_age=1.5",
            "-c pgmigrate.min_query_age=5s",
            r"-c pgmigrate.blocker_states=active,idle\ in\ transaction",
            "-c pgmigrate.application_names=web*,worker",
            "-c pgmigrate.exclude_application_names=psql",
            "-c pgmigrate.users=app",
            "-c pgmigrate.exclude_users=admin,postgres",
        ]
    )
    got = with_options(BASE, options)
    assert got.action is BlockingAction.CANCEL
    assert (got.schedule.lock_timeout, got.schedule.budget) == (0.25, 3.0)
    assert (got.schedule.base_delay, got.schedule.max_delay) == (0.0, 1.0)
    assert (got.max_hold, got.watch_interval, got.cancel_grace) == (7.0, 0.02, 0.0)
    filters = got.filters
    assert (filters.min_transaction_age, filters.min_query_age) == (1.5, 5.0)
    assert filters.states == {BackendState.ACTIVE, BackendState.IDLE_IN_TRANSACTION}
    assert filters.application_names == ("web*", "worker")
    assert filters.exclude_application_names == ("psql",)
    assert (filters.users, filters.exclude_users) == (("app",), ("admin", "postgres"))


def test_the_table_names_every_option() -> None:
    assert "blocking_action" in NAMES and "role" not in NAMES and len(NAMES) == 15


@pytest.mark.parametrize(
    "options",
    [
        "-c pgmigrate.blocking_action=kill",
        "-c pgmigrate.lock_timeout=0",
        "-c pgmigrate.lock_timeout=-1s",
        "-c pgmigrate.lock_timeout=nan",
        "-c pgmigrate.blocker_states=sleeping",
        "-c pgmigrate.retry_max_delay=0 -c pgmigrate.retry_delay=1",
        "-c pgmigrate.unknown=1",
    ],
)
def test_bad_values_are_ignored(options: str, caplog: pytest.LogCaptureFixture) -> None:
    got = with_options(BASE, options)
    assert got.action is BASE.action and got.schedule.lock_timeout == BASE.schedule.lock_timeout
    assert "ignoring" in caplog.text


def test_no_budget() -> None:
    assert math.isinf(with_options(BASE, "-c pgmigrate.lock_budget=none").schedule.budget)


@pytest.mark.parametrize(("text", "value"), [("5", 5.0), ("5s", 5.0), ("250ms", 0.25)])
def test_seconds(text: str, value: float) -> None:
    assert seconds(text) == value


def test_schedule_options_are_checked_together() -> None:
    short = with_options(BASE, "-c pgmigrate.lock_timeout=5ms")
    assert short.schedule.lock_timeout == 0.005  # below the default shortest attempt: allowed
    alone = with_options(BASE, "-c pgmigrate.retry_delay=20")  # over max_delay: ignored...
    assert alone.schedule == BASE.schedule
    both = "-c pgmigrate.retry_delay=20 -c pgmigrate.retry_max_delay=30"
    assert with_options(BASE, both).schedule.base_delay == 20.0  # ...unless the max comes too
