"""`migrate --report FILE.html`: the guard events of this run (the proxy sends them to the
migration connection as notices when asked: report_events), each tagged with the migration
that was running, written as the proxy's migration report (one HTML page)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import CommandError
from pgmigrate_proxy import report

TITLE = "Migration report"


def checked_path(value: str) -> Path:
    """The report's path, refused at once (before migrating) when its directory is missing."""
    path = Path(value)
    if not path.parent.is_dir():
        raise CommandError(f"--report: no directory {str(path.parent)!r} to write {path.name}")
    return path


class Collector:
    """Receives the proxy's guard events and the migrate command's progress; writes the page."""

    def __init__(self, path: Path, database: str) -> None:
        self.path = path
        self.database = database
        self.events: list[dict[str, Any]] = []
        self.migration: str | None = None  # the migration running now, "app.0002_x"

    def on_event(self, event: dict[str, Any]) -> None:
        """A guard event from the proxy, tagged with the migration running."""
        self.events.append({**event, "migration": self.migration})

    def progress(self, action: str, migration: Any) -> None:
        """migrate's progress callback: which migration runs now (statements outside one, such
        as creating django_migrations, have none)."""
        if action in ("apply_start", "unapply_start"):
            suffix = " (unapply)" if action == "unapply_start" else ""
            self.migration = f"{migration}{suffix}"
        elif action in ("apply_success", "unapply_success"):
            self.migration = None

    def write(self) -> None:
        source = f"manage.py migrate, database {self.database!r}"
        page = report.render(self.events, title=TITLE, source=source, client_view=True)
        try:
            self.path.write_text(page, encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"--report: cannot write {self.path}: {exc.strerror}") from None
