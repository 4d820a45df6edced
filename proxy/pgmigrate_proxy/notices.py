"""The texts of the proxy's NoticeResponse messages that other programs read (the Django app
prints them in django-pgmigrate 1.x's words): each built and matched here, and only here."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any, Final

PREFIX: Final = "pgmigrate: "

#: What a blocker notice says was done: terminated, cancelled, or reported ("blocked by").
TERMINATED: Final = "terminated"
CANCELLED: Final = "cancelled"
BLOCKED_BY: Final = "blocked by"


def blocker(verb: str, who: str) -> str:
    """`who` (from the guard: "pid 12, idle in transaction, ..." or "prepared transaction 'g'")
    terminated, cancelled or blocking (verb one of TERMINATED, CANCELLED, BLOCKED_BY)."""
    return f"{PREFIX}{verb} {who}"


def retrying(reason: str, delay_ms: int, attempt: int) -> str:
    return f"{PREFIX}lock not available ({reason}); retrying in {delay_ms} ms (attempt {attempt})"


def budget_spent(attempts: int, seconds: float) -> str:
    return f"{PREFIX}lock budget spent after {attempts} attempt(s) ({seconds:.1f} s)"


def gave_up(budget: float) -> str:
    return (
        f"{PREFIX}lock budget of {budget:g} s spent waiting for blocking sessions; "
        "the statement was not sent"
    )


def draining(count: int, timeout: float) -> str:
    return (
        f"{PREFIX}draining: waiting up to {timeout:g} s for {count} session(s) holding locks"
        " on the statement's tables to finish"
    )


def drain_gave_up(timeout: float) -> str:
    return (
        f"{PREFIX}drain: sessions still held locks on the statement's tables after {timeout:g} s;"
        " the statement was not sent"
    )


def admin_down(reason: str | None = None) -> str:
    because = f": {reason}" if reason else ""
    return f"{PREFIX}cannot look for blocking sessions (admin connection down{because})"


def migration_lock_wait(holder: str) -> str:
    return f"{PREFIX}another migration holds the migration lock: {holder}; waiting"


def migration_lock_busy(seconds: float) -> str:
    return f"{PREFIX}migration lock not available after {seconds:g} s (migration_lock_timeout)"


def migration_lock_failed(reason: str) -> str:
    return f"{PREFIX}cannot take the migration lock: {reason}"


def applied_despite_rollback(count: int, shown: str) -> str:
    return (
        f"{PREFIX}autocommit session: {count} statement(s) stay applied despite the rollback: "
        f"{shown}"
    )


#: A guard event, to a session that asked for them (report_events): the prefix, then the event
#: as one JSON object (ts, event, then its fields; what the JSON log has of it). No "pgmigrate: "
#: prefix: a client that does not read them prints nothing for them.
EVENT_PREFIX: Final = "pgmigrate-event: "
EVENT_SEVERITY: Final = "LOG"


def event(fields: Mapping[str, object]) -> str:
    return EVENT_PREFIX + json.dumps(fields, default=str, ensure_ascii=False)


def read_event(message: str) -> dict[str, Any] | None:
    """The event in a notice's message, or None when it holds none."""
    if not message.startswith(EVENT_PREFIX):
        return None
    try:
        found = json.loads(message[len(EVENT_PREFIX) :])
    except ValueError:
        return None
    return found if isinstance(found, dict) else None


# --- matching (the Django app) -------------------------------------------------------------------

TERMINATED_RE: Final = re.compile(rf"{PREFIX}{TERMINATED} pid (\d+)")
CANCELLED_RE: Final = re.compile(rf"{PREFIX}{CANCELLED} pid (\d+)")
#: group 1: a pid, or group 2: "prepared transaction 'gid'"
BLOCKED_BY_RE: Final = re.compile(rf"{PREFIX}{BLOCKED_BY} (?:pid (\d+)|(prepared transaction .*))")
#: groups: the server's message, the delay in ms, the next attempt's number
RETRYING_RE: Final = re.compile(
    rf"{PREFIX}lock not available \((.*)\); retrying in (\d+) ms \(attempt (\d+)\)"
)
#: group 1: how many statements stay applied
APPLIED_RE: Final = re.compile(rf"{PREFIX}autocommit session: (\d+) statement\(s\) stay applied")
#: group 1: the text of any other notice of the proxy's
ANY_RE: Final = re.compile(rf"{PREFIX}(.*)")
