"""The admin console's views of clients, servers and pools: SHOW POOLS, CLIENTS, SERVERS, STATS,
STATS_TOTALS, DATABASES and USERS, with pgbouncer's column names and meanings.

Times are microseconds where pgbouncer's are (wait_us, total_wait_time, xact_time,
query_time); timestamps are UTC text. query_time runs from a client's request going out to a
server with no query running there until its ReadyForQuery, xact_time from a transaction's
first request until its ReadyForQuery 'I' (idle in transaction included), as the relay sees
them (runtime/backend.py ServerConnection.sending): the proxy's own queries on a server, and
the guard's attempts of a held statement, are not counted.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from datetime import datetime, timezone

from pgmigrate_proxy.console.host import ConsoleHost, database_of
from pgmigrate_proxy.console.rows import Table, Value
from pgmigrate_proxy.poolconfig import pool_settings
from pgmigrate_proxy.runtime.backend import ServerConnection
from pgmigrate_proxy.runtime.pool import Pool
from pgmigrate_proxy.runtime.poolstate import client_state, pool_counts, server_state, waiting_since
from pgmigrate_proxy.runtime.stats import PoolStats

_MICRO = 1_000_000

POOLS_COLUMNS = (
    "database", "user", "cl_active", "cl_waiting", "cl_active_cancel_req",
    "cl_waiting_cancel_req", "sv_active", "sv_active_cancel", "sv_being_canceled", "sv_idle",
    "sv_used", "sv_tested", "sv_login", "maxwait", "maxwait_us", "pool_mode",
)  # fmt: skip
CONNECTION_COLUMNS = (
    "type", "user", "database", "replication", "state", "addr", "port", "local_addr",
    "local_port", "connect_time", "request_time", "wait", "wait_us", "close_needed", "ptr",
    "link", "remote_pid", "tls", "application_name", "prepared_statements", "id",
)  # fmt: skip
STATS_COLUMNS = (
    "database", "total_server_assignment_count", "total_xact_count", "total_query_count",
    "total_received", "total_sent", "total_xact_time", "total_query_time", "total_wait_time",
    "avg_server_assignment_count", "avg_xact_count", "avg_query_count", "avg_recv", "avg_sent",
    "avg_xact_time", "avg_query_time", "avg_wait_time",
)  # fmt: skip
STATS_TOTALS_COLUMNS = (
    "database", "server_assignment_count", "xact_count", "query_count", "bytes_received",
    "bytes_sent", "xact_time", "query_time", "wait_time",
)  # fmt: skip
DATABASES_COLUMNS = (
    "name", "host", "port", "database", "force_user", "pool_size", "min_pool_size",
    "reserve_pool_size", "server_lifetime", "pool_mode", "max_connections",
    "current_connections", "max_client_connections", "current_client_connections", "paused",
    "disabled",
)  # fmt: skip
USERS_COLUMNS = (
    "name", "pool_size", "reserve_pool_size", "pool_mode", "max_user_connections",
    "current_connections", "max_user_client_connections", "current_client_connections",
)  # fmt: skip


def timestamp(wall: float | None) -> str | None:
    if wall is None or not math.isfinite(wall):
        return None
    return datetime.fromtimestamp(wall, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _wall(monotonic: float) -> float:
    """A time.monotonic() reading as wall-clock time."""
    return time.time() - (time.monotonic() - monotonic)


def pools(host: ConsoleHost) -> Table:
    now = time.monotonic()
    counts = pool_counts(host.pools, host.sessions)
    rows: list[tuple[Value, ...]] = []
    for key, pool in sorted(host.pools.pools.items()):
        found = counts[key]
        cl, sv = found.clients, found.servers
        longest = now - found.oldest_wait if found.oldest_wait is not None else 0.0
        rows.append((
            *key, cl["active"] + cl["idle"], cl["waiting"], 0, 0, sv["active"], 0,
            found.cancelling, sv["idle"], sv["used"], sv["tested"], sv["login"], int(longest),
            int(longest * _MICRO) % _MICRO, pool.settings.pool_mode.value,
        ))  # fmt: skip
    return Table(POOLS_COLUMNS, rows)


def _address(transport_info: object) -> tuple[str | None, int | None]:
    if isinstance(transport_info, tuple) and len(transport_info) >= 2:
        return str(transport_info[0]), int(transport_info[1])
    return (str(transport_info), None) if transport_info else (None, None)


def _ends(server: ServerConnection) -> tuple[str | None, int | None, str | None, int | None]:
    transport = server.transport
    if transport is None:
        return None, None, None, None
    return (
        *_address(transport.get_extra_info("peername")),
        *_address(transport.get_extra_info("sockname")),
    )


def clients(host: ConsoleHost) -> Table:
    now = time.monotonic()
    rows: list[tuple[Value, ...]] = []
    for session in sorted(host.sessions, key=host.client_id):
        client = session.client
        peer = _address(client.get_extra_info("peername")) if client is not None else (None, None)
        local = _address(client.get_extra_info("sockname")) if client is not None else (None, None)
        since = waiting_since(session)
        wait = now - since if since is not None else 0.0
        server = session.server
        rows.append((
            "C", session.parameters.get("user"), database_of(session), "none",
            client_state(session), *peer, *local, timestamp(session.started),
            timestamp(session.started), int(wait), int(wait * _MICRO) % _MICRO, 0,
            f"0x{id(session):x}", server.server_pid if server is not None else None,
            0,  # (the client's process: unknown over TCP, as pgbouncer says)
            "TLS" if session.tls else "", session.parameters.get("application_name", ""), 0,
            host.client_id(session),
        ))  # fmt: skip
    return Table(CONNECTION_COLUMNS, rows)


def servers(host: ConsoleHost) -> Table:
    linked = {s.server: host.client_id(s) for s in host.sessions if s.server is not None}
    rows: list[tuple[Value, ...]] = []
    for (database, user), pool in sorted(host.pools.pools.items()):
        for lease in sorted(pool.leases.values(), key=lambda lease: lease.server.server_pid):
            server = lease.server
            tls = server.transport is not None and server.transport.get_extra_info("sslcontext")
            rows.append((
                "S", user, database, "none", server_state(lease), *_ends(server),
                timestamp(_wall(lease.born)), timestamp(_wall(lease.idle_since or lease.born)),
                0, 0, int(not math.isfinite(lease.born)), f"0x{id(server):x}",
                linked.get(server), server.server_pid, "TLS" if tls else "",
                lease.current.get("application_name", ""), 0, server.server_pid,
            ))  # fmt: skip
    return Table(CONNECTION_COLUMNS, rows)


def _per_database(host: ConsoleHost) -> dict[str, PoolStats]:
    found: dict[str, PoolStats] = {}
    for (database, _user), pool in host.pools.pools.items():
        found.setdefault(database, PoolStats()).add(pool.stats)
    return found


def _avg_wait(stats: PoolStats) -> int:
    return int(stats.wait_time / stats.wait_count * _MICRO) if stats.wait_count else 0


def _avg(seconds: float, count: int) -> int:
    return int(seconds / count * _MICRO) if count else 0


def stats(host: ConsoleHost) -> Table:
    """Totals since the start, and averages: counts per second since the start; wait, query
    and transaction time per wait, query and transaction (pgbouncer averages over its last
    stats_period instead)."""
    uptime = max(time.time() - host.started, 1e-6)
    rows: list[tuple[Value, ...]] = []
    for database, s in sorted(_per_database(host).items()):
        rows.append((
            database, s.server_assignment_count, s.xact_count, s.query_count, s.bytes_received,
            s.bytes_sent, int(s.xact_time * _MICRO), int(s.query_time * _MICRO),
            int(s.wait_time * _MICRO), round(s.server_assignment_count / uptime),
            round(s.xact_count / uptime), round(s.query_count / uptime),
            round(s.bytes_received / uptime), round(s.bytes_sent / uptime),
            _avg(s.xact_time, s.xact_count), _avg(s.query_time, s.query_count), _avg_wait(s),
        ))  # fmt: skip
    return Table(STATS_COLUMNS, rows)


def stats_totals(host: ConsoleHost) -> Table:
    rows: list[tuple[Value, ...]] = []
    for database, s in sorted(_per_database(host).items()):
        rows.append((
            database, s.server_assignment_count, s.xact_count, s.query_count, s.bytes_received,
            s.bytes_sent, int(s.xact_time * _MICRO), int(s.query_time * _MICRO),
            int(s.wait_time * _MICRO),
        ))  # fmt: skip
    return Table(STATS_TOTALS_COLUMNS, rows)


def _names(host: ConsoleHost, overrides: Iterable[str], index: int) -> list[str]:
    known = {key[index] for key in host.pools.pools}
    return sorted(known | set(overrides))


def databases(host: ConsoleHost) -> Table:
    upstream = host.settings.upstream
    config = host.config
    servers_of: dict[str, int] = {}
    for (database, _user), pool in host.pools.pools.items():
        servers_of[database] = servers_of.get(database, 0) + pool.size
    client_count: dict[str, int] = {}
    for session in host.sessions:
        client_count[database_of(session)] = client_count.get(database_of(session), 0) + 1
    rows: list[tuple[Value, ...]] = []
    for name in _names(host, config.pool_overrides.databases, 0):
        settings = pool_settings(config, name, "")
        rows.append((
            name, upstream.host, upstream.port, name, None, settings.pool_size,
            settings.min_pool_size, settings.reserve_pool_size, int(settings.server_lifetime),
            settings.pool_mode.value, settings.max_db_connections, servers_of.get(name, 0), 0,
            client_count.get(name, 0), int(host.gate.is_paused(name)), 0,
        ))  # fmt: skip
    for name in ("pgbouncer", "pgmigrate"):  # the console's: no server behind them
        rows.append((
            name, None, None, name, None, 0, 0, 0, 0, "statement", 0, 0, 0,
            client_count.get(name, 0), 0, 0,
        ))  # fmt: skip
    return Table(DATABASES_COLUMNS, rows)


def users(host: ConsoleHost) -> Table:
    config = host.config
    servers_of: dict[str, int] = {}
    for (_database, user), pool in host.pools.pools.items():
        servers_of[user] = servers_of.get(user, 0) + pool.size
    client_count: dict[str, int] = {}
    for session in host.sessions:
        user = session.parameters.get("user", "")
        client_count[user] = client_count.get(user, 0) + 1
    rows: list[tuple[Value, ...]] = []
    for name in _names(host, config.pool_overrides.users, 1):
        override = config.pool_overrides.users.get(name, {})
        rows.append((
            name, override.get("pool_size"), override.get("reserve_pool_size"),
            override.get("pool_mode"), override.get("max_user_connections", 0),
            servers_of.get(name, 0), 0, client_count.get(name, 0),
        ))  # fmt: skip
    return Table(USERS_COLUMNS, rows)


def pool_of(host: ConsoleHost, database: str | None) -> list[Pool]:
    """The pools of `database` (None: all)."""
    return [p for (db, _u), p in host.pools.pools.items() if database in (None, db)]
