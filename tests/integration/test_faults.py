"""Faults between the proxy and PostgreSQL, injected with the tunnel fixture: the server gone
mid-result, mid-COPY, mid-authentication and mid-guarded-statement, the admin connection stalled
while it looks blockers up.

Each test ends the same way: the client got PostgreSQL's error or a clear one from the proxy
(never a hang), nothing ran twice (the catalog says so), and nothing stayed open: no backend of
the test's application_name, no connection through the tunnel, no session, task or fd of the
proxy's (assert_proxy_settles).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.fixtures.tunnel import Direction, Tunnel
from tests.integration.probes import (
    assert_proxy_settles,
    close_idle_servers,
    open_fds,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ProxyFactory = Callable[..., RunningProxy]
Conn = psycopg.Connection[Any]
MIGRATE = "-c pgmigrate.role=migrate"
#: What a client may see when the proxy lost its server: PostgreSQL's words for a lost
#: connection (libpq's, when the proxy just closes) or the proxy's own 08006/57P01 errors.
LOST = ("server closed the connection", "connection to server", "terminating connection",
        "lost", "consuming input failed", "server conn crashed")  # fmt: skip


@pytest.fixture
def admin(pg: PgInfo) -> Iterator[Conn]:
    with pg.connect() as conn:
        yield conn


@pytest.fixture
def table(admin: Conn) -> Iterator[str]:
    """A fresh table (id int) owned by u_trust."""
    name = f"fault_{secrets.token_hex(4)}"
    admin.execute(sql.SQL("CREATE TABLE {} (id int)").format(sql.Identifier(name)))
    admin.execute(sql.SQL("ALTER TABLE {} OWNER TO u_trust").format(sql.Identifier(name)))
    yield name
    admin.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def app() -> str:
    """An application_name of this test's own, to find its backends."""
    return f"fault-{secrets.token_hex(4)}"


def backends(admin: Conn, app: str) -> int:
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [app]
    ).fetchone()
    return int(row[0]) if row else 0


def rows(admin: Conn, table: str) -> int:
    row = admin.execute(sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))).fetchone()
    return int(row[0]) if row else 0


def columns(admin: Conn, table: str, column: str) -> int:
    row = admin.execute(
        "SELECT count(*) FROM information_schema.columns WHERE table_name = %s"
        " AND column_name = %s",
        [table, column],
    ).fetchone()
    return int(row[0]) if row else 0


def assert_lost(exc: BaseException) -> None:
    """The client's error says the server connection was lost (not a bogus SQL error)."""
    text = str(exc).lower()
    assert isinstance(exc, psycopg.OperationalError), f"{type(exc).__name__}: {exc}"
    assert any(word in text for word in LOST), f"unclear error: {exc!r}"


def settles(proxy: RunningProxy, admin: Conn, app: str, tunnel: Tunnel, fds: int) -> None:
    """No backend of `app`, nothing through the tunnel, and the proxy back to its baseline."""
    wait_until(
        lambda: close_idle_servers(proxy) and backends(admin, app) == 0,
        f"the backends of {app} to exit",
    )
    wait_until(lambda: tunnel.connections == 0, "the tunnel's connections to close")
    assert_proxy_settles(proxy, admin, None, fds)


@pytest.fixture
def tunneled(proxy_factory: ProxyFactory, pg: PgInfo, tunnel: Tunnel) -> RunningProxy:
    """A proxy whose sessions reach `pg` through `tunnel`; its admin connection goes direct."""
    return proxy_factory(tunnel.url(pg), admin_upstream=pg.url())


def connect(proxy: RunningProxy, app: str, user: str = "u_trust", **params: str) -> Conn:
    return psycopg.connect(
        proxy.conninfo(user, application_name=app, connect_timeout="15", **params),
        autocommit=True,
    )


# --- server gone mid-result ----------------------------------------------------------------------


def test_server_gone_mid_result(
    tunneled: RunningProxy, tunnel: Tunnel, admin: Conn, table: str, app: str
) -> None:
    fds = open_fds()
    with connect(tunneled, app) as conn:
        tunnel.cut_after(200_000, Direction.TO_CLIENT)
        with pytest.raises(psycopg.Error) as caught:
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} SELECT g FROM generate_series(1, 100000) g"
                    " RETURNING id, repeat('x', 100)"
                ).format(sql.Identifier(table))
            ).fetchall()
    assert_lost(caught.value)
    settles(tunneled, admin, app, tunnel, fds)
    assert rows(admin, table) in (0, 100000)  # one INSERT, applied at most once


# --- mid-COPY ------------------------------------------------------------------------------------


def test_server_gone_mid_copy_out(
    tunneled: RunningProxy, tunnel: Tunnel, admin: Conn, app: str
) -> None:
    fds = open_fds()
    with connect(tunneled, app) as conn:
        tunnel.cut_after(300_000, Direction.TO_CLIENT)
        received = 0
        copy_out = "COPY (SELECT g, repeat('y', 200) FROM generate_series(1, 100000) g) TO STDOUT"
        with pytest.raises(psycopg.Error) as caught, conn.cursor().copy(copy_out) as copy:
            for block in copy:
                received += len(block)
    assert_lost(caught.value)
    assert 0 < received < 100000 * 200
    settles(tunneled, admin, app, tunnel, fds)


def test_server_gone_mid_copy_in(
    tunneled: RunningProxy, tunnel: Tunnel, admin: Conn, table: str, app: str
) -> None:
    fds = open_fds()
    line = b"1\n" * 50_000  # 100 kB a write
    with connect(tunneled, app) as conn:
        tunnel.cut_after(1_000_000, Direction.TO_SERVER)
        copy_in = sql.SQL("COPY {} FROM STDIN").format(sql.Identifier(table))
        with pytest.raises(psycopg.Error) as caught, conn.cursor().copy(copy_in) as copy:
            for _ in range(100):  # 10 MB: far past the cut
                copy.write(line)
    assert_lost(caught.value)
    settles(tunneled, admin, app, tunnel, fds)
    assert rows(admin, table) == 0  # the COPY never ended: nothing of it committed


# --- mid-authentication --------------------------------------------------------------------------

#: Where to cut the server's side of a SCRAM exchange: inside AuthenticationSASL (24 bytes),
#: inside AuthenticationSASLContinue, inside AuthenticationSASLFinal, and before the client's
#: first message reaches the server.
AUTH_CUTS = {
    "in-sasl": (Direction.TO_CLIENT, 10),
    "in-sasl-continue": (Direction.TO_CLIENT, 40),
    "in-sasl-final": (Direction.TO_CLIENT, 140),
    "before-startup": (Direction.TO_SERVER, 0),
}


@pytest.mark.parametrize("where", AUTH_CUTS)
def test_server_gone_mid_authentication(
    tunneled: RunningProxy, tunnel: Tunnel, admin: Conn, app: str, where: str
) -> None:
    fds = open_fds()
    direction, nbytes = AUTH_CUTS[where]
    tunnel.cut_after(nbytes, direction)
    with pytest.raises(psycopg.OperationalError) as caught:
        connect(tunneled, app, user="u_scram")
    assert_lost(caught.value)
    assert "password authentication failed" not in str(caught.value)
    settles(tunneled, admin, app, tunnel, fds)
    with connect(tunneled, app, user="u_scram") as conn:  # the next login goes through
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_server_stalled_mid_authentication(
    proxy_factory: ProxyFactory, pg: PgInfo, tunnel: Tunnel, admin: Conn, app: str
) -> None:
    """A server that stops answering during the SCRAM exchange: startup_timeout ends it."""
    proxy = proxy_factory(tunnel.url(pg), admin_upstream=pg.url(), startup_timeout=1.0)
    fds = open_fds()
    tunnel.stall(Direction.TO_CLIENT)
    with pytest.raises(psycopg.OperationalError) as caught:
        connect(proxy, app, user="u_scram")
    assert "timeout" in str(caught.value).lower() or "time" in str(caught.value).lower(), str(
        caught.value
    )
    tunnel.resume()
    settles(proxy, admin, app, tunnel, fds)


# --- mid-guarded-statement -----------------------------------------------------------------------

SESSIONS = {"ordinary": {}, "migration": {"options": MIGRATE}}


class Background:
    """Run `sql` on `conn` in a thread; keep the notices it gets and how it ended."""

    def __init__(self, conn: Conn, statement: str) -> None:
        self.notices: list[str] = []
        self.error: BaseException | None = None
        conn.add_notice_handler(lambda diag: self.notices.append(diag.message_primary or ""))
        self._thread = threading.Thread(target=self._run, args=(conn, statement), daemon=True)
        self._thread.start()

    def _run(self, conn: Conn, statement: str) -> None:
        try:
            conn.execute(statement)
        except BaseException as exc:
            self.error = exc

    def join(self) -> BaseException | None:
        self._thread.join(60)
        assert not self._thread.is_alive(), "the statement is still running"
        return self.error


def add_column(table: str, column: str) -> str:
    return f"ALTER TABLE {table} ADD COLUMN {column} int"


@pytest.mark.parametrize("session", SESSIONS)
def test_server_gone_while_guarded_statement_held(
    proxy_factory: ProxyFactory,
    pg: PgInfo,
    tunnel: Tunnel,
    admin: Conn,
    table: str,
    app: str,
    session: str,
) -> None:
    """The guard holds an ALTER (blocking_action=show) when the session's server goes away."""
    proxy = proxy_factory(tunnel.url(pg), admin_upstream=pg.url(), blocking_action="show")
    fds = open_fds()
    with pg.connect() as blocker:
        blocker.execute(f"BEGIN; SELECT * FROM {table}")  # idle in transaction on the table
        conn = connect(proxy, app, **SESSIONS[session])
        held = Background(conn, add_column(table, "c"))
        wait_until(lambda: any("blocked by" in n for n in held.notices), "the guard to hold it")
        tunnel.cut()
        error = held.join()
        conn.close()
        assert error is not None
        assert_lost(error)
        blocker.execute("ROLLBACK")
    settles(proxy, admin, app, tunnel, fds)
    assert columns(admin, table, "c") == 0  # dropped with its session, never sent later


def _measure(proxy: RunningProxy, tunnel: Tunnel, app: str, statement: str, **params: str) -> int:
    """How many bytes the server sends the proxy for `statement` in a new session."""
    with connect(proxy, app, **params) as conn:
        before = tunnel.forwarded[Direction.TO_CLIENT]
        conn.execute(statement)
        return tunnel.forwarded[Direction.TO_CLIENT] - before


@pytest.mark.parametrize("session", SESSIONS)
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.6, 0.9, 0.999])
def test_server_gone_while_guarded_statement_forwarded(
    tunneled: RunningProxy,
    tunnel: Tunnel,
    admin: Conn,
    table: str,
    app: str,
    session: str,
    fraction: float,
) -> None:
    """The session's server goes away at some point of the guard's exchange for an ALTER (its
    own queries, the statement, its answer): the client hears of it and nothing runs twice."""
    params = SESSIONS[session]
    total = _measure(tunneled, tunnel, app, add_column(table, "m"), **params)
    wait_until(
        lambda: close_idle_servers(tunneled) and backends(admin, app) == 0,
        "the measuring session to end",
    )
    fds = open_fds()
    with connect(tunneled, app, **params) as conn:
        tunnel.cut_after(int(total * fraction), Direction.TO_CLIENT)
        with pytest.raises(psycopg.Error) as caught:
            conn.execute(add_column(table, "c"))
            # a cut after the statement's answer (the guard putting the session's lock_timeout
            # back; or a run that took fewer bytes than the measuring one) is heard by the next
            # statement, which brings more bytes than the whole measured exchange
            conn.execute("SELECT repeat('x', %s)", (total + 65536,))
    assert_lost(caught.value)
    settles(tunneled, admin, app, tunnel, fds)
    assert columns(admin, table, "c") <= 1


# --- the admin connection stalled ----------------------------------------------------------------


def test_admin_connection_stalled_while_looking_up_blockers(
    proxy_factory: ProxyFactory,
    pg: PgInfo,
    tunnel_factory: Callable[..., Tunnel],
    admin: Conn,
    table: str,
    app: str,
) -> None:
    """The admin connection stops answering (not closed) while the guard looks for blockers:
    the statement falls back to lock_timeout retries and ends with 55P03 within its budget;
    the blocker is not touched; once the admin connection answers again the guard works."""
    admin_tunnel = tunnel_factory(pg)
    proxy = proxy_factory(admin_upstream=admin_tunnel.url(pg), lock_budget=2.0)
    fds = open_fds()
    with pg.connect() as blocker, connect(proxy, app) as conn:
        blocker.execute(f"BEGIN; SELECT * FROM {table}")
        admin_tunnel.stall()
        with pytest.raises(errors.LockNotAvailable):
            conn.execute(add_column(table, "c"))
        assert blocker.execute("SELECT 1").fetchone() == (1,)  # still alive
        assert columns(admin, table, "c") == 0
        admin_tunnel.resume()
        blocker.execute("ROLLBACK")
        conn.execute(add_column(table, "c"))  # the session carries on
    assert columns(admin, table, "c") == 1
    wait_until(
        lambda: close_idle_servers(proxy) and backends(admin, app) == 0,
        f"the backends of {app} to exit",
    )
    assert_proxy_settles(proxy, admin, None, fds)
