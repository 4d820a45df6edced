"""`manage.py pgmigrate_blockers`: the blockers of the statements that proxies hold right now,
listed, and with --terminate / --cancel ended, with the user's own rights."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections
from pgmigrate_proxy import events

from pgmigrate import blockers


def _age(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds:.1f}s"


def _plural(count: int) -> str:
    return f"{count} blocking {'query' if count == 1 else 'queries'}"


class Command(BaseCommand):
    help = (
        "Lists the sessions that block the statements pgmigrate-proxy holds right now (an "
        "embedded proxy in another migrate, or an external one), with the rights of this "
        "database user, and with --terminate or --cancel ends them."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        action = parser.add_mutually_exclusive_group()
        action.add_argument("--terminate", action="store_true", help="terminate the blockers")
        action.add_argument("--cancel", action="store_true", help="cancel their queries")
        parser.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        parser.add_argument(
            "--database",
            help="a database alias of DATABASES (default: every PostgreSQL database)",
        )
        parser.add_argument(
            "--channel",
            default=events.DEFAULT_CHANNEL,
            help="the proxies' events_channel (default: %(default)s)",
        )
        parser.add_argument(
            "--wait",
            type=float,
            default=blockers.ANSWER_SECONDS,
            help="seconds to wait for the proxies' answers (default: %(default)s)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        channel = options["channel"]
        if not events.CHANNEL_RE.fullmatch(channel):
            raise CommandError(f"--channel: {channel!r} is not allowed; letters, digits and _")
        aliases = [options["database"]] if options["database"] else self._postgres_aliases()
        ending = "terminate" if options["terminate"] else "cancel" if options["cancel"] else None
        for alias in aliases:
            if alias not in settings.DATABASES:
                raise CommandError(f"--database: {alias!r} is not in DATABASES")
            found = blockers.held_statements(connections[alias], channel, options["wait"])
            pids = self._show(alias, found)
            if ending and pids:
                self._end(alias, pids, ending, options["yes"])

    @staticmethod
    def _postgres_aliases() -> list[str]:
        return [a for a in settings.DATABASES if connections[a].vendor == "postgresql"]

    def _show(self, alias: str, found: list[blockers.Held]) -> list[int]:
        """Print each held statement and its blockers; the blockers' pids."""
        if not found:
            self.stdout.write(f"No statement held by a proxy on database '{alias}'.")
            return []
        pids: list[int] = []
        for held in found:
            since = str(held.answer.get("since", ""))[11:19]
            self.stdout.write(
                f"Held on '{alias}' since {since} by proxy {held.proxy} "
                f"(backend {held.answer.get('statement_pid')}, "
                f"{held.answer.get('action', '?')}): {held.statement}"
            )
            if not held.blockers:
                self.stdout.write("  no blocker seen")
            for session in held.blockers:
                pids.append(session.pid)
                self.stdout.write("  " + self._line(session))
        return list(dict.fromkeys(pids))

    @staticmethod
    def _line(session: blockers.Session) -> str:
        if session.prepared_xact is not None:
            return f"prepared transaction {session.prepared_xact!r} (COMMIT/ROLLBACK PREPARED)"
        parts = [
            f"pid {session.pid}",
            session.state or "",
            f"transaction {_age(session.xact_age)}",
            f"query {_age(session.query_age)}",
            f"application_name {session.application_name!r}",
            f"user {session.user!r}",
            f"pga_context {session.context}" if session.context else "",
            f"query: {session.query}",
        ]
        return ", ".join(part for part in parts if part)

    def _end(self, alias: str, pids: list[int], ending: str, yes: bool) -> None:
        pids = [pid for pid in pids if pid > 0]
        if not pids:
            return
        if not yes:
            answer = input(f"{ending.capitalize()} {_plural(len(pids))} on '{alias}'? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                self.stdout.write("Nothing done.")
                return
        outcome = blockers.signal(connections[alias], pids, ending == "terminate")
        done = [pid for pid, why in outcome.items() if not why]
        verb = "Terminated" if ending == "terminate" else "Cancelled"
        self.stdout.write(f"{verb} {_plural(len(done))}")
        for pid, why in outcome.items():
            if why:
                self.stderr.write(f"Could not {ending} pid {pid}: {why}")
