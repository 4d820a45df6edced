"""The pooler's per-database and per-user overrides (`[databases.NAME]`, `[users.NAME]` in the
TOML file) and the resolver of one (database, user) pool's settings.

pgbouncer is the model: a `[databases]` entry overrides the global settings for that database,
a `[users]` entry overrides both for that user (pgbouncer: "If not set, the database or default
pool_mode is used"), and `pool_size` overrides `default_pool_size`. Values are checked by the
same rules as the global settings (settings.py). Pure: no I/O; config.py reads the file.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pgmigrate_proxy.settings import SETTINGS, Rejected


class PoolMode(enum.Enum):
    """When a server connection goes back to its pool."""

    SESSION = "session"  # when the client leaves, after server_reset_query
    TRANSACTION = "transaction"  # at each ReadyForQuery 'I'


class SessionStateAction(enum.Enum):
    """What transaction mode does with a statement that leaves state on its server connection."""

    PIN = "pin"  # the client keeps that server connection for the rest of its session
    REFUSE = "refuse"  # the statement gets an error


class AuthType(enum.Enum):
    """How a pooled client's login is checked."""

    PASSTHROUGH = "passthrough"
    AUTH_QUERY = "auth_query"
    AUTH_FILE = "auth_file"
    TRUST = "trust"


#: The TOML tables of overrides, and the keys each entry may set (pgbouncer's, where it has them).
DATABASE_KEYS: tuple[str, ...] = (
    "pool_mode",
    "pool_size",
    "min_pool_size",
    "reserve_pool_size",
    "max_db_connections",
    "server_lifetime",
    "query_wait_timeout",
    "session_state",
)
USER_KEYS: tuple[str, ...] = (
    "pool_mode",
    "pool_size",
    "reserve_pool_size",
    "max_user_connections",
    "query_wait_timeout",
    "idle_transaction_timeout",
    "client_idle_timeout",
    "session_state",
)
SECTIONS: dict[str, tuple[str, ...]] = {"databases": DATABASE_KEYS, "users": USER_KEYS}
#: An override key checked by another setting's rule.
_RULE: dict[str, str] = {"pool_size": "default_pool_size"}


class OverrideError(ValueError):
    """A bad entry; `key` is its dotted name (`databases.app.pool_mode`), `allowed` what fits.
    `unknown` tells an unknown key from a bad value."""

    def __init__(self, key: str, value: object, allowed: str, *, unknown: bool = False) -> None:
        super().__init__(key)
        self.key, self.value, self.allowed, self.unknown = key, value, allowed, unknown


Overrides = Mapping[str, Mapping[str, Any]]


def parse_section(section: str, table: object) -> dict[str, dict[str, Any]]:
    """Check one TOML table of overrides (`section` is "databases" or "users") and return its
    normalized values by name; raises OverrideError naming the first bad key."""
    allowed_keys = SECTIONS[section]
    if not isinstance(table, dict):
        raise OverrideError(section, table, f"a table of [{section}.NAME] tables")
    parsed: dict[str, dict[str, Any]] = {}
    for name, entry in table.items():
        where = f"{section}.{name}"
        if not isinstance(entry, dict):
            raise OverrideError(where, entry, "a table of " + ", ".join(allowed_keys))
        values: dict[str, Any] = {}
        for key, value in entry.items():
            if key not in allowed_keys:
                allowed = ", ".join(allowed_keys)
                raise OverrideError(f"{where}.{key}", value, allowed, unknown=True)
            rule = SETTINGS[_RULE.get(str(key), str(key))]
            try:
                values[key] = rule.parse(value)
            except Rejected as exc:
                raise OverrideError(f"{where}.{key}", value, str(exc) or rule.allowed) from None
        parsed[name] = values
    return parsed


@dataclass(frozen=True)
class PoolOverrides:
    """The `[databases.NAME]` and `[users.NAME]` entries: name -> {key: normalized value}."""

    databases: Overrides = field(default_factory=dict, hash=False)
    users: Overrides = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class PoolSettings:
    """Everything one (database, user) pool needs, overrides applied. Durations in seconds;
    0 disables a timeout or a limit, as in pgbouncer (server_lifetime 0: use a server once)."""

    pool_mode: PoolMode
    pool_size: int
    min_pool_size: int
    reserve_pool_size: int
    reserve_pool_timeout: float
    max_db_connections: int
    max_user_connections: int
    server_lifetime: float
    server_idle_timeout: float
    server_connect_timeout: float
    server_check_delay: float
    server_check_query: str  # settings.EMPTY_QUERY: send an empty query; "": no check
    server_reset_query: str  # "": none
    query_wait_timeout: float
    client_idle_timeout: float
    idle_transaction_timeout: float
    max_prepared_statements: int  # 0: no prepared-statement mapping
    session_state: SessionStateAction


#: Keys read from the global settings as they are (the others are resolved in pool_settings).
_PLAIN = tuple(
    name
    for name in PoolSettings.__dataclass_fields__
    if name not in ("pool_mode", "pool_size", "session_state")
)


def pool_settings(config: object, database: str, user: str) -> PoolSettings:
    """The settings of the pool for (`database`, `user`): the user's entry wins over the
    database's, which wins over the global setting. `config` is a config.Config (typed loosely
    so that this module stays below config.py); its `pool_overrides` holds the entries."""
    overrides: PoolOverrides = getattr(config, "pool_overrides", PoolOverrides())
    db = overrides.databases.get(database, {})
    usr = overrides.users.get(user, {})

    def pick(key: str, global_key: str | None = None) -> Any:
        if key in usr:
            return usr[key]
        if key in db:
            return db[key]
        return getattr(config, global_key or key)

    values = {name: pick(name) for name in _PLAIN}
    return PoolSettings(
        pool_mode=PoolMode(pick("pool_mode")),
        pool_size=pick("pool_size", "default_pool_size"),
        session_state=SessionStateAction(pick("session_state")),
        **values,
    )
