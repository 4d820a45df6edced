"""The admin console's side of the DDL guard: SHOW HELD, SHOW BLOCKERS, SHOW EVENTS, and
RELEASE, TERMINATE BLOCKERS, CANCEL BLOCKERS for the statements held now.

What the console does through the admin connection on a console user's behalf is only what
that user could do itself in PostgreSQL: blockers are shown as pg_stat_activity would show them
to the user's role, and ended only where the role could call pg_terminate_backend /
pg_cancel_backend itself (admin.AdminConnection.may_signal).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import replace

import psycopg

from pgmigrate_proxy.admin import AdminConnection, AdminUnavailable
from pgmigrate_proxy.console.host import ConsoleHost
from pgmigrate_proxy.console.parse import CommandError
from pgmigrate_proxy.console.pools import timestamp
from pgmigrate_proxy.console.rows import Table, Value
from pgmigrate_proxy.guard.blockers import INSUFFICIENT_PRIVILEGE as HIDDEN
from pgmigrate_proxy.guard.blockers import Blocker, redact_query
from pgmigrate_proxy.guard.pipeline import Pipeline
from pgmigrate_proxy.protocol.sqlstate import SqlState

log = logging.getLogger("pgmigrate_proxy.console")

#: A held statement's text is cut to this many characters (after redaction).
STATEMENT_LIMIT = 200
#: What the guard did to a blocker, by event name.
DONE = {
    "terminated": "terminated", "cancelled": "cancelled", "blocked_by": "shown",
    "console_terminated": "terminated (console)", "console_cancelled": "cancelled (console)",
}  # fmt: skip

HELD_COLUMNS = (
    "id", "client_id", "client", "user", "database", "application_name", "statement",
    "targets", "state", "held_since", "held_s", "action", "blockers",
)  # fmt: skip
BLOCKERS_COLUMNS = (
    "held_id", "pid", "state", "user", "application_name", "client_addr", "xact_age_s",
    "query_age_s", "locks", "done", "query",
)  # fmt: skip
EVENTS_COLUMNS = ("time", "event", "unit", "statement_pid", "fields")


def _held(host: ConsoleHost, unit: int | None = None) -> list[Pipeline]:
    """The units in the pipeline now (one: `unit`; CommandError when it is not)."""
    held = host.guard.context.held
    if unit is None:
        return [held[key] for key in sorted(held)]
    if unit not in held:
        raise CommandError(SqlState.UNDEFINED_OBJECT, f"no statement is held with id {unit}")
    return [held[unit]]


def _statement(pipeline: Pipeline) -> str:
    text = "; ".join(" ".join(s.text.split()) for s in pipeline.unit.statements)
    return redact_query(text)[:STATEMENT_LIMIT]


def _targets(pipeline: Pipeline) -> str:
    parts: list[str] = []
    for statement in pipeline.unit.statements:
        parts.extend(f"{lock.relation} ({lock.mode.name})" for lock in statement.locks)
        parts.extend(
            f"{ask.question.value.replace('_', ' ')} of {ask.relation} ({ask.mode.name})"
            for ask in statement.resolve
        )
    return ", ".join(dict.fromkeys(parts))


def _done(host: ConsoleHost, unit: int) -> dict[int, str]:
    """pid -> what the guard did to it so far, from the unit's events."""
    done: dict[int, str] = {}
    for event in host.guard.recent.of_unit(unit):
        verb = DONE.get(event.name)
        pid = event.fields.get("pid")
        if verb is not None and isinstance(pid, int):
            done[pid] = verb
    return done


def _client_id(host: ConsoleHost, peer: object) -> int | None:
    for session in host.sessions:
        if session.peer == peer:
            return host.client_id(session)
    return None


def show_held(host: ConsoleHost) -> Table:
    loop_now = _loop_time()
    rows: list[tuple[Value, ...]] = []
    for pipeline in _held(host):
        held_for = max(0.0, loop_now - pipeline.started) if pipeline.started else 0.0
        done = _done(host, pipeline.unit_id)
        blockers = ", ".join(f"pid {pid} {verb}" for pid, verb in sorted(done.items()))
        state = f"attempt {pipeline.attempt}" if pipeline.attempt else "holding"
        if not pipeline.attempt and not pipeline.resolution.resolved:
            state = "resolving"  # (its targets are being looked up; a mid-batch one stays so)
        client = pipeline.client
        rows.append((
            pipeline.unit_id, _client_id(host, client.get("client")), _text(client.get("client")),
            _text(client.get("user")), pipeline.view.database,
            _text(client.get("application_name")), _statement(pipeline), _targets(pipeline),
            state, timestamp(time.time() - held_for), round(held_for, 3),
            pipeline.settings.action.value, blockers,
        ))  # fmt: skip
    return Table(HELD_COLUMNS, rows)


def _text(value: object) -> str | None:
    return None if value is None else str(value)


def _loop_time() -> float:
    """The pipeline's clock (its Now step): the loop's."""
    return asyncio.get_running_loop().time()


def _admin(host: ConsoleHost) -> AdminConnection:
    admin = host.guard.admin
    if admin is None:
        raise CommandError(
            SqlState.OBJECT_NOT_IN_PREREQUISITE_STATE,
            "no admin connection (the guard is off): blockers cannot be looked for",
        )
    return admin


async def _blockers(
    host: ConsoleHost, user: str, pipelines: Iterable[Pipeline]
) -> list[tuple[Pipeline, Blocker]]:
    """The live blockers of each held unit, as `user`'s role may see them."""
    admin = _admin(host)
    context = host.guard.context
    found: list[tuple[Pipeline, Blocker]] = []
    try:
        viewer = await admin.role_oid(user)
        for pipeline in pipelines:
            targets = pipeline.resolution.targets
            protected = {*context.in_flight, pipeline.view.server_pid, context.admin_pid}
            database = pipeline.view.database
            listed = await admin.find_blockers(targets, protected, database=database, viewer=viewer)
            for blocker in listed:
                seen = blocker if viewer is not None else replace(blocker, visible=False)
                found.append((pipeline, seen.as_seen()))
    except (AdminUnavailable, psycopg.Error) as exc:
        raise CommandError(SqlState.CONNECTION_FAILURE, f"admin connection: {exc}") from None
    return found


async def show_blockers(host: ConsoleHost, user: str) -> Table:
    rows: list[tuple[Value, ...]] = []
    for pipeline, blocker in await _blockers(host, user, _held(host)):
        locks = ", ".join(
            f"{lock.mode.name}{'' if lock.granted else ' (waiting)'}" for lock in blocker.locks
        )
        done = _done(host, pipeline.unit_id).get(blocker.pid, "")
        rows.append((
            pipeline.unit_id, blocker.pid, blocker.state.value if blocker.state else None,
            blocker.usename, blocker.application_name, blocker.client_addr,
            _round(blocker.xact_age), _round(blocker.query_age), locks, done, blocker.query,
        ))  # fmt: skip
    return Table(BLOCKERS_COLUMNS, rows)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def show_events(host: ConsoleHost, count: int, *, reveal: bool) -> Table:
    """The last `count` events; the blockers' queries and contexts only when `reveal` (an
    admin_users member: the guard's log has them too), else "<insufficient privilege>"."""
    rows: list[tuple[Value, ...]] = []
    for event in host.guard.recent.last(count):
        fields = {k: v for k, v in event.fields.items() if k not in ("unit", "statement_pid")}
        if isinstance(fields.get("query"), str):
            fields["query"] = redact_query(str(fields["query"])) if reveal else HIDDEN
        if "context" in fields and not reveal:
            fields["context"] = None
        unit, pid = event.fields.get("unit"), event.fields.get("statement_pid")
        rows.append((
            timestamp(event.ts), event.name, unit if isinstance(unit, int) else None,
            pid if isinstance(pid, int) else None, json.dumps(fields, default=str),
        ))  # fmt: skip
    return Table(EVENTS_COLUMNS, rows)


def release(host: ConsoleHost, unit: int) -> str:
    """RELEASE id: the unit is sent without waiting for its blockers any longer."""
    (pipeline,) = _held(host, unit)
    host.guard.context.released.add(unit)
    log.info("console: held statement %d released (%s)", unit, _statement(pipeline)[:60])
    if pipeline.attempt:
        return f"statement {unit} is already on the server (attempt {pipeline.attempt})"
    return f"statement {unit} released: it is sent now"


async def end_blockers(host: ConsoleHost, user: str, unit: int | None, *, terminate: bool) -> Table:
    """TERMINATE / CANCEL BLOCKERS [id]: end the blockers `user` could end itself; 42501 when
    there are blockers and it may end none of them."""
    admin = _admin(host)
    held = _held(host, unit)
    if unit is not None and not held[0].resolution.resolved:
        raise CommandError(
            SqlState.OBJECT_NOT_IN_PREREQUISITE_STATE,
            f"the targets of statement {unit} are not known (yet): its blockers cannot be found",
        )
    found = await _blockers(host, user, held)
    pids = {blocker.pid for _, blocker in found}
    try:
        allowed = await admin.may_signal(user, pids)
    except (AdminUnavailable, psycopg.Error) as exc:
        raise CommandError(SqlState.CONNECTION_FAILURE, f"admin connection: {exc}") from None
    if pids and not allowed:
        verb = "terminate" if terminate else "cancel"
        raise CommandError(
            SqlState.INSUFFICIENT_PRIVILEGE,
            f"permission denied to {verb} the blockers (pid {', '.join(map(str, sorted(pids)))})",
            hint=f'role "{user}" may not signal them in PostgreSQL (pg_signal_backend, or a '
            "member of their role)",
        )
    rows: list[tuple[Value, ...]] = []
    signal = admin.terminate if terminate else admin.cancel
    verb = "terminated" if terminate else "cancelled"
    for pipeline, blocker in found:
        if blocker.pid not in allowed:
            rows.append((pipeline.unit_id, blocker.pid or None, "refused: no permission"))
            continue
        try:
            ok = await signal(blocker.pid)
        except (AdminUnavailable, psycopg.Error) as exc:
            raise CommandError(SqlState.CONNECTION_FAILURE, f"admin connection: {exc}") from None
        outcome = verb if ok else "gone"
        rows.append((pipeline.unit_id, blocker.pid, outcome))
        fields = {"pid": blocker.pid, "by": user, "outcome": outcome}
        host.guard.recent.record(f"console_{verb}", {**fields, "unit": pipeline.unit_id})
        log.warning("console: user %s %s blocker pid %d of held statement %d",
                    user, outcome, blocker.pid, pipeline.unit_id)  # fmt: skip
    return Table(("held_id", "pid", "outcome"), rows)
