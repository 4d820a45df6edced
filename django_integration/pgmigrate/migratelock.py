"""One `migrate` at a time per database: the proxy's session advisory lock (migrationlock.py),
taken on a connection of its own before migrate plans and held until it ends; a second migrate
says who holds it and waits (PGMIGRATE_MIGRATE_LOCK_TIMEOUT: at most that long, then stops)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import psycopg
from pgmigrate_proxy import migrationlock
from pgmigrate_proxy.migrationlock import Busy

from pgmigrate import route

__all__ = ["Busy", "held"]


@contextlib.contextmanager
def held(
    settings_dict: Mapping[str, Any], timeout: float | None, say: Callable[[str], None]
) -> Iterator[None]:
    """Hold the migration lock of the database while the block runs; raises Busy after
    `timeout` seconds of waiting (None: as long as it takes)."""
    name = migrationlock.application_name("pgmigrate migrate")
    conninfo = route.upstream_conninfo(settings_dict)
    with psycopg.connect(conninfo, autocommit=True, application_name=name) as conn:
        got = conn.execute(migrationlock.TRY_LOCK, (migrationlock.KEY,)).fetchone()
        if not (got and got[0]):
            row = conn.execute(
                migrationlock.HOLDER_SQL, (migrationlock.CLASSID, migrationlock.OBJID)
            ).fetchone()
            say(f"Another migrate holds the migration lock: {migrationlock.describe(row)}. "
                "Waiting...")  # fmt: skip
            if timeout == 0:
                raise Busy
            limit = migrationlock.timeout_text(timeout)
            conn.execute(migrationlock.SET_LOCK_TIMEOUT, (limit,))
            try:
                conn.execute(migrationlock.LOCK, (migrationlock.KEY,))
            except psycopg.errors.LockNotAvailable:
                raise Busy from None
        yield
