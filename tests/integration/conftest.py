"""Local fixtures of the integration tests: a direct superuser connection, a bystander session."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy

CONNECT_SECONDS = "10"


@pytest.fixture
def admin(pg: PgInfo) -> Iterator[psycopg.Connection[Any]]:
    """An autocommit superuser connection straight to `pg` (not through the proxy)."""
    with pg.connect(connect_timeout=CONNECT_SECONDS) as conn:
        yield conn


@pytest.fixture
def bystander(proxy: RunningProxy) -> Iterator[psycopg.Connection[Any]]:
    """A psycopg session through `proxy`, opened first: it must survive what other clients do."""
    conninfo = proxy.conninfo("u_trust", connect_timeout=CONNECT_SECONDS)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        yield conn
    # the proxy's teardown follows: its checks run after this session has ended
