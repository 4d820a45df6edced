"""`migrate --report FILE.html`: the embedded proxy's guard events of this run, each tagged with
the migration that was running, written as the proxy's migration report (one HTML page)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from django.core.management.base import CommandError
from pgmigrate_proxy import report

TITLE = "Migration report"
#: What the page says when the events could not be collected (an external proxy's are in its
#: own log, which `pgmigrate-proxy report` reads).
EXTERNAL = (
    "through an external pgmigrate-proxy: its guard events are in its log; "
    'run it with log_format = "json" and use `pgmigrate-proxy report LOG -o FILE.html`'
)


def checked_path(value: str) -> Path:
    """The report's path, refused at once (before migrating) when its directory is missing."""
    path = Path(value)
    if not path.parent.is_dir():
        raise CommandError(f"--report: no directory {str(path.parent)!r} to write {path.name}")
    return path


class Collector:
    """Receives the embedded proxy's guard events (in the proxy's thread) and the migrate
    command's progress (in its own), and writes the page."""

    def __init__(self, path: Path, database: str) -> None:
        self.path = path
        self.database = database
        self.events: list[dict[str, Any]] = []
        self.migration: str | None = None  # the migration running now, "app.0002_x"
        self.note = ""
        self._lock = threading.Lock()

    def on_event(self, event: dict[str, object]) -> None:
        """A guard event of the embedded proxy, tagged with the migration running."""
        with self._lock:
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
        with self._lock:
            events = list(self.events)
        source = f"manage.py migrate, database {self.database!r}"
        if self.note:
            source = f"{source}; {self.note}"
        page = report.render(events, title=TITLE, source=source, client_view=True)
        try:
            self.path.write_text(page, encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"--report: cannot write {self.path}: {exc.strerror}") from None
