"""Threads for the lock scenarios: a blocker holding a lock on auth.User, a migrate run."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable
from typing import Any

import pgactivity  # type: ignore[import-untyped]
import pglock
from django.core.management import call_command
from django.db import connections, transaction

WAIT = 30.0


class Background(threading.Thread):
    """Runs `target` in a thread with its own Django connections; keeps what it raised."""

    def __init__(self, target: Callable[[], Any]) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.error: BaseException | None = None
        self.result: Any = None

    def run(self) -> None:
        try:
            self.result = self.target()
        except BaseException as exc:
            self.error = exc
        finally:
            connections.close_all()

    def finish(self) -> Any:
        """Join (with a deadline) and return the result, or raise what the thread raised."""
        self.join(WAIT)
        assert not self.is_alive(), "thread did not finish"
        if self.error is not None:
            raise self.error
        return self.result


class Blocker(Background):
    """Holds a lock on auth.User (pglock.model, NOWAIT) in a transaction until released."""

    def __init__(self, mode: str = pglock.ACCESS_SHARE) -> None:
        super().__init__(self._hold)
        self.mode = mode
        self.locked = threading.Event()
        self.release = threading.Event()
        self.pid = 0

    def _hold(self) -> None:
        try:
            with transaction.atomic():
                assert pglock.model("auth.User", mode=self.mode, timeout=0)
                self.pid = pgactivity.pid()
                self.locked.set()
                self.release.wait(WAIT)
        finally:
            self.locked.set()

    def __enter__(self) -> Blocker:
        self.start()
        assert self.locked.wait(WAIT)
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release.set()
        self.join(WAIT)


class Migrate(Background):
    """`call_command("migrate", *args)` in a thread, its output in `out`."""

    def __init__(self, *args: str, command: str = "migrate", **options: Any) -> None:
        self.out = io.StringIO()
        super().__init__(
            lambda: call_command(command, *args, stdout=self.out, no_color=True, **options)
        )

    def wait_for(self, text: str, timeout: float = WAIT) -> None:
        """Poll the output until it holds `text`."""
        deadline = time.monotonic() + timeout
        while text not in self.out.getvalue():
            assert self.is_alive() or text in self.out.getvalue(), self.out.getvalue()
            assert time.monotonic() < deadline, f"no {text!r} in {self.out.getvalue()!r}"
            time.sleep(0.02)


def migrate(*args: str, **options: Any) -> str:
    """Run migrate in this thread; return its output."""
    out = io.StringIO()
    call_command("migrate", *args, stdout=out, no_color=True, **options)
    return out.getvalue()
