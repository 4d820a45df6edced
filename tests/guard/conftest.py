"""Fixtures of the guard's integration tests: a fresh table; sessions closed before it goes."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql

from tests.fixtures.postgres import PgInfo
from tests.guard.live import Connect


@pytest.fixture
def table(pg: PgInfo) -> Iterator[tuple[str, int]]:
    """A fresh table (name, OID) in the postgres database, dropped afterwards."""
    name = f"guard_{secrets.token_hex(4)}"
    with pg.connect() as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (id int)").format(sql.Identifier(name)))
        row = conn.execute("SELECT %s::regclass::oid", (name,)).fetchone()
        assert row is not None
        yield name, int(row[0])
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def sessions(pg: PgInfo, table: tuple[str, int]) -> Iterator[Connect]:
    """Opens autocommit sessions to `pg` (kwargs: libpq params); closes them before the table
    is dropped."""
    opened: list[psycopg.Connection[Any]] = []

    def connect(**params: str) -> psycopg.Connection[Any]:
        conn = pg.connect(**{"application_name": "guard-test", **params})
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        conn.close()
