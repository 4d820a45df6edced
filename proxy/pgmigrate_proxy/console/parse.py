"""The admin console's command language, sans-IO: one query string in, one Command out (or a
CommandError carrying the SQLSTATE to answer with).

Words are case-insensitive, as in pgbouncer; a trailing `;` is allowed, two commands in one
query are not. Names (database, setting) may be double-quoted, values single-quoted.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from pgmigrate_proxy.protocol.sqlstate import SqlState


class Verb(enum.Enum):
    """What a console command does."""

    EMPTY = "EMPTY"  # an empty query (psql sends one for `;`)
    SHOW = "SHOW"
    PAUSE = "PAUSE"
    RESUME = "RESUME"
    RECONNECT = "RECONNECT"
    KILL_CLIENT = "KILL_CLIENT"
    RELOAD = "RELOAD"
    SHUTDOWN = "SHUTDOWN"
    SET = "SET"
    RELEASE = "RELEASE"
    TERMINATE_BLOCKERS = "TERMINATE BLOCKERS"
    CANCEL_BLOCKERS = "CANCEL BLOCKERS"


#: What SHOW shows (pgbouncer's names, then ours).
SHOW_SUBJECTS = (
    "HELP", "POOLS", "CLIENTS", "SERVERS", "STATS", "STATS_TOTALS", "DATABASES", "USERS",
    "CONFIG", "STATE", "VERSION", "HELD", "BLOCKERS", "EVENTS",
)  # fmt: skip
#: Commands that change nothing: the ones stats_users may run.
READ_ONLY = frozenset({Verb.EMPTY, Verb.SHOW})
WAIT_FOR_CLIENTS = "WAIT_FOR_CLIENTS"
#: SHOW EVENTS without a count shows this many.
DEFAULT_EVENTS = 20


class CommandError(Exception):
    """A command the console cannot run, with the SQLSTATE of its ErrorResponse."""

    def __init__(self, code: SqlState, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.hint = hint


@dataclass(frozen=True)
class Command:
    """One parsed command: `subject` is SHOW's what or SET's key; `argument` a database name,
    an id, SET's value, SHUTDOWN's WAIT_FOR_CLIENTS or SHOW EVENTS' count."""

    verb: Verb
    subject: str = ""
    argument: str | None = None

    @property
    def read_only(self) -> bool:
        return self.verb in READ_ONLY

    @property
    def number(self) -> int:
        """The argument as an id or a count (parse() checked it)."""
        assert self.argument is not None
        return int(self.argument)


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<word>[A-Za-z_][A-Za-z0-9_$.]*)
      | (?P<number>[-+]?[0-9]+(?:\.[0-9]*)?[a-z]*)
      | "(?P<ident>(?:[^"]|"")*)"
      | '(?P<string>(?:[^']|'')*)'
      | (?P<equals>=)
      | (?P<semicolon>;)
    )""",
    re.VERBOSE,
)


def _tokens(text: str) -> list[tuple[str, str]]:
    """(kind, value) pairs; kind word, number, ident, string, equals or semicolon."""
    found: list[tuple[str, str]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            raise _invalid(text)
        kind = match.lastgroup or ""
        value = match.group(kind)
        if kind == "ident":
            value = value.replace('""', '"')
        elif kind == "string":
            value = value.replace("''", "'")
        found.append((kind, value))
        pos = match.end()
    while found and found[-1][0] == "semicolon":
        found.pop()
    if any(kind == "semicolon" for kind, _ in found):
        raise CommandError(SqlState.SYNTAX_ERROR, "the admin console runs one command per query")
    return found


def _invalid(text: str) -> CommandError:
    shown = " ".join(text.split())[:80]
    return CommandError(
        SqlState.SYNTAX_ERROR, f"invalid command: {shown}", hint="SHOW HELP lists the commands"
    )


def _name(token: tuple[str, str]) -> str:
    kind, value = token
    return value if kind == "ident" else value.lower() if kind == "word" else value


def _number(text: str, token: tuple[str, str]) -> str:
    if token[0] != "number" or not token[1].isdigit():
        raise _invalid(text)
    return token[1]


def parse(text: str) -> Command:
    """The Command `text` says. Raises CommandError (42601 for anything not understood)."""
    tokens = _tokens(text)
    if not tokens:
        return Command(Verb.EMPTY)
    kind, first = tokens[0]
    if kind != "word":
        raise _invalid(text)
    head, rest = first.upper(), tokens[1:]
    if head == "SHOW":
        return _show(text, rest)
    if head in ("PAUSE", "RESUME", "RECONNECT"):
        if len(rest) > 1 or (rest and rest[0][0] not in ("word", "ident")):
            raise _invalid(text)
        return Command(Verb(head), argument=_name(rest[0]) if rest else None)
    if head in ("KILL_CLIENT", "RELEASE"):
        if len(rest) != 1:
            raise _invalid(text)
        return Command(Verb(head), argument=_number(text, rest[0]))
    if head in ("TERMINATE", "CANCEL"):
        if not rest or rest[0][1].upper() != "BLOCKERS" or len(rest) > 2:
            raise _invalid(text)
        argument = _number(text, rest[1]) if len(rest) == 2 else None
        return Command(Verb(f"{head} BLOCKERS"), argument=argument)
    if head == "RELOAD" and not rest:
        return Command(Verb.RELOAD)
    if head == "SHUTDOWN":
        if not rest:
            return Command(Verb.SHUTDOWN)
        if len(rest) == 1 and rest[0][1].upper() == WAIT_FOR_CLIENTS:
            return Command(Verb.SHUTDOWN, argument=WAIT_FOR_CLIENTS)
        raise _invalid(text)
    if head == "SET":
        return _set(text, rest)
    raise _invalid(text)


def _show(text: str, rest: list[tuple[str, str]]) -> Command:
    if not rest or rest[0][0] != "word" or rest[0][1].upper() not in SHOW_SUBJECTS:
        raise _invalid(text)
    subject = rest[0][1].upper()
    if subject == "EVENTS" and len(rest) == 2:
        return Command(Verb.SHOW, subject, _number(text, rest[1]))
    if len(rest) != 1:
        raise _invalid(text)
    argument = str(DEFAULT_EVENTS) if subject == "EVENTS" else None
    return Command(Verb.SHOW, subject, argument)


def _set(text: str, rest: list[tuple[str, str]]) -> Command:
    """SET key = value (or TO): the value as written (a quoted one unquoted)."""
    if len(rest) != 3 or rest[0][0] not in ("word", "ident"):
        raise _invalid(text)
    if rest[1][0] != "equals" and rest[1][1].upper() != "TO":
        raise _invalid(text)
    kind, value = rest[2]
    if kind not in ("word", "number", "string", "ident"):
        raise _invalid(text)
    return Command(Verb.SET, _name(rest[0]), value)
