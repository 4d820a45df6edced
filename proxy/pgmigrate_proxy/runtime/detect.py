"""Which client frames start a guarded statement: the cheap tests first, the Parse cache, and
the guarded prepared statements of one session (for its Binds)."""

from __future__ import annotations

import sys
from typing import Final

from pgmigrate_proxy.guard.unit import needs_guard
from pgmigrate_proxy.protocol import extended
from pgmigrate_proxy.protocol.framing import Frame
from pgmigrate_proxy.protocol.messages import DecodeError
from pgmigrate_proxy.protocol.types import FrontendType
from pgmigrate_proxy.runtime import offload
from pgmigrate_proxy.sql import Statement, classify, first_keyword, is_plain
from pgmigrate_proxy.sql.cache import ByteLRU
from pgmigrate_proxy.sql.classify import MAX_CLASSIFIED, unclassified
from pgmigrate_proxy.sql.prefilter import PLAIN_KEYWORDS
from pgmigrate_proxy.sql.session_state import STATE_WORDS

#: First words of a Query that, alone in it, cannot take a lock that queues traffic.
_PLAIN_HEADS: Final = (
    b"select ",
    b"select\n",
    b"insert ",
    b"update ",
    b"delete ",
    b"with ",
    b"values ",
)
#: Parse messages seen lately, by their bytes: (statement name, guarded statements or None);
#: at most 4 MB of them, all sessions together, none over 64 kB (a long one is parsed again).
_PARSES: Final[ByteLRU[bytes, tuple[str, tuple[Statement, ...] | None]]] = ByteLRU(
    4 << 20, 64 << 10
)
#: Bytes of a text (no NUL among them) past which it has over MAX_CLASSIFIED characters.
_LONG_TEXT: Final = 4 * MAX_CLASSIFIED
#: (a name of this module's: compiled, read without a lookup in the module's dict)
_STATE_WORDS: Final = STATE_WORDS


class Deferred(Exception):
    """Not an error: a text to classify off the loop before its frame can go on."""

    def __init__(self, sql: str) -> None:
        self.sql = sql


def long_head(payload: bytes, start: int = 0) -> str | None:
    """The first MAX_CLASSIFIED characters of a text (from byte `start`) so long that
    sql.classify judges it by them alone; None for a text that is not that long. Such a text
    is never decoded whole on the loop (100 MB took 330 ms, and its Statement would hold it):
    what the guard logs and shows of it is this head."""
    if payload.find(b"\0", start, start + _LONG_TEXT + 1) >= 0:
        return None  # the text ends early (or is not that long): the usual path
    return payload[start : start + _LONG_TEXT].decode("utf-8", "replace")[:MAX_CLASSIFIED]


def passes_by_head(payload: bytes, start: int = 0) -> bool:
    """True for a text so long that it is judged by its head (long_head), when the first
    keyword there lets it pass."""
    head = long_head(payload, start)
    if head is None:
        return False
    keyword = first_keyword(head)
    return keyword is None or keyword in PLAIN_KEYWORDS


def _judged_by_head(head: str) -> tuple[Statement, ...] | None:
    """What classify gives a text longer than MAX_CLASSIFIED that begins with `head`, when it
    needs the guard (None: it passes)."""
    statement = unclassified(head)
    return (statement,) if needs_guard(statement) else None


def plain_query(payload: bytes) -> bool:
    """The cheapest test, on the Query's bytes: one ordinary DML statement (a SELECT, INSERT,
    UPDATE, DELETE, WITH or VALUES, with at most a final semicolon). Anything else goes to
    the full prefilter and the parser."""
    if not payload[:7].lower().startswith(_PLAIN_HEADS):
        return False
    semicolon = payload.find(b";")
    return semicolon < 0 or not payload[semicolon + 1 : -1].strip()


def names_no_state(text: bytes) -> bool:
    """sql.session_state.is_candidate's substring test on a statement's bytes, without
    decoding: True when the text names none of the functions and words that may leave state
    (a plain_query that passes it leaves none). Here, not in sql/, so that it is compiled
    with the relay that calls it on every Query in transaction pooling (setup.py)."""
    lowered = text.lower()  # (find, not `in`: bytes.__contains__ tries the word as an int
    # first, and raises and clears a TypeError with a formatted message each time)
    words = _STATE_WORDS
    return (lowered.find(words[0]) < 0 and lowered.find(words[1]) < 0 and
            lowered.find(words[2]) < 0)  # fmt: skip


def check_readable(item: Frame) -> None:
    """Raise DecodeError when a frame the migration runner reads is malformed."""
    if item.type == FrontendType.QUERY:
        if b"\0" not in item.payload:  # (as query_text checks it, without decoding 10 MB)
            raise DecodeError("string not terminated")
    elif item.type == FrontendType.PARSE:
        extended.parse_statement(item.payload)
    elif item.type == FrontendType.BIND:
        extended.bind_names(item.payload)


class Detector:
    """One session's detection: what its frames start, which of its prepared statements are
    guarded (`statements`, by name, read by the relay's Bind shortcut; `texts`: all of them),
    and its allowance of classification on the loop (`budget`; past it, Deferred)."""

    __slots__ = ("budget", "classified", "statements", "texts")

    def __init__(self) -> None:
        self.statements: dict[str, tuple[Statement, ...]] = {}
        #: The Parse payloads of the session's prepared statements, by name (the gate reads
        #: a Bind's statement text there: runtime/gate.py).
        self.texts: dict[str, bytes] = {}
        self.budget = offload.LoopBudget()
        #: The last text classified apart, and its statements.
        self.classified: tuple[str, tuple[Statement, ...]] | None = None

    def guarded(self, item: Frame, *, failed: bool) -> tuple[Statement, ...] | None:
        """The guarded statements a frame starts (None: it passes)."""
        try:
            if item.type == FrontendType.QUERY:
                if len(item.payload) > _LONG_TEXT:
                    head = long_head(item.payload)
                    if head is not None:
                        return None if failed else _judged_by_head(head)
                return self._guarded_sql(extended.query_text(item.payload), failed)
            if item.type == FrontendType.PARSE:
                name, found = self._parse(item.payload, failed)
                self.texts[name] = item.payload
                if found:
                    self.statements[name] = found
                elif self.statements:
                    self.statements.pop(name, None)
                return found
            if item.type == FrontendType.BIND and self.statements:
                return self.statements.get(extended.bind_names(item.payload)[1])
        except DecodeError:
            return None  # PostgreSQL will reject it in its own words
        return None

    def _parse(self, payload: bytes, failed: bool) -> tuple[str, tuple[Statement, ...] | None]:
        """A Parse's statement name and guarded statements; the same Parse comes again and
        again (one per execution, for most drivers): keep the answer by its bytes."""
        if failed:
            return extended.parse_statement(payload)[0], None
        if len(payload) > _LONG_TEXT:  # (nor hashed for the cache: it would not be kept)
            name_end = payload.find(b"\0")
            head = long_head(payload, name_end + 1) if name_end >= 0 else None
            if head is not None:
                return payload[:name_end].decode("utf-8", "replace"), _judged_by_head(head)
        known = _PARSES.get(payload)
        if known is None:
            name, sql = extended.parse_statement(payload)
            known = (name, self._guarded_sql(sql, False))
            _PARSES.put(payload, known, 2 * sys.getsizeof(payload))  # the key, and the text
        return known

    def _guarded_sql(self, sql: str, failed: bool) -> tuple[Statement, ...] | None:
        if failed or is_plain(sql):
            return None
        statements = self._classify(sql)
        return statements if any(needs_guard(s) for s in statements) else None

    def _classify(self, sql: str) -> tuple[Statement, ...]:
        """classify(sql) within the loop budget; Deferred when it must be done apart."""
        done = self.classified
        if done is not None and done[0] == sql:
            return done[1]
        if not self.budget.take(sql):
            raise Deferred(sql)
        return classify(sql)

    def guarded_in_unit(self, item: Frame, *, failed: bool) -> None:
        """Keep the prepared-statement map right for a Parse inside a held unit: classified on
        the loop even past the budget (at most MAX_CLASSIFIED: the unit cannot wait here)."""
        try:
            self.guarded(item, failed=failed)
        except Deferred as deferred:
            self.classified = (deferred.sql, classify(deferred.sql))
            self.guarded(item, failed=failed)

    async def parsed_statements(self, frames: list[Frame]) -> list[Statement]:
        """The statements of the Parse messages among `frames` (off the loop past the budget)."""
        found: list[Statement] = []
        for item in frames:
            if item.type == FrontendType.PARSE:
                try:
                    sql = extended.parse_statement(item.payload)[1]
                except DecodeError:
                    continue  # PostgreSQL will reject it in its own words
                done = self.classified
                if done is not None and done[0] == sql:
                    found.extend(done[1])
                elif not is_plain(sql):
                    found.extend(await offload.classify_bounded(sql, self.budget))
        return found
