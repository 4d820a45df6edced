"""The proxy's admin connection (psycopg, async): lock and activity queries, cancel, terminate."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Coroutine, Mapping
from types import TracebackType
from typing import Any, Final, TypeVar

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import DictRow, dict_row

from pgmigrate_proxy import adminlogin
from pgmigrate_proxy.errors import ConnectionFailure
from pgmigrate_proxy.guard.blockers import (
    BackendState,
    Blocker,
    RelationLock,
    parse_pga_context,
    report_query,
)
from pgmigrate_proxy.guard.drain import LOCKS_SQL
from pgmigrate_proxy.sql.locks import CONFLICTS, LockMode

APPLICATION_NAME: Final = "pgmigrate-proxy admin"

log = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a cancelled query may take to unwind before it is cancelled again.
_UNWIND_SECONDS = 0.5

_CONNECTION_DEFAULTS: Mapping[str, str] = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
}

# One row per blocker; the FROM clause names pg_stat_activity `a` and may name
# pg_prepared_xacts `p`, and provides `pid`, `xid` and `locks` (json).
_BLOCKER_COLUMNS = """
    SELECT b.pid, b.locks, a.state, a.backend_type,
           coalesce(a.datname, p.database)::text AS datname,
           coalesce(a.usename, p.owner)::text AS usename,
           coalesce(a.application_name, '') AS application_name,
           host(a.client_addr) AS client_addr,
           extract(epoch FROM statement_timestamp() - coalesce(a.xact_start, p.prepared))::float8
               AS xact_age,
           extract(epoch FROM statement_timestamp() - a.query_start)::float8 AS query_age,
           a.query, a.wait_event_type, p.gid AS prepared_xact,
           %(viewer)s::oid IS NULL
           OR coalesce(pg_has_role(%(viewer)s::oid, 'pg_read_all_stats', 'USAGE')
                       OR pg_has_role(%(viewer)s::oid,
                                      coalesce(a.usesysid, (SELECT r.oid FROM pg_roles AS r
                                                            WHERE r.rolname = p.owner)),
                                      'USAGE'),
                       false) AS visible
"""

# Relation locks held or awaited, in a mode conflicting with the needed one, by sessions other
# than the excluded ones. A prepared transaction's locks have no pid; its xid is that of the
# transactionid lock under the same virtualtransaction (whose format varies between versions).
_FIND_BLOCKERS = (
    """
    WITH locks AS MATERIALIZED (
        SELECT pid, virtualtransaction, locktype, database, relation, transactionid, mode, granted
        FROM pg_locks
        WHERE locktype IN ('relation', 'transactionid')
    ),
    conflicting(relation, mode) AS (
        SELECT * FROM unnest(%(relations)s::oid[], %(modes)s::text[])
    ),
    hits AS (
        SELECT l.pid, l.virtualtransaction, l.relation, l.mode, l.granted
        FROM locks AS l
        JOIN conflicting AS c ON c.relation = l.relation AND c.mode = l.mode
        WHERE l.locktype = 'relation'
          AND l.database = (SELECT oid FROM pg_database
                            WHERE datname = coalesce(%(database)s::text, current_database()))
          AND (l.pid IS NULL OR l.pid <> ALL (%(exclude)s::int[]))
    ),
    b AS (
        SELECT coalesce(h.pid, 0) AS pid, x.transactionid::text AS xid,
               json_agg(json_build_object('relation', h.relation, 'mode', h.mode,
                                          'granted', h.granted)
                        ORDER BY h.relation, h.mode) AS locks
        FROM hits AS h
        LEFT JOIN locks AS x
          ON h.pid IS NULL AND x.pid IS NULL AND x.locktype = 'transactionid'
             AND x.virtualtransaction = h.virtualtransaction
        GROUP BY 1, 2
    )
    """
    + _BLOCKER_COLUMNS
    + """
    FROM b
    LEFT JOIN pg_stat_activity AS a ON a.pid = b.pid AND b.xid IS NULL
    LEFT JOIN pg_prepared_xacts AS p ON p.transaction::text = b.xid
    WHERE a.pid IS NOT NULL OR p.gid IS NOT NULL
    ORDER BY b.pid, p.gid
    """
)

_ACTIVITY = (
    "WITH b AS (SELECT pid, NULL::json AS locks FROM unnest(%(pids)s::int[]) AS pid)"
    + _BLOCKER_COLUMNS
    + """
    FROM b
    JOIN pg_stat_activity AS a ON a.pid = b.pid
    LEFT JOIN pg_prepared_xacts AS p ON false
    ORDER BY b.pid
    """
)


# The session user of a waiting backend (it could RESET ROLE to it: its rights are the client's)
# and whether it owns each relation the backend waits to lock.
_WAITER_OWNS = """
    SELECT a.usesysid, bool_and(pg_has_role(a.usesysid, c.relowner, 'USAGE')) AS owns
    FROM pg_stat_activity AS a
    JOIN pg_locks AS l ON l.pid = a.pid AND NOT l.granted AND l.locktype = 'relation'
    JOIN pg_class AS c ON c.oid = l.relation
    WHERE a.pid = %(pid)s
    GROUP BY a.usesysid
"""


# Whether a backend's role is a superuser or a member of pg_signal_backend.
_ADMIN_LIKE = """
    SELECT r.rolsuper OR pg_has_role(r.oid, 'pg_signal_backend', 'MEMBER') AS ok
    FROM pg_stat_activity AS a JOIN pg_roles AS r ON r.oid = a.usesysid
    WHERE a.pid = %(pid)s
"""


def blockers_query(
    relation_modes: Mapping[int, LockMode | str],
    exclude_pids: Collection[int] = (),
    *,
    database: str | None = None,
    viewer: int | None = None,
) -> tuple[str, dict[str, Any]]:
    """find_blockers' query and parameters (pyformat), for a program that runs it on a
    connection of its own (`manage.py pgmigrate_blockers`: with the user's own rights).
    Columns: pid, locks, state, backend_type, datname, usename, application_name, client_addr,
    xact_age, query_age, query (raw), wait_event_type, prepared_xact, visible."""
    relations, modes = _conflicting_pairs(relation_modes)
    params = {
        "relations": relations,
        "modes": modes,
        "database": database,
        "exclude": sorted(exclude_pids),
        "viewer": viewer,
    }
    return _FIND_BLOCKERS, params


def activity_query(
    pids: Collection[int], *, viewer: int | None = None
) -> tuple[str, dict[str, Any]]:
    """activity()'s query and parameters, as blockers_query gives find_blockers'."""
    return _ACTIVITY, {"pids": sorted({pid for pid in pids if pid > 0}), "viewer": viewer}


_ROLE_OID = "SELECT oid FROM pg_catalog.pg_roles WHERE rolname = %(name)s"
_MAY_SIGNAL = """
    SELECT a.pid FROM pg_catalog.pg_stat_activity AS a
    JOIN pg_catalog.pg_roles AS me ON me.rolname = %(role)s
    WHERE a.pid = ANY(%(pids)s::int[])
      AND (me.rolsuper
           OR (NOT coalesce((SELECT r.rolsuper FROM pg_catalog.pg_roles AS r
                             WHERE r.oid = a.usesysid), false)
               AND coalesce(pg_catalog.pg_has_role(me.oid, a.usesysid, 'USAGE')
                            OR pg_catalog.pg_has_role(me.oid, 'pg_signal_backend', 'USAGE'),
                            false)))
"""


class AdminUnavailable(ConnectionFailure):
    """The admin connection could not be opened, was lost beyond repair, or a query timed out."""


class AdminLoginRefused(AdminUnavailable):
    """PostgreSQL refused the admin login (user, password, database, pg_hba.conf): at start a
    setup error; later an outage like any other. `user` and `reason` (the server's words) let
    a caller say it in its own terms."""

    def __init__(self, conninfo: str, libpq_message: str) -> None:
        super().__init__(adminlogin.refusal(conninfo, libpq_message))
        self.user = adminlogin.conninfo_user(conninfo)
        self.reason = adminlogin.server_reason(libpq_message)


def _blocker(row: DictRow) -> Blocker:
    locks = tuple(
        RelationLock(int(lock["relation"]), LockMode[lock["mode"]], bool(lock["granted"]))
        for lock in row["locks"] or ()
    )
    return Blocker(
        pid=row["pid"],
        state=BackendState.parse(row["state"]),
        backend_type=row["backend_type"],
        datname=row["datname"],
        usename=row["usename"],
        application_name=row["application_name"],
        client_addr=row["client_addr"],
        xact_age=row["xact_age"],
        query_age=row["query_age"],
        query=report_query(row["query"]),
        wait_event_type=row["wait_event_type"],
        locks=locks,
        context=parse_pga_context(row["query"]),
        prepared_xact=row["prepared_xact"],
        visible=bool(row["visible"]),
    )


def _conflicting_pairs(relation_modes: Mapping[int, LockMode | str]) -> tuple[list[int], list[str]]:
    """Parallel arrays (relation OID, held mode) of every held lock that would block the need."""
    relations: list[int] = []
    modes: list[str] = []
    for oid, needed in relation_modes.items():
        needed = LockMode[needed] if isinstance(needed, str) else needed
        for held in sorted(CONFLICTS[needed]):
            relations.append(oid)
            modes.append(held.name)
    return relations, modes


class AdminConnection:
    """One autocommit psycopg connection for the guard's queries and signals.

    Every query runs with `statement_timeout` on the server and a slightly longer deadline on
    the client; a connection found lost is reopened (exponential backoff, `reconnect_attempts`
    tries) and the query run once more. Failures surface as AdminUnavailable.

    The role must see other sessions' activity and signal them: a superuser, or a role granted
    pg_read_all_stats and pg_signal_backend (which cannot signal superusers' sessions). One
    connection serves every database: find_blockers takes the database to look in.
    """

    def __init__(
        self,
        conninfo: str,
        *,
        statement_timeout: float = 2.0,
        connect_timeout: float = 5.0,
        reconnect_attempts: int = 6,
        reconnect_delay: float = 0.1,
        reconnect_max_delay: float = 5.0,
    ) -> None:
        self._conninfo = conninfo
        self._statement_timeout = statement_timeout
        self._connect_timeout = connect_timeout
        self._reconnect_attempts = max(1, reconnect_attempts)
        self._reconnect_delay = reconnect_delay
        self._reconnect_max_delay = reconnect_max_delay
        self._conn: psycopg.AsyncConnection[DictRow] | None = None
        self._pid = 0
        self._lock = asyncio.Lock()
        self._listen: tuple[str, Callable[[str], None]] | None = None

    async def __aenter__(self) -> AdminConnection:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def conninfo(self) -> str:
        """Its conninfo (with any password: never log it)."""
        return self._conninfo

    @property
    def pid(self) -> int:
        """The backend pid of the current (or last) admin session; 0 before the first connect."""
        return self._pid

    @property
    def connected(self) -> bool:
        """True while the connection is open and not known to be broken."""
        conn = self._conn
        return conn is not None and not conn.closed and not conn.broken

    async def connect(self) -> None:
        """Open the connection (once; see ensure() for retries), replacing any previous one.
        Raises AdminLoginRefused when PostgreSQL refuses the login, else AdminUnavailable."""
        await self._discard()
        try:
            self._conn = await _within(self._open(), self._connect_timeout)
        except psycopg.Error as exc:
            if adminlogin.refused(str(exc)):
                raise AdminLoginRefused(self._conninfo, str(exc)) from exc
            raise AdminUnavailable(f"cannot open the admin connection: {_describe(exc)}") from exc
        except (OSError, asyncio.TimeoutError) as exc:
            raise AdminUnavailable(f"cannot open the admin connection: {_describe(exc)}") from exc
        self._pid = self._conn.info.backend_pid
        log.info("admin connection open (backend pid %d)", self._pid)

    async def ensure(self) -> None:
        """Connected: reopen a lost connection, with exponential backoff between attempts."""
        if self.connected:
            return
        async with self._lock:
            delay = self._reconnect_delay
            for attempt in range(1, self._reconnect_attempts + 1):
                if self.connected:
                    return
                try:
                    await self.connect()
                    return
                except AdminUnavailable as exc:
                    if attempt == self._reconnect_attempts:
                        raise
                    log.warning("%s; retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._reconnect_max_delay)

    async def close(self) -> None:
        """Close the connection; ensure() or connect() may open it again."""
        await self._discard()

    async def find_blockers(
        self,
        relation_oids: Mapping[int, LockMode | str],
        exclude_pids: Collection[int] = (),
        *,
        database: str | None = None,
        viewer: int | None = None,
    ) -> list[Blocker]:
        """Sessions and prepared transactions holding or awaiting a lock on one of the relations
        (OID -> the mode the guarded statement needs) in a conflicting mode, in `database` (the
        admin connection's own by default); the admin session and `exclude_pids` left out.
        `viewer`: the OID of the role on whose behalf they are looked for; each Blocker's
        `visible` says whether that role may see its details in pg_stat_activity."""
        if not relation_oids:
            return []
        relations, modes = _conflicting_pairs(relation_oids)
        params = {
            "relations": relations,
            "modes": modes,
            "database": database,
            "exclude": sorted({*exclude_pids, self._pid}),
            "viewer": viewer,
        }
        return [_blocker(row) for row in await self._fetch(_FIND_BLOCKERS, params)]

    async def blocking_pids(self, pid: int) -> list[int]:
        """pg_blocking_pids(pid), without duplicates; a 0 stands for a prepared transaction."""
        rows = await self._fetch("SELECT pg_blocking_pids(%(pid)s) AS pids", {"pid": pid})
        return list(dict.fromkeys(rows[0]["pids"] or ()))

    async def activity(self, pids: Collection[int], *, viewer: int | None = None) -> list[Blocker]:
        """pg_stat_activity of these sessions (no lock details; 0 and vanished pids left out);
        `viewer` as for find_blockers."""
        wanted = sorted({pid for pid in pids if pid > 0})  # unique: one row each
        if not wanted:
            return []
        params = {"pids": wanted, "viewer": viewer}
        return [_blocker(row) for row in await self._fetch(_ACTIVITY, params)]

    async def waiter_owns(self, pid: int) -> tuple[int | None, bool]:
        """For a backend waiting for relation locks: its session user's OID, and whether that
        role owns (or is a superuser for) every relation the backend waits for. (None, False)
        when it waits for no relation lock."""
        rows = await self._fetch(_WAITER_OWNS, {"pid": pid})
        if not rows:
            return None, False
        return int(rows[0]["usesysid"]), bool(rows[0]["owns"])

    async def lock_rows(
        self, relations: Collection[int], *, database: str
    ) -> list[tuple[int, int, str, bool]]:
        """The relation locks held or awaited on `relations` in `database`: (pid, relation OID,
        mode, granted) rows of pg_locks (a drain's snapshot of who holds its tables)."""
        if not relations:
            return []
        params = {"relations": sorted(relations), "database": database}
        rows = await self._fetch(LOCKS_SQL, params)
        return [(r["pid"], r["relation"], r["mode"], r["granted"]) for r in rows]

    async def alive(self, pids: Collection[int]) -> set[int]:
        """Those of `pids` that are backends now (in pg_stat_activity: any role sees every pid)."""
        wanted = sorted({pid for pid in pids if pid > 0})
        if not wanted:
            return set()
        query = "SELECT pid FROM pg_catalog.pg_stat_activity WHERE pid = ANY(%(pids)s::int[])"
        return {int(row["pid"]) for row in await self._fetch(query, {"pids": wanted})}

    async def admin_like(self, pid: int) -> bool:
        """Whether backend `pid` is a session of a superuser or of a member of
        pg_signal_backend (a role that may act as an admin connection); False when it is gone."""
        rows = await self._fetch(_ADMIN_LIKE, {"pid": pid})
        return bool(rows and rows[0]["ok"])

    async def notify_all(self, channel: str, payloads: list[str]) -> bool:
        """pg_notify(channel, p) for each payload, in one statement (they are delivered together
        and in order); False as for notify()."""
        return await self.poll(
            "SELECT pg_notify(%(channel)s, p) FROM unnest(%(payloads)s::text[])"
            " WITH ORDINALITY AS t(p, n) ORDER BY n",
            {"channel": channel, "payloads": payloads},
        )

    async def terminate(self, pid: int) -> bool:
        """pg_terminate_backend(pid); False when it is no backend (or is this admin session)."""
        return await self._signal("SELECT pg_terminate_backend(%(pid)s) AS ok", pid)

    async def cancel(self, pid: int) -> bool:
        """pg_cancel_backend(pid): ends a running query, not an idle-in-transaction session."""
        return await self._signal("SELECT pg_cancel_backend(%(pid)s) AS ok", pid)

    async def role_oid(self, name: str) -> int | None:
        """The OID of role `name` (None: no such role)."""
        rows = await self._fetch(_ROLE_OID, {"name": name})
        return int(rows[0]["oid"]) if rows else None

    async def may_signal(self, role: str, pids: Collection[int]) -> set[int]:
        """Those of `pids` that role `role` could end itself with pg_terminate_backend or
        pg_cancel_backend (PostgreSQL's rule: a superuser any; otherwise not a superuser's
        session, and a member of the session's role or of pg_signal_backend)."""
        wanted = sorted({pid for pid in pids if pid > 0})
        if not wanted:
            return set()
        rows = await self._fetch(_MAY_SIGNAL, {"role": role, "pids": wanted})
        return {int(row["pid"]) for row in rows}

    async def lookup_user(self, query: str, user: str) -> tuple[object, ...] | None:
        """auth_query's first row for `user` (None: no row), the name bound as `$1`."""
        rows = await self._fetch(query, (user,))
        return tuple(rows[0].values()) if rows else None

    async def listen(self, channel: str, callback: Callable[[str], None]) -> None:
        """LISTEN on `channel` now (when connected) and after each reconnect; `callback` gets each
        payload. PostgreSQL delivers them while this connection runs a query (see poll())."""
        self._listen = (channel, callback)
        conn = self._conn
        if self.connected and conn is not None:
            await self._quick(conn, sql.SQL("LISTEN {}").format(sql.Identifier(channel)), None)
            conn.add_notify_handler(lambda notify: callback(notify.payload))

    async def notify(self, channel: str, payload: str) -> bool:
        """pg_notify(channel, payload) when the connection is up; False (nothing sent, no
        reconnect: the guard reconnects when it needs to) when it is down or the send failed."""
        return await self.poll("SELECT pg_notify(%(channel)s, %(payload)s)",
                               {"channel": channel, "payload": payload})  # fmt: skip

    async def poll(self, query: str = "SELECT 1", params: Mapping[str, Any] | None = None) -> bool:
        """One short query if the connection is up (it also delivers pending notifications)."""
        conn = self._conn
        if not self.connected or conn is None:
            return False
        try:
            await self._quick(conn, query, params)
        except (psycopg.Error, asyncio.TimeoutError) as exc:
            log.debug("admin connection: %s", _describe(exc))
            return False
        return True

    async def _quick(
        self, conn: psycopg.AsyncConnection[DictRow], query: Any, params: Mapping[str, Any] | None
    ) -> None:
        async def run() -> None:
            await conn.execute(query, params)

        await _within(run(), self._statement_timeout + 1.0)

    async def _signal(self, query: str, pid: int) -> bool:
        if pid <= 0 or pid == self._pid:
            return False
        rows = await self._fetch(query, {"pid": pid})
        return bool(rows[0]["ok"])

    async def _open(self) -> psycopg.AsyncConnection[DictRow]:
        params = {**_CONNECTION_DEFAULTS, **conninfo_to_dict(self._conninfo)}
        params["application_name"] = APPLICATION_NAME
        params.setdefault("connect_timeout", str(max(2, int(self._connect_timeout))))
        conn = await psycopg.AsyncConnection.connect(
            make_conninfo("", **params), autocommit=True, row_factory=dict_row
        )
        try:
            timeout = f"{max(1, int(self._statement_timeout * 1000))}ms"
            await conn.execute(
                "SELECT set_config('statement_timeout', %(timeout)s, false),"
                " set_config('lock_timeout', %(timeout)s, false),"
                " set_config('search_path', 'pg_catalog', false)",
                {"timeout": timeout},
            )
            if self._listen is not None:
                channel, callback = self._listen
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                conn.add_notify_handler(lambda notify: callback(notify.payload))
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _fetch(
        self, query: str, params: Mapping[str, Any] | tuple[Any, ...]
    ) -> list[DictRow]:
        """Run `query`, reconnecting and running it once more when the connection was lost
        (a tuple of params: `query` takes them as `$1`, `$2`, ... through a raw cursor)."""
        for attempt in (1, 2):
            await self.ensure()
            conn = self._conn
            assert conn is not None
            try:
                return await _within(_execute(conn, query, params), self._statement_timeout + 1.0)
            except asyncio.TimeoutError as exc:
                await self._discard()
                raise AdminUnavailable("an admin query timed out; reconnecting") from exc
            except psycopg.OperationalError as exc:
                if not (conn.closed or conn.broken):
                    raise  # the query failed (statement_timeout, ...), the connection is fine
                await self._discard()
                log.warning("admin connection lost: %s", _describe(exc))
                if attempt == 2:
                    raise AdminUnavailable(f"admin connection lost: {_describe(exc)}") from exc
        raise AssertionError("unreachable")

    async def _discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            await conn.close()


async def _execute(
    conn: psycopg.AsyncConnection[DictRow],
    query: str,
    params: Mapping[str, Any] | tuple[Any, ...],
) -> list[DictRow]:
    if isinstance(params, tuple):
        async with psycopg.AsyncRawCursor(conn, row_factory=dict_row) as raw:
            await raw.execute(query, params)
            return await raw.fetchall()
    async with conn.cursor() as cur:
        await cur.execute(query, params)
        return await cur.fetchall()


async def _within(work: Coroutine[Any, Any, T], timeout: float) -> T:
    """`work`'s result, or asyncio.TimeoutError after `timeout` seconds and a bounded unwind.

    Unlike asyncio.wait_for, this does not wait for psycopg's own handling of a cancel (a
    cancel request to the server, up to 10 s): a second cancel makes psycopg close the
    connection at once.
    """
    task = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if done:
        return task.result()
    for _ in range(2):
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=_UNWIND_SECONDS)
        if done:
            if not task.cancelled():
                task.exception()  # retrieved: the timeout is what the caller hears about
            break
    raise asyncio.TimeoutError


def _describe(exc: BaseException) -> str:
    """One line about a failure; libpq's messages carry no password."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
