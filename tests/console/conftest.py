"""Fixtures and helpers of the admin console's tests: a proxy with admin and stats users, console
connections through psycopg (ClientCursor: the simple query protocol), clients through the
proxy, and SHOW results as dicts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy

CONNECT_SECONDS = "10"
#: A stats user (SHOW only) and a user who may not use the console at all.
STATS_USER = "u_scram"
OUTSIDER = "u_password"

Console = psycopg.Connection[Any]


def console(
    proxy: RunningProxy,
    user: str,
    password: str | None = None,
    dbname: str = "pgmigrate",
) -> Console:
    """An admin console connection: autocommit, simple query protocol (ClientCursor)."""
    conninfo = proxy.conninfo(user, password, dbname=dbname, connect_timeout=CONNECT_SECONDS)
    return psycopg.connect(conninfo, autocommit=True, cursor_factory=psycopg.ClientCursor)


def show(conn: Console, what: str) -> tuple[list[str], list[dict[str, Any]]]:
    """SHOW `what`: its column names, and its rows as dicts."""
    cursor = conn.execute(f"SHOW {what}")
    assert cursor.description is not None
    columns = [column.name for column in cursor.description]
    return columns, [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]


def client(proxy: RunningProxy, user: str = "u_trust", **params: str) -> psycopg.Connection[Any]:
    """An ordinary client through the proxy (autocommit)."""
    conninfo = proxy.conninfo(user, connect_timeout=CONNECT_SECONDS, **params)
    return psycopg.connect(conninfo, autocommit=True)


@pytest.fixture
def console_proxy(proxy_factory: Callable[..., RunningProxy], pg: PgInfo) -> Iterator[RunningProxy]:
    """A proxy whose admin_users is the superuser and `u_trust` (a role with no rights in
    PostgreSQL), whose stats_users is STATS_USER."""
    yield proxy_factory(admin_users=(pg.superuser, "u_trust"), stats_users=(STATS_USER,))


@pytest.fixture
def opened() -> Iterator[Callable[[psycopg.Connection[Any]], psycopg.Connection[Any]]]:
    """Keeps connections to close at the end of the test (before the proxy stops)."""
    kept: list[psycopg.Connection[Any]] = []

    def keep(conn: psycopg.Connection[Any]) -> psycopg.Connection[Any]:
        kept.append(conn)
        return conn

    yield keep
    for conn in kept:
        conn.close()
