"""One `migrate` at a time per database: a session advisory lock, taken on a connection of its
own before migrate plans and held until it ends; a second migrate says who holds it and waits
(PGMIGRATE_MIGRATE_LOCK_TIMEOUT: at most that long, then it stops)."""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from typing import Any

import psycopg

from pgmigrate import route

#: The advisory lock's key ("pgmigrat" in ASCII); advisory locks are per database already.
KEY = 0x70676D6967726174
#: How pg_locks shows a bigint advisory key: its high and low 32 bits, objsubid 1.
CLASSID, OBJID = KEY >> 32, KEY & 0xFFFFFFFF
#: The lock connection's application_name: what every role may read of it in pg_stat_activity.
APPLICATION_NAME = "pgmigrate migrate since {since} on {host}:{pid}"
_OURS = re.compile(r"pgmigrate migrate since (\S+) on (.*):(\d+)$")

_HOLDER = """
    SELECT a.pid, a.application_name, coalesce(a.client_hostname, host(a.client_addr)),
           to_char(a.backend_start AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS"Z"')
    FROM pg_locks AS l JOIN pg_stat_activity AS a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s AND l.objid = %s
      AND l.objsubid = 1
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


class Busy(Exception):
    """The lock was not free within the timeout."""


def describe_holder(conn: psycopg.Connection[Any]) -> str:
    """Who holds the lock: pid, host, application_name, since (what this role may see)."""
    row = conn.execute(_HOLDER, (CLASSID, OBJID)).fetchone()
    if row is None:
        return "a session that has just let it go"
    pid, name, host, since = row
    ours = _OURS.match(name or "")
    if ours is not None:  # another django-pgmigrate: its own host, process and start
        since, host, process = ours.group(1), ours.group(2), ours.group(3)
        return f"pid {pid} (migrate process {process} on {host}), since {since}"
    parts = [f"pid {pid}", f"host {host}" if host else "", f"application_name {name!r}"]
    parts.append(f"since {since}" if since else "")
    return ", ".join(part for part in parts if part)


@contextlib.contextmanager
def held(
    settings_dict: Mapping[str, Any], timeout: float | None, say: Callable[[str], None]
) -> Iterator[None]:
    """Hold the migration lock of the database while the block runs; raises Busy after
    `timeout` seconds of waiting (None: as long as it takes)."""
    since = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ").replace(" ", "T")
    name = APPLICATION_NAME.format(since=since, host=socket.gethostname(), pid=os.getpid())
    conninfo = route.upstream_conninfo(settings_dict)
    with psycopg.connect(conninfo, autocommit=True, application_name=name[:63]) as conn:
        got = conn.execute("SELECT pg_try_advisory_lock(%s)", (KEY,)).fetchone()
        if not (got and got[0]):
            say(f"Another migrate holds the migration lock: {describe_holder(conn)}. Waiting...")
            limit = "0" if timeout is None else f"{max(1, round(timeout * 1000))}ms"
            conn.execute("SELECT set_config('lock_timeout', %s, false)", (limit,))
            try:
                conn.execute("SELECT pg_advisory_lock(%s)", (KEY,))
            except psycopg.errors.LockNotAvailable:
                raise Busy from None
        yield
