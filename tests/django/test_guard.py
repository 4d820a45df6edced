"""From PGMIGRATE_* settings to the proxy's guard options: filters, intervals, the Plan."""

from __future__ import annotations

import datetime as dt

import pgmigrate
import pytest
from pgmigrate import filters, guard
from pgmigrate_proxy.config import Config
from pgmigrate_proxy.embedded_proxy import SESSION_OPTIONS
from pgmigrate_proxy.runtime.guarding import GuardSettings
from pgmigrate_proxy.runtime.options import parse, with_options
from pytest_django.fixtures import Settings as SettingsWrapper


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("5 seconds", 5.0),
        ("5s", 5.0),
        ("500ms", 0.5),
        ("1 minute 30 seconds", 90.0),
        ("2 hours", 7200.0),
        ("1 day", 86400.0),
        ("00:00:05", 5.0),
        ("01:02:03.5", 3723.5),
        (" 7 ", 7.0),
        (dt.timedelta(milliseconds=250), 0.25),
        (3, 3.0),
    ],
)
def test_interval(value: object, seconds: float) -> None:
    assert filters.interval(value) == seconds


@pytest.mark.parametrize("value", ["", "five seconds", "5 fortnights", "-1 s", True, None, "1:"])
def test_interval_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        filters.interval(value)


@pytest.mark.parametrize(
    ("lookups", "values"),
    [
        ({"blocking_activity__duration__gte": "5 seconds"}, {"min_query_age": 5.0}),
        ({"blocking_activity__duration__gt": dt.timedelta(seconds=2)}, {"min_query_age": 2.0}),
        ({"blocking_activity__state": "ACTIVE"}, {"blocker_states": ("active",)}),
        (
            {"blocking_activity__state__in": ["IDLE_IN_TRANSACTION", "idle in transaction"]},
            {"blocker_states": ("idle in transaction", "idle in transaction")},
        ),
        (
            {"blocking_activity__state": "IDLE_IN_TRANSACTION_(ABORTED)"},
            {"blocker_states": ("idle in transaction (aborted)",)},
        ),
        ({"blocking_activity__application_name": "web"}, {"application_names": ("web",)}),
        ({"blocking_activity__application_name": "w*b"}, {"application_names": ("w[*]b",)}),
        (
            {"blocking_activity__application_name__startswith": "celery"},
            {"application_names": ("celery*",)},
        ),
        (
            {"blocking_activity__application_name__contains": "cron"},
            {"application_names": ("*cron*",)},
        ),
        (
            {"blocking_activity__application_name__in": ["a", "b"]},
            {"application_names": ("a", "b")},
        ),
    ],
)
def test_translate(lookups: dict[str, object], values: dict[str, object]) -> None:
    assert filters.translate(lookups) == (values, [])


def test_translate_names_what_it_cannot_map() -> None:
    assert filters.translate(
        {
            "blocking_activity__duration__lte": "1 s",
            "blocking_activity__state": "ACTIVE",
            "blocking_activity__state__in": ["IDLE"],
            "blocking_activity__application_name": "a,b",
            "activity__query__contains": "x",
        }
    ) == (
        {"blocker_states": ("active",)},
        [
            "blocking_activity__duration__lte: the proxy has no equivalent filter",
            "blocking_activity__state__in: blocker_states is already set by "
            "blocking_activity__state",
            "blocking_activity__application_name: 'a,b' has a comma, which the proxy's "
            "lists cannot carry",
            "activity__query__contains: the proxy has no equivalent filter",
        ],
    )


def test_default_plan() -> None:
    plan = guard.plan()
    assert plan == guard.Plan(
        action=plan.action,
        proxy_mode="auto",
        autocommit=True,
        interval=1.0,
        guard={"blocking_action": "terminate"},
    )
    assert type(plan.action) is pgmigrate.Terminate
    assert not plan.worker
    assert not plan.shows_blockers
    assert plan.session_options() == (
        "-c pgmigrate.role=migrate -c pgmigrate.blocking_action=terminate"
    )


def test_plan_with_everything(settings: SettingsWrapper) -> None:
    settings.PGMIGRATE_BLOCKING_ACTION = pgmigrate.Cancel(
        blocking_activity__duration__gte="5 seconds",
        blocking_activity__state__in=["ACTIVE", "IDLE_IN_TRANSACTION"],
    )
    settings.PGMIGRATE_LOCK_TIMEOUT = dt.timedelta(seconds=30)
    settings.PGMIGRATE_ATTEMPT_TIMEOUT = dt.timedelta(milliseconds=200)
    settings.PGMIGRATE_RETRY_DELAY = dt.timedelta(seconds=8)
    settings.PGMIGRATE_MAX_HOLD = 3
    settings.PGMIGRATE_MIN_TRANSACTION_AGE = 1
    settings.PGMIGRATE_EXCLUDE_USERS = ["replicator"]
    settings.PGMIGRATE_AUTOCOMMIT = False
    plan = guard.plan()
    assert plan.guard == {
        "blocking_action": "cancel",
        "lock_budget": 30.0,
        "lock_timeout": 0.2,
        "retry_max_delay": 8.0,  # a lone retry_delay over the proxy's max raises the max
        "retry_delay": 8.0,
        "max_hold": 3.0,
        "min_transaction_age": 1.0,
        "exclude_users": ("replicator",),
        "min_query_age": 5.0,
        "blocker_states": ("active", "idle in transaction"),
    }
    assert plan.session_options() == (
        "-c pgmigrate.role=transactional -c pgmigrate.blocking_action=cancel "
        "-c pgmigrate.lock_budget=30.0 -c pgmigrate.lock_timeout=0.2 "
        "-c pgmigrate.retry_max_delay=8.0 -c pgmigrate.retry_delay=8.0 "
        "-c pgmigrate.max_hold=3.0 -c pgmigrate.min_transaction_age=1.0 "
        "-c pgmigrate.exclude_users=replicator -c pgmigrate.min_query_age=5.0 "
        "-c pgmigrate.blocker_states=active,idle\\ in\\ transaction"
    )
    # The proxy reads them back as they were meant, and so does its Config.
    assert {name for name, _ in parse(plan.session_options())} <= SESSION_OPTIONS
    settings_seen = with_options(GuardSettings(), plan.session_options())
    assert (
        settings_seen.filters.states
        == Config(blocker_states=("active", "idle in transaction")).guard_filters().states
    )
    assert settings_seen.schedule == Config(**plan.guard).retry_schedule()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("action", "budget", "expected"),
    [
        (pgmigrate.Show, None, {"blocking_action": "show", "lock_timeout": guard.LONG_ATTEMPT}),
        (
            pgmigrate.Show,
            dt.timedelta(seconds=5),
            {"blocking_action": "show", "lock_budget": 5.0, "lock_timeout": 5.0},
        ),
        (None, None, {"blocking_action": "none"}),
    ],
)
def test_show_waits_in_the_lock_queue(
    settings: SettingsWrapper, action: object, budget: object, expected: dict[str, object]
) -> None:
    settings.PGMIGRATE_BLOCKING_ACTION = action
    settings.PGMIGRATE_LOCK_TIMEOUT = budget
    settings.PGMIGRATE_ATTEMPT_TIMEOUT = 0.1  # for the proxy's actions other than show
    expected = {**expected, "lock_timeout": expected.get("lock_timeout", 0.1)}
    plan = guard.plan()
    assert plan.guard == expected
    assert plan.shows_blockers


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        (pgmigrate.Drain, {"drain_timeout": 2.0, "drain_then": "terminate"}),
        ("drain", {"drain_timeout": 2.0, "drain_then": "terminate"}),
        (
            pgmigrate.Drain(timeout="500ms", then=pgmigrate.Cancel),
            {"drain_timeout": 0.5, "drain_then": "cancel"},
        ),
        (
            pgmigrate.Drain(timeout=dt.timedelta(seconds=3), then=None),
            {"drain_timeout": 3.0, "drain_then": "give_up"},
        ),
        (
            pgmigrate.Drain(then=pgmigrate.Terminate(), blocking_activity__state="ACTIVE"),
            {"drain_timeout": 2.0, "drain_then": "terminate", "blocker_states": ("active",)},
        ),
    ],
)
def test_drain(settings: SettingsWrapper, action: object, expected: dict[str, object]) -> None:
    settings.PGMIGRATE_BLOCKING_ACTION = action
    plan = guard.plan()
    assert plan.guard == {"blocking_action": "drain", **expected}
    assert not plan.worker and not plan.shows_blockers
    seen = with_options(GuardSettings(), plan.session_options())
    assert (seen.drain.timeout, seen.drain.then.value) == (
        expected["drain_timeout"],
        expected["drain_then"],
    )


@pytest.mark.parametrize(
    ("action", "message"),
    [
        (pgmigrate.Drain(timeout="soon"), "Drain's timeout must be a datetime.timedelta"),
        (pgmigrate.Drain(timeout=0), "Drain's timeout must be from 1ms to 1d"),
        (pgmigrate.Drain(then=pgmigrate.Show), "Drain's then must be pgmigrate.Terminate"),
    ],
)
def test_drain_refuses_bad_arguments(
    settings: SettingsWrapper, action: object, message: str
) -> None:
    settings.PGMIGRATE_BLOCKING_ACTION = action
    with pytest.raises(guard.Invalid) as info:
        guard.plan()
    assert info.value.check_id == "pgmigrate.E003"
    assert message in str(info.value)


class Custom(pgmigrate.BlockingAction):
    def worker(self, cmd: object, blocking_locks: object) -> list[int]:
        return []


class Quiet(pgmigrate.Terminate):
    """A subclass keeping Terminate's worker: still the proxy's job."""


def test_custom_actions_run_in_a_worker(settings: SettingsWrapper) -> None:
    settings.PGMIGRATE_BLOCKING_ACTION = Custom(mode="ACCESS_SHARE")
    plan = guard.plan()
    assert plan.worker
    assert not plan.shows_blockers
    assert plan.guard == {"blocking_action": "none", "lock_timeout": guard.LONG_ATTEMPT}
    settings.PGMIGRATE_BLOCKING_ACTION = Quiet
    assert not guard.plan().worker
    assert guard.plan().guard == {"blocking_action": "terminate"}


def test_plan_refuses_bad_settings(settings: SettingsWrapper) -> None:
    settings.PGMIGRATE_LOCK_TIMEOUT = "soon"
    with pytest.raises(guard.Invalid) as info:
        guard.plan()
    assert info.value.check_id == "pgmigrate.E006"
    assert str(info.value) == (
        "PGMIGRATE_LOCK_TIMEOUT: must be a datetime.timedelta, a number of seconds or a duration "
        "such as '5s'"
    )


def test_option_text() -> None:
    assert guard.option_text(("a b", "c")) == "a\\ b,c"
    assert guard.option_text(0.05) == "0.05"
    assert guard.option_text("x\\y") == "x\\\\y"


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("50ms", 0.05), ("5s", 5.0), ("2min", 120.0), (dt.timedelta(seconds=3), 3.0), (7, 7.0)],
)
def test_durations_as_the_proxy_takes_them(
    settings: SettingsWrapper, value: object, seconds: float
) -> None:
    settings.PGMIGRATE_ATTEMPT_TIMEOUT = value
    settings.PGMIGRATE_MAX_HOLD = value
    got = guard.plan().guard
    assert (got["lock_timeout"], got["max_hold"]) == (seconds, seconds)


def test_the_proxy_defaults_and_ranges_are_the_schemas() -> None:
    from pgmigrate_proxy.embedded_proxy import SETTINGS

    assert Config().retry_max_delay == guard.DEFAULT_RETRY_MAX_DELAY
    assert SETTINGS["lock_timeout"].parse(guard.LONG_ATTEMPT) == guard.LONG_ATTEMPT
    for name, key in guard.PROXY_KEYS.items():
        high = SETTINGS[key].high
        assert high is not None
        validate = next(s.validate for s in guard.SETTINGS if s.name == name)
        assert validate(high) == high
        with pytest.raises(ValueError, match="must be from"):
            validate(high * 2)


def test_the_readme_says_the_proxys_defaults() -> None:
    """The Django settings table's "(proxy: ...)" are the schema's defaults."""
    from pathlib import Path

    from pgmigrate_proxy.embedded_proxy import SETTINGS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for name, key in guard.PROXY_KEYS.items():
        default = SETTINGS[key].shown_default()
        if key == "lock_budget":
            continue  # None there is "no limit", said in words
        row = next(line for line in readme.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"(proxy: {default})" in row, row
