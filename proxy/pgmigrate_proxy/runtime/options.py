"""A session's own guard settings: `-c pgmigrate.<name>=<value>` in its startup options.

Any libpq client can send them (the `options` connection parameter, or PGOPTIONS), and
PostgreSQL accepts such dotted names as custom settings, so they are harmless when
forwarded. The Django app sends its PGMIGRATE_* settings this way to an external proxy.
Times are seconds, or with an `ms` / `s` suffix; lists are comma-separated (a space inside
a value is written `\\ `, as libpq wants). A bad value is logged and the option ignored.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from pgmigrate_proxy.guard.blockers import BackendState
from pgmigrate_proxy.guard.policy import BlockingAction
from pgmigrate_proxy.runtime.guarding import GuardSettings

log = logging.getLogger("pgmigrate_proxy.session")

Apply = Callable[[GuardSettings, str], GuardSettings]


def with_options(settings: GuardSettings, options: str) -> GuardSettings:
    """`settings` with the session's pgmigrate.* startup options applied."""
    schedule: dict[str, float] = {}  # checked together: they constrain each other
    for name, value in parse(options):
        try:
            if name in _SCHEDULE:
                field, convert = _SCHEDULE[name]
                schedule[field] = convert(value)
            elif name in _APPLY:
                settings = _APPLY[name](settings, value)
            elif name != "role":
                log.warning("ignoring unknown session option pgmigrate.%s", name)
        except ValueError as exc:
            log.warning("ignoring session option pgmigrate.%s=%r: %s", name, value, exc)
    return _with_schedule(settings, schedule) if schedule else settings


def _with_schedule(settings: GuardSettings, changes: dict[str, float]) -> GuardSettings:
    current = settings.schedule
    timeout = changes.get("lock_timeout", current.lock_timeout)
    budget = changes.get("budget", current.budget)
    shortest = min(current.min_attempt, timeout, budget)
    try:
        schedule = replace(current, **changes, min_attempt=shortest)
    except ValueError as exc:
        log.warning("ignoring session options %s: %s", sorted(changes), exc)
        return settings
    return replace(settings, schedule=schedule)


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


def seconds(text: str, *, zero: bool = False) -> float:
    """A time in seconds from `5`, `5s`, `250ms`; zero allowed only when asked."""
    text = text.strip().lower()
    ms = text.endswith("ms")
    value = float(text[:-2]) / 1000 if ms else float(text.removesuffix("s"))
    if math.isnan(value) or math.isinf(value) or value < 0 or (value == 0 and not zero):
        raise ValueError(f"not a {'non-negative' if zero else 'positive'} time: {text!r}")
    return value


def _names(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _states(text: str) -> frozenset[BackendState]:
    states = set()
    for name in _names(text):
        state = BackendState.parse(name)
        if state is None:
            raise ValueError(f"unknown state {name!r}")
        states.add(state)
    return frozenset(states)


def _budget(value: str) -> float:
    return math.inf if value.strip().lower() in ("", "none", "0") else seconds(value)


def _setting(field: str, convert: Callable[[str], Any]) -> Apply:
    return lambda settings, value: replace(settings, **{field: convert(value)})


def _filter(field: str, convert: Callable[[str], Any]) -> Apply:
    return lambda settings, value: replace(
        settings, filters=replace(settings.filters, **{field: convert(value)})
    )


#: Options that set the retry schedule: (RetrySchedule field, parser).
_SCHEDULE: dict[str, tuple[str, Callable[[str], float]]] = {
    "lock_timeout": ("lock_timeout", seconds),
    "lock_budget": ("budget", _budget),
    "retry_delay": ("base_delay", lambda v: seconds(v, zero=True)),
    "retry_max_delay": ("max_delay", lambda v: seconds(v, zero=True)),
}

_APPLY: dict[str, Apply] = {
    "blocking_action": _setting("action", lambda v: BlockingAction(v.strip().lower())),
    "max_hold": _setting("max_hold", seconds),
    "watch_interval": _setting("watch_interval", seconds),
    "cancel_grace": _setting("cancel_grace", lambda v: seconds(v, zero=True)),
    "min_transaction_age": _filter("min_transaction_age", lambda v: seconds(v, zero=True)),
    "min_query_age": _filter("min_query_age", lambda v: seconds(v, zero=True)),
    "blocker_states": _filter("states", _states),
    "application_names": _filter("application_names", _names),
    "exclude_application_names": _filter("exclude_application_names", _names),
    "users": _filter("users", _names),
    "exclude_users": _filter("exclude_users", _names),
}

#: The option names a session may send (besides `role`).
NAMES = frozenset(_APPLY) | frozenset(_SCHEDULE)
