"""Maps a blocking action's django-pglock queryset filters onto the proxy's blocker filters.

`pgmigrate.Terminate(blocking_activity__duration__gte="5 seconds")` filters the blockers by
django-pgactivity's fields; the proxy filters them itself (min_query_age, blocker_states,
application_names). A lookup without an equivalent is reported by name (a system check
error) rather than silently dropped.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable, Iterable, Mapping

from pgmigrate_proxy.settings import BLOCKER_STATES

_UNITS: dict[str, float] = {
    "us": 1e-6, "usec": 1e-6, "usecs": 1e-6, "microsecond": 1e-6, "microseconds": 1e-6,
    "ms": 1e-3, "msec": 1e-3, "msecs": 1e-3, "millisecond": 1e-3, "milliseconds": 1e-3,
    "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
    "m": 60.0, "min": 60.0, "mins": 60.0, "minute": 60.0, "minutes": 60.0,
    "h": 3600.0, "hr": 3600.0, "hrs": 3600.0, "hour": 3600.0, "hours": 3600.0,
    "d": 86400.0, "day": 86400.0, "days": 86400.0,
    "w": 604800.0, "week": 604800.0, "weeks": 604800.0,
}  # fmt: skip
_PART = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-z]*)\s*", re.IGNORECASE)
_CLOCK = re.compile(r"\s*(?:([0-9]+):)?([0-9]+):([0-9]+(?:\.[0-9]*)?)\s*")


class Unmappable(ValueError):
    """A filter the proxy cannot apply; str() says which and why."""


def interval(value: object) -> float:
    """Seconds from a timedelta, a number of seconds, or a PostgreSQL-style interval text
    ("5 seconds", "500ms", "1 minute 30 seconds", "00:00:05")."""
    if isinstance(value, dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _interval_text(value)
    else:
        raise ValueError(f"not a duration: {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"not a non-negative duration: {value!r}")
    return seconds


def _interval_text(text: str) -> float:
    clock = _CLOCK.fullmatch(text)
    if clock is not None:
        hours, minutes, seconds = clock.groups()
        return int(hours or 0) * 3600.0 + int(minutes) * 60.0 + float(seconds)
    total, position = 0.0, 0
    while position < len(text):
        part = _PART.match(text, position)
        if part is None or part.end() == position:
            raise ValueError(f"not an interval: {text!r}")
        unit = (part.group(2) or "s").lower()
        if unit not in _UNITS:
            raise ValueError(f"unknown unit {part.group(2)!r} in {text!r}")
        total += float(part.group(1)) * _UNITS[unit]
        position = part.end()
    if position == 0:
        raise ValueError(f"not an interval: {text!r}")
    return total


def _state(value: object) -> str:
    name = " ".join(str(value).lower().replace("_", " ").split()) if isinstance(value, str) else ""
    name = name.replace("( aborted)", "(aborted)").replace("(aborted )", "(aborted)")
    if name not in BLOCKER_STATES:  # (django-pgactivity's ACTIVE, IDLE_IN_TRANSACTION, ...)
        raise ValueError(f"unknown state {value!r}")
    return name


def glob_literal(name: str) -> str:
    """`name` as a glob pattern that matches only itself."""
    if "," in name:
        raise ValueError(f"{name!r} has a comma, which the proxy's lists cannot carry")
    return re.sub(r"([*?\[])", r"[\1]", name)


def _strings(value: object) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError(f"not a list of strings: {value!r}")
    items = list(value)
    if not items or not all(isinstance(item, str) for item in items):
        raise ValueError(f"not a list of strings: {value!r}")
    return items


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"not a string: {value!r}")
    return value


Lookup = Callable[[object], tuple[str, object]]


def _names(shape: Callable[[str], str]) -> Lookup:
    return lambda value: ("application_names", (shape(glob_literal(_text(value))),))


_LOOKUPS: dict[str, Lookup] = {
    "duration__gte": lambda value: ("min_query_age", interval(value)),
    "duration__gt": lambda value: ("min_query_age", interval(value)),
    "state": lambda value: ("blocker_states", (_state(value),)),
    "state__exact": lambda value: ("blocker_states", (_state(value),)),
    "state__iexact": lambda value: ("blocker_states", (_state(value),)),
    "state__in": lambda value: ("blocker_states", tuple(_state(v) for v in _strings(value))),
    "application_name": _names(lambda name: name),
    "application_name__exact": _names(lambda name: name),
    "application_name__startswith": _names(lambda name: name + "*"),
    "application_name__endswith": _names(lambda name: "*" + name),
    "application_name__contains": _names(lambda name: "*" + name + "*"),
    "application_name__in": lambda value: (
        "application_names",
        tuple(glob_literal(name) for name in _strings(value)),
    ),
}
_PREFIX = "blocking_activity__"

#: The lookups the proxy can apply, for messages.
SUPPORTED = tuple(_PREFIX + lookup for lookup in _LOOKUPS)


def translate(filters: Mapping[str, object]) -> tuple[dict[str, object], list[str]]:
    """The proxy values (Config keys) for a blocking action's filters, and the problems: one
    line for each lookup that cannot be mapped, or whose value is not allowed."""
    values: dict[str, object] = {}
    origin: dict[str, str] = {}
    problems: list[str] = []
    for lookup, value in filters.items():
        handler = _LOOKUPS.get(lookup.removeprefix(_PREFIX)) if lookup.startswith(_PREFIX) else None
        if handler is None:
            problems.append(f"{lookup}: the proxy has no equivalent filter")
            continue
        try:
            key, mapped = handler(value)
        except ValueError as exc:
            problems.append(f"{lookup}: {exc}")
            continue
        if key in values:
            problems.append(f"{lookup}: {key} is already set by {origin[key]}")
            continue
        values[key], origin[key] = mapped, lookup
    return values, problems
