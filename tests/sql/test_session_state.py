"""session_state(sql): the statements that leave state on a server connection past their
transaction (what transaction pooling must pin), without false alarms on ordinary SQL."""

from __future__ import annotations

import pytest
from pgmigrate_proxy.sql.session_state import (
    StateKind,
    drops_prepared,
    is_candidate,
    session_state,
)

S = StateKind

STATE = [
    ("SET search_path = app, public", S.SET),
    ("set statement_timeout to '5s'", S.SET),
    ("SET SESSION statement_timeout = 0", S.SET),
    ("SET TIME ZONE 'UTC'", S.SET),
    ("SET ROLE reporting", S.SET),
    ("SET SESSION AUTHORIZATION app", S.SET),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", S.SET),
    ("SET application_name TO DEFAULT", S.SET),
    ("RESET search_path", S.SET),
    ("RESET ALL", S.SET),
    ("  /* c */ -- x\n SET x.y = 1;", S.SET),
    ("LISTEN jobs", S.LISTEN),
    ("UNLISTEN *", S.LISTEN),
    ("SELECT pg_advisory_lock(1)", S.ADVISORY_LOCK),
    ("SELECT pg_advisory_lock_shared(1, 2)", S.ADVISORY_LOCK),
    ("SELECT pg_catalog.pg_try_advisory_lock(42)", S.ADVISORY_LOCK),
    ("select PG_TRY_ADVISORY_LOCK_SHARED(42)", S.ADVISORY_LOCK),
    ("SELECT id FROM t WHERE pg_try_advisory_lock(t.id) LIMIT 1", S.ADVISORY_LOCK),
    ("CREATE TEMP TABLE t (a int)", S.TEMP_OBJECT),
    ("CREATE TEMPORARY TABLE IF NOT EXISTS t (a int) ON COMMIT DELETE ROWS", S.TEMP_OBJECT),
    ("CREATE LOCAL TEMP TABLE t AS SELECT 1", S.TEMP_OBJECT),
    ("CREATE TABLE pg_temp.t (a int)", S.TEMP_OBJECT),
    ("CREATE TEMP VIEW v AS SELECT 1", S.TEMP_OBJECT),
    ("CREATE OR REPLACE TEMP VIEW v AS SELECT 1", S.TEMP_OBJECT),
    ("CREATE TEMP SEQUENCE s", S.TEMP_OBJECT),
    ("SELECT 1 AS a INTO TEMP t", S.TEMP_OBJECT),
    ("PREPARE q (int) AS SELECT $1", S.PREPARE),
    ("DEALLOCATE q", S.PREPARE),
    ("DEALLOCATE PREPARE ALL", S.PREPARE),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", S.HOLD_CURSOR),
    ("DECLARE c NO SCROLL CURSOR WITH HOLD FOR SELECT * FROM t", S.HOLD_CURSOR),
    ("SELECT set_config('search_path', 'app', false)", S.SET_CONFIG),
    ("SELECT pg_catalog.set_config('a.b', 'c', 'off')", S.SET_CONFIG),
    ("SELECT set_config('a.b', 'c', $1)", S.SET_CONFIG),  # unknown: taken as session-wide
    ("SELECT count(*) FROM (SELECT set_config('a.b', x, false) FROM t) s", S.SET_CONFIG),
    ("LOAD 'auto_explain'", S.LOAD),
    ("BEGIN; SET search_path = app; COMMIT", S.SET),
    ("SELECT 1; LISTEN x", S.LISTEN),
    ("EXPLAIN ANALYZE SELECT pg_advisory_lock(1)", S.ADVISORY_LOCK),
    ("WITH l AS (SELECT pg_advisory_lock(1)) SELECT * FROM l", S.ADVISORY_LOCK),
]


@pytest.mark.parametrize(("sql", "kind"), STATE)
def test_state_is_found(sql: str, kind: StateKind) -> None:
    assert session_state(sql) == {kind}


NO_STATE = [
    "SELECT 1",
    "select 1;",
    'SELECT "auth_user"."id", "auth_user"."username" FROM "auth_user" '
    'WHERE "auth_user"."id" = 1 LIMIT 21',
    "UPDATE t SET a = 1 WHERE id = 2",
    "INSERT INTO t (a) VALUES ('LISTEN x; SET a = 1')",
    "SELECT 'LISTEN jobs', 'SET search_path = x'",
    "SELECT $$ SET x = 1 $$",
    "SELECT set_config FROM t",  # a column
    "SELECT t.set_config, pg_advisory_lock FROM t",  # columns
    "SELECT set_config(x) FROM t",  # not pg_catalog's set_config(text, text, boolean)
    "SET LOCAL search_path = app",
    "SET LOCAL statement_timeout = '1s'",
    "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SET TRANSACTION READ ONLY",
    "SET CONSTRAINTS ALL DEFERRED",
    "SELECT set_config('a.b', 'c', true)",
    "SELECT set_config('a.b', 'c', 'on')",
    "SELECT pg_advisory_xact_lock(1)",
    "SELECT pg_try_advisory_xact_lock_shared(1)",
    "SELECT pg_advisory_unlock_all()",
    "CREATE TABLE t (a int)",
    "CREATE UNLOGGED TABLE t (a int)",
    "CREATE TEMP TABLE t (a int) ON COMMIT DROP",
    "CREATE VIEW v AS SELECT * FROM temperature",
    "SELECT temp FROM readings",
    "DECLARE c CURSOR FOR SELECT 1",
    "DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1",
    "EXECUTE q(1)",
    "DISCARD ALL",
    "NOTIFY jobs, 'SET x'",
    "-- SET x = 1\nSELECT 1",
    "/* LISTEN x */ SELECT 1",
    "CREATE FUNCTION f() RETURNS void LANGUAGE sql AS 'SET search_path = x'",
    "",
    "SELEC 1",  # PostgreSQL rejects it: no state
    "LISTEN",  # a syntax error too
]


@pytest.mark.parametrize("sql", NO_STATE)
def test_ordinary_statements_leave_no_state(sql: str) -> None:
    assert session_state(sql) == frozenset()


def test_several_kinds_in_one_text() -> None:
    sql = "SET a.b = 1; LISTEN x; SELECT pg_advisory_lock(1); CREATE TEMP TABLE t (a int)"
    assert session_state(sql) == {S.SET, S.LISTEN, S.ADVISORY_LOCK, S.TEMP_OBJECT}


@pytest.mark.parametrize(
    "sql", ["SELECT 1", "select * from t where id = $1", "INSERT INTO t VALUES (1)", "COMMIT"]
)
def test_ordinary_statements_skip_the_parser(sql: str) -> None:
    assert not is_candidate(sql)


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("DEALLOCATE ALL", True),
        ("deallocate prepare all", True),
        ("DISCARD ALL", True),
        ("SELECT 1; DISCARD ALL", True),
        ("DEALLOCATE q", False),
        ("DISCARD TEMP", False),
        ("DISCARD PLANS", False),
        ("SELECT 'DISCARD ALL'", False),
    ],
)
def test_drops_prepared(sql: str, expected: bool) -> None:
    assert drops_prepared(sql) is expected


def test_answers_are_cached_by_text() -> None:
    sql = "SET search_path = cached_case"
    assert session_state(sql) is session_state(sql)
