"""The admin console's commands: who may run which, and what each does (SHOW dispatches to the
views in pools.py and guardview.py); each returns the reply's bytes without ReadyForQuery."""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import replace
from typing import Any

from pgmigrate_proxy import __version__
from pgmigrate_proxy.config import KEYS, RELOADABLE, Config, ConfigError
from pgmigrate_proxy.console import guardview, pools, rows
from pgmigrate_proxy.console.host import Access, ConsoleHost
from pgmigrate_proxy.console.parse import WAIT_FOR_CLIENTS, Command, CommandError, Verb
from pgmigrate_proxy.console.rows import Table, Value
from pgmigrate_proxy.protocol.sqlstate import SqlState
from pgmigrate_proxy.runtime.session import Phase
from pgmigrate_proxy.settings import SETTINGS, format_duration

log = logging.getLogger("pgmigrate_proxy.console")

#: How often PAUSE looks whether the clients' transactions are done.
PAUSE_POLL = 0.01
#: Settings SET may not change: addresses, secrets, access, logging, TLS and the guard switch
#: (those need the config file and RELOAD, or a restart).
_NOT_LIVE = frozenset({
    "upstream", "admin_upstream", "log_level", "log_format", "client_tls_cert_file",
    "client_tls_key_file", "client_tls_mode", "auth_type", "auth_file", "auth_query",
    "admin_users", "stats_users", "guard",
})  # fmt: skip
#: What SET may change while the proxy runs.
LIVE: tuple[str, ...] = tuple(k for k in KEYS if k in RELOADABLE and k not in _NOT_LIVE)

HELP = (
    ("SHOW HELP|POOLS|CLIENTS|SERVERS|STATS|STATS_TOTALS|DATABASES|USERS|CONFIG|STATE|VERSION",
     "pgbouncer's views"),
    ("SHOW HELD", "the statements the guard holds now, their targets and blockers"),
    ("SHOW BLOCKERS", "the sessions that block the held statements now"),
    ("SHOW EVENTS [n]", "the last n guard events (20)"),
    ("PAUSE [db]", "wait for the clients' transactions to end; hold new ones until RESUME"),
    ("RESUME [db]", "end a PAUSE"),
    ("RECONNECT [db]", "close the server connections as soon as they are free"),
    ("KILL_CLIENT id", "close the client with this id (SHOW CLIENTS)"),
    ("RELOAD", "read the configuration again (as SIGHUP)"),
    ("SHUTDOWN [WAIT_FOR_CLIENTS]", "stop the proxy (at once, or once the clients have left)"),
    ("SET key = value", "change a setting while running: " + ", ".join(LIVE)),
    ("RELEASE id", "send a held statement now, without waiting for its blockers"),
    ("TERMINATE BLOCKERS [id]", "end the blockers of the held statements (or of one)"),
    ("CANCEL BLOCKERS [id]", "cancel the blockers' queries"),
)  # fmt: skip


async def run(host: ConsoleHost, command: Command, user: str, access: Access) -> bytes:
    """The reply to one command. Raises CommandError."""
    if not command.read_only and access is not Access.ADMIN:
        raise CommandError(
            SqlState.INSUFFICIENT_PRIVILEGE,
            f"permission denied for {command.verb.value}: only admin_users may run it",
        )
    verb = command.verb
    if verb is Verb.EMPTY:
        return rows.empty_query()
    if verb is Verb.SHOW:
        return rows.result(await show(host, command, user, access))
    if verb is Verb.TERMINATE_BLOCKERS or verb is Verb.CANCEL_BLOCKERS:
        unit = command.number if command.argument is not None else None
        terminate = verb is Verb.TERMINATE_BLOCKERS
        table = await guardview.end_blockers(host, user, unit, terminate=terminate)
        return rows.result(table, verb.value)
    if verb is Verb.RELEASE:
        return rows.notice(guardview.release(host, command.number)) + rows.command_complete(
            "RELEASE"
        )
    if verb is Verb.PAUSE:
        await pause(host, command.argument)
    elif verb is Verb.RESUME:
        resume(host, command.argument)
    elif verb is Verb.RECONNECT:
        reconnect(host, command.argument)
    elif verb is Verb.KILL_CLIENT:
        kill_client(host, command.number)
    elif verb is Verb.RELOAD:
        reload(host)
    elif verb is Verb.SHUTDOWN:
        shutdown(host, wait_for_clients=command.argument == WAIT_FOR_CLIENTS)
    elif verb is Verb.SET:
        return set_live(host, command.subject, command.argument or "")
    return rows.command_complete(verb.value)


async def show(host: ConsoleHost, command: Command, user: str, access: Access) -> Table:
    subject = command.subject
    views = {
        "POOLS": pools.pools, "CLIENTS": pools.clients, "SERVERS": pools.servers,
        "STATS": pools.stats, "STATS_TOTALS": pools.stats_totals,
        "DATABASES": pools.databases, "USERS": pools.users, "CONFIG": show_config,
        "STATE": show_state, "HELD": guardview.show_held,
    }  # fmt: skip
    if subject in views:
        return views[subject](host)
    if subject == "BLOCKERS":
        return await guardview.show_blockers(host, user)
    if subject == "EVENTS":
        return guardview.show_events(host, command.number, reveal=access is Access.ADMIN)
    if subject == "VERSION":
        return Table(("version",), [(f"pgmigrate-proxy {__version__}",)])
    return Table(("command", "description"), [(c, d) for c, d in HELP])


def _shown(config: Config, key: str, value: object) -> str:
    if key == "upstream":
        return config.upstream_redacted()
    if key == "admin_upstream":
        return config.admin_upstream_redacted() if value is not None else ""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(value)
    if SETTINGS[key].kind == "duration" and isinstance(value, (int, float)):
        return format_duration(float(value))
    return str(value)


def show_config(host: ConsoleHost) -> Table:
    config = host.config
    found: list[tuple[Value, ...]] = []
    for key in KEYS:
        default = SETTINGS[key].default
        shown_default = "" if key == "upstream" else _shown(config, key, default)
        changeable = "yes" if key in LIVE else "no"
        found.append((key, _shown(config, key, getattr(config, key)), shown_default, changeable))
    return Table(("key", "value", "default", "changeable"), found)


def show_state(host: ConsoleHost) -> Table:
    paused = sorted(db for db in host.gate.paused if db is not None)
    found: list[tuple[Value, ...]] = [
        ("active", "no" if None in host.gate.paused else "yes"),
        ("paused", "yes" if None in host.gate.paused else "no"),
        ("suspended", "no"),
        ("paused_databases", ",".join(paused)),
        ("guard", "on" if host.config.guard else "off"),
        ("admin_connection", "up" if host.guard.admin_up else "down"),
        ("held_statements", str(len(host.guard.context.held))),
    ]
    return Table(("key", "value"), found)


async def pause(host: ConsoleHost, database: str | None) -> None:
    """PAUSE [db]: from now on no client of `database` (None: all) starts a new transaction;
    returns once every one of them is between transactions (gated)."""
    gate = host.gate
    if database in gate.paused or None in gate.paused:
        raise CommandError(SqlState.OBJECT_NOT_IN_PREREQUISITE_STATE, "already paused")
    gate.paused.add(database)
    log.info("console: PAUSE %s", database or "(all)")
    while database in gate.paused:  # (a RESUME meanwhile ends the wait)
        busy = [
            s for s in host.sessions
            if gate.covers(s, database) and s.phase is Phase.RELAY and not gate.close(s)
        ]  # fmt: skip
        if not busy:
            return
        await asyncio.sleep(PAUSE_POLL)


def resume(host: ConsoleHost, database: str | None) -> None:
    gate = host.gate
    if database is None:
        if not gate.paused:
            raise CommandError(SqlState.OBJECT_NOT_IN_PREREQUISITE_STATE, "not paused")
        gate.paused.clear()
    elif database in gate.paused:
        gate.paused.discard(database)
    else:
        raise CommandError(
            SqlState.OBJECT_NOT_IN_PREREQUISITE_STATE, f'database "{database}" is not paused'
        )
    count = gate.open(host.sessions)
    log.info("console: RESUME %s: %d client(s) go on", database or "(all)", count)


def reconnect(host: ConsoleHost, database: str | None) -> None:
    """RECONNECT [db]: idle servers closed now, the others when their client gives them back
    (marked older than any server_lifetime)."""
    for pool in pools.pool_of(host, database):
        for lease in list(pool.leases.values()):
            lease.born = -math.inf
        for lease in list(pool.idle):
            pool.close(lease)
    log.info("console: RECONNECT %s", database or "(all)")


def kill_client(host: ConsoleHost, client: int) -> None:
    for session in host.sessions:
        if host.client_id(session) == client:
            log.info("console: KILL_CLIENT %d (%s)", client, session.peer)
            session.fail(
                SqlState.ADMIN_SHUTDOWN,
                "terminating connection due to administrator command",
                detail="KILL_CLIENT from the pgmigrate-proxy admin console",
            )
            return
    raise CommandError(SqlState.UNDEFINED_OBJECT, f"no client with id {client}")


def reload(host: ConsoleHost) -> None:
    if host.reload_hook is None:
        raise CommandError(
            SqlState.OBJECT_NOT_IN_PREREQUISITE_STATE,
            "RELOAD needs the pgmigrate-proxy service (this proxy has no configuration to read)",
        )
    host.reload_hook("RELOAD from the admin console")


def shutdown(host: ConsoleHost, *, wait_for_clients: bool) -> None:
    if host.stop_hook is None:
        raise CommandError(
            SqlState.OBJECT_NOT_IN_PREREQUISITE_STATE,
            "SHUTDOWN needs the pgmigrate-proxy service (an embedded proxy stops with its owner)",
        )
    host.stop(wait_for_clients=wait_for_clients)


def set_live(host: ConsoleHost, key: str, value: str) -> bytes:
    """SET key = value: one setting, checked as the config file's, applied as a RELOAD does."""
    if key not in SETTINGS:
        message = f'unrecognized configuration parameter "{key}"'
        raise CommandError(SqlState.UNDEFINED_OBJECT, message)
    if key not in LIVE:
        raise CommandError(
            SqlState.OBJECT_NOT_IN_PREREQUISITE_STATE,
            f'parameter "{key}" cannot be changed with SET (the config file and RELOAD, or a '
            "restart)",
        )
    try:
        changes: dict[str, Any] = {key: value}  # (Config checks and normalizes it)
        new = replace(host.config, **changes)
    except ConfigError as exc:
        raise CommandError(SqlState.INVALID_PARAMETER_VALUE, str(exc)) from None
    host.reload(new)
    log.info("console: SET %s = %s", key, _shown(new, key, getattr(new, key)))
    return rows.command_complete("SET")
