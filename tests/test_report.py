"""The migration report: the renderer on given events (escaping, grouping, outcomes), and
`pgmigrate-proxy report` on the JSON log of a real proxy run, opened in chromium."""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pgmigrate_proxy import report
from pgmigrate_proxy.cli import main
from pgmigrate_proxy.logsetup import JsonLinesFormatter

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.report_browser import open_report, screenshot_path

SCRIPT = "<script>alert('x')</script>"


def _event(ms: int, name: str, **fields: Any) -> dict[str, Any]:
    ts = f"2026-01-01T10:00:{ms // 1000:02d}.{ms % 1000:03d}+00:00"
    return {"ts": ts, "event": name, "unit": 1, "statement_pid": 42, **fields}


def _held_and_applied() -> list[dict[str, Any]]:
    return [
        _event(0, "held", statement=f'ALTER TABLE t ADD COLUMN "{SCRIPT}" int', migration=SCRIPT),
        _event(
            5,
            "terminated",
            pid=7,
            state="idle in transaction",
            xact_age=3.2,
            application_name=SCRIPT,
            user="web",
            query=f"SELECT '{SCRIPT}'",
        ),
        _event(120, "attempt", attempt=1, lock_wait_ms=50, run_ms=0, code="55P03"),
        _event(121, "retry", attempt=1, delay_ms=50),
        _event(300, "attempt", attempt=2, lock_wait_ms=0, run_ms=120),
        _event(301, "applied", attempts=2, elapsed_ms=301),
    ]


def test_user_data_is_escaped_and_nothing_is_loaded_or_run() -> None:
    page = report.render(_held_and_applied())
    assert "<script>" not in page
    assert html.escape(SCRIPT) in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    assert "http://" not in page and "https://" not in page


def test_attempts_blockers_and_outcome_of_a_statement() -> None:
    (statement,), other = report.statements(_held_and_applied())
    assert other == []
    assert statement.label == SCRIPT
    assert statement.outcome == "applied"
    got = [(a.number, round(a.start, 3), a.lock_wait, a.run) for a in statement.attempts]
    assert got == [(1, 0.07, 0.05, 0.0), (2, 0.18, 0.0, 0.12)]  # started at end - wait - run
    assert [(name, fields["pid"]) for _, name, fields in statement.blockers] == [("terminated", 7)]


@pytest.mark.parametrize(
    ("name", "fields", "outcome"),
    [
        ("gave_up", {"code": "55P03"}, "gave up (55P03 lock_not_available)"),
        ("failed", {"code": "55P03"}, "gave up (55P03 lock_not_available)"),
        ("failed", {"code": "42P01"}, "error 42P01"),
        ("dropped", {}, "dropped: the client left while it was held"),
    ],
)
def test_outcomes(name: str, fields: dict[str, Any], outcome: str) -> None:
    events = [_event(0, "held", statement="DROP TABLE t"), _event(9, name, **fields)]
    assert report.statements(events)[0][0].outcome == outcome


def test_without_a_migration_name_the_client_names_it() -> None:
    events = [_event(0, "held", statement="DROP TABLE t", application_name="deploy")]
    assert report.statements(events)[0][0].label == "deploy (backend 42)"


def test_the_client_view_hides_what_its_role_may_not_see() -> None:
    events = [
        _event(0, "held", statement="DROP TABLE t"),
        _event(
            1, "blocked_by", pid=7, state="active", query="SELECT secret_report()", visible=False
        ),
    ]
    assert "secret_report" in report.render(events)
    client = report.render(events, client_view=True)
    assert "secret_report" not in client and html.escape(report.HIDDEN) in client


def test_passwords_in_statements_are_redacted() -> None:
    statement = "ALTER SUBSCRIPTION s CONNECTION 'host=h password=hunter2'"
    page = report.render([_event(0, "held", statement=statement)])
    assert "hunter2" not in page


def test_read_jsonl_keeps_guard_events_only() -> None:
    lines = [
        "2026-01-01 10:00:00 INFO pgmigrate_proxy.guard: guard held unit=1",
        json.dumps({"ts": "2026-01-01T10:00:00+00:00", "msg": "listening"}),
        json.dumps(_event(0, "held", statement="DROP TABLE t")),
        "{not json",
    ]
    assert [e["event"] for e in report.read_jsonl(lines)] == ["held"]


def test_report_command_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err
    text_log = tmp_path / "text.log"
    text_log.write_text("2026-01-01 10:00:00 INFO pgmigrate_proxy.guard: guard held unit=1\n")
    assert main(["report", str(text_log), "-o", str(tmp_path / "out.html")]) == 0
    assert 'log_format = "json"' in capsys.readouterr().err
    assert main(["report", str(text_log), "-o", str(tmp_path / "no" / "out.html")]) == 2
    assert "cannot write" in capsys.readouterr().err


# --- a real run: the proxy's JSON log, the report command, chromium ---------------------------


@pytest.fixture
def json_log(tmp_path: Path) -> Iterator[Path]:
    """The proxy's log as log_format = "json" writes it, into a file, during the test."""
    path = tmp_path / "proxy.jsonl"
    with path.open("w", encoding="utf-8") as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonLinesFormatter())
        logger = logging.getLogger("pgmigrate_proxy")
        logger.addHandler(handler)
        try:
            yield path
        finally:
            logger.removeHandler(handler)


def _blocker(pg: PgInfo, table: str, idle_timeout: str = "0") -> psycopg.Connection[Any]:
    """A session idle in transaction after reading `table` (its application_name: a script),
    ended by PostgreSQL after `idle_timeout` (idle_in_transaction_session_timeout)."""
    conn = pg.connect(application_name=SCRIPT)
    conn.execute(f"SET idle_in_transaction_session_timeout = '{idle_timeout}'")
    conn.execute("BEGIN")
    conn.execute(f"SELECT * FROM {table}")
    return conn


def run_migration(pg: PgInfo, proxy: RunningProxy, table: str) -> list[str]:
    """Three guarded statements through `proxy`: one applied after its blocker is terminated;
    one retried (blocking_action=none) until PostgreSQL ends its blocker (an idle transaction
    timeout of 300 ms); one that gives up (blocking_action=show, a 300 ms budget). Returns the
    statements' texts."""
    with pg.connect() as setup:
        setup.execute(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id int)")
    statements = [
        f'ALTER TABLE {table} ADD COLUMN "{SCRIPT}" int',
        f"ALTER TABLE {table} ADD COLUMN a int",
        f"ALTER TABLE {table} ADD COLUMN b int",
    ]
    params = {"application_name": "migrate"}
    with closing(_blocker(pg, table)), psycopg.connect(
        proxy.conninfo(pg.superuser, **params), autocommit=True
    ) as conn:  # fmt: skip
        conn.execute(statements[0])
    retried = "-c pgmigrate.blocking_action=none -c pgmigrate.lock_budget=20s"
    with closing(_blocker(pg, table, "300ms")), psycopg.connect(
        proxy.conninfo(pg.superuser, options=retried, **params), autocommit=True
    ) as conn:  # fmt: skip
        conn.execute(statements[1])
    gave_up = "-c pgmigrate.blocking_action=show -c pgmigrate.lock_budget=300ms"
    with closing(_blocker(pg, table)), psycopg.connect(
        proxy.conninfo(pg.superuser, options=gave_up, **params), autocommit=True
    ) as conn, pytest.raises(psycopg.errors.LockNotAvailable):  # fmt: skip
        conn.execute(statements[2])
    return statements


def test_report_of_a_real_run_opens_in_chromium(
    pg: PgInfo, proxy_factory: Callable[..., RunningProxy], json_log: Path, tmp_path: Path
) -> None:
    statements = run_migration(pg, proxy_factory(), "rpt_proxy")
    page = tmp_path / "report.html"
    assert main(["report", str(json_log), "-o", str(page)]) == 0
    opened = open_report(page, screenshot_path(tmp_path, "report-proxy.png"))
    assert opened.errors == []
    assert opened.dialogs == []  # the <script> in a statement and an application_name never ran
    assert opened.requests == [page.resolve().as_uri()]
    assert [s["sql"] for s in opened.sections] == statements
    assert [s["outcome"] for s in opened.sections] == [
        "applied", "applied", "gave up (55P03 lock_not_available)",
    ]  # fmt: skip
    assert [s["visible"] for s in opened.sections] == [True, True, True]
    bars = [s["bars"] for s in opened.sections]
    assert bars[0] == 3 and bars[1] >= 3 and bars[2] == 1  # held, attempts (wait + run); held
    assert SCRIPT in opened.text  # shown as text
    assert "terminated" in opened.text and "blocked by" in opened.text
