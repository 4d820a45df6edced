"""The guard acts only for those who may run the statement, and shows them only what
pg_stat_activity would: a role without rights on a table must not end or see other sessions
through the proxy's admin connection (issue: privilege escalation through the admin connection).

`u_trust` is the role without rights (a fresh table belongs to the superuser); tests that need
an owner hand it the table, and every grant is taken back at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.guard.scenarios import Client, stays, wait_for

pytestmark = pytest.mark.integration

ROLE = "u_trust"
SECRET = "secret_marker_4711"
ProxyFactory = Callable[..., RunningProxy]


def q(template: str, *names: str) -> sql.Composed:
    return sql.SQL(template).format(*map(sql.Identifier, names))


@pytest.fixture
def tables(pg: PgInfo) -> Iterator[Callable[[], str]]:
    """Fresh tables of the superuser's, each with a row; dropped (and grants revoked) after."""
    made: list[str] = []
    counter = iter(range(100))

    def make() -> str:
        name = f"priv_{next(counter)}_{psycopg.__name__[:3]}_{id(made) % 10000}"
        with pg.connect() as conn:
            conn.execute(q("DROP TABLE IF EXISTS {} CASCADE", name))
            conn.execute(q("CREATE TABLE {} (id int PRIMARY KEY)", name))
            conn.execute(q("INSERT INTO {} VALUES (1)", name))
        made.append(name)
        return name

    yield make
    with pg.connect() as conn:
        conn.execute(f"REVOKE pg_read_all_stats FROM {ROLE}")
        for name in reversed(made):
            conn.execute(q("DROP TABLE IF EXISTS {} CASCADE", name))


@pytest.fixture
def holders(pg: PgInfo) -> Iterator[Callable[..., psycopg.Connection[Any]]]:
    """Superuser sessions left idle in transaction after a statement that mentions SECRET (a
    SELECT, or with write=True an UPDATE)."""
    opened: list[psycopg.Connection[Any]] = []

    def hold(table: str, write: bool = False) -> psycopg.Connection[Any]:
        conn = pg.connect(application_name="holder")
        conn.execute("BEGIN")
        verb = "UPDATE {} SET id = id" if write else "SELECT * FROM {}"
        conn.execute(q(verb + " WHERE id <> -1 /* " + SECRET + " */", table))
        opened.append(conn)
        return conn

    yield hold
    for conn in opened:
        conn.close()


def through(proxy: RunningProxy, user: str = ROLE, **params: str) -> Client:
    conn = psycopg.connect(
        proxy.conninfo(user, connect_timeout="10", application_name="client", **params),
        autocommit=True,
    )
    client = Client(conn)

    def keep(diag: psycopg.errors.Diagnostic) -> None:
        from tests.guard.scenarios import Notice

        client.notices.append(
            Notice(
                diag.severity_nonlocalized or "",
                diag.message_primary or "",
                diag.message_detail or "",
            )
        )

    conn.add_notice_handler(keep)
    return client


def alive(pg: PgInfo, holder: psycopg.Connection[Any]) -> bool:
    with pg.connect() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (holder.info.backend_pid,)
        ).fetchone()
    return row is not None and row[0] == 1


def everything_said(client: Client) -> str:
    return "\n".join(f"{n.message} {n.detail}" for n in client.notices)


STATEMENTS = [
    "ALTER TABLE {} ADD COLUMN x int",
    "DROP TABLE {}",
    "TRUNCATE {}",
    "LOCK TABLE {}",
    "VACUUM FULL {}",
    "CREATE INDEX ON {} (id)",
    "ALTER TABLE {} RENAME TO renamed_by_attacker",
    "CLUSTER {} USING {}",
    "REINDEX TABLE {}",
    "COMMENT ON TABLE {} IS 'x'",
]


@pytest.mark.parametrize("action", ["terminate", "show", "drain"])
@pytest.mark.parametrize("template", STATEMENTS)
def test_a_role_without_rights_ends_and_sees_no_one(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    tables: Callable[[], str],
    holders: Callable[[str], psycopg.Connection[Any]],
    template: str,
    action: str,
) -> None:
    table = tables()
    holder = holders(table)
    proxy = proxy_factory(blocking_action=action, lock_budget=1.0, max_hold=0.5)
    client = through(proxy)
    statement = sql.SQL(template).format(
        sql.Identifier(table), sql.Identifier(f"{table}_pkey")
    )
    if template.startswith("VACUUM"):
        client.conn.execute(statement)  # PostgreSQL skips the table with a WARNING
    else:
        with pytest.raises(errors.InsufficientPrivilege), client.conn.transaction():
            client.conn.execute(statement)  # (LOCK TABLE needs a transaction block)
    assert alive(pg, holder), "the proxy ended a session on the client's behalf"
    assert SECRET not in everything_said(client)
    assert not client.has_notice("pgmigrate"), client.notices
    # the session goes on: the next statement is answered
    assert client.conn.execute("SELECT 1").fetchone() == (1,)
    client.conn.close()


def test_a_pipeline_from_a_role_without_rights_ends_no_one(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    tables: Callable[[], str],
    holders: Callable[[str], psycopg.Connection[Any]],
) -> None:
    """Mid-batch (nothing resolved beforehand) the statement is not acted for either."""
    table = tables()
    holder = holders(table)
    proxy = proxy_factory(blocking_action="terminate", lock_budget=1.0)
    client = through(proxy)
    with pytest.raises(errors.InsufficientPrivilege), client.conn.pipeline():
        client.conn.execute("SELECT %s::int", (1,))
        client.conn.execute(q("ALTER TABLE {} ADD COLUMN y int", table))
    assert alive(pg, holder)
    assert SECRET not in everything_said(client)
    client.conn.close()


@pytest.fixture
def own_table(pg: PgInfo, tables: Callable[[], str]) -> Iterator[tuple[str, str]]:
    """(a table of u_trust's, a table of the superuser's that u_trust may not reference)."""
    mine, theirs = tables(), tables()
    with pg.connect() as conn:
        conn.execute(q("ALTER TABLE {} OWNER TO {}", mine, ROLE))
        conn.execute(q("ALTER TABLE {} ADD COLUMN ref int", mine))
    yield mine, theirs


@pytest.mark.parametrize("pipeline", [False, True])
def test_a_foreign_key_to_a_table_it_may_not_reference_ends_no_one(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    own_table: tuple[str, str],
    holders: Callable[[str], psycopg.Connection[Any]],
    pipeline: bool,
) -> None:
    """PostgreSQL locks the referenced table before it checks REFERENCES: the client's backend
    queues there (it would directly too) but the proxy must not clear the way for it."""
    mine, theirs = own_table
    holder = holders(theirs, write=True)  # ROW EXCLUSIVE: conflicts with the FK's lock
    proxy = proxy_factory(blocking_action="terminate", lock_budget=1.0, watch_interval=0.02)
    client = through(proxy, options="-c lock_timeout=1500ms")
    statement = q("ALTER TABLE {} ADD FOREIGN KEY (ref) REFERENCES {} (id)", mine, theirs)
    with pytest.raises((errors.LockNotAvailable, errors.InsufficientPrivilege)):
        if pipeline:
            with client.conn.pipeline():
                client.conn.execute("SELECT %s::int", (1,))
                client.conn.execute(statement)
        else:
            client.conn.execute(statement)
    assert alive(pg, holder), "the proxy ended a session on a table the client may not use"
    assert SECRET not in everything_said(client)
    client.conn.close()


def test_an_owner_is_guarded_but_sees_no_query_of_another_role(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    own_table: tuple[str, str],
    holders: Callable[[str], psycopg.Connection[Any]],
) -> None:
    """The owner's ALTER goes through the pipeline (the blocker is ended), and the notice shows
    the superuser's session as pg_stat_activity shows it to the owner."""
    mine, _ = own_table
    holder = holders(mine)
    proxy = proxy_factory(blocking_action="terminate", lock_budget=5.0)
    client = through(proxy)
    client.conn.execute(q("ALTER TABLE {} ADD COLUMN z int", mine))
    wait_for(lambda: not alive(pg, holder), "the blocker ended")
    said = everything_said(client)
    assert client.has_notice(f"terminated pid {holder.info.backend_pid}", "WARNING"), said
    assert SECRET not in said
    assert "<insufficient privilege>" in said
    client.conn.close()


def test_show_gives_the_query_to_a_role_that_may_read_all_stats(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    own_table: tuple[str, str],
    holders: Callable[[str], psycopg.Connection[Any]],
) -> None:
    mine, _ = own_table
    with pg.connect() as conn:
        conn.execute(f"GRANT pg_read_all_stats TO {ROLE}")
    holder = holders(mine)
    proxy = proxy_factory(blocking_action="show", lock_budget=0.6, max_hold=5.0)
    client = through(proxy)
    with pytest.raises(errors.LockNotAvailable):
        client.conn.execute(q("ALTER TABLE {} ADD COLUMN w int", mine))
    said = everything_said(client)
    assert client.has_notice(f"blocked by pid {holder.info.backend_pid}"), said
    assert SECRET in said
    assert alive(pg, holder)
    client.conn.close()


def test_show_hides_the_query_from_an_owner_without_read_all_stats(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    own_table: tuple[str, str],
    holders: Callable[[str], psycopg.Connection[Any]],
) -> None:
    mine, _ = own_table
    holder = holders(mine)
    proxy = proxy_factory(blocking_action="show", lock_budget=0.6, max_hold=5.0)
    client = through(proxy)
    with pytest.raises(errors.LockNotAvailable):
        client.conn.execute(q("ALTER TABLE {} ADD COLUMN w int", mine))
    said = everything_said(client)
    assert client.has_notice(f"blocked by pid {holder.info.backend_pid}"), said
    assert SECRET not in said and "<insufficient privilege>" in said
    assert "idle in transaction for" not in said  # state and ages hidden too, as PG hides them
    assert alive(pg, holder)
    client.conn.close()


def test_a_table_privilege_is_enough_where_postgresql_asks_for_no_more(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    tables: Callable[[], str],
    holders: Callable[[str], psycopg.Connection[Any]],
) -> None:
    """TRUNCATE needs the TRUNCATE privilege, LOCK TABLE a write privilege: granted those, the
    role is guarded (its blockers ended); LOCK in ACCESS EXCLUSIVE with SELECT only is not."""
    truncated, locked, selected = tables(), tables(), tables()
    with pg.connect() as conn:
        conn.execute(q("GRANT TRUNCATE ON {} TO {}", truncated, ROLE))
        conn.execute(q("GRANT UPDATE ON {} TO {}", locked, ROLE))
        conn.execute(q("GRANT SELECT ON {} TO {}", selected, ROLE))
    proxy = proxy_factory(blocking_action="terminate", lock_budget=5.0)
    for table in (truncated, locked):
        holder = holders(table)
        client = through(proxy)
        statement = "TRUNCATE {}" if table == truncated else "LOCK TABLE {}"
        with client.conn.transaction():
            client.conn.execute(q(statement, table))
        wait_for(lambda h=holder: not alive(pg, h), f"the blocker of {statement} ended")
        client.conn.close()
    holder = holders(selected)
    client = through(proxy)
    with pytest.raises(errors.InsufficientPrivilege), client.conn.transaction():
        client.conn.execute(q("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE", selected))
    stays(lambda: alive(pg, holder), "the blocker of a refused LOCK lives", 0.3)
    client.conn.close()


def test_report_events_show_an_owner_no_more_than_pg_stat_activity(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    own_table: tuple[str, str],
    holders: Callable[[str], psycopg.Connection[Any]],
) -> None:
    """A session that asks for its guard events (report_events, as migrate --report does) gets
    each as a LOG notice; of another role's blocker only what pg_stat_activity shows it."""
    from pgmigrate_proxy import notices

    mine, _ = own_table
    holder = holders(mine)
    proxy = proxy_factory(blocking_action="terminate", lock_budget=5.0)
    client = through(proxy, options="-c pgmigrate.report_events=on")
    client.conn.execute(q("ALTER TABLE {} ADD COLUMN v int", mine))
    events = [notices.read_event(n.message) for n in client.notices if n.severity == "LOG"]
    names = [e["event"] for e in events if e]
    assert names == ["held", "blockers", "terminated", "attempt", "applied"]
    terminated = next(e for e in events if e and e["event"] == "terminated")
    assert terminated["pid"] == holder.info.backend_pid
    assert terminated["query"] == "<insufficient privilege>" and "state" not in terminated
    assert SECRET not in everything_said(client)
    plain = through(proxy)  # without the option: no event notices
    plain.conn.execute(q("ALTER TABLE {} ADD COLUMN u int", mine))
    assert not any(n.message.startswith(notices.EVENT_PREFIX) for n in plain.notices)
    client.conn.close()
    plain.conn.close()
