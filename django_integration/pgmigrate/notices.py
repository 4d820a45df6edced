"""The proxy's NoticeResponse messages on the migration connection, printed in 1.x's words.

psycopg 3 hands notices to a handler as they arrive (so "Blocked by" shows while a statement
waits); psycopg2 appends them to `connection.notices` when a statement ends, and that list may
be replaced by any object with an `append` method. Each statement's end (a Django execute
wrapper) flushes what was counted during it: "Terminated 2 blocking queries...".
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

from django.core.management.base import BaseCommand
from django.db.backends.base.base import BaseDatabaseWrapper
from pgmigrate_proxy import notices as texts

#: psycopg2 notice text: "WARNING:  pgmigrate: terminated pid 12, ...\nDETAIL:  ...\n".
_PSYCOPG2_NOTICE = re.compile(r"^(?P<severity>[A-Z]+):\s+(?P<message>.*)$", re.MULTILINE)


def _plural(count: int) -> str:
    return "y" if count == 1 else "ies"


class NoticePrinter:
    """Turns the proxy's notices into the migrate command's output lines."""

    def __init__(
        self,
        command: BaseCommand,
        *,
        show_blocked: bool,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.command = command
        self.show_blocked = show_blocked
        self.on_event = on_event  # the guard events (report_events), for migrate --report
        self.terminated: list[int] = []
        self.cancelled: list[int] = []
        self.blocked: list[str] = []  # this statement's blockers, as shown
        self.lines: list[str] = []  # everything printed (tests and logs read it)
        self._table: tuple[tuple[re.Pattern[str], Callable[[re.Match[str]], None]], ...] = (
            (texts.TERMINATED_RE, self._terminated),
            (texts.CANCELLED_RE, self._cancelled),
            (texts.BLOCKED_BY_RE, self._blocked),
            (texts.RETRYING_RE, self._retrying),
            (texts.APPLIED_RE, self._applied),
            (texts.ANY_RE, self._generic),
        )

    def notice(self, severity: str, message: str) -> None:
        """One notice; those not from the proxy are left alone, as Django leaves them."""
        event = texts.read_event(message)
        if event is not None:
            if self.on_event is not None:
                self.on_event(event)
            return
        for pattern, handle in self._table:
            match = pattern.match(message)
            if match is not None:
                handle(match)
                return

    def statement_done(self) -> None:
        """A statement ended: print what it terminated or cancelled, forget its blockers."""
        if self.terminated:
            count = len(self.terminated)
            self._write(f"Terminated {count} blocking quer{_plural(count)}...")
        if self.cancelled:
            count = len(self.cancelled)
            self._write(f"Cancelled {count} blocking quer{_plural(count)}...")
        self.terminated, self.cancelled, self.blocked = [], [], []

    # --- the table's handlers ------------------------------------------------------------------

    def _terminated(self, match: re.Match[str]) -> None:
        self.terminated.append(int(match.group(1)))

    def _cancelled(self, match: re.Match[str]) -> None:
        self.cancelled.append(int(match.group(1)))

    def _blocked(self, match: re.Match[str]) -> None:
        who = match.group(1) or match.group(2)
        if who in self.blocked:
            return
        self.blocked.append(who)
        if self.show_blocked:
            count = len(self.blocked)
            self._write(f"Blocked by {count} quer{_plural(count)}: {' '.join(self.blocked)}...")

    def _retrying(self, match: re.Match[str]) -> None:
        self.statement_done()  # the blockers of an attempt are printed before its retry
        delay, attempt = match.group(2), match.group(3)
        self._write(f"Lock not available, retrying in {delay} ms (attempt {attempt})...")

    def _applied(self, match: re.Match[str]) -> None:
        count = int(match.group(1))
        self._write(
            f"Autocommit: {count} statement{'' if count == 1 else 's'} of this migration "
            "stay applied despite the rollback..."
        )

    def _generic(self, match: re.Match[str]) -> None:
        text = match.group(1)
        self._write(text[:1].upper() + text[1:] + ("" if text.endswith("...") else "..."))

    def _write(self, text: str) -> None:
        self.lines.append(text)
        command = self.command
        if getattr(command, "verbosity", 1):
            command.stdout.write(command.style.WARNING(f"\n  {text}"), ending=" ")


class _Psycopg2Notices:
    """Stands in for a psycopg2 connection's `notices` list."""

    def __init__(self, printer: NoticePrinter) -> None:
        self.printer = printer

    def append(self, text: str) -> None:
        match = _PSYCOPG2_NOTICE.search(text)
        if match is not None:
            self.printer.notice(match.group("severity"), match.group("message").strip())


def _attach(raw: Any, printer: NoticePrinter) -> Callable[[], None]:
    """Start delivering the raw connection's notices to `printer`; return how to stop."""
    if hasattr(raw, "add_notice_handler"):  # psycopg 3

        def handler(diagnostic: Any) -> None:
            printer.notice(str(diagnostic.severity), str(diagnostic.message_primary or ""))

        raw.add_notice_handler(handler)
        return lambda: raw.remove_notice_handler(handler)
    saved = raw.notices  # psycopg2
    raw.notices = _Psycopg2Notices(printer)

    def restore() -> None:
        raw.notices = saved

    return restore


@contextlib.contextmanager
def printed(connection: BaseDatabaseWrapper, printer: NoticePrinter) -> Iterator[NoticePrinter]:
    """Print the proxy's notices while the block runs on the (connected) `connection`."""

    def statement(execute: Callable[..., Any], *args: Any) -> Any:
        try:
            return execute(*args)
        finally:
            printer.statement_done()

    connection.ensure_connection()
    detach = _attach(connection.connection, printer)
    try:
        with connection.execute_wrapper(statement):
            yield printer
    finally:
        printer.statement_done()
        with contextlib.suppress(Exception):  # the connection may be gone
            detach()
