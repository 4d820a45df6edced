"""Session startup options `-c pgmigrate.<name>=<value>` override the proxy's guard settings."""

from __future__ import annotations

import math

import psycopg
import pytest
from pgmigrate_proxy.guard.blockers import BackendState
from pgmigrate_proxy.guard.drain import DrainThen
from pgmigrate_proxy.guard.policy import BlockingAction
from pgmigrate_proxy.runtime.guarding import GuardSettings
from pgmigrate_proxy.runtime.options import NAMES, OptionError, applied, parse, with_options

from tests.fixtures.proxy import RunningProxy

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
            "-c pgmigrate.drain_timeout=500ms",
            "-c pgmigrate.drain_then=give_up",
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
    assert (got.drain.timeout, got.drain.then) == (0.5, DrainThen.GIVE_UP)
    filters = got.filters
    assert (filters.min_transaction_age, filters.min_query_age) == (1.5, 5.0)
    assert filters.states == {BackendState.ACTIVE, BackendState.IDLE_IN_TRANSACTION}
    assert filters.application_names == ("web*", "worker")
    assert filters.exclude_application_names == ("psql",)
    assert (filters.users, filters.exclude_users) == (("app",), ("admin", "postgres"))


def test_the_table_names_every_option() -> None:
    assert "blocking_action" in NAMES and "role" not in NAMES and len(NAMES) == 20


@pytest.mark.parametrize(
    ("options", "name", "allowed"),
    [
        ("-c pgmigrate.blocking_action=kill", "blocking_action", "terminate | cancel"),
        ("-c pgmigrate.lock_timeout=0", "lock_timeout", "from 1ms to 7d"),
        ("-c pgmigrate.lock_timeout=-1s", "lock_timeout", "from 1ms to 7d"),
        ("-c pgmigrate.lock_timeout=nan", "lock_timeout", "from 1ms to 7d"),
        ("-c pgmigrate.lock_timeout=inf", "lock_timeout", "from 1ms to 7d"),
        ("-c pgmigrate.lock_timeout=1e308", "lock_timeout", "from 1ms to 7d"),
        ("-c pgmigrate.lock_timeout=1e308min", "lock_timeout", "from 1ms to 7d"),
        ("-c pgmigrate.lock_timeout=5parsecs", "lock_timeout", "from 1ms to 7d"),
        ("-c pgmigrate.watch_interval=0.000001", "watch_interval", "from 10ms to 1min"),
        ("-c pgmigrate.watch_interval=1h", "watch_interval", "from 10ms to 1min"),
        ("-c pgmigrate.max_hold=-5", "max_hold", "from 1ms to 1d"),
        ("-c pgmigrate.cancel_grace=nan", "cancel_grace", "from 0 to 1h"),
        ("-c pgmigrate.min_query_age=1e400", "min_query_age", "from 0 to 7d"),
        ("-c pgmigrate.lock_budget=0", "lock_budget", "none or empty for no limit"),
        ("-c pgmigrate.blocker_states=sleeping", "blocker_states", "idle in transaction"),
        (
            "-c pgmigrate.retry_max_delay=0 -c pgmigrate.retry_delay=1",
            "retry_max_delay",
            ">= retry_delay (1s)",
        ),
        ("-c pgmigrate.retry_delay=20", "retry_delay", "<= retry_max_delay (5s)"),
    ],
)
def test_bad_values_are_refused(options: str, name: str, allowed: str) -> None:
    with pytest.raises(OptionError) as caught:
        with_options(BASE, options)
    assert caught.value.name == name
    assert f'parameter "pgmigrate.{name}"' in str(caught.value)
    assert allowed in caught.value.allowed


def test_applied_keeps_the_proxy_settings_on_a_bad_value(caplog: pytest.LogCaptureFixture) -> None:
    assert applied(BASE, "-c pgmigrate.watch_interval=0.000001") == BASE
    assert "ignoring session options" in caplog.text


def test_unknown_names_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    assert with_options(BASE, "-c pgmigrate.unknown=1 -c pgmigrate.role=migrate") == BASE
    assert "ignoring unknown session option pgmigrate.unknown" in caplog.text


def test_no_budget() -> None:
    assert math.isinf(with_options(BASE, "-c pgmigrate.lock_budget=none").schedule.budget)


@pytest.mark.parametrize(
    ("text", "value"),
    [("5", 5.0), ("5s", 5.0), ("250ms", 0.25), ("2min", 120.0), ("0.5", 0.5), ("1h", 3600.0)],
)
def test_durations(text: str, value: float) -> None:
    assert with_options(BASE, f"-c pgmigrate.max_hold={text}").max_hold == value


def test_schedule_options_are_checked_together() -> None:
    short = with_options(BASE, "-c pgmigrate.lock_timeout=5ms")
    assert short.schedule.lock_timeout == 0.005  # below the default shortest attempt: allowed
    both = "-c pgmigrate.retry_delay=20 -c pgmigrate.retry_max_delay=30"
    assert with_options(BASE, both).schedule.base_delay == 20.0  # over the default max: with it


def test_the_defaults_are_the_proxys() -> None:
    """GuardSettings() and RetrySchedule() start from the settings schema's defaults."""
    from pgmigrate_proxy.config import Config
    from pgmigrate_proxy.runtime.server import guard_settings

    assert guard_settings(Config()) == BASE


# --- through a running proxy ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "allowed"),
    [
        ("watch_interval=0.000001", "from 10ms to 1min"),
        ("lock_timeout=1e308", "from 1ms to 7d"),
        ("lock_timeout=nan", "from 1ms to 7d"),
        ("max_hold=-1", "from 1ms to 1d"),
    ],
)
def test_a_bad_option_refuses_the_session(proxy: RunningProxy, option: str, allowed: str) -> None:
    conninfo = proxy.conninfo("u_trust", connect_timeout="10")
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(conninfo, options=f"-c pgmigrate.{option}")
    name = option.split("=")[0]
    assert f'invalid value for parameter "pgmigrate.{name}"' in str(caught.value)
    assert allowed in str(caught.value)
    with psycopg.connect(conninfo, options="-c pgmigrate.watch_interval=20ms") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the proxy serves the next one


def test_the_refusal_is_22023(proxy: RunningProxy) -> None:
    """PostgreSQL's invalid_parameter_value, as a FATAL before authentication, on raw asyncpg."""
    import asyncio

    import asyncpg

    async def attempt() -> str:
        try:
            await asyncpg.connect(
                host=proxy.host,
                port=proxy.port,
                user="u_trust",
                database="postgres",
                server_settings={"options": "-c pgmigrate.lock_timeout=1e308"},
                ssl=False,
            )
        except asyncpg.PostgresError as exc:
            return str(exc.sqlstate)
        return "connected"

    assert asyncio.run(attempt()) == "22023"
