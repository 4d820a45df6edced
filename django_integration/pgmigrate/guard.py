"""The PGMIGRATE_* settings validated, and what they ask of the proxy's guard (a Plan).

Every setting has a validator and the id of the system check that reports it; the checks and
the migrate command read the settings through the same table, so a setting the checks accept
is a setting the command can run with.
"""

from __future__ import annotations

import datetime as dt
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from pgmigrate_proxy.embedded_proxy import SETTINGS as PROXY_SETTINGS
from pgmigrate_proxy.embedded_proxy import Rejected, format_duration, parse_duration

from pgmigrate import actions, conf, filters

#: Per-attempt lock_timeout for Show and custom actions when no budget is set: the statement
#: waits in PostgreSQL's lock queue (as in 1.x) for up to a day per attempt.
LONG_ATTEMPT = 86400.0
#: The proxy's default retry_max_delay, for a lone retry_delay.
DEFAULT_RETRY_MAX_DELAY: float = PROXY_SETTINGS["retry_max_delay"].default
#: PGMIGRATE_BLOCKING_ACTION_INTERVAL's range (a Django-side setting: the proxy has none).
INTERVAL_RANGE = (0.001, 86400.0)
#: The PGMIGRATE_* duration settings that set a proxy setting: its range and default apply.
PROXY_KEYS = {
    "PGMIGRATE_LOCK_TIMEOUT": "lock_budget",
    "PGMIGRATE_ATTEMPT_TIMEOUT": "lock_timeout",
    "PGMIGRATE_RETRY_DELAY": "retry_delay",
    "PGMIGRATE_RETRY_MAX_DELAY": "retry_max_delay",
    "PGMIGRATE_MAX_HOLD": "max_hold",
    "PGMIGRATE_MIN_TRANSACTION_AGE": "min_transaction_age",
}
DURATION_FORMS = "must be a datetime.timedelta, a number of seconds or a duration such as '5s'"
#: The session option that marks a migration session, and its two values.
ROLE = "role"
ROLE_MIGRATE = "migrate"
ROLE_TRANSACTIONAL = "transactional"


#: The longest PGMIGRATE_MIGRATE_LOCK_TIMEOUT: a week.
MIGRATE_LOCK_MAX = 7 * 24 * 3600.0


class Invalid(ValueError):
    """A setting with a value not allowed: the check id and the message."""

    def __init__(self, check_id: str, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.check_id = check_id
        self.setting = setting
        self.message = message


def seconds(value: object, *, optional: bool, low: float, high: float) -> float | None:
    """A duration setting: a timedelta, a number of seconds or a duration text such as `50ms`,
    `5s`, `2min` (the proxy's parser), from `low` to `high` seconds (None when optional)."""
    if value is None and optional:
        return None
    if isinstance(value, dt.timedelta):
        value = value.total_seconds()
    try:
        number = parse_duration(value)
    except Rejected:
        raise ValueError(DURATION_FORMS) from None
    if not low <= number <= high:
        raise ValueError(f"must be from {format_duration(low)} to {format_duration(high)}")
    return number


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be True or False")
    return value


def choice(value: object) -> str:
    if value not in conf.PROXY_MODES:
        raise ValueError("must be one of " + ", ".join(repr(mode) for mode in conf.PROXY_MODES))
    return str(value)


def patterns(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ValueError("must be a list of glob patterns")
    items = tuple(value)
    if not all(isinstance(item, str) and item and "," not in item for item in items):
        raise ValueError("must be a list of non-empty glob patterns without commas")
    return items


#: The string names PGMIGRATE_BLOCKING_ACTION accepts (the proxy's own spelling of
#: blocking_action), each with the action it stands for.
ACTION_NAMES: dict[str, type[actions.BlockingAction] | None] = {
    "terminate": actions.Terminate,
    "cancel": actions.Cancel,
    "show": actions.Show,
    "drain": actions.Drain,
    "none": None,
}


def blocking_action(value: object) -> actions.BlockingAction | None:
    """None, a pgmigrate.BlockingAction subclass (instantiated) or instance, or one of the
    names "terminate", "cancel", "show", "none" (any case, or as "pgmigrate.Terminate")."""
    if isinstance(value, str):
        name = value.strip().lower().removeprefix("pgmigrate.")
        if name in ACTION_NAMES:
            action = ACTION_NAMES[name]
            return None if action is None else action()
    if inspect.isclass(value) and issubclass(value, actions.BlockingAction):
        value = value()
    if isinstance(value, actions.Drain):
        drain_values(value)  # its timeout and then, checked
    if value is None or isinstance(value, actions.BlockingAction):
        return value
    raise ValueError(
        "must be None, pgmigrate.Terminate, pgmigrate.Show, pgmigrate.Cancel, pgmigrate.Drain, a "
        "pgmigrate.BlockingAction subclass or instance, or one of "
        + ", ".join(repr(name) for name in ACTION_NAMES)
        + f" (got {value!r})"
    )


def drain_values(action: actions.Drain) -> dict[str, object]:
    """A Drain's drain_timeout and drain_then, checked (ValueError saying what is wrong)."""
    setting = PROXY_SETTINGS["drain_timeout"]
    assert setting.low is not None and setting.high is not None
    try:
        timeout = seconds(action.timeout, optional=False, low=setting.low, high=setting.high)
    except ValueError as exc:
        raise ValueError(f"Drain's timeout {exc}") from None
    return {"drain_timeout": timeout, "drain_then": actions.drain_then(action.then)}


def _duration(name: str) -> Callable[[object], object]:
    """The validator of setting `name`: the range of the proxy setting it sets."""
    setting = PROXY_SETTINGS[PROXY_KEYS[name]]
    assert setting.low is not None and setting.high is not None
    low, high = setting.low, setting.high
    return lambda value: seconds(value, optional=True, low=low, high=high)


@dataclass(frozen=True)
class Setting:
    """One setting: its name, check id, reader and validator."""

    name: str
    check_id: str
    read: Callable[[], object]
    validate: Callable[[object], object]


SETTINGS: tuple[Setting, ...] = (
    Setting("PGMIGRATE_BLOCKING_ACTION", "pgmigrate.E003", conf.blocking_action, blocking_action),
    Setting(
        "PGMIGRATE_BLOCKING_ACTION_INTERVAL",
        "pgmigrate.E005",
        conf.blocking_action_interval,
        lambda value: seconds(value, optional=False, low=INTERVAL_RANGE[0], high=INTERVAL_RANGE[1]),
    ),
    Setting(
        "PGMIGRATE_LOCK_TIMEOUT",
        "pgmigrate.E006",
        conf.lock_timeout,
        _duration("PGMIGRATE_LOCK_TIMEOUT"),
    ),
    Setting("PGMIGRATE_PATCH_MIGRATE", "pgmigrate.E007", conf.patch_migrate, boolean),
    Setting("PGMIGRATE_PROXY", "pgmigrate.E008", conf.proxy, choice),
    Setting("PGMIGRATE_AUTOCOMMIT", "pgmigrate.E009", conf.autocommit, boolean),
    Setting(
        "PGMIGRATE_ATTEMPT_TIMEOUT",
        "pgmigrate.E010",
        conf.attempt_timeout,
        _duration("PGMIGRATE_ATTEMPT_TIMEOUT"),
    ),
    Setting(
        "PGMIGRATE_RETRY_DELAY",
        "pgmigrate.E011",
        conf.retry_delay,
        _duration("PGMIGRATE_RETRY_DELAY"),
    ),
    Setting(
        "PGMIGRATE_RETRY_MAX_DELAY",
        "pgmigrate.E012",
        conf.retry_max_delay,
        _duration("PGMIGRATE_RETRY_MAX_DELAY"),
    ),
    Setting("PGMIGRATE_MAX_HOLD", "pgmigrate.E013", conf.max_hold, _duration("PGMIGRATE_MAX_HOLD")),
    Setting(
        "PGMIGRATE_MIN_TRANSACTION_AGE",
        "pgmigrate.E014",
        conf.min_transaction_age,
        _duration("PGMIGRATE_MIN_TRANSACTION_AGE"),
    ),
    Setting("PGMIGRATE_USERS", "pgmigrate.E015", conf.users, patterns),
    Setting("PGMIGRATE_EXCLUDE_USERS", "pgmigrate.E016", conf.exclude_users, patterns),
    Setting(
        "PGMIGRATE_EXCLUDE_APPLICATION_NAMES",
        "pgmigrate.E017",
        conf.exclude_application_names,
        patterns,
    ),
    Setting(
        "PGMIGRATE_MIGRATE_LOCK_TIMEOUT",
        "pgmigrate.E018",
        conf.migrate_lock_timeout,
        lambda value: seconds(value, optional=True, low=0.0, high=MIGRATE_LOCK_MAX),
    ),
)
#: The check id for blocking-action filters that the proxy cannot apply.
UNMAPPABLE_FILTER = "pgmigrate.E004"


def read() -> tuple[dict[str, object], list[Invalid]]:
    """Every setting's validated value (by name), and what is wrong with the others."""
    values: dict[str, object] = {}
    problems: list[Invalid] = []
    for setting in SETTINGS:
        try:
            values[setting.name] = setting.validate(setting.read())
        except ValueError as exc:
            problems.append(Invalid(setting.check_id, setting.name, str(exc)))
    delay = values.get("PGMIGRATE_RETRY_DELAY")
    most = values.get("PGMIGRATE_RETRY_MAX_DELAY")
    if isinstance(delay, float) and isinstance(most, float) and most < delay:
        message = "must not be less than PGMIGRATE_RETRY_DELAY"
        problems.append(Invalid("pgmigrate.E012", "PGMIGRATE_RETRY_MAX_DELAY", message))
    action = values.get("PGMIGRATE_BLOCKING_ACTION")
    if isinstance(action, actions.BlockingAction) and actions.proxy_action(action):
        _, unmappable = filters.translate(action.filters)
        problems += [
            Invalid(UNMAPPABLE_FILTER, "PGMIGRATE_BLOCKING_ACTION", line) for line in unmappable
        ]
    return values, problems


@dataclass(frozen=True)
class Plan:
    """What migrate does: which proxy, which guard settings, and whether a worker thread runs."""

    action: actions.BlockingAction | None
    proxy_mode: str
    autocommit: bool
    interval: float
    guard: dict[str, object] = field(default_factory=dict)  # Config key -> value (set ones)
    migrate_lock_timeout: float | None = None  # None: wait for another migrate as long as it takes

    @property
    def worker(self) -> bool:
        """True for a custom BlockingAction: its worker runs in a thread, as in 1.x."""
        return self.action is not None and actions.proxy_action(self.action) is None

    @property
    def shows_blockers(self) -> bool:
        """Print "Blocked by ..." from the proxy's notices (not for custom workers)."""
        return not self.worker and self.guard.get("blocking_action") in ("show", "none")

    def session_options(self) -> str:
        """The `-c pgmigrate.<name>=<value>` startup options of the migration connection."""
        role = ROLE_MIGRATE if self.autocommit else ROLE_TRANSACTIONAL
        words = [f"-c pgmigrate.{ROLE}={role}"]
        words += [f"-c pgmigrate.{key}={option_text(value)}" for key, value in self.guard.items()]
        return " ".join(words)


def option_text(value: object) -> str:
    """A value as a session option wants it (libpq's `\\ ` for a space)."""
    if isinstance(value, tuple):
        value = ",".join(value)
    elif isinstance(value, float):
        value = repr(value)
    return str(value).replace("\\", "\\\\").replace(" ", "\\ ")


def plan() -> Plan:
    """The Plan of the current settings; raises Invalid for the first bad one."""
    values, problems = read()
    if problems:
        raise problems[0]
    action = values["PGMIGRATE_BLOCKING_ACTION"]
    assert action is None or isinstance(action, actions.BlockingAction)
    interval = values["PGMIGRATE_BLOCKING_ACTION_INTERVAL"]
    assert isinstance(interval, float)
    return Plan(
        action=action,
        proxy_mode=str(values["PGMIGRATE_PROXY"]),
        autocommit=bool(values["PGMIGRATE_AUTOCOMMIT"]),
        interval=interval,
        guard=guard_values(action, values),
        migrate_lock_timeout=_optional_float(values["PGMIGRATE_MIGRATE_LOCK_TIMEOUT"]),
    )


def _optional_float(value: object) -> float | None:
    assert value is None or isinstance(value, float)
    return value


def guard_values(
    action: actions.BlockingAction | None, values: dict[str, object]
) -> dict[str, object]:
    """The proxy's guard keys for the settings; None-valued settings are left to the proxy.

    Order matters to the proxy, which applies session options one by one: retry_max_delay
    goes before retry_delay, lock_budget before lock_timeout.
    """
    name = actions.proxy_action(action) if action is not None else "none"
    guard: dict[str, object] = {"blocking_action": name or "none"}
    budget = values["PGMIGRATE_LOCK_TIMEOUT"]
    if budget is not None:
        guard["lock_budget"] = budget
    if name in ("show", None):  # Show and custom workers: wait in the lock queue, as in 1.x
        guard["lock_timeout"] = budget if isinstance(budget, float) else LONG_ATTEMPT
    elif values["PGMIGRATE_ATTEMPT_TIMEOUT"] is not None:
        guard["lock_timeout"] = values["PGMIGRATE_ATTEMPT_TIMEOUT"]
    delay, most = values["PGMIGRATE_RETRY_DELAY"], values["PGMIGRATE_RETRY_MAX_DELAY"]
    if isinstance(delay, float) and most is None and delay > DEFAULT_RETRY_MAX_DELAY:
        most = delay
    for key, value in (("retry_max_delay", most), ("retry_delay", delay)):
        if value is not None:
            guard[key] = value
    for key, setting in (
        ("max_hold", "PGMIGRATE_MAX_HOLD"),
        ("min_transaction_age", "PGMIGRATE_MIN_TRANSACTION_AGE"),
        ("users", "PGMIGRATE_USERS"),
        ("exclude_users", "PGMIGRATE_EXCLUDE_USERS"),
        ("exclude_application_names", "PGMIGRATE_EXCLUDE_APPLICATION_NAMES"),
    ):
        if values[setting] is not None:
            guard[key] = values[setting]
    if action is not None and name is not None:
        guard.update(filters.translate(action.filters)[0])
    if isinstance(action, actions.Drain):
        guard.update(drain_values(action))
    return guard
