"""The asyncio driver of the DDL pipeline: carries out the steps that guard/pipeline.py yields
against a server connection, the admin connection, a client writer and the clock (a unit
runner: it is given those, and knows no client session)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import psycopg

from pgmigrate_proxy import notices
from pgmigrate_proxy.admin import AdminConnection, AdminUnavailable
from pgmigrate_proxy.guard import pipeline
from pgmigrate_proxy.guard.blockers import INSUFFICIENT_PRIVILEGE
from pgmigrate_proxy.guard.drain import Gate as DrainGate
from pgmigrate_proxy.guard.drain import GateHold, HoldRule
from pgmigrate_proxy.guard.pipeline import GuardContext, Steps
from pgmigrate_proxy.guard.policy import Verdict
from pgmigrate_proxy.guard.steps import (
    Acks,
    Activity,
    AdminDown,
    Announce,
    Arm,
    BlockingPids,
    Deliver,
    Event,
    FindBlockers,
    Inject,
    LockHolders,
    Notice,
    Now,
    Recheck,
    Release,
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
from pgmigrate_proxy.protocol.framing import Frame
from pgmigrate_proxy.protocol.types import TransactionStatus
from pgmigrate_proxy.runtime.coordinate import DrainCoordinator
from pgmigrate_proxy.runtime.gate import DrainGate as GateForDrains
from pgmigrate_proxy.runtime.gate import Gate
from pgmigrate_proxy.runtime.ports import Capture, ClientWriter, ServerPort
from pgmigrate_proxy.runtime.publish import EventPublisher
from pgmigrate_proxy.runtime.stats import GuardEvents
from pgmigrate_proxy.sql import Statement

__all__ = [
    "UNRESOLVED",
    "GuardServices",
    "GuardSettings",
    "HeldUnit",
    "Resolution",
    "TargetMemory",
    "needs_guard",
    "redoable",
    "resolve_targets",
    "run",
]

log = logging.getLogger("pgmigrate_proxy.guard")
#: Statement texts whose resolved targets are kept for Executes that come mid-batch.
_KNOWN_TARGETS = 64
#: What a client may not see of a blocker session its role may not see (Blocker.as_seen).
_HIDDEN = ("state", "xact_age", "query_age", "context", "client_addr")


@dataclass
class GuardServices:
    """Shared by every session of a server: the admin connection and the pipelines' context."""

    admin: AdminConnection | None
    context: GuardContext = field(default_factory=GuardContext)
    gate: Gate = field(default_factory=Gate)  # holds other sessions' statements at the proxy
    #: What a drain arms (blocking_action = drain; guard/drain.py's Gate protocol): `gate`.
    drain_gate: DrainGate = field(init=False)
    events: EventPublisher | None = None  # NOTIFY of each event (events_channel)
    recent: GuardEvents = field(default_factory=GuardEvents)  # the recent ones, for the console
    #: Drains announced to the other proxies, and theirs armed on drain_gate (the drain channel)
    coordinator: DrainCoordinator | None = None

    def __post_init__(self) -> None:
        self.drain_gate = GateForDrains(self.gate)

    @property
    def in_flight(self) -> set[int]:
        """Backends running guarded statements (never acted on by another pipeline)."""
        return self.context.in_flight

    @property
    def admin_up(self) -> bool:
        """The admin connection is open and the guard is not backing off from a failure."""
        admin = self.admin
        return admin is not None and admin.connected and self.context.health.reason is None

    def refreshed(self) -> GuardContext:
        """The context, told whether there is an admin connection and its backend pid."""
        context = self.context
        admin = self.admin
        context.health.present = admin is not None
        context.admin_pid = admin.pid if admin is not None and admin.connected else 0
        return context


class TargetMemory:
    """What was resolved for the statements a session prepared, kept per statement text (a
    few, bounded) for the Executes that come mid-batch, when nothing can be asked."""

    __slots__ = ("_targets",)

    def __init__(self) -> None:
        self._targets: dict[str, Resolution] = {}

    def known_targets(self, statements: Iterable[Statement]) -> Resolution:
        """A statement never resolved makes the whole unresolved (it goes out untouched)."""
        known = [self._targets.get(statement.text) for statement in statements]
        if any(part is None for part in known):
            return UNRESOLVED
        return Resolution.merge(part for part in known if part is not None)

    def remember_targets(self, statements: Iterable[Statement], resolved: Resolution) -> None:
        for statement in statements:
            if len(self._targets) >= _KNOWN_TARGETS:
                self._targets.pop(next(iter(self._targets)))
            self._targets[statement.text] = resolved


class _View:
    """What the pipeline reads (pipeline.SessionView): the server connection's state, the
    client's presence, the session's remembered targets."""

    __slots__ = ("client", "server", "targets")

    def __init__(self, server: ServerPort, client: ClientWriter, targets: TargetMemory) -> None:
        self.server = server
        self.client = client
        self.targets = targets

    @property
    def server_pid(self) -> int:
        return self.server.server_pid

    @property
    def database(self) -> str:
        return self.server.database

    @property
    def status(self) -> TransactionStatus:
        return self.server.status

    @property
    def can_inject(self) -> bool:
        return self.server.can_inject

    @property
    def gone(self) -> bool:
        return self.client.gone or self.server.gone

    def known_targets(self, statements: Iterable[Statement]) -> Resolution:
        return self.targets.known_targets(statements)

    def remember_targets(self, statements: Iterable[Statement], resolved: Resolution) -> None:
        self.targets.remember_targets(statements, resolved)


async def run(
    server: ServerPort,
    client: ClientWriter,
    services: GuardServices,
    settings: GuardSettings,
    unit: HeldUnit,
    targets: TargetMemory,
) -> None:
    """Take one held unit through the pipeline; the client gets exactly the replies of one run."""
    context = services.refreshed()
    pid = server.server_pid
    context.in_flight.add(pid)
    try:
        view = _View(server, client, targets)
        steps = pipeline.run(view, context, settings, unit, _client(client))
        await drive(steps, server, client, services, report_events=settings.report_events)
    finally:
        context.in_flight.discard(pid)


async def resolve_targets(
    server: ServerPort, client: ClientWriter, services: GuardServices,
    statements: Iterable[Statement],
) -> Resolution:  # fmt: skip
    """The statements' targets and the client's rights, asked on its own server connection."""
    resolved: Resolution = await drive(pipeline.resolve(statements), server, client, services)
    return resolved


async def drive(
    steps: Steps,
    server: ServerPort,
    client: ClientWriter,
    services: GuardServices,
    *,
    report_events: bool = False,
) -> Any:
    """Carry out `steps` until they return; their return value. A failed admin step is thrown
    into them as AdminDown; a lost server connection (ConnectionError) ends the run.
    `report_events`: each event goes to the client too, as a notice (notices.event)."""
    driver = _Driver(server, client, services, report_events)
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
        self,
        server: ServerPort,
        client: ClientWriter,
        services: GuardServices,
        report_events: bool = False,
    ) -> None:
        self.server = server
        self.client = client
        self.services = services
        self.report_events = report_events
        self.loop = asyncio.get_running_loop()
        self.exchange: asyncio.Task[list[Frame]] | None = None
        self.hold: GateHold | None = None  # a drain's armed rule
        self.announced: str | None = None  # its id on the drain channel, once announced
        self.units: set[int] = set()  # the units whose events went out (for the held board)

    async def do(self, step: object) -> Any:
        server, client = self.server, self.client
        match step:
            case Now():
                return self.loop.time()
            case Sleep(seconds=seconds):
                await asyncio.sleep(seconds)
            case WaitIdle():
                await server.wait_idle()
            case Inject(sql=sql, params=params):
                result = await server.inject(sql, params)
                client.deliver(result.asynchronous)
                return result
            case Send(data=data):
                self.exchange = self.loop.create_task(server.exchange(data))
            case Replies(timeout=timeout):
                return await self._replies(timeout)
            case Notice(severity=severity, message=message, detail=detail):
                client.notice(severity, message, detail)
            case Deliver(frames=frames):
                client.deliver(frames)
            case Arm(rule=rule):
                self._release()
                self.hold = self.services.drain_gate.arm(rule)
            case Release():
                self._release()
            case Announce(rule=rule, targets=targets, hold_seconds=bound):
                return await self._announce(rule, targets, bound)
            case Recheck():
                if self.hold is not None:
                    self.hold.recheck()
            case Event(name=name, fields=fields, level=level):
                _event(name, fields, level)
                self._publish(name, fields)
                self.services.recent.record(name, fields)
                if self.report_events:
                    text = notices.event(_for_client(name, fields))
                    client.notice(notices.EVENT_SEVERITY, text)
            case _:
                return await self._admin(step)
        return None

    def _publish(self, name: str, fields: Mapping[str, object]) -> None:
        publisher = self.services.events
        if publisher is None:
            return
        unit = fields.get("unit")
        if isinstance(unit, int):
            self.units.add(unit)
        publisher.publish(name, fields)

    async def _replies(self, timeout: float | None) -> list[Frame] | None:
        task = self.exchange
        assert task is not None, "Replies before Send"
        if timeout is None:
            return await task
        if timeout > 0 and not task.done():
            await asyncio.wait({task}, timeout=timeout)
        return task.result() if task.done() else None

    async def _announce(self, rule: object, targets: tuple[int, ...], bound: float) -> Acks | None:
        coordinator = self.services.coordinator
        if coordinator is None or not isinstance(rule, HoldRule):
            return None
        acks = await coordinator.announce(rule, targets, bound)
        self.announced = acks.drain
        return acks

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
            case LockHolders(relations=relations, database=database):
                return await admin.lock_rows(relations, database=database)
            case Signal(pid=pid, verdict=verdict):
                signal = admin.terminate if verdict is Verdict.TERMINATE else admin.cancel
                return await signal(pid)
        raise TypeError(f"not a pipeline step: {step!r}")

    def _release(self) -> None:
        hold, self.hold = self.hold, None
        if hold is not None:
            hold.release()
        announced, self.announced = self.announced, None
        if announced is not None and self.services.coordinator is not None:
            self.services.coordinator.end(announced)

    def close(self) -> None:
        if self.services.events is not None:
            self.services.events.forget(self.units)
        self._release()  # whatever ended the run, nothing stays held
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


def _client(client: object) -> dict[str, object]:
    """Who sent the held statement, for its events: the startup parameters `user` and
    `application_name` and the peer address of the client session (the runner's writer)."""
    while isinstance(client, Capture):  # a migration runner's: the session is behind it
        client = client.client
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
