"""The classifier against real servers: PostgreSQL takes (pg_locks) the locks it predicts."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from pgmigrate_proxy.sql import LockMode, Statement, classify, conflicts, targets_query
from pgmigrate_proxy.sql.locks import queues_behind_traffic
from pgmigrate_proxy.sql.tree import NON_VOLATILE_FUNCTIONS
from psycopg import RawCursor, errors, sql

from tests.fixtures.postgres import PgInfo
from tests.sql.live_cases import CASES, SCHEMA_SETUP, LiveCase

pytestmark = pytest.mark.integration

DBNAME = "sql_locks"
WAIT_SECONDS = 20.0
Conn = psycopg.Connection[Any]


@dataclass(frozen=True)
class Rel:
    """A relation of the case's schemas before the statement ran."""

    name: str
    kind: str
    owner: int | None  # the table of an index, of an owned or identity sequence
    filenode: int


@pytest.fixture(scope="module")
def db(pg: PgInfo) -> Iterator[PgInfo]:
    with pg.connect() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(DBNAME)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DBNAME)))
    yield pg
    with pg.connect() as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(DBNAME)))


def _connect(pg: PgInfo, schema: str) -> Conn:
    conn = pg.connect(dbname=DBNAME)
    conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(schema)))
    return conn


@pytest.fixture
def schema(db: PgInfo, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh schema (and its sibling `<schema>_x`) holding SCHEMA_SETUP and the case's setup."""
    case: LiveCase = request.node.callspec.params["case"]
    name = "s_" + request.node.callspec.id.replace("-", "_")
    with db.connect(dbname=DBNAME) as conn:
        _drop_schemas(conn, name)
        conn.execute(sql.SQL("CREATE SCHEMA {0}; CREATE SCHEMA {1}").format(*_idents(name)))
        conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(name)))
        conn.execute(SCHEMA_SETUP)
        if case.setup:
            conn.execute(case.setup.format(other=name + "_x"))
    yield name
    with db.connect(dbname=DBNAME) as conn:
        _drop_schemas(conn, name)


def _idents(name: str) -> tuple[sql.Identifier, sql.Identifier]:
    return sql.Identifier(name), sql.Identifier(name + "_x")


def _drop_schemas(conn: Conn, name: str) -> None:
    conn.execute(
        sql.SQL("DROP SCHEMA IF EXISTS {0} CASCADE; DROP SCHEMA IF EXISTS {1} CASCADE").format(
            *_idents(name)
        )
    )


def _relations(conn: Conn, schema: str) -> dict[int, Rel]:
    rows = conn.execute(
        """
        SELECT c.oid, c.relname, c.relkind, coalesce(i.indrelid, d.refobjid), c.relfilenode
        FROM pg_class c
        LEFT JOIN pg_index i ON i.indexrelid = c.oid
        LEFT JOIN pg_depend d ON d.classid = 'pg_class'::regclass AND d.objid = c.oid
            AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
            AND c.relkind = 'S'
        WHERE c.relnamespace::regnamespace::text IN (%s, %s)
        """,
        (schema, schema + "_x"),
    ).fetchall()
    return {oid: Rel(name, kind, owner, node) for oid, name, kind, owner, node in rows}


def _predict(conn: Conn, statement: Statement) -> dict[int, LockMode]:
    """Run the statement's targets query: relid -> the strongest predicted mode."""
    query = targets_query(statement)
    predicted: dict[int, LockMode] = {}
    if query is None:
        return predicted
    for target, relid, _allowed in RawCursor(conn).execute(query.sql, query.params).fetchall():
        predicted[relid] = max(query.modes[target], predicted.get(relid, query.modes[target]))
    return predicted


def _locks_of(conn: Conn, pid: int) -> dict[int, LockMode]:
    """relid -> the strongest relation lock `pid` holds or waits for in this database."""
    rows = conn.execute(
        "SELECT relation, mode FROM pg_locks WHERE pid = %s AND locktype = 'relation'"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        (pid,),
    ).fetchall()
    held: dict[int, LockMode] = {}
    for relid, mode in rows:
        held[relid] = max(LockMode[mode], held.get(relid, LockMode[mode]))
    return held


def _problems(
    predicted: dict[int, LockMode], actual: dict[int, LockMode], rels: dict[int, Rel], exact: bool
) -> list[str]:
    """Differences that matter: a predicted mode the server did not take (exactly, or at most),
    or an unpredicted lock that can queue behind traffic on a relation that existed before."""
    found = []
    for relid, mode in predicted.items():
        got = actual.get(relid)
        wrong = got != mode if exact else got is not None and got > mode
        if wrong and relid in rels:
            found.append(f"{rels[relid].name}: predicted {mode.name}, server: {got and got.name}")
    for relid, got in actual.items():
        rel = rels.get(relid)
        if relid in predicted or rel is None or not queues_behind_traffic(got):
            continue
        owner_mode = predicted.get(rel.owner) if rel.owner is not None else None
        if owner_mode is None or owner_mode < got:  # an index, covered by its table's lock
            found.append(f"{rel.name}: server took {got.name}, not predicted")
    return found


def _the_statement(case: LiveCase, schema: str) -> Statement:
    (statement,) = classify(case.sql.format(other=schema + "_x"))
    return statement


def _main(statement: Statement, predicted: dict[int, LockMode], rels: dict[int, Rel]) -> int:
    """The first predicted relation that has a heap of its own (for the rewrite/scan checks)."""
    return next((oid for oid in predicted if oid in rels and rels[oid].kind in "rm"), 0)


def _usage(conn: Conn, relid: int) -> tuple[int | None, int]:
    """The relation's file node (None once dropped) and the seq scans of this transaction."""
    row = conn.execute(
        "SELECT max(relfilenode)::int, pg_stat_get_xact_numscans(%s)::int"
        " FROM pg_class WHERE oid = %s",
        (relid, relid),
    ).fetchone()
    assert row is not None
    return row[0], row[1]


def _run_in_transaction(db: PgInfo, case: LiveCase, schema: str) -> None:
    statement = _the_statement(case, schema)
    with _connect(db, schema) as conn:
        conn.execute("BEGIN")
        rels = _relations(conn, schema)
        predicted = _predict(conn, statement)
        main = _main(statement, predicted, rels)
        before = _usage(conn, main)
        conn.execute(statement.text)
        actual = _locks_of(conn, conn.info.backend_pid)
        after = _usage(conn, main)
        conn.execute("ROLLBACK")
    problems = _problems(predicted, actual, rels, exact=True)
    if main and after[0] is not None and statement.kind != "TruncateStmt":
        rewrote = before[0] != after[0]
        if rewrote != statement.rewrites and (rewrote or case.rewrite_exact):
            problems.append(f"rewrites: predicted {statement.rewrites}, server rewrote: {rewrote}")
        if before[1] != after[1] and not statement.scans:
            problems.append("scans: the server scanned the table, predicted no scan")
    assert not problems, f"{statement.text}: {problems}"


def _run_observed(db: PgInfo, case: LiveCase, schema: str) -> None:
    """A statement that cannot run in a transaction block: hold it up with a blocker and look
    at its locks from a third session while it waits."""
    statement = _the_statement(case, schema)
    assert case.blocker is not None
    with _connect(db, schema) as blocker, _connect(db, schema) as runner:
        with _connect(db, schema) as observer:
            rels = _relations(observer, schema)
            predicted = _predict(observer, statement)
        blocker.execute("BEGIN")
        blocker.execute(case.blocker)
        thread = threading.Thread(target=runner.execute, args=(statement.text,))
        thread.start()
        try:
            with _connect(db, schema) as observer:
                _wait_until_waiting(observer, runner.info.backend_pid)
                actual = _locks_of(observer, runner.info.backend_pid)
        finally:
            blocker.execute("ROLLBACK")
            thread.join(WAIT_SECONDS)
    problems = _problems(predicted, actual, rels, exact=False)
    first = statement.locks[0].relation.name
    if not any(rels[relid].name == first for relid in actual if relid in rels):
        problems.append(f"{first}: predicted {statement.locks[0].mode.name}, server: nothing")
    assert not problems, f"{statement.text}: {problems}"


def _wait_until_waiting(conn: Conn, pid: int) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        row = conn.execute(
            "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
        if row is not None and row[0] == "Lock":
            return
        time.sleep(0.01)
    pytest.fail(f"backend {pid} never waited for a lock")


@pytest.mark.parametrize("case", [pytest.param(c, id=i) for i, c in CASES.items()])
def test_predicted_locks_are_taken(db: PgInfo, schema: str, case: LiveCase) -> None:
    if db.server.major_version < case.min_version:
        pytest.skip(f"needs PostgreSQL {case.min_version}")
    statement = _the_statement(case, schema)
    if statement.transactional:
        _run_in_transaction(db, case, schema)
        return
    with _connect(db, schema) as conn:  # 25001 inside a transaction block
        conn.execute("BEGIN")
        with pytest.raises(errors.ActiveSqlTransaction):
            conn.execute(statement.text)
        conn.execute("ROLLBACK")
    if case.blocker is not None:  # else it locks no relation it names: nothing to observe
        _run_observed(db, case, schema)


@pytest.fixture
def table(db: PgInfo) -> Iterator[str]:
    with db.connect(dbname=DBNAME) as conn:
        conn.execute("DROP TABLE IF EXISTS matrix; CREATE TABLE matrix (id int)")
    yield "matrix"
    with db.connect(dbname=DBNAME) as conn:
        conn.execute("DROP TABLE matrix")


def test_conflict_matrix_matches_the_server(db: PgInfo, table: str) -> None:
    """Every (held, requested) pair: LOCK ... NOWAIT fails (55P03) exactly when they conflict."""
    with db.connect(dbname=DBNAME) as holder, db.connect(dbname=DBNAME) as asker:
        for held in LockMode:
            holder.execute("BEGIN")
            holder.execute(f"LOCK TABLE {table} IN {held.sql} MODE")
            for requested in LockMode:
                asker.execute("BEGIN")
                try:
                    asker.execute(f"LOCK TABLE {table} IN {requested.sql} MODE NOWAIT")
                    waited = False
                except errors.LockNotAvailable:
                    waited = True
                asker.execute("ROLLBACK")
                assert waited == conflicts(requested, held), (requested.name, held.name)
            holder.execute("ROLLBACK")


def test_non_volatile_functions_are_not_volatile(db: PgInfo) -> None:
    with db.connect(dbname=DBNAME) as conn:
        rows = conn.execute(
            "SELECT proname, bool_or(provolatile = 'v') FROM pg_proc"
            " WHERE proname = ANY(%s) GROUP BY proname",
            (sorted(NON_VOLATILE_FUNCTIONS),),
        ).fetchall()
    assert {name for name, _ in rows} == NON_VOLATILE_FUNCTIONS
    assert [name for name, volatile in rows if volatile] == []
