"""Sends the guard's events with NOTIFY through the admin connection, off the guard's path (a
bounded queue and one task: a full queue or a down connection drops the event, never waits),
keeps the board of the statements held now, and answers requests for it (events.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

from pgmigrate_proxy import events
from pgmigrate_proxy.admin import AdminConnection
from pgmigrate_proxy.events import Identity

log = logging.getLogger("pgmigrate_proxy.events")

#: Events waiting to be sent; more are dropped (the log still has them).
QUEUE_SIZE = 1000
#: While statements are held, the admin connection is asked this often for requests (they
#: arrive only while it runs a query; the guard's own queries usually come more often).
POLL_SECONDS = 0.25


class EventPublisher:
    """One per proxy: `publish()` is called by the guard's driver for each event."""

    def __init__(self, admin: AdminConnection, channel: str, identity: Identity | None = None):
        self.admin = admin
        self.channel = channel
        self.identity = identity or Identity.current()
        #: unit id -> what is known of the statement held now (the "held" and "blockers" events)
        self.board: dict[int, dict[str, object]] = {}
        self._queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_SIZE)
        self._task: asyncio.Task[None] | None = None  # only while there is something to do
        self._loop = asyncio.get_running_loop()
        self._closed = False
        self.dropped = 0

    async def start(self) -> None:
        """LISTEN for requests (the admin connection may be down: then on its reconnect)."""
        try:
            await self.admin.listen(events.request_channel(self.channel), self._requested)
        except Exception as exc:  # a down admin connection LISTENs on reconnect
            log.debug("events: LISTEN deferred: %s", exc)

    async def close(self) -> None:
        """Send what is queued (bounded by the admin queries' timeout), then stop."""
        self._closed = True
        self.board.clear()
        task, self._task = self._task, None
        if task is None:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout=2.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    def publish(self, name: str, fields: Mapping[str, object]) -> None:
        """Queue event `name` (never waits) and keep the board up to date."""
        unit = fields.get("unit")
        held = self.board.get(unit) if isinstance(unit, int) else None
        if held is not None and "database" not in fields:
            fields = {**fields, "database": held.get("database")}
        self._track(name, fields)
        self._put(events.event_payload(name, fields, self.identity))

    def forget(self, units: set[int]) -> None:
        """Units whose run ended (with or without a final event): held no more."""
        for unit in units:
            self.board.pop(unit, None)

    def _track(self, name: str, fields: Mapping[str, object]) -> None:
        unit = fields.get("unit")
        if not isinstance(unit, int):
            return
        if name == "held":
            self.board[unit] = {**fields, "since": events.now_text()}
        elif name in events.FINAL_EVENTS:
            self.board.pop(unit, None)
        elif name == "blockers" and unit in self.board:
            self.board[unit].update(targets=fields.get("targets"), blockers=fields.get("pids"))

    def _put(self, payload: str) -> None:
        if self._closed:
            return
        try:
            self._queue.put_nowait(payload)
        except asyncio.QueueFull:
            self.dropped += 1
        if self._task is None or self._task.done():
            self._task = self._loop.create_task(self._run())

    def _requested(self, payload: str) -> None:
        """A request on the request channel (called by psycopg): each held statement, answered."""
        message = events.parse(payload)
        if message is None or message.get("kind") != "request":
            return
        request = str(message.get("id", ""))
        for unit, held in list(self.board.items()):
            answer = {**held, "unit": unit, "admin_pid": self.admin.pid}
            self._put(events.holding_payload(request, answer, self.identity))

    async def _run(self) -> None:
        """Send the queue; while statements are held, poll for requests; then end (no task is
        left on the loop while the proxy is idle)."""
        queue = self._queue
        while not queue.empty() or self.board:
            try:
                payload = await asyncio.wait_for(queue.get(), POLL_SECONDS)
            except asyncio.TimeoutError:
                if self.board:
                    await self.admin.poll()
                continue
            try:
                await self.admin.notify(self.channel, payload)
            except Exception as exc:  # an event is never worth a failure
                log.debug("events: not sent: %s", exc)
