"""One validated, frozen Config from defaults < TOML file < PGMIGRATE_PROXY_* env vars < flags."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NoReturn

from psycopg.conninfo import conninfo_to_dict

from pgmigrate_proxy import __version__
from pgmigrate_proxy.auth.authfile import AuthFileError, parse_auth_file
from pgmigrate_proxy.auth.credentials import StoredCredential
from pgmigrate_proxy.guard.drain import DrainSettings, DrainThen
from pgmigrate_proxy.guard.policy import BackendState, BlockingAction, Filters, RetrySchedule
from pgmigrate_proxy.logsetup import MASK, redact
from pgmigrate_proxy.poolconfig import SECTIONS, OverrideError, PoolOverrides, parse_section
from pgmigrate_proxy.settings import (
    BLOCKER_STATES as BLOCKER_STATES,
)
from pgmigrate_proxy.settings import (
    GUARD_KEYS,
    POOL_KEYS,
    SETTINGS,
    Rejected,
    Setting,
    default,
    format_duration,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PROG = "pgmigrate-proxy"
ENV_PREFIX = "PGMIGRATE_PROXY_"
CONFIG_ENV = ENV_PREFIX + "CONFIG"
TOML_TABLE = "proxy"
DEFAULT_SSLROOTCERT = "~/.postgresql/root.crt"  # where libpq looks when sslrootcert is unset
#: Flags that may carry a password (visible to every local user in /proc/PID/cmdline).
SECRET_KEYS = ("upstream", "admin_upstream")


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
        shown = repr(conceal(value)) if isinstance(value, str) else repr(value)
        where = f", set by {source}" if source else ""
        return cls(f"invalid {key}: {shown} (allowed: {allowed}){where}", key=key, allowed=allowed)


#: A URL's user:password, the password taken up to the last "@" (wider than libpq, on purpose:
#: a malformed URL's secret may hold "/", "@" or a space).
_URL_SECRET = re.compile(r"(?is)^(\s*[a-z][a-z0-9+.-]*://[^:@/?#\s]*:).*@")
_ANY_PASSWORD = re.compile(r"(?is)(password\s*=\s*).*")


def redact_conninfo(text: str) -> str:
    """A conninfo for the log: passwords masked, a URL's up to its last "@"."""
    return redact(_URL_SECRET.sub(lambda m: m[1] + MASK + "@", text, count=1))


def conceal(text: str) -> str:
    """`text` (a value as given, perhaps a malformed conninfo) with anything that may be a
    password masked: a URL's password up to its last "@", everything after `password=`."""
    return _ANY_PASSWORD.sub(lambda m: m[1] + MASK, redact_conninfo(text), count=1)


RULES: dict[str, Setting] = SETTINGS


def _check(key: str, value: object, source: str | None = None) -> Any:
    rule = RULES[key]
    try:
        return rule.parse(value)
    except Rejected as exc:
        raise ConfigError.invalid(key, value, str(exc) or rule.allowed, source) from None


def _check_delays(delay: float, most: float, sources: Mapping[str, str]) -> None:
    """retry_max_delay >= retry_delay; blames retry_delay only when it alone was set."""
    if most >= delay:
        return
    if "retry_max_delay" in sources or "retry_delay" not in sources:
        allowed = f"a duration >= retry_delay ({format_duration(delay)})"
        raise ConfigError.invalid("retry_max_delay", most, allowed, sources.get("retry_max_delay"))
    allowed = f"a duration <= retry_max_delay ({format_duration(most)})"
    raise ConfigError.invalid("retry_delay", delay, allowed, sources.get("retry_delay"))


@dataclass(frozen=True)
class Config:
    """The proxy's settings; every instance holds validated, normalized values."""

    listen_host: str = default("listen_host")
    listen_port: int = default("listen_port")
    metrics_listen: str | None = default("metrics_listen")
    upstream: str | None = default("upstream")
    log_level: str = default("log_level")
    log_format: str = default("log_format")
    max_message_size: int = default("max_message_size")
    startup_timeout: float = default("startup_timeout")
    max_startup_clients: int = default("max_startup_clients")
    shutdown_grace: float = default("shutdown_grace")
    client_tls_cert_file: str | None = default("client_tls_cert_file")
    client_tls_key_file: str | None = default("client_tls_key_file")
    client_tls_mode: str = default("client_tls_mode")
    embedded_data_dir: str | None = default("embedded_data_dir")
    embedded_pg: str | None = default("embedded_pg")
    guard: bool = default("guard")
    blocking_action: str = default("blocking_action")
    lock_timeout: float = default("lock_timeout")
    lock_budget: float | None = default("lock_budget")
    retry_delay: float = default("retry_delay")
    retry_max_delay: float = default("retry_max_delay")
    max_hold: float = default("max_hold")
    watch_interval: float = default("watch_interval")
    cancel_grace: float = default("cancel_grace")
    drain_timeout: float = default("drain_timeout")
    drain_then: str = default("drain_then")
    drain_ack_timeout: float = default("drain_ack_timeout")
    report_events: bool = default("report_events")
    min_transaction_age: float = default("min_transaction_age")
    min_query_age: float = default("min_query_age")
    blocker_states: tuple[str, ...] = default("blocker_states")
    application_names: tuple[str, ...] = default("application_names")
    exclude_application_names: tuple[str, ...] = default("exclude_application_names")
    users: tuple[str, ...] = default("users")
    exclude_users: tuple[str, ...] = default("exclude_users")
    admin_upstream: str | None = default("admin_upstream")
    events_channel: str | None = default("events_channel")
    migration_lock: bool = default("migration_lock")
    migration_lock_timeout: float = default("migration_lock_timeout")
    migration_application_names: tuple[str, ...] = default("migration_application_names")
    pool_mode: str = default("pool_mode")
    max_client_conn: int = default("max_client_conn")
    default_pool_size: int = default("default_pool_size")
    min_pool_size: int = default("min_pool_size")
    reserve_pool_size: int = default("reserve_pool_size")
    reserve_pool_timeout: float = default("reserve_pool_timeout")
    max_db_connections: int = default("max_db_connections")
    max_user_connections: int = default("max_user_connections")
    server_lifetime: float = default("server_lifetime")
    server_idle_timeout: float = default("server_idle_timeout")
    server_connect_timeout: float = default("server_connect_timeout")
    server_check_delay: float = default("server_check_delay")
    server_check_query: str = default("server_check_query")
    server_reset_query: str = default("server_reset_query")
    query_wait_timeout: float = default("query_wait_timeout")
    client_idle_timeout: float = default("client_idle_timeout")
    idle_transaction_timeout: float = default("idle_transaction_timeout")
    max_prepared_statements: int = default("max_prepared_statements")
    session_state: str = default("session_state")
    auth_type: str = default("auth_type")
    auth_file: str | None = default("auth_file")
    auth_query: str = default("auth_query")
    admin_users: tuple[str, ...] = default("admin_users")
    stats_users: tuple[str, ...] = default("stats_users")
    #: The TOML file's [databases.NAME] / [users.NAME] entries (poolconfig.pool_settings reads
    #: them); not a setting of its own: no flag or environment variable.
    pool_overrides: PoolOverrides = field(default_factory=PoolOverrides)

    def __post_init__(self) -> None:
        for key in RULES:
            object.__setattr__(self, key, _check(key, getattr(self, key)))
        _check_delays(self.retry_delay, self.retry_max_delay, {})

    def upstream_params(self) -> dict[str, str]:
        """The upstream conninfo as a dict (empty when upstream is None)."""
        return {k: str(v) for k, v in conninfo_to_dict(self.upstream or "").items()}

    def upstream_redacted(self) -> str:
        """The upstream with any password masked; "(embedded)" when upstream is None."""
        return "(embedded)" if self.upstream is None else redact_conninfo(self.upstream)

    def admin_upstream_redacted(self) -> str:
        """admin_upstream with any password masked; when unset, the upstream's (it is used)."""
        if self.admin_upstream is None:
            return self.upstream_redacted()
        return redact_conninfo(self.admin_upstream)

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

    def drain_settings(self) -> DrainSettings:
        """drain_timeout and drain_then, for blocking_action = drain."""
        return DrainSettings(timeout=self.drain_timeout, then=DrainThen(self.drain_then))

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


#: The settings (one flag and environment variable each), in the schema's order.
KEYS: tuple[str, ...] = tuple(f.name for f in fields(Config) if f.name != "pool_overrides")
RELOADABLE: frozenset[str] = frozenset((*KEYS, "pool_overrides")) - {
    "listen_host",
    "listen_port",
    "metrics_listen",
    "embedded_data_dir",
    "embedded_pg",
    "events_channel",  # the admin connection LISTENs on it from the start
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


#: The subcommands, for --help (cli.COMMANDS runs them).
SUBCOMMANDS = {
    "demo": "the lock-queue stall, straight to PostgreSQL and then through the proxy "
    "(pgmigrate-proxy demo --help)",
}
_EPILOG = (
    "commands:\n"
    + "".join(f"  {name:<8}{text}\n" for name, text in SUBCOMMANDS.items())
    + "\nDurations take seconds or a unit: 50ms, 5s, 2min. Keep passwords out of the command "
    "line (every local user can read it): set PGPASSWORD, a passfile (passfile=... in the "
    f"conninfo, or ~/.pgpass), or {ENV_PREFIX}UPSTREAM."
)


def _help(key: str) -> str:
    setting = RULES[key]
    return (
        f"{setting.help}. Allowed: {setting.allowed}. Default: {setting.shown_default()}. "
        f"Env {env_var(key)}"
    ).replace("%", "%%")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The proxy's flags: --config, --version and one --<key-with-dashes> per Config key."""
    parser = _ArgumentParser(
        prog=prog,
        usage="%(prog)s [--config FILE] [--<setting> VALUE ...]\n       %(prog)s demo [...]",
        description="PostgreSQL wire-protocol proxy that clears lock blockers before DDL.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", metavar="FILE", help=f"TOML settings file (env {CONFIG_ENV})")
    proxy = parser.add_argument_group("proxy settings")
    guard = parser.add_argument_group("guard settings (also per session: -c pgmigrate.<name>)")
    pool = parser.add_argument_group("pool settings (also per database and user in the file)")
    for key in KEYS:
        group = guard if key in GUARD_KEYS else pool if key in POOL_KEYS else proxy
        group.add_argument(flag(key), dest=key, metavar=key.upper(), help=_help(key))
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


def _overrides(data: dict[str, Any], path: str) -> PoolOverrides:
    """Pop the [databases.NAME] / [users.NAME] tables (a dict under `users` is pool overrides,
    a list or string the guard's filter) and check them."""
    found: dict[str, Any] = {}
    for section in SECTIONS:
        if section in data and (section != "users" or isinstance(data[section], dict)):
            try:
                found[section] = parse_section(section, data.pop(section))
            except OverrideError as exc:
                if exc.unknown:
                    message = f"unknown key in {path}: {exc.key} (allowed: {exc.allowed})"
                    raise ConfigError(message, key=exc.key, allowed=exc.allowed) from None
                raise ConfigError.invalid(exc.key, exc.value, exc.allowed, path) from None
    return PoolOverrides(**found)


def _file_layer(path: str) -> tuple[dict[str, tuple[object, str]], PoolOverrides]:
    data = _read_toml(path)
    overrides = _overrides(data, path)
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
    return {key: (value, path) for key, value in {**data, **table}.items()}, overrides


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


def _check_auth(config: Config, sources: Mapping[str, str]) -> None:
    """auth_type auth_file needs auth_file, auth_query needs auth_query."""
    needed = config.auth_type if config.auth_type in ("auth_file", "auth_query") else None
    if needed and not getattr(config, needed):
        allowed = f"a non-empty value when auth_type is {needed}"
        raise ConfigError.invalid(needed, getattr(config, needed), allowed, sources.get(needed))
    if config.auth_file and config.auth_type in ("auth_file", "trust"):
        load_auth_file(config.auth_file)


def load_auth_file(path: str) -> dict[str, StoredCredential]:
    """The users of an auth_file; ConfigError (one line, no password) when it is unusable.
    Read at start and again at each reload."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
        message = f"invalid auth_file: cannot read {path}: {reason}"
        raise ConfigError(message, key="auth_file") from None
    try:
        return parse_auth_file(text, path)
    except AuthFileError as exc:
        raise ConfigError(f"invalid auth_file: {exc}", key="auth_file") from None


def load_config(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Build the Config from flags in `argv`, `environ` and the TOML file they name.

    Raises ConfigError for anything not allowed; --help and --version print and raise
    SystemExit(0), as argparse does.
    """
    options = _parse_flags(argv)
    config_path = options.pop("config", None) or environ.get(CONFIG_ENV) or None
    file_layer, overrides = _file_layer(config_path) if config_path else ({}, PoolOverrides())
    layers: list[Mapping[str, tuple[object, str]]] = [
        file_layer,
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
    config = Config(**values, pool_overrides=overrides)
    _check_auth(config, sources)
    for key in ("upstream", "admin_upstream"):
        _check_upstream_tls(config, key, sources.get(key))
    _check_client_tls(config, sources)
    _check_embedded_pg(config, sources.get("embedded_pg"))
    return config


def passwords_on_command_line(argv: Sequence[str]) -> list[str]:
    """The keys (upstream, admin_upstream) whose flag in `argv` carries a password: every local
    user can read it in /proc/PID/cmdline, and Python cannot wipe its own argv."""
    try:
        options = _parse_flags(argv)
    except ConfigError:
        return []
    found = []
    for key in SECRET_KEYS:
        try:
            params = conninfo_to_dict(options.get(key) or "")
        except Exception:  # load_config reports it; this only decides a warning
            params = {}
        if params.get("password"):
            found.append(key)
    return found


def changed_keys(old: Config, new: Config) -> list[str]:
    """The keys whose values differ between two configs, in field order (`pool_overrides` for
    the file's [databases.NAME] / [users.NAME] entries)."""
    names = (f.name for f in fields(Config))
    return [key for key in names if getattr(old, key) != getattr(new, key)]
