"""The asyncio driver of the DDL pipeline: carries out the steps that guard/pipeline.py yields
against the session's server connection, the admin connection, the client and the clock."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import psycopg

from pgmigrate_proxy import notices
from pgmigrate_proxy.admin import AdminConnection, AdminUnavailable
from pgmigrate_proxy.guard import pipeline
from pgmigrate_proxy.guard.blockers import INSUFFICIENT_PRIVILEGE
from pgmigrate_proxy.guard.pipeline import GuardContext, Steps
from pgmigrate_proxy.guard.policy import Verdict
from pgmigrate_proxy.guard.steps import (
    Activity,
    AdminDown,
    BlockingPids,
    Deliver,
    Event,
    FindBlockers,
    Inject,
    Notice,
    Now,
    Replies,
    Send,
    Signal,
    Sleep,
    WaiterOwns,
    WaitIdle,
)
from pgmigrate_proxy.guard.unit import (
    UNRESOLVED,
    GuardSettings,
    HeldUnit,
    Resolution,
    needs_guard,
    redoable,
)
from pgmigrate_proxy.protocol.extended import QueryResult
from pgmigrate_proxy.protocol.framing import Frame
from pgmigrate_proxy.sql import Statement

__all__ = [
    "UNRESOLVED",
    "GuardServices",
    "GuardSettings",
    "GuardedSession",
    "HeldUnit",
    "Resolution",
    "needs_guard",
    "redoable",
    "resolve_targets",
    "run",
]

log = logging.getLogger("pgmigrate_proxy.guard")
#: What a client may not see of a blocker session its role may not see (Blocker.as_seen).
_HIDDEN = ("state", "xact_age", "query_age", "context", "client_addr")


@dataclass
class GuardServices:
    """Shared by every session of a server: the admin connection and the pipelines' context."""

    admin: AdminConnection | None
    context: GuardContext = field(default_factory=GuardContext)

    @property
    def in_flight(self) -> set[int]:
        """Backends running guarded statements (never acted on by another pipeline)."""
        return self.context.in_flight

    def refreshed(self) -> GuardContext:
        """The context, told whether there is an admin connection and its backend pid."""
        context = self.context
        admin = self.admin
        context.health.present = admin is not None
        context.admin_pid = admin.pid if admin is not None and admin.connected else 0
        return context


class GuardedSession(pipeline.SessionView, Protocol):
    """What the driver needs from the session it runs the pipeline for."""

    async def wait_idle(self) -> None: ...
    async def inject(self, sql: str, params: Sequence[str | None] = ()) -> QueryResult: ...
    async def exchange(self, data: bytes) -> list[Frame]: ...
    def deliver(self, frames: Iterable[Frame]) -> None: ...
    def notice(self, severity: str, message: str, detail: str | None = None) -> None: ...


async def run(
    session: GuardedSession, services: GuardServices, settings: GuardSettings, unit: HeldUnit
) -> None:
    """Take one held unit through the pipeline; the client gets exactly the replies of one run."""
    context = services.refreshed()
    pid = session.server_pid
    context.in_flight.add(pid)
    try:
        steps = pipeline.run(session, context, settings, unit, _client(session))
        await drive(steps, session, services, report_events=settings.report_events)
    finally:
        context.in_flight.discard(pid)


async def resolve_targets(
    session: GuardedSession, services: GuardServices, statements: Iterable[Statement]
) -> Resolution:
    """The statements' targets and the client's rights, asked on its own server connection."""
    resolved: Resolution = await drive(pipeline.resolve(statements), session, services)
    return resolved


async def drive(
    steps: Steps, session: GuardedSession, services: GuardServices, *, report_events: bool = False
) -> Any:
    """Carry out `steps` until they return; their return value. A failed admin step is thrown
    into them as AdminDown; a lost server connection (ConnectionError) ends the run.
    `report_events`: each event goes to the client too, as a notice (notices.event)."""
    driver = _Driver(session, services, report_events)
    reply: Any = None
    failure: AdminDown | None = None
    try:
        while True:
            try:
                step = steps.throw(failure) if failure is not None else steps.send(reply)
            except StopIteration as stop:
                return stop.value
            reply, failure = None, None
            try:
                reply = await driver.do(step)
            except (AdminUnavailable, psycopg.Error) as exc:
                failure = AdminDown(_describe(exc))
    finally:
        steps.close()
        driver.close()


class _Driver:
    """One run's I/O: the step kinds and what each does."""

    def __init__(
        self, session: GuardedSession, services: GuardServices, report_events: bool = False
    ) -> None:
        self.session = session
        self.services = services
        self.report_events = report_events
        self.loop = asyncio.get_running_loop()
        self.exchange: asyncio.Task[list[Frame]] | None = None

    async def do(self, step: object) -> Any:
        session = self.session
        match step:
            case Now():
                return self.loop.time()
            case Sleep(seconds=seconds):
                await asyncio.sleep(seconds)
            case WaitIdle():
                await session.wait_idle()
            case Inject(sql=sql, params=params):
                return await session.inject(sql, params)
            case Send(data=data):
                self.exchange = self.loop.create_task(session.exchange(data))
            case Replies(timeout=timeout):
                return await self._replies(timeout)
            case Notice(severity=severity, message=message, detail=detail):
                session.notice(severity, message, detail)
            case Deliver(frames=frames):
                session.deliver(frames)
            case Event(name=name, fields=fields, level=level):
                _event(name, fields, level)
                if self.report_events:
                    text = notices.event(_for_client(name, fields))
                    session.notice(notices.EVENT_SEVERITY, text)
            case _:
                return await self._admin(step)
        return None

    async def _replies(self, timeout: float | None) -> list[Frame] | None:
        task = self.exchange
        assert task is not None, "Replies before Send"
        if timeout is None:
            return await task
        if timeout > 0 and not task.done():
            await asyncio.wait({task}, timeout=timeout)
        return task.result() if task.done() else None

    async def _admin(self, step: object) -> Any:
        admin = self.services.admin
        if admin is None:
            raise AdminUnavailable("no admin connection")
        match step:
            case FindBlockers(targets=targets, protected=protected, database=database,
                              viewer=viewer):  # fmt: skip
                return await admin.find_blockers(
                    targets, protected, database=database, viewer=viewer
                )
            case BlockingPids(pid=pid):
                return await admin.blocking_pids(pid)
            case Activity(pids=pids, viewer=viewer):
                return await admin.activity(pids, viewer=viewer)
            case WaiterOwns(pid=pid):
                return await admin.waiter_owns(pid)
            case Signal(pid=pid, verdict=verdict):
                signal = admin.terminate if verdict is Verdict.TERMINATE else admin.cancel
                return await signal(pid)
        raise TypeError(f"not a pipeline step: {step!r}")

    def close(self) -> None:
        task = self.exchange
        if task is None:
            return
        if not task.done():
            task.cancel()
        elif not task.cancelled():
            task.exception()  # retrieved: a lost connection is reported by whoever awaited it


def _event(event: str, fields: Mapping[str, object], level: str = "INFO") -> None:
    """One structured log line per pipeline event."""
    shown = {k: v for k, v in fields.items() if v is not None}
    text = " ".join(f"{k}={v!r}" for k, v in shown.items())
    log.log(
        logging.getLevelName(level), "guard %s %s", event, text,
        extra={"fields": {"event": event, **shown}},
    )  # fmt: skip


def _for_client(event: str, fields: Mapping[str, object]) -> dict[str, object]:
    """An event as its client may have it: what the JSON log has (ts, event, fields), but of a
    blocker its role may not see in pg_stat_activity only what PostgreSQL would show it."""
    ts = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    shown = {k: v for k, v in fields.items() if v is not None}
    if shown.get("visible") is False:
        shown = {k: v for k, v in shown.items() if k not in _HIDDEN}
        shown["query"] = INSUFFICIENT_PRIVILEGE
    return {"ts": ts, "event": event, **shown}


def _client(session: object) -> dict[str, object]:
    """Who sent the held statement, for its events: the startup parameters `user` and
    `application_name` and the peer address of the client session behind `session`."""
    client = getattr(session, "session", None)
    parameters = getattr(client, "parameters", None)
    named = parameters if isinstance(parameters, dict) else {}
    return {
        "user": named.get("user"),
        "application_name": named.get("application_name") or None,
        "client": getattr(client, "peer", None),
    }


def _describe(exc: BaseException) -> str:
    """One line about an admin failure; libpq's messages carry no password."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
