"""One migration at a time per database: the session advisory lock that `manage.py migrate` and
the proxy's migration sessions (session option `migration_lock`) take before they change the
schema, who holds it, and how the proxy takes it on a connection of its own."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, Final

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

#: The advisory lock's key ("pgmigrat" in ASCII); advisory locks are per database already.
KEY: Final = 0x70676D6967726174
#: How pg_locks shows a bigint advisory key: its high and low 32 bits, objsubid 1.
CLASSID: Final = KEY >> 32
OBJID: Final = KEY & 0xFFFFFFFF

#: The holder's session, as every role may see it in pg_stat_activity (application_name).
HOLDER_SQL: Final = """
    SELECT a.pid, a.application_name, coalesce(a.client_hostname, host(a.client_addr)),
           to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')
    FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s
      AND l.objsubid = 1
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""
TRY_LOCK: Final = "SELECT pg_try_advisory_lock(%s)"
LOCK: Final = "SELECT pg_advisory_lock(%s)"
SET_LOCK_TIMEOUT: Final = "SELECT set_config('lock_timeout', %s, false)"

_NAME = "{what} since {since} on {host}:{pid}"
_OURS = re.compile(r"(pgmigrate migrate|pgmigrate-proxy) since (\S+) on (.*):(\d+)$")


class Busy(Exception):
    """The lock was not free within the timeout."""


def application_name(what: str) -> str:
    """The lock connection's application_name: who (`pgmigrate migrate`, `pgmigrate-proxy`),
    since when, on which host and process (at most 63 bytes, PostgreSQL's limit)."""
    since = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    name = _NAME.format(what=what, since=since, host=socket.gethostname(), pid=os.getpid())
    return name.encode()[:63].decode(errors="ignore")


def describe(row: tuple[Any, ...] | None) -> str:
    """A HOLDER_SQL row in words: pid, host, application_name, since."""
    if row is None:
        return "a session that has just let it go"
    pid, name, host, since = row
    ours = _OURS.match(name or "")
    if ours is not None:  # a migrate or proxy of ours: its own host, process and start
        what, since, host, process = ours.groups()
        who = "migrate process" if what == "pgmigrate migrate" else "pgmigrate-proxy process"
        return f"pid {pid} ({who} {process} on {host}), since {since}"
    parts = [f"pid {pid}", f"host {host}" if host else "", f"application_name {name!r}"]
    parts.append(f"since {since}" if since else "")
    return ", ".join(part for part in parts if part)


def timeout_text(seconds: float | None) -> str:
    """lock_timeout for waiting `seconds` (None or 0: as long as it takes)."""
    return "0" if not seconds else f"{max(1, round(seconds * 1000))}ms"


async def acquire(
    conninfo: str, database: str, timeout: float | None, say: Callable[[str], None]
) -> psycopg.AsyncConnection[Any]:
    """A connection (to `database`, with `conninfo`'s role) holding the lock; `say` is told
    who holds it when it must wait. Raises Busy after `timeout` s (None or 0: no limit)."""
    params = {**conninfo_to_dict(conninfo), "dbname": database}
    params["application_name"] = application_name("pgmigrate-proxy")
    conn = await psycopg.AsyncConnection.connect(make_conninfo("", **params), autocommit=True)
    try:
        got = await (await conn.execute(TRY_LOCK, (KEY,))).fetchone()
        if not (got and got[0]):
            holder = await (await conn.execute(HOLDER_SQL, (CLASSID, OBJID))).fetchone()
            say(describe(holder))
            await conn.execute(SET_LOCK_TIMEOUT, (timeout_text(timeout),))
            try:
                await conn.execute(LOCK, (KEY,))
            except psycopg.errors.LockNotAvailable:
                raise Busy from None
    except BaseException:
        await conn.close()
        raise
    return conn
