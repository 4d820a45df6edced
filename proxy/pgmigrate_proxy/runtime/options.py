"""A session's own guard settings: `-c pgmigrate.<name>=<value>` in its startup options.

Any libpq client can send them (the `options` connection parameter, or PGOPTIONS), and
PostgreSQL accepts such dotted names as custom settings, so they are harmless when
forwarded. The Django app sends its PGMIGRATE_* settings this way to an external proxy.
Values are parsed and range-checked by the settings schema (pgmigrate_proxy.settings), as the
proxy's own configuration is: durations in seconds or with a unit (`50ms`, `5s`, `2min`), lists
comma-separated (a space inside a value is written `\\ `, as libpq wants). A value not allowed
refuses the session at startup (22023 invalid_parameter_value, naming the option and what it
takes); an unknown pgmigrate.* name is logged and ignored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from pgmigrate_proxy.guard.blockers import BackendState
from pgmigrate_proxy.guard.drain import DrainThen
from pgmigrate_proxy.guard.policy import BlockingAction
from pgmigrate_proxy.protocol.sqlstate import SqlState
from pgmigrate_proxy.runtime.guarding import GuardSettings
from pgmigrate_proxy.settings import SESSION_NAMES, SETTINGS, Rejected, format_duration

log = logging.getLogger("pgmigrate_proxy.session")

Apply = Callable[[GuardSettings, Any], GuardSettings]
#: The SQLSTATE of a refused option, as PostgreSQL answers a bad `-c name=value`.
INVALID_PARAMETER_VALUE = SqlState.INVALID_PARAMETER_VALUE
_SHOWN = 64  # characters of a refused value repeated in the error


class OptionError(ValueError):
    """A session option with a value not allowed; str() is the error the client gets."""

    def __init__(self, name: str, value: str, allowed: str) -> None:
        shown = value if len(value) <= _SHOWN else value[:_SHOWN] + "..."
        super().__init__(
            f'invalid value for parameter "pgmigrate.{name}": "{shown}" (allowed: {allowed})'
        )
        self.name = name
        self.allowed = allowed


def with_options(settings: GuardSettings, options: str) -> GuardSettings:
    """`settings` with the session's pgmigrate.* startup options applied; raises OptionError
    for a value not allowed."""
    schedule: dict[str, float] = {}  # checked together: they constrain each other
    given: dict[str, str] = {}
    for name, value in parse(options):
        if name not in SESSION_NAMES:
            if name != "role":
                log.warning("ignoring unknown session option pgmigrate.%s", name)
            continue
        try:
            parsed = SETTINGS[name].parse(value)
        except Rejected as exc:
            raise OptionError(name, value, str(exc) or SETTINGS[name].allowed) from None
        given[name] = value
        if name in _SCHEDULE:
            schedule[_SCHEDULE[name]] = math.inf if parsed is None else parsed
        else:
            settings = _APPLY[name](settings, parsed)
    return _with_schedule(settings, schedule, given) if schedule else settings


def applied(settings: GuardSettings, options: str) -> GuardSettings:
    """with_options, but a value not allowed (checked at startup already) is logged and the
    proxy's settings kept."""
    try:
        return with_options(settings, options)
    except OptionError as exc:
        log.warning("ignoring session options: %s", exc)
        return settings


def _with_schedule(
    settings: GuardSettings, changes: dict[str, float], given: dict[str, str]
) -> GuardSettings:
    current = settings.schedule
    timeout = changes.get("lock_timeout", current.lock_timeout)
    budget = changes.get("budget", current.budget)
    delay = changes.get("base_delay", current.base_delay)
    most = changes.get("max_delay", current.max_delay)
    if most < delay:
        if "retry_max_delay" in given or "retry_delay" not in given:
            allowed = f"a duration >= retry_delay ({format_duration(delay)})"
            raise OptionError("retry_max_delay", given.get("retry_max_delay", ""), allowed)
        allowed = f"a duration <= retry_max_delay ({format_duration(most)})"
        raise OptionError("retry_delay", given["retry_delay"], allowed)
    shortest = min(current.min_attempt, timeout, budget)
    return replace(settings, schedule=replace(current, **changes, min_attempt=shortest))


def parse(options: str) -> Iterable[tuple[str, str]]:
    """The (name, value) pairs of the pgmigrate.* settings in a startup `options` string."""
    words = options.replace("\\ ", "\0").split()
    for index, word in enumerate(words):
        setting = None
        if word == "-c" and index + 1 < len(words):
            setting = words[index + 1]
        elif (word.startswith("-c") and len(word) > 2) or word.startswith("--"):
            setting = word[2:]
        if setting and setting.startswith("pgmigrate.") and "=" in setting:
            name, _, value = setting[len("pgmigrate.") :].partition("=")
            yield name.replace("-", "_"), value.replace("\0", " ")


def _states(names: tuple[str, ...]) -> frozenset[BackendState]:
    return frozenset(BackendState(name) for name in names)


def _setting(field: str, convert: Callable[[Any], Any] = lambda v: v) -> Apply:
    return lambda settings, value: replace(settings, **{field: convert(value)})


def _filter(field: str, convert: Callable[[Any], Any] = lambda v: v) -> Apply:
    return lambda settings, value: replace(
        settings, filters=replace(settings.filters, **{field: convert(value)})
    )


#: Options that set the retry schedule: the RetrySchedule field of each.
_SCHEDULE: dict[str, str] = {
    "lock_timeout": "lock_timeout",
    "lock_budget": "budget",
    "retry_delay": "base_delay",
    "retry_max_delay": "max_delay",
}

#: The other options: how each applies its parsed value.
_APPLY: dict[str, Apply] = {
    "blocking_action": _setting("action", BlockingAction),
    "max_hold": _setting("max_hold"),
    "watch_interval": _setting("watch_interval"),
    "cancel_grace": _setting("cancel_grace"),
    "drain_timeout": lambda settings, value: replace(
        settings, drain=replace(settings.drain, timeout=value)
    ),
    "drain_then": lambda settings, value: replace(
        settings, drain=replace(settings.drain, then=DrainThen(value))
    ),
    "report_events": _setting("report_events"),
    "migration_lock": _setting("migration_lock"),
    "migration_lock_timeout": _setting("migration_lock_timeout"),
    "min_transaction_age": _filter("min_transaction_age"),
    "min_query_age": _filter("min_query_age"),
    "blocker_states": _filter("states", _states),
    "application_names": _filter("application_names"),
    "exclude_application_names": _filter("exclude_application_names"),
    "users": _filter("users"),
    "exclude_users": _filter("exclude_users"),
}
assert set(_APPLY) | set(_SCHEDULE) == set(SESSION_NAMES), "every session option applies"

#: The option names a session may send (besides `role`).
NAMES = frozenset(SESSION_NAMES)
