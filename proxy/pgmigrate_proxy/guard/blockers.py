"""What the guard knows of a blocking session: the Blocker record and the safe form of its query."""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pgmigrate_proxy.sql.locks import LockMode

#: pg_stat_activity.backend_type of an ordinary client session, the only kind the guard acts on.
CLIENT_BACKEND = "client backend"
#: A reported query text is cut to this many characters (after redaction).
QUERY_LIMIT = 300
#: What a masked secret is replaced with.
MASK = "***"
#: What pg_stat_activity.query says of a session the viewer may not see, as PostgreSQL spells it.
INSUFFICIENT_PRIVILEGE = "<insufficient privilege>"


class BackendState(enum.Enum):
    """pg_stat_activity.state, as PostgreSQL spells it."""

    STARTING = "starting"  # PostgreSQL 17+: authentication still running
    ACTIVE = "active"
    IDLE = "idle"
    IDLE_IN_TRANSACTION = "idle in transaction"
    IDLE_IN_TRANSACTION_ABORTED = "idle in transaction (aborted)"
    FASTPATH_FUNCTION_CALL = "fastpath function call"
    DISABLED = "disabled"

    @classmethod
    def parse(cls, text: str | None) -> BackendState | None:
        """The state named `text`; None for NULL (no client session) or a name we do not know."""
        try:
            return cls(text)
        except ValueError:
            return None

    @property
    def idle_in_transaction(self) -> bool:
        """True for the states that pg_cancel_backend cannot end (nothing is running)."""
        return self in (BackendState.IDLE_IN_TRANSACTION, BackendState.IDLE_IN_TRANSACTION_ABORTED)


@dataclass(frozen=True)
class RelationLock:
    """One pg_locks row of a blocker on a guarded relation: the mode held (granted) or awaited."""

    relation: int  # the relation's OID
    mode: LockMode
    granted: bool


@dataclass(frozen=True, kw_only=True)
class Blocker:
    """A session (or a prepared transaction, pid 0) holding or awaiting a conflicting lock.

    `query` is already stripped of its pga_context comment, redacted and cut to QUERY_LIMIT;
    ages are seconds since xact_start / query_start (None when PostgreSQL reports NULL).
    """

    pid: int
    state: BackendState | None = None
    backend_type: str | None = CLIENT_BACKEND  # None for a prepared transaction
    datname: str | None = None
    usename: str | None = None
    application_name: str = ""
    client_addr: str | None = None
    xact_age: float | None = None
    query_age: float | None = None
    query: str = ""
    wait_event_type: str | None = None
    locks: tuple[RelationLock, ...] = ()
    context: Mapping[str, Any] | None = field(default=None, hash=False)
    prepared_xact: str | None = None  # the gid of a prepared transaction
    #: False when the client the guard acts for may not see this session's details in
    #: pg_stat_activity (not its role's, and no pg_read_all_stats): see as_seen().
    visible: bool = True

    def as_seen(self) -> Blocker:
        """The blocker as the client's role would see it in pg_stat_activity: for a session it
        may not see, PostgreSQL shows pid, user, database and application_name only, and
        "<insufficient privilege>" for the query."""
        if self.visible:
            return self
        return replace(
            self,
            state=None,
            client_addr=None,
            xact_age=None,
            query_age=None,
            query=INSUFFICIENT_PRIVILEGE,
            wait_event_type=None,
            context=None,
        )

    @property
    def waiting(self) -> bool:
        """True when the blocker is itself queued for one of the guarded relations."""
        return any(not lock.granted for lock in self.locks)


# --- django-pgactivity context -------------------------------------------------------------------

# django-pgactivity prepends "/*pga_context={json}*/\n" (with every "*" of the JSON made "-").
_CONTEXT = re.compile(r"\A\s*/\*pga_context=(\{[^*]*\})\*/\n?")


def parse_pga_context(query: str | None) -> dict[str, Any] | None:
    """The JSON object of a leading django-pgactivity context comment; None if absent or bad."""
    match = _CONTEXT.match(query or "")
    if match is None:
        return None
    try:
        value = json.loads(match.group(1))
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def strip_pga_context(query: str) -> str:
    """The query without its leading django-pgactivity context comment."""
    return _CONTEXT.sub("", query, count=1)


# --- redaction -----------------------------------------------------------------------------------

# An SQL string literal, possibly cut short by track_activity_query_size: '..' (with ''),
# E'..' (with backslash escapes) or $tag$..$tag$.
_LITERAL = "|".join(
    (
        r"[eE]'(?:[^'\\]|\\.|'')*(?:'|\Z)",
        r"'(?:[^']|'')*(?:'|\Z)",
        r"(?P<tag>\$\w*\$)(?s:.*?)(?:(?P=tag)|\Z)",
    )
)
# PASSWORD '...' (CREATE/ALTER ROLE, USER MAPPING and SERVER options, ...).
_PASSWORD_LITERAL = re.compile(rf"(?i)(\bpassword\s+)(?:{_LITERAL})")
# password=... / sslpassword = ... in a conninfo or a comparison: quoted (also ''..'' inside
# an SQL literal) or a bare word.
_PASSWORD_VALUE = re.compile(
    rf"(?i)(password\s*=\s*)(?:''(?:\\''|\\.|[^'\\])*(?:''|\Z)|{_LITERAL}|[^\s'&;,)]+)"
)
# postgresql://user:secret@host
_URI_USERINFO = re.compile(r"(?i)(\b[a-z][a-z0-9+.-]*://[^:/@\s']*:)[^@\s']*(@)")


def redact_query(query: str) -> str:
    """`query` with the literals that look like secrets masked: PASSWORD '...', password=... in a
    conninfo (also URI userinfo); errs on the side of masking too much."""
    query = _PASSWORD_LITERAL.sub(lambda m: f"{m.group(1)}'{MASK}'", query)
    query = _PASSWORD_VALUE.sub(lambda m: f"{m.group(1)}{MASK}", query)
    return _URI_USERINFO.sub(lambda m: f"{m.group(1)}{MASK}{m.group(2)}", query)


def report_query(raw: str | None) -> str:
    """The form of a pg_stat_activity query that may be shown: no context, redacted, cut short."""
    return redact_query(strip_pga_context(raw or ""))[:QUERY_LIMIT]
