"""`manage.py pgmigrate`: Django's migrate, run through pgmigrate-proxy."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
from typing import Any

import pgactivity  # type: ignore[import-untyped]
from django.core.management.base import CommandError, CommandParser
from django.core.management.commands.migrate import Command as MigrateCommand
from django.db import connections
from django.db.utils import OperationalError

from pgmigrate import atomic, guard, migratelock, notices, report, route, worker

#: SQLSTATE lock_not_available: the proxy's answer when the lock budget is spent.
LOCK_NOT_AVAILABLE = "55P03"


def lock_not_available(exc: BaseException) -> bool:
    """True for Django's OperationalError around psycopg's or psycopg2's LockNotAvailable."""
    cause = exc.__cause__
    code = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
    return code == LOCK_NOT_AVAILABLE


class Command(MigrateCommand):
    """migrate, with each statement guarded by the proxy: blockers cleared before DDL."""

    help = (
        "Updates database schema through pgmigrate-proxy, which clears the sessions that "
        "block each statement's locks before sending it."
    )

    collector: report.Collector | None = None

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument(
            "--report",
            metavar="FILE.html",
            help="Write a report of the guarded statements (held, blockers and what was done, "
            "each attempt, the outcome) to FILE.html, one self-contained page.",
        )

    def migration_progress_callback(
        self, action: str, migration: Any = None, fake: bool = False
    ) -> None:
        if self.collector is not None:
            self.collector.progress(action, migration)
        super().migration_progress_callback(action, migration, fake)

    def handle(self, *args: Any, **options: Any) -> None:
        path = options.get("report")
        if path is None:
            self._handle(*args, **options)
            return
        self.collector = report.Collector(report.checked_path(path), options["database"])
        try:
            self._handle(*args, **options)
        finally:
            self.collector.write()
            if options["verbosity"]:
                self.stdout.write(f"Migration report: {path}")
            self.collector = None

    def _handle(self, *args: Any, **options: Any) -> None:
        connection = connections[options["database"]]
        if connection.vendor != "postgresql":
            super().handle(*args, **options)
            return
        if connection.in_atomic_block:
            self.stderr.write("pgmigrate: inside a transaction; migrating without the proxy")
            super().handle(*args, **options)
            return
        try:
            plan = guard.plan()
        except guard.Invalid as exc:
            raise CommandError(str(exc)) from None
        self.verbosity = options["verbosity"]
        try:
            self._migrate(plan, args, options)
        except migratelock.Busy:
            seconds = plan.migrate_lock_timeout
            self.stderr.write(
                f"Migration lock not available after {seconds:g} s "
                "(PGMIGRATE_MIGRATE_LOCK_TIMEOUT). Aborting..."
            )
            sys.exit(1)
        except OperationalError as exc:
            if not lock_not_available(exc):
                raise
            if self.verbosity:
                self.stdout.write(self.style.ERROR("\nLock timeout expired. Aborting..."))
            sys.exit(1)

    def _say(self, text: str) -> None:
        """A line about waiting for another migrate (stderr: it is no migration output)."""
        if self.verbosity:
            self.stderr.write(text)

    def _migrate(self, plan: guard.Plan, args: Any, options: dict[str, Any]) -> None:
        alias = options["database"]
        connection = connections[alias]
        collector = self.collector
        on_event = None
        if collector is not None:  # the proxy sends the guard events as notices
            plan = dataclasses.replace(plan, guard={**plan.guard, "report_events": True})
            on_event = collector.on_event
        printer = notices.NoticePrinter(self, show_blocked=plan.shows_blockers, on_event=on_event)
        direct = dict(connection.settings_dict)  # before routed() points it at the proxy
        with (
            route.routed(connection, plan) as path,
            notices.printed(connection, printer),
            atomic.bracketing(),
            # one migrate at a time, from before Django plans (after the embedded proxy
            # started: a refused admin login is said first, in its own words)
            migratelock.held(direct, plan.migrate_lock_timeout, self._say),
        ):
            pid = pgactivity.pid(using=alias)
            if self.verbosity:
                self.stdout.write(self.style.MIGRATE_HEADING("Postgres process ID: ") + str(pid))
            if self.verbosity >= 2:
                self.stdout.write(f"Through the {path.describe()}")
            polling: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
            if plan.worker:
                assert plan.action is not None
                polling = worker.polling(plan.action, self, alias, pid, plan.interval)
            with polling:
                super().handle(*args, **options)
