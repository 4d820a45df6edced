"""Where the migration connection goes: through an embedded proxy, or an external one it found.

The connection's `settings_dict` is swapped for a copy (other threads keep the original dict,
and with it the direct route) that points at the proxy and carries the session options; the
connection is closed and reopened, and put back as it was afterwards, also on error.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from django.core.management.base import CommandError
from django.db.backends.base.base import BaseDatabaseWrapper
from pgmigrate_proxy.config import Config, ConfigError
from pgmigrate_proxy.embedded_proxy import PRIVILEGES, AdminLoginRefused, EmbeddedProxy, is_proxy
from psycopg.conninfo import make_conninfo

from pgmigrate import conf
from pgmigrate.guard import Plan

#: libpq parameters of OPTIONS that describe the hop to PostgreSQL: they go into the embedded
#: proxy's upstream, and off the loopback hop to the proxy.
UPSTREAM_OPTIONS = (
    "sslmode", "sslrootcert", "sslcert", "sslkey", "sslpassword", "sslcrl", "sslcrldir",
    "sslsni", "sslcertmode", "sslnegotiation", "ssl_min_protocol_version",
    "ssl_max_protocol_version", "requirepeer", "gssencmode", "krbsrvname", "gsslib",
    "channel_binding", "connect_timeout",
)  # fmt: skip
#: OPTIONS the loopback hop to an embedded proxy drops.
_HOP_DROPPED = UPSTREAM_OPTIONS
#: Django's connection pool (psycopg 3) would hand out connections without the session
#: options: the migration connection is a connection of its own.
_POOL = "pool"
_LOOPBACK = {"sslmode": "disable", "gssencmode": "disable"}
#: The attribute that marks a wrapper as routed (read by the RunPython patch).
ROUTE_ATTRIBUTE = "pgmigrate_route"


class Kind(enum.Enum):
    """Which proxy a migration goes through."""

    EMBEDDED = "embedded"
    EXTERNAL = "external"


@dataclass(frozen=True)
class Route:
    """The proxy in use for one migrate run."""

    kind: Kind
    autocommit: bool
    proxy_version: str | None = None  # an external proxy's version
    port: int | None = None  # the embedded proxy's port

    def describe(self) -> str:
        """One line for `migrate -v 2`."""
        if self.kind is Kind.EXTERNAL:
            return f"external pgmigrate-proxy {self.proxy_version}"
        return f"embedded pgmigrate-proxy on 127.0.0.1:{self.port}"


def parameter_status(raw: Any) -> Callable[[str], str | None] | None:
    """The ParameterStatus lookup of a psycopg 3 or psycopg2 connection."""
    info = getattr(raw, "info", None)
    lookup = getattr(info, "parameter_status", None) or getattr(raw, "get_parameter_status", None)
    return lookup if callable(lookup) else None


def external_proxy(connection: BaseDatabaseWrapper) -> str | None:
    """The version of the pgmigrate-proxy the connection goes through, else None (it connects)."""
    connection.ensure_connection()
    lookup = parameter_status(connection.connection)
    return is_proxy(lookup) if lookup is not None else None


def upstream_conninfo(settings_dict: Mapping[str, Any]) -> str:
    """The database's real settings as a libpq conninfo (with the password: keep it private)."""
    options: Mapping[str, Any] = settings_dict.get("OPTIONS") or {}
    params = {
        "host": settings_dict.get("HOST"),
        "port": settings_dict.get("PORT"),
        "dbname": settings_dict.get("NAME") or "postgres",
        "user": settings_dict.get("USER"),
        "password": settings_dict.get("PASSWORD"),
    }
    params.update({key: options[key] for key in UPSTREAM_OPTIONS if key in options})
    return make_conninfo(**{key: str(value) for key, value in params.items() if value})


def embedded_config(settings_dict: Mapping[str, Any], plan: Plan) -> Config:
    """The embedded proxy's Config: the real database upstream, an ephemeral loopback port."""
    try:
        return Config(
            upstream=upstream_conninfo(settings_dict),
            listen_host="127.0.0.1",
            listen_port=0,
            shutdown_grace=0.0,
            **plan.guard,  # type: ignore[arg-type]
        )
    except ConfigError as exc:
        raise CommandError(f"cannot start the embedded pgmigrate-proxy: {exc}") from None


def session_settings(
    settings_dict: dict[str, Any], options: str, address: tuple[str, int] | None
) -> dict[str, Any]:
    """A copy of `settings_dict` with the session options, pointed at `address` when given."""
    hop = dict(settings_dict.get("OPTIONS") or {})
    hop.pop(_POOL, None)
    if address is not None:
        hop = {key: value for key, value in hop.items() if key not in _HOP_DROPPED}
        hop.update(_LOOPBACK)
    hop["options"] = " ".join(filter(None, (str(hop.get("options") or ""), options)))
    swapped = {**settings_dict, "OPTIONS": hop}
    if address is not None:
        swapped["HOST"], swapped["PORT"] = address[0], str(address[1])
    return swapped


def _reconnect(connection: BaseDatabaseWrapper, settings_dict: dict[str, Any]) -> None:
    connection.close()
    connection.settings_dict = settings_dict
    connection.ensure_connection()


def _find(connection: BaseDatabaseWrapper, mode: str) -> str | None:
    """An external proxy's version, when the mode lets migrate use one."""
    if mode == conf.PROXY_EMBEDDED:
        return None
    version = external_proxy(connection)
    if version is None and mode == conf.PROXY_EXTERNAL:
        raise CommandError(
            f"PGMIGRATE_PROXY is 'external' but database '{connection.alias}' "
            f"({connection.settings_dict.get('HOST')}:{connection.settings_dict.get('PORT')}) "
            "is not a pgmigrate-proxy"
        )
    return version


def _start_embedded(alias: str, config: Config) -> EmbeddedProxy:
    """The embedded proxy, listening; a refused admin login stops migrate, saying why."""
    try:
        return EmbeddedProxy(config).start()
    except AdminLoginRefused as exc:
        user = f"USER {exc.user!r}" if exc.user else "no USER (libpq took PGUSER or the OS user)"
        raise CommandError(
            f"cannot start the embedded pgmigrate-proxy: PostgreSQL refused the login of its "
            f"admin connection to database '{alias}' ({user}): {exc.reason}. It logs in as "
            f"DATABASES['{alias}'] does; the guard needs {PRIVILEGES}"
        ) from None


@contextlib.contextmanager
def routed(connection: BaseDatabaseWrapper, plan: Plan) -> Iterator[Route]:
    """Route `connection` through a proxy for the duration of the block."""
    original = connection.settings_dict
    proxy: EmbeddedProxy | None = None
    try:
        version = _find(connection, plan.proxy_mode)
        options = plan.session_options()
        if version is not None:
            route = Route(Kind.EXTERNAL, plan.autocommit, proxy_version=version)
            _reconnect(connection, session_settings(original, options, None))
        else:
            proxy = _start_embedded(connection.alias, embedded_config(original, plan))
            route = Route(Kind.EMBEDDED, plan.autocommit, port=proxy.port)
            _reconnect(connection, session_settings(original, options, (proxy.host, proxy.port)))
        setattr(connection, ROUTE_ATTRIBUTE, route)
        yield route
    finally:
        with contextlib.suppress(AttributeError):
            delattr(connection, ROUTE_ATTRIBUTE)
        connection.close()
        connection.settings_dict = original
        if proxy is not None:
            proxy.stop()
