"""The blockers of the statements that proxies hold right now, seen with the user's own rights:
ask the proxies on the database itself (NOTIFY on the events channel's request channel; each
proxy answers with its held statements' targets), then look at pg_locks and pg_stat_activity on
the user's own connection, so that only what that user may see is shown and ended."""

from __future__ import annotations

import select
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from django.db.backends.base.base import BaseDatabaseWrapper
from pgmigrate_proxy import events
from pgmigrate_proxy.admin import activity_query, blockers_query
from pgmigrate_proxy.guard.blockers import parse_pga_context, report_query

#: How long proxies get to answer (they answer at their admin connection's next query: a
#: held statement makes one at least every 0.25 s).
ANSWER_SECONDS = 1.0


@dataclass(frozen=True)
class Session:
    """A blocking session as pg_stat_activity shows it to the user."""

    pid: int
    state: str | None
    xact_age: float | None
    query_age: float | None
    application_name: str
    user: str | None
    context: dict[str, Any] | None
    query: str
    prepared_xact: str | None = None


@dataclass
class Held:
    """A statement a proxy holds now, and its blockers."""

    answer: dict[str, Any]
    blockers: list[Session] = field(default_factory=list)

    @property
    def statement(self) -> str:
        return str(self.answer.get("statement", ""))

    @property
    def proxy(self) -> str:
        proxy = self.answer.get("proxy") or {}
        return f"{proxy.get('host', '?')}:{proxy.get('pid', '?')}"


def held_statements(
    connection: BaseDatabaseWrapper, channel: str, wait: float = ANSWER_SECONDS
) -> list[Held]:
    """Ask the proxies for their held statements on this connection's database; each with its
    blockers, looked for with this connection (its role's rights)."""
    connection.ensure_connection()
    raw = connection.connection
    request = uuid.uuid4().hex
    with connection.cursor() as cursor:
        cursor.execute(f'LISTEN "{channel}"')
        try:
            cursor.execute("SELECT current_database()")
            database = cursor.fetchone()[0]
            cursor.execute(
                "SELECT pg_notify(%s, %s)",
                [events.request_channel(channel), events.request_payload(request)],
            )
            answers = _answers(raw, request, wait)
        finally:
            cursor.execute(f'UNLISTEN "{channel}"')
        found = []
        for answer in answers:
            if answer.get("database") not in (None, database):
                continue
            held = Held(answer)
            held.blockers = _blockers(cursor, answer, database)
            found.append(held)
    return found


def signal(connection: BaseDatabaseWrapper, pids: Iterable[int], terminate: bool) -> dict[int, str]:
    """pg_terminate_backend / pg_cancel_backend with the user's rights: pid -> "" when done, else
    why not (PostgreSQL's words)."""
    function = "pg_terminate_backend" if terminate else "pg_cancel_backend"
    outcome: dict[int, str] = {}
    with connection.cursor() as cursor:
        for pid in pids:
            try:
                cursor.execute(f"SELECT {function}(%s)", [pid])
                ok = cursor.fetchone()[0]
                outcome[pid] = "" if ok else "no such session"
            except Exception as exc:  # a DatabaseError of either driver: say it, go on
                outcome[pid] = " ".join(str(exc).split())
    return outcome


def _answers(raw: Any, request: str, wait: float) -> list[dict[str, Any]]:
    """The answers to `request` that arrive within `wait` seconds, one per held statement."""
    found: dict[tuple[str, object], dict[str, Any]] = {}
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        for payload in _notifies(raw, left):
            message = events.parse(payload)
            if message is None or message.get("kind") != "holding":
                continue
            if message.get("request") != request:
                continue
            proxy = message.get("proxy") or {}
            found[(str(proxy.get("instance")), message.get("unit"))] = message
    return list(found.values())


def _notifies(raw: Any, timeout: float) -> list[str]:
    """Payloads received within `timeout` (psycopg 3 or psycopg2)."""
    if hasattr(raw, "notifies") and callable(raw.notifies):  # psycopg 3
        return [n.payload for n in raw.notifies(timeout=timeout, stop_after=1)]
    select.select([raw], [], [], timeout)  # psycopg2
    raw.poll()
    payloads = [n.payload for n in raw.notifies]
    raw.notifies.clear()
    return payloads


def _blockers(cursor: Any, answer: dict[str, Any], database: str) -> list[Session]:
    targets = answer.get("targets") or {}
    relation_modes = {int(oid): str(mode) for oid, mode in targets.items()}
    exclude = {int(answer.get("statement_pid") or 0), int(answer.get("admin_pid") or 0)}
    rows: list[dict[str, Any]] = []
    if relation_modes:
        rows += _fetch(cursor, *blockers_query(relation_modes, exclude, database=database))
    known = {row["pid"] for row in rows}
    announced = {int(p) for p in answer.get("blockers") or () if int(p) not in known}
    if announced - exclude:  # what the proxy's in-flight watch saw (pg_blocking_pids)
        rows += _fetch(cursor, *activity_query(announced - exclude))
    return [_session(row) for row in rows]


def _fetch(cursor: Any, query: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    cursor.execute(query, params)
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _session(row: dict[str, Any]) -> Session:
    return Session(
        pid=int(row["pid"]),
        state=row["state"],
        xact_age=row["xact_age"],
        query_age=row["query_age"],
        application_name=row["application_name"] or "",
        user=row["usename"],
        context=parse_pga_context(row["query"]),
        query=report_query(row["query"]),
        prepared_xact=row["prepared_xact"],
    )
