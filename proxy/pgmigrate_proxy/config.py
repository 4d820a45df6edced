"""One validated, frozen Config from defaults < TOML file < PGMIGRATE_PROXY_* env vars < flags."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, NoReturn

import psycopg
from psycopg.conninfo import conninfo_to_dict

from pgmigrate_proxy import __version__
from pgmigrate_proxy.guard.policy import BackendState, BlockingAction, Filters, RetrySchedule
from pgmigrate_proxy.logsetup import LEVELS, redact

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PROG = "pgmigrate-proxy"
ENV_PREFIX = "PGMIGRATE_PROXY_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
TOML_TABLE = "proxy"
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
CLIENT_TLS_MODES = ("auto", "disable", "allow", "require")
LOG_FORMATS = ("text", "json")
DEFAULT_SSLROOTCERT = "~/.postgresql/root.crt"  # where libpq looks when sslrootcert is unset
BLOCKING_ACTIONS = tuple(action.value for action in BlockingAction)
#: The pg_stat_activity states blocker_states may name ("starting" sessions hold no locks).
BLOCKER_STATES = tuple(s.value for s in BackendState if s is not BackendState.STARTING)
TRUE_WORDS = ("true", "on", "yes", "1")
FALSE_WORDS = ("false", "off", "no", "0")


class ConfigError(Exception):
    """A setting is missing, unknown or not allowed; str() is the one line the CLI prints."""

    def __init__(self, message: str, *, key: str | None = None, allowed: str = "") -> None:
        super().__init__(message)
        self.key = key
        self.allowed = allowed

    @classmethod
    def invalid(
        cls, key: str, value: object, allowed: str, source: str | None = None
    ) -> ConfigError:
        shown = repr(redact(value)) if isinstance(value, str) else repr(value)
        where = f", set by {source}" if source else ""
        return cls(f"invalid {key}: {shown} (allowed: {allowed}){where}", key=key, allowed=allowed)


class _Rejected(Exception):
    """Raised by a rule's parser; a non-empty message replaces the rule's `allowed` text."""


@dataclass(frozen=True)
class _Rule:
    allowed: str
    parse: Callable[[object], Any]  # returns the normalized value or raises _Rejected


def _integer(low: int, high: int) -> _Rule:
    def parse(value: object) -> int:
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise _Rejected
        return value

    return _Rule(f"an integer from {low} to {high}", parse)


def _seconds(low: float, *, inclusive: bool) -> _Rule:
    def parse(value: object) -> float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise _Rejected from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Rejected
        number = float(value)
        if not math.isfinite(number) or not (number >= low if inclusive else number > low):
            raise _Rejected
        return number

    bound = f">= {low:g}" if inclusive else f"> {low:g}"
    return _Rule(f"a finite number of seconds {bound}", parse)


def _optional_seconds(low: float, *, inclusive: bool) -> _Rule:
    seconds = _seconds(low, inclusive=inclusive)

    def parse(value: object) -> float | None:
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
            return None
        return float(seconds.parse(value))

    return _Rule(seconds.allowed + ", or none or empty for no limit", parse)


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    word = value.strip().lower() if isinstance(value, str) else None
    if word not in TRUE_WORDS + FALSE_WORDS:
        raise _Rejected
    return word in TRUE_WORDS


def _items(value: object) -> tuple[str, ...]:
    """A comma-separated string (items stripped, empty ones dropped) or a sequence of strings
    (items kept as they are); duplicates dropped."""
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",") if item.strip()]
    elif isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        items = list(value)
    else:
        raise _Rejected
    return tuple(dict.fromkeys(items))


def _globs(empty: str) -> _Rule:
    return _Rule(f"comma-separated glob patterns or a TOML array; empty for {empty}", _items)


def _states(value: object) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(" ".join(item.lower().split()) for item in _items(value)))
    if any(name not in BLOCKER_STATES for name in names):
        raise _Rejected
    return names


def _choice(*names: str) -> _Rule:
    def parse(value: object) -> str:
        name = value.strip().lower() if isinstance(value, str) else None
        if name not in names:
            raise _Rejected
        return name

    return _Rule(" | ".join(names), parse)


def _host(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or len(value.split()) != 1:
        raise _Rejected
    return value.strip()


def _optional_text(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise _Rejected
    return value


def _upstream(value: object) -> str | None:
    text = _optional_text(value)
    if text is None:
        return None
    try:
        params = conninfo_to_dict(text)
    except psycopg.Error as exc:
        # psycopg quotes fragments of the string: never echo them when a password is in it.
        detail = "" if "password" in text.lower() else " ".join(str(exc).split())
        allowed = "a libpq URL or key=value conninfo" + (f"; {detail}" if detail else "")
        raise _Rejected(allowed) from None
    if params.get("sslmode", "prefer") not in SSLMODES:
        raise _Rejected("sslmode one of " + ", ".join(SSLMODES))
    return text


_OPTIONAL_PATH = _Rule("a path, or empty for none", _optional_text)
_UPSTREAM_ALLOWED = "a libpq URL or key=value conninfo, or empty for "

RULES: dict[str, _Rule] = {
    "listen_host": _Rule("a host name or IP address", _host),
    "listen_port": _integer(0, 65535),
    "upstream": _Rule(_UPSTREAM_ALLOWED + "an embedded PostgreSQL", _upstream),
    "log_level": _choice(*LEVELS),
    "log_format": _choice(*LOG_FORMATS),
    "max_message_size": _integer(8192, 1073741823),
    "startup_timeout": _seconds(0, inclusive=False),
    "max_startup_clients": _integer(1, 1000000),
    "shutdown_grace": _seconds(0, inclusive=True),
    "client_tls_cert_file": _OPTIONAL_PATH,
    "client_tls_key_file": _OPTIONAL_PATH,
    "client_tls_mode": _choice(*CLIENT_TLS_MODES),
    "embedded_data_dir": _OPTIONAL_PATH,
    "embedded_pg": _Rule(
        "'embedded', a PostgreSQL major version such as 15, or an existing bin directory",
        _optional_text,
    ),
    "guard": _Rule("true or false (also on/off, yes/no, 1/0)", _boolean),
    "blocking_action": _choice(*BLOCKING_ACTIONS),
    "lock_timeout": _seconds(0, inclusive=False),
    "lock_budget": _optional_seconds(0, inclusive=False),
    "retry_delay": _seconds(0, inclusive=True),
    "retry_max_delay": _seconds(0, inclusive=True),
    "max_hold": _seconds(0, inclusive=False),
    "watch_interval": _seconds(0, inclusive=False),
    "cancel_grace": _seconds(0, inclusive=True),
    "min_transaction_age": _seconds(0, inclusive=True),
    "min_query_age": _seconds(0, inclusive=True),
    "blocker_states": _Rule(
        "comma-separated pg_stat_activity states or a TOML array, among "
        + ", ".join(BLOCKER_STATES)
        + "; empty for all",
        _states,
    ),
    "application_names": _globs("all"),
    "exclude_application_names": _globs("none"),
    "users": _globs("all"),
    "exclude_users": _globs("none"),
    "admin_upstream": _Rule(_UPSTREAM_ALLOWED + "the upstream", _upstream),
    "migration_application_names": _globs("none"),
}


def _check(key: str, value: object, source: str | None = None) -> Any:
    rule = RULES[key]
    try:
        return rule.parse(value)
    except _Rejected as exc:
        raise ConfigError.invalid(key, value, str(exc) or rule.allowed, source) from None


def _check_delays(delay: float, most: float, sources: Mapping[str, str]) -> None:
    """retry_max_delay >= retry_delay; blames retry_delay only when it alone was set."""
    if most >= delay:
        return
    if "retry_max_delay" in sources or "retry_delay" not in sources:
        allowed = f"a finite number of seconds >= retry_delay ({delay:g})"
        raise ConfigError.invalid("retry_max_delay", most, allowed, sources.get("retry_max_delay"))
    allowed = f"a finite number of seconds <= retry_max_delay ({most:g})"
    raise ConfigError.invalid("retry_delay", delay, allowed, sources.get("retry_delay"))


@dataclass(frozen=True)
class Config:
    """The proxy's settings; every instance holds validated, normalized values."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 6432
    upstream: str | None = None
    log_level: str = "info"
    log_format: str = "text"
    max_message_size: int = 268435456
    startup_timeout: float = 60.0
    max_startup_clients: int = 50
    shutdown_grace: float = 30.0
    client_tls_cert_file: str | None = None
    client_tls_key_file: str | None = None
    client_tls_mode: str = "auto"
    embedded_data_dir: str | None = None
    embedded_pg: str | None = None
    guard: bool = True
    blocking_action: str = "terminate"
    lock_timeout: float = 0.05
    lock_budget: float | None = None
    retry_delay: float = 0.05
    retry_max_delay: float = 5.0
    max_hold: float = 30.0
    watch_interval: float = 0.05
    cancel_grace: float = 2.0
    min_transaction_age: float = 0.0
    min_query_age: float = 0.0
    blocker_states: tuple[str, ...] = ()
    application_names: tuple[str, ...] = ()
    exclude_application_names: tuple[str, ...] = ()
    users: tuple[str, ...] = ()
    exclude_users: tuple[str, ...] = ()
    admin_upstream: str | None = None
    migration_application_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for key in RULES:
            object.__setattr__(self, key, _check(key, getattr(self, key)))
        _check_delays(self.retry_delay, self.retry_max_delay, {})

    def upstream_params(self) -> dict[str, str]:
        """The upstream conninfo as a dict (empty when upstream is None)."""
        return {k: str(v) for k, v in conninfo_to_dict(self.upstream or "").items()}

    def upstream_redacted(self) -> str:
        """The upstream with any password masked; "(embedded)" when upstream is None."""
        return "(embedded)" if self.upstream is None else redact(self.upstream)

    def admin_upstream_redacted(self) -> str:
        """admin_upstream with any password masked; when unset, the upstream's (it is used)."""
        if self.admin_upstream is None:
            return self.upstream_redacted()
        return redact(self.admin_upstream)

    def blocking_action_value(self) -> BlockingAction:
        """blocking_action as the guard's enum."""
        return BlockingAction(self.blocking_action)

    def guard_filters(self) -> Filters:
        """Which blockers the blocking action may touch (the others are only reported)."""
        states = (BackendState.parse(name) for name in self.blocker_states)
        return Filters(
            min_transaction_age=self.min_transaction_age,
            min_query_age=self.min_query_age,
            states=frozenset(state for state in states if state is not None),
            application_names=self.application_names,
            exclude_application_names=self.exclude_application_names,
            users=self.users,
            exclude_users=self.exclude_users,
        )

    def retry_schedule(self) -> RetrySchedule:
        """Attempts of lock_timeout each, backoff from retry_delay to retry_max_delay, all within
        lock_budget (unset: no limit). Multiplier and jitter are RetrySchedule's defaults."""
        budget = math.inf if self.lock_budget is None else self.lock_budget
        return RetrySchedule(
            budget=budget,
            lock_timeout=self.lock_timeout,
            base_delay=self.retry_delay,
            max_delay=self.retry_max_delay,
            # A lock_timeout or budget under the default shortest attempt must still get one.
            min_attempt=min(RetrySchedule.min_attempt, self.lock_timeout, budget),
        )

    def effective_client_tls_mode(self) -> str:
        """client_tls_mode with "auto" resolved: allow with a certificate, disable without."""
        if self.client_tls_mode != "auto":
            return self.client_tls_mode
        return "allow" if self.client_tls_cert_file else "disable"


KEYS: tuple[str, ...] = tuple(f.name for f in fields(Config))
RELOADABLE: frozenset[str] = frozenset(KEYS) - {
    "listen_host",
    "listen_port",
    "embedded_data_dir",
    "embedded_pg",
}
assert set(RULES) == set(KEYS), "every Config field needs a rule"


def env_var(key: str) -> str:
    """The environment variable that sets `key`."""
    return ENV_PREFIX + key.upper()


def flag(key: str) -> str:
    """The command-line flag that sets `key`."""
    return "--" + key.replace("_", "-")


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but its errors raise ConfigError (one line, exit 2) instead of printing usage."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(message)


def _default(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(value) or "empty"
    return "unset" if value is None else repr(value)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The proxy's flags: --config, --version and one --<key-with-dashes> per Config key."""
    parser = _ArgumentParser(
        prog=prog,
        description="PostgreSQL wire-protocol proxy that clears lock blockers before DDL.",
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", metavar="FILE", help=f"TOML settings file (env {CONFIG_ENV})")
    for field in fields(Config):
        parser.add_argument(
            flag(field.name),
            dest=field.name,
            metavar=field.name.upper(),
            help=f"{RULES[field.name].allowed}; default {_default(field.default)}; "
            f"env {env_var(field.name)}",
        )
    return parser


def _parse_flags(argv: Sequence[str]) -> dict[str, str]:
    parser = build_parser()
    namespace, unknown = parser.parse_known_args(list(argv))
    if unknown:
        name = unknown[0].split("=", 1)[0]
        allowed = ", ".join(["--config", "--version", "--help", *map(flag, KEYS)])
        kind = "option" if name.startswith("-") else "argument"
        message = f"unknown {kind} {name!r} (allowed: {allowed})"
        raise ConfigError(message, key=name, allowed=allowed)
    return dict(vars(namespace))


def _reject_unknown(unknown: Sequence[str], allowed: Sequence[str], what: str) -> None:
    if unknown:
        listed, choices = ", ".join(unknown), ", ".join(allowed)
        raise ConfigError(
            f"unknown {what}: {listed} (allowed: {choices})", key=unknown[0], allowed=choices
        )


def _env_layer(environ: Mapping[str, str]) -> dict[str, tuple[object, str]]:
    allowed = [CONFIG_ENV, *map(env_var, KEYS)]
    unknown = sorted(n for n in environ if n.startswith(ENV_PREFIX) and n not in allowed)
    _reject_unknown(unknown, allowed, "environment variable")
    return {key: (environ[env_var(key)], env_var(key)) for key in KEYS if env_var(key) in environ}


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ConfigError(
            f"cannot read config file {path!r}: {exc.strerror or exc}",
            key="config",
            allowed="a readable TOML file",
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"invalid TOML in {path!r}: {' '.join(str(exc).split())}",
            key="config",
            allowed="a TOML file",
        ) from None


def _file_layer(path: str) -> dict[str, tuple[object, str]]:
    data = _read_toml(path)
    table: dict[str, Any] = {}
    if isinstance(data.get(TOML_TABLE), dict):
        table = data.pop(TOML_TABLE)
    unknown = [name for name in data if name not in KEYS]
    unknown += [f"{TOML_TABLE}.{name}" for name in table if name not in KEYS]
    _reject_unknown(unknown, KEYS, f"key in {path}")
    twice = sorted(set(data) & set(table))
    if twice:
        raise ConfigError(
            f"{twice[0]} is set twice in {path}: at the top and in [{TOML_TABLE}]", key=twice[0]
        )
    return {key: (value, path) for key, value in {**data, **table}.items()}


def _readable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.R_OK)


def _check_upstream_tls(config: Config, key: str, source: str | None) -> None:
    """`key` (upstream or admin_upstream) with verify-ca/verify-full needs a readable root cert."""
    conninfo: str | None = getattr(config, key)
    params = conninfo_to_dict(conninfo or "")
    mode = params.get("sslmode")
    if mode not in ("verify-ca", "verify-full"):
        return
    root = str(params.get("sslrootcert") or DEFAULT_SSLROOTCERT)
    if root != "system" and not _readable(os.path.expanduser(root)):
        allowed = f"sslmode={mode} with sslrootcert naming a readable file, not {root!r}"
        raise ConfigError.invalid(key, conninfo, allowed, source)


def _check_client_tls(config: Config, sources: Mapping[str, str]) -> None:
    cert, key = config.client_tls_cert_file, config.client_tls_key_file
    if bool(cert) != bool(key):
        missing = "client_tls_key_file" if cert else "client_tls_cert_file"
        raise ConfigError.invalid(missing, None, "a file whenever the other TLS file is set")
    if config.client_tls_mode in ("allow", "require") and not cert:
        allowed = "auto or disable unless client_tls_cert_file and client_tls_key_file are set"
        raise ConfigError.invalid(
            "client_tls_mode", config.client_tls_mode, allowed, sources.get("client_tls_mode")
        )
    if config.effective_client_tls_mode() == "disable":
        return
    for name in ("client_tls_cert_file", "client_tls_key_file"):
        path = getattr(config, name)
        if not _readable(path):
            raise ConfigError.invalid(name, path, "an existing readable file", sources.get(name))


def _check_embedded_pg(config: Config, source: str | None) -> None:
    choice = config.embedded_pg
    if choice is None or choice == "embedded" or choice.isdigit() or os.path.isdir(choice):
        return
    raise ConfigError.invalid("embedded_pg", choice, RULES["embedded_pg"].allowed, source)


def load_config(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Build the Config from flags in `argv`, `environ` and the TOML file they name.

    Raises ConfigError for anything not allowed; --help and --version print and raise
    SystemExit(0), as argparse does.
    """
    options = _parse_flags(argv)
    config_path = options.pop("config", None) or environ.get(CONFIG_ENV) or None
    layers: list[Mapping[str, tuple[object, str]]] = [
        _file_layer(config_path) if config_path else {},
        _env_layer(environ),
        {key: (value, flag(key)) for key, value in options.items()},
    ]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for layer in layers:
        for key, (value, source) in layer.items():
            values[key] = _check(key, value, source)
            sources[key] = source
    defaults = Config()
    delay = values.get("retry_delay", defaults.retry_delay)
    _check_delays(delay, values.get("retry_max_delay", defaults.retry_max_delay), sources)
    config = Config(**values)
    for key in ("upstream", "admin_upstream"):
        _check_upstream_tls(config, key, sources.get(key))
    _check_client_tls(config, sources)
    _check_embedded_pg(config, sources.get("embedded_pg"))
    return config


def changed_keys(old: Config, new: Config) -> list[str]:
    """The keys whose values differ between two configs, in field order."""
    return [key for key in KEYS if getattr(old, key) != getattr(new, key)]
