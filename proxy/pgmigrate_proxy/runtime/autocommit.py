"""Autocommit semantics for migration sessions: the virtual transaction the client sees.

In a migration session the proxy answers BEGIN / COMMIT / ROLLBACK / SAVEPOINT / RELEASE
itself and sends every other statement as its own implicit transaction, so that each lock is
held for one statement only and a guarded statement can be retried. The client's view stays
consistent: ReadyForQuery says T inside the virtual transaction and E after an error until
ROLLBACK, as PostgreSQL would. `SET pgmigrate.atomic = on` opens a real transaction for a
stretch of statements (the Django app wraps RunPython in it) until `... = off` or the end of
the client's transaction. The price, stated in the README: a failed migration leaves the
statements before the failure applied.

This module is pure: statement text in, a Reply (what to answer, what to send) out.
"""

from __future__ import annotations

import enum
import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pgmigrate_proxy import notices
from pgmigrate_proxy.protocol.sqlstate import SqlState
from pgmigrate_proxy.protocol.types import TransactionStatus

# COMMIT PREPARED / ROLLBACK PREPARED end a two-phase transaction: the server's business.
_CONTROL = re.compile(
    r"^\s*(begin|start\s+transaction|commit(?!\s+prepared\b)|end|abort"
    r"|rollback(?!\s+prepared\b)|savepoint|release)\b",
    re.IGNORECASE,
)
_NAME = r'("(?:[^"]|"")*"|[^\s;"]+)'  # a savepoint name, quoted (spaces, ";") or not
_ROLLBACK_TO = re.compile(
    r"^\s*rollback\s+(?:work\s+|transaction\s+)?to\s+(?:savepoint\s+)?" + _NAME + r"\s*;?\s*$",
    re.IGNORECASE,
)
_RELEASE = re.compile(r"^\s*release\s+(?:savepoint\s+)?" + _NAME + r"\s*;?\s*$", re.IGNORECASE)
_SAVEPOINT = re.compile(r"^\s*savepoint\s+" + _NAME + r"\s*;?\s*$", re.IGNORECASE)
_LEAD = re.compile(r"(?:\s+|--[^\n\r]*)*")  # whitespace and line comments
_ATOMIC = re.compile(
    r"^\s*set\s+(?:session\s+)?pgmigrate\.atomic\s*(?:=|to)\s*'?(on|off|true|false|1|0)'?\s*;?\s*$",
    re.IGNORECASE,
)
_SET_LOCAL = re.compile(r"^(\s*set\s+)local\s+([\w.\"]+)", re.IGNORECASE)
_ROLE = re.compile(r"pgmigrate\.role=(\w+)")
_APPLIED_SHOWN = 10


class State(enum.Enum):
    """The virtual transaction's state."""

    OUTSIDE = "outside"  # no transaction: the client sees I
    OPEN = "open"  # inside BEGIN: the client sees T
    FAILED = "failed"  # an error since BEGIN: the client sees E until ROLLBACK
    ATOMIC = "atomic"  # a real transaction on the server (pgmigrate.atomic = on)


class Kind(enum.Enum):
    """What the proxy does with one statement of a migration session."""

    FORWARD = "forward"  # send it, as its own implicit transaction (or in the real one)
    ANSWER = "answer"  # answer it without sending anything
    REJECT = "reject"  # answer with an error (25P02, 3B001) without sending anything
    SEND_REAL = "send_real"  # send `server_sql` for real, then answer with `tag`


@dataclass(frozen=True)
class Reply:
    """The outcome for one statement."""

    kind: Kind
    tag: str = ""  # CommandComplete tag when the proxy answers
    error: tuple[str, str] | None = None  # (SQLSTATE, message) for REJECT
    notice: str | None = None  # a WARNING to send first
    server_sql: str | None = None  # what to send instead (SEND_REAL, or a rewritten FORWARD)
    setting: str | None = None  # SET LOCAL made a session SET: save this setting's value first
    # Settings to set back (name, value): before an answer; after a FORWARD (which then ends
    # an atomic stretch's real transaction, whose rollback would undo them).
    restore: tuple[tuple[str, str], ...] = ()


def is_migration_session(parameters: dict[str, str], patterns: Sequence[str]) -> bool:
    """Marked by `-c pgmigrate.role=migrate` in options, or by an application_name pattern."""
    role = _ROLE.search(parameters.get("options", ""))
    if role is not None:
        return role.group(1).lower() == "migrate"
    name = parameters.get("application_name", "")
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def is_control(sql: str) -> bool:
    """Whether a statement is one the virtual transaction answers or rewrites itself."""
    sql = _body(sql)
    return bool(_CONTROL.match(sql) or _ATOMIC.match(sql) or _SET_LOCAL.match(sql))


@dataclass
class VirtualTransaction:
    """The client's transaction, as the proxy keeps it for a migration session."""

    state: State = State.OUTSIDE
    savepoints: list[str] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)  # statements applied since BEGIN
    saved: dict[str, str] = field(default_factory=dict)  # values SET LOCAL replaced

    @property
    def status(self) -> TransactionStatus:
        """The ReadyForQuery status the client must see."""
        if self.state is State.OUTSIDE:
            return TransactionStatus.IDLE
        if self.state is State.FAILED:
            return TransactionStatus.FAILED
        return TransactionStatus.IN_TRANSACTION

    def statement(self, sql: str) -> Reply:
        """Decide what to do with one statement (its own text)."""
        sql = _body(sql)  # a control statement after a comment is still one
        if self.state is State.ATOMIC:
            return self._atomic(sql)
        atomic = _ATOMIC.match(sql)
        if atomic is not None:
            return self._switch(atomic.group(1).lower() in ("on", "true", "1"))
        control = _CONTROL.match(sql)
        if control is not None:
            return self._control(control.group(1).lower().split()[0], sql)
        if self.state is State.FAILED:
            return _aborted()
        local = _SET_LOCAL.match(sql)
        if local is not None and self.state is State.OPEN:
            # SET LOCAL would last for its own implicit transaction only: make it a session
            # SET for the rest of the virtual transaction.
            return Reply(
                Kind.FORWARD,
                server_sql=_SET_LOCAL.sub(r"\1\2", sql, count=1),
                setting=local.group(2).strip('"').lower(),
            )
        return Reply(Kind.FORWARD)

    def forwarded(self, sql: str, error: bool) -> None:
        """A forwarded statement finished: remember it, or fail the virtual transaction."""
        if self.state is State.OPEN:
            if error:
                self.state = State.FAILED
            else:
                self.applied.append(sql)

    # --- the statements the proxy answers ------------------------------------------------

    def _control(self, verb: str, sql: str) -> Reply:
        if verb in ("begin", "start"):
            if self.state is State.FAILED:
                return _aborted()
            if self.state is not State.OUTSIDE:
                notice = "there is already a transaction in progress"
                return Reply(Kind.ANSWER, "BEGIN", notice=notice)
            self.state = State.OPEN
            self.savepoints.clear()
            self.applied.clear()
            return Reply(Kind.ANSWER, "BEGIN")
        if verb in ("commit", "end"):
            return self._end("ROLLBACK" if self.state is State.FAILED else "COMMIT")
        if verb in ("rollback", "abort"):
            target = _ROLLBACK_TO.match(sql)
            return self._rollback_to(target.group(1)) if target else self._end("ROLLBACK")
        if verb == "savepoint":
            return self._savepoint(sql)
        return self._release(sql)

    def _end(self, tag: str) -> Reply:
        notice = None
        if self.state is State.OUTSIDE:
            notice = "there is no transaction in progress"
        elif tag == "ROLLBACK" and self.applied:
            notice = _applied_warning(self.applied)
        self.state = State.OUTSIDE
        self.savepoints.clear()
        self.applied.clear()
        restore, self.saved = tuple(self.saved.items()), {}
        return Reply(Kind.ANSWER, tag, notice=notice, restore=restore)

    def _savepoint(self, sql: str) -> Reply:
        match = _SAVEPOINT.match(sql)
        if self.state is State.OUTSIDE:
            return _outside("SAVEPOINT")
        if self.state is State.FAILED:
            return _aborted()
        self.savepoints.append(_name(match.group(1)) if match else "")
        return Reply(Kind.ANSWER, "SAVEPOINT")

    def _release(self, sql: str) -> Reply:
        match = _RELEASE.match(sql)
        name = _name(match.group(1)) if match else ""
        if self.state is State.OUTSIDE:
            return _outside("RELEASE SAVEPOINT")
        if self.state is State.FAILED:
            return _aborted()
        if name not in self.savepoints:
            return self._no_savepoint(name)
        del self.savepoints[self._latest(name) :]
        return Reply(Kind.ANSWER, "RELEASE")

    def _rollback_to(self, raw: str) -> Reply:
        name = _name(raw)
        if self.state is State.OUTSIDE:
            return _outside("ROLLBACK TO SAVEPOINT")
        if name not in self.savepoints:
            return self._no_savepoint(name)
        del self.savepoints[self._latest(name) + 1 :]
        notice = _applied_warning(self.applied) if self.applied else None
        if self.state is State.FAILED:
            self.state = State.OPEN
        return Reply(Kind.ANSWER, "ROLLBACK", notice=notice)

    def _latest(self, name: str) -> int:
        """Where the most recent savepoint of that name is (names may repeat)."""
        return len(self.savepoints) - 1 - self.savepoints[::-1].index(name)

    def _no_savepoint(self, name: str) -> Reply:
        """3B001; like any error, it fails an open transaction block."""
        if self.state is State.OPEN:
            self.state = State.FAILED
        return Reply(
            Kind.REJECT,
            error=(SqlState.INVALID_SAVEPOINT_SPECIFICATION, f'savepoint "{name}" does not exist'),
        )

    # --- atomic stretches --------------------------------------------------------------------

    def _switch(self, on: bool) -> Reply:
        if self.state is State.FAILED:
            return _aborted()
        if not on:
            return Reply(Kind.ANSWER, "SET")
        if self.state is State.OUTSIDE:
            return Reply(Kind.ANSWER, "SET")  # nothing to group outside a transaction
        self.state = State.ATOMIC
        return Reply(Kind.SEND_REAL, "SET", server_sql="BEGIN")

    def _atomic(self, sql: str) -> Reply:
        """In a real transaction: everything goes to the server, until it ends."""
        atomic = _ATOMIC.match(sql)
        if atomic is not None and atomic.group(1).lower() in ("off", "false", "0"):
            self.state = State.OPEN
            return Reply(Kind.SEND_REAL, "SET", server_sql="COMMIT")
        control = _CONTROL.match(sql)
        verb = control.group(1).lower().split()[0] if control is not None else ""
        if verb in ("commit", "end", "rollback", "abort") and not _ROLLBACK_TO.match(sql):
            # The client's block ends with the real transaction: what stayed applied before
            # the stretch is reported, the SET LOCAL values are put back, as in _end.
            notice = None
            if verb in ("rollback", "abort") and self.applied:
                notice = _applied_warning(self.applied)
            self.state = State.OUTSIDE
            self.savepoints.clear()
            self.applied.clear()
            restore, self.saved = tuple(self.saved.items()), {}
            return Reply(Kind.FORWARD, notice=notice, restore=restore)
        return Reply(Kind.FORWARD)

    def atomic_failed(self) -> None:
        """The real transaction's COMMIT at `atomic = off` failed: the client's one fails."""
        self.state = State.FAILED


def _aborted() -> Reply:
    message = "current transaction is aborted, commands ignored until end of transaction block"
    return Reply(Kind.REJECT, error=(SqlState.IN_FAILED_SQL_TRANSACTION, message))


def _outside(what: str) -> Reply:
    return Reply(
        Kind.REJECT,
        error=(
            SqlState.NO_ACTIVE_SQL_TRANSACTION,
            f"{what} can only be used in transaction blocks",
        ),
    )


def _body(sql: str) -> str:
    """The statement without the whitespace and comments before it (block comments nest)."""
    pos = 0
    while True:
        lead = _LEAD.match(sql, pos)
        pos = lead.end() if lead else pos
        if not sql.startswith("/*", pos):
            return sql[pos:] if pos else sql
        depth, pos = 1, pos + 2
        while depth:
            opening, closing = sql.find("/*", pos), sql.find("*/", pos)
            if closing < 0:
                return sql  # an open comment: PostgreSQL will say so
            if 0 <= opening < closing:
                depth, pos = depth + 1, opening + 2
            else:
                depth, pos = depth - 1, closing + 2


def _name(raw: str) -> str:
    raw = raw.rstrip(";")
    return raw[1:-1].replace('""', '"') if raw.startswith('"') else raw.lower()


def _applied_warning(applied: Iterable[str]) -> str:
    items = list(applied)
    shown = "; ".join(s[:80] for s in items[:_APPLIED_SHOWN])
    more = f" and {len(items) - _APPLIED_SHOWN} more" if len(items) > _APPLIED_SHOWN else ""
    return notices.applied_despite_rollback(len(items), shown + more)
