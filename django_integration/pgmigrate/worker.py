"""django-pgmigrate 1.x's mechanism for custom blocking actions: a polling thread.

Every PGMIGRATE_BLOCKING_ACTION_INTERVAL the thread calls the action with the migration's
django-pglock `BlockedPGLock` queryset (its own connection, with the database's original
settings, so it does not go through the migration's route). The proxy is told
blocking_action=none and a per-attempt lock_timeout of the whole budget, so that a blocked
statement waits in PostgreSQL's lock queue, where the queryset sees it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from django.apps import apps
from django.core.management.base import BaseCommand
from django.db import connections

from pgmigrate.actions import BlockingAction


class Worker(threading.Thread):
    """Runs `action(cmd, blocked_locks)` every `interval` seconds until stopped."""

    def __init__(
        self, action: BlockingAction, command: BaseCommand, alias: str, pid: int, interval: float
    ) -> None:
        super().__init__(name="pgmigrate-blocking-action", daemon=True)
        self.action = action
        self.command = command
        self.alias = alias
        self.pid = pid
        self.interval = interval
        self.finished = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        model = apps.get_model("pglock", "BlockedPGLock")
        try:
            while not self.finished.wait(self.interval):
                self.action(self.command, model.objects.using(self.alias).pid(self.pid))
        except BaseException as exc:  # reported by stop(), in the command's thread
            self.error = exc
        finally:
            connections.close_all()  # this thread's connections only

    def stop(self) -> None:
        """End the thread; raise what the action raised."""
        self.finished.set()
        self.join()
        if self.error is not None:
            raise RuntimeError("the blocking action's worker failed") from self.error


@contextlib.contextmanager
def polling(
    action: BlockingAction, command: BaseCommand, alias: str, pid: int, interval: float
) -> Iterator[Worker]:
    """Run the action's worker while the block runs."""
    worker = Worker(action, command, alias, pid, interval)
    worker.start()
    try:
        yield worker
    finally:
        worker.stop()
