"""The proxy's notices, printed in django-pgmigrate 1.x's words (no database)."""

from __future__ import annotations

import io

from django.core.management.base import BaseCommand, OutputWrapper
from pgmigrate import notices


def _printer(
    verbosity: int = 1, *, show_blocked: bool = True
) -> tuple[notices.NoticePrinter, io.StringIO]:
    command = BaseCommand(no_color=True)
    out = io.StringIO()
    command.stdout = OutputWrapper(out)
    command.verbosity = verbosity  # type: ignore[attr-defined]
    return notices.NoticePrinter(command, show_blocked=show_blocked), out


def test_terminated_counted_per_statement() -> None:
    printer, out = _printer()
    printer.notice("WARNING", "pgmigrate: terminated pid 11, idle in transaction, for 0.3 s")
    printer.notice("WARNING", "pgmigrate: terminated pid 12, active, for 2.0 s, user 'app'")
    assert out.getvalue() == ""
    printer.statement_done()
    printer.statement_done()
    printer.notice("WARNING", "pgmigrate: terminated pid 13, active")
    printer.statement_done()
    assert out.getvalue() == (
        "\n  Terminated 2 blocking queries... \n  Terminated 1 blocking query... "
    )


def test_blocked_by_as_it_changes() -> None:
    printer, out = _printer()
    printer.notice("NOTICE", "pgmigrate: blocked by pid 21, idle in transaction, for 1.0 s")
    printer.notice("NOTICE", "pgmigrate: blocked by pid 21, idle in transaction, for 1.1 s")
    printer.notice("NOTICE", "pgmigrate: blocked by pid 22, active")
    printer.notice("NOTICE", "pgmigrate: blocked by prepared transaction 'tx1'")
    assert out.getvalue() == (
        "\n  Blocked by 1 query: 21... "
        "\n  Blocked by 2 queries: 21 22... "
        "\n  Blocked by 3 queries: 21 22 prepared transaction 'tx1'... "
    )


def test_blocked_by_only_when_shown() -> None:
    printer, out = _printer(show_blocked=False)
    printer.notice("NOTICE", "pgmigrate: blocked by pid 21, active")
    assert out.getvalue() == ""


def test_retries_budget_and_autocommit() -> None:
    printer, out = _printer()
    printer.notice("WARNING", "pgmigrate: cancelled pid 5, active")
    printer.notice(
        "NOTICE",
        "pgmigrate: lock not available (canceling statement due to lock timeout); "
        "retrying in 75 ms (attempt 2)",
    )
    printer.notice("WARNING", "pgmigrate: lock budget spent after 3 attempt(s) (0.1 s)")
    printer.notice(
        "WARNING",
        "pgmigrate: autocommit session: 2 statement(s) stay applied despite the rollback: "
        "ALTER TABLE a ...; ALTER TABLE b ...",
    )
    printer.notice("NOTICE", 'relation "x" already exists, skipping')  # not the proxy's
    assert out.getvalue() == (
        "\n  Cancelled 1 blocking query... "
        "\n  Lock not available, retrying in 75 ms (attempt 2)... "
        "\n  Lock budget spent after 3 attempt(s) (0.1 s)... "
        "\n  Autocommit: 2 statements of this migration stay applied despite the rollback... "
    )


def test_silent_at_verbosity_0() -> None:
    printer, out = _printer(verbosity=0)
    printer.notice("WARNING", "pgmigrate: terminated pid 11, active")
    printer.statement_done()
    assert out.getvalue() == ""
    assert printer.lines == ["Terminated 1 blocking query..."]


def test_psycopg2_notice_text() -> None:
    printer, out = _printer()
    sink = notices._Psycopg2Notices(printer)
    sink.append("WARNING:  pgmigrate: terminated pid 11, active\nDETAIL:  blocking action\n")
    sink.append("garbage")
    printer.statement_done()
    assert out.getvalue() == "\n  Terminated 1 blocking query... "
