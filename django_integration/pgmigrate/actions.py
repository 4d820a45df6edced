"""The blocking actions of PGMIGRATE_BLOCKING_ACTION: Terminate, Show, Cancel and custom ones."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from django.core.management.base import BaseCommand
    from pglock.models import BlockedPGLockQuerySet


def _plural(count: int) -> str:
    return "y" if count == 1 else "ies"


class BlockingAction:
    """The base class of blocking actions, as in django-pgmigrate 1.x.

    Keyword arguments are django-pglock `BlockedPGLock` queryset filters. The built-in actions
    (Terminate, Show, Cancel and subclasses that keep their `worker`) run inside the proxy,
    which maps the filters onto its own. A subclass with a `worker` of its own runs as in 1.x:
    a thread calls `worker(cmd, blocking_locks)` every PGMIGRATE_BLOCKING_ACTION_INTERVAL with
    the `BlockedPGLock` queryset of the migration's blockers, and `worker` returns what it
    handled. (In 1.x it also subclassed pglock.PrioritizeSideEffect, whose `worker` takes
    other arguments; it no longer does, so that subclasses type-check.)
    """

    def __init__(self, **filters: Any) -> None:
        self.filters = filters

    def worker(self, cmd: BaseCommand, blocking_locks: BlockedPGLockQuerySet) -> list[int]:
        raise NotImplementedError

    def __call__(self, cmd: BaseCommand, blocked_locks: BlockedPGLockQuerySet) -> list[int]:
        return self.worker(cmd, blocked_locks.filter(**self.filters))

    def __repr__(self) -> str:
        filters = ", ".join(f"{key}={value!r}" for key, value in self.filters.items())
        return f"{type(self).__module__}.{type(self).__qualname__}({filters})"


def _acted(cmd: BaseCommand, verb: str, pids: list[int]) -> list[int]:
    """Print "<verb> N blocking quer(y|ies)..." in the warning style, as 1.x does."""
    if pids and cmd.verbosity:  # type: ignore[attr-defined]
        count = len(pids)
        cmd.stdout.write(
            cmd.style.WARNING(f"\n  {verb} {count} blocking quer{_plural(count)}..."),
            ending=" ",
        )
    return pids


class Terminate(BlockingAction):
    """Terminate the sessions that block a migration (the default)."""

    def worker(self, cmd: BaseCommand, blocking_locks: BlockedPGLockQuerySet) -> list[int]:
        terminated: list[int] = blocking_locks.terminate_blocking_activity()
        return _acted(cmd, "Terminated", terminated)


class Cancel(BlockingAction):
    """Cancel the blockers' queries (the proxy ends idle-in-transaction ones after a grace)."""

    def worker(self, cmd: BaseCommand, blocking_locks: BlockedPGLockQuerySet) -> list[int]:
        cancelled: list[int] = blocking_locks.cancel_blocking_activity()
        return _acted(cmd, "Cancelled", cancelled)


class Show(BlockingAction):
    """Show the process IDs of the blockers (for `pgactivity` / `pglock`) and wait."""

    def worker(self, cmd: BaseCommand, blocking_locks: BlockedPGLockQuerySet) -> list[int]:
        pids = list(blocking_locks.values_list("blocking_activity_id", flat=True).distinct())
        if pids:
            output = cmd.style.WARNING(
                f"\n  Blocked by {len(pids)} quer{_plural(len(pids))}: "
                + " ".join(str(pid) for pid in pids)
                + "..."
            )
            if output != getattr(cmd, "_pgmigrate_last_output", "") and cmd.verbosity:  # type: ignore[attr-defined]
                cmd.stdout.write(output, ending=" ")
            cmd._pgmigrate_last_output = output  # type: ignore[attr-defined]
        return pids


class Drain(BlockingAction):
    """Drain instead of kill (the proxy's blocking_action = drain): the proxy holds new work on
    the migration's tables, lets the transactions holding locks on them finish (up to
    `timeout`: seconds, a timedelta or a duration such as "500ms"), runs the statement and
    releases what it held. `then` applies to the sessions still holding locks after the
    timeout: pgmigrate.Terminate (the default), pgmigrate.Cancel, or None to give up (the
    statement fails with 55P03, nobody is touched). Keyword filters apply to `then`."""

    def __init__(
        self,
        timeout: object = 2.0,
        then: type[BlockingAction] | BlockingAction | None = Terminate,
        **filters: Any,
    ) -> None:
        super().__init__(**filters)
        self.timeout = timeout
        self.then = then

    def worker(self, cmd: BaseCommand, blocking_locks: BlockedPGLockQuerySet) -> list[int]:
        return []  # the proxy does it: this worker never runs

    def __repr__(self) -> str:
        then = getattr(self.then, "__name__", None) or repr(self.then)
        shown = ", ".join(f"{key}={value!r}" for key, value in self.filters.items())
        return f"pgmigrate.Drain(timeout={self.timeout!r}, then={then}" + (
            f", {shown})" if shown else ")"
        )


def drain_then(then: object) -> str:
    """The proxy's drain_then for Drain's `then`; ValueError for anything else."""
    if then is None:
        return "give_up"
    cls = then if isinstance(then, type) else type(then)
    if issubclass(cls, (Terminate, Cancel)) and cls.__call__ is BlockingAction.__call__:
        return PROXY_ACTIONS[cls.worker]
    raise ValueError(
        f"Drain's then must be pgmigrate.Terminate, pgmigrate.Cancel or None (got {then!r})"
    )


#: The built-in workers and the proxy's blocking_action that does their job.
PROXY_ACTIONS: dict[Callable[..., list[int]], str] = {
    Terminate.worker: "terminate",
    Show.worker: "show",
    Cancel.worker: "cancel",
    Drain.worker: "drain",
}


def proxy_action(action: BlockingAction) -> str | None:
    """The proxy's blocking_action for a built-in action; None for a custom `worker`."""
    cls = type(action)
    if cls.__call__ is not BlockingAction.__call__:
        return None
    return PROXY_ACTIONS.get(cls.worker)
