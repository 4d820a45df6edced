"""session_state() against a real server: a statement it reports leaves state that a later
transaction of the same connection sees, and one it passes leaves none."""

from __future__ import annotations

from typing import Any

import pytest
from pgmigrate_proxy.sql.session_state import session_state

from tests.fixtures.postgres import PgInfo

pytestmark = pytest.mark.integration

#: Everything of a session that outlives its transactions and that these cases can touch. A
#: custom setting (pgm.x) set LOCAL stays defined afterwards, as '': not counted as state.
FINGERPRINT = """
SELECT (SELECT array_agg(name || '=' || setting ORDER BY name) FROM pg_settings
        WHERE name NOT LIKE 'pgm.%'),
       current_user, session_user,
       (SELECT array_agg(c ORDER BY c) FROM pg_listening_channels() c),
       (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()),
       (SELECT count(*) FROM pg_class WHERE relnamespace = pg_my_temp_schema()),
       (SELECT array_agg(name ORDER BY name) FROM pg_prepared_statements),
       (SELECT array_agg(name ORDER BY name) FROM pg_cursors),
       coalesce(current_setting('pgm.x', true), '')
"""

# (setup, statement): the statement runs as BEGIN; statement; COMMIT after the setup.
LIVE = [
    ("", "SET search_path = pg_catalog, public"),
    ("", "SET SESSION statement_timeout = '5s'"),
    ("", "SET pgm.x = 'on'"),
    ("", "SET ROLE u_trust"),
    ("", "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY"),
    ("SET work_mem = '8MB'", "RESET work_mem"),
    ("SET work_mem = '8MB'", "RESET ALL"),
    ("", "LISTEN pgm_jobs"),
    ("LISTEN pgm_jobs", "UNLISTEN *"),
    ("", "SELECT pg_advisory_lock(7)"),
    ("", "SELECT pg_try_advisory_lock_shared(7)"),
    ("", "CREATE TEMP TABLE pgm_t (a int)"),
    ("", "CREATE TEMP TABLE pgm_t (a int) ON COMMIT DELETE ROWS"),
    ("", "CREATE TABLE pg_temp.pgm_t (a int)"),
    ("", "CREATE TEMP VIEW pgm_v AS SELECT 1 AS a"),
    ("", "CREATE TEMP SEQUENCE pgm_s"),
    ("", "SELECT 1 AS a INTO TEMP pgm_t"),
    ("", "PREPARE pgm_q (int) AS SELECT $1"),
    ("PREPARE pgm_q AS SELECT 1", "DEALLOCATE pgm_q"),
    ("", "DECLARE pgm_c CURSOR WITH HOLD FOR SELECT 1"),
    ("", "SELECT set_config('pgm.x', 'on', false)"),
    ("", "SET LOCAL search_path = pg_catalog"),
    ("", "SET LOCAL pgm.x = 'on'"),
    ("", "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE"),
    ("", "SELECT set_config('pgm.x', 'on', true)"),
    ("", "SELECT pg_advisory_xact_lock(7)"),
    ("", "CREATE TEMP TABLE pgm_t (a int) ON COMMIT DROP"),
    ("", "DECLARE pgm_c CURSOR FOR SELECT 1"),
    ("", "SELECT 'LISTEN x', 'SET a = 1'"),
    ("", "NOTIFY pgm_jobs, 'SET x'"),
    ("", "SELECT 1"),
]


@pytest.mark.parametrize(("setup", "sql"), LIVE)
def test_reported_state_is_state(pg: PgInfo, setup: str, sql: str) -> None:
    with pg.connect() as conn:
        if setup:
            conn.execute(setup)
        before: Any = conn.execute(FINGERPRINT).fetchone()
        conn.execute(f"BEGIN; {sql}; COMMIT")
        after: Any = conn.execute(FINGERPRINT).fetchone()
    assert bool(session_state(sql)) is (before != after), (before, after)
