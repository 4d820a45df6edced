"""Which client frames start a guarded statement: the cheap tests first, the Parse cache, and
the guarded prepared statements of one session (for its Binds)."""

from __future__ import annotations

import sys

from pgmigrate_proxy.guard.unit import needs_guard
from pgmigrate_proxy.protocol import extended
from pgmigrate_proxy.protocol.framing import Frame
from pgmigrate_proxy.protocol.messages import DecodeError
from pgmigrate_proxy.protocol.types import FrontendType
from pgmigrate_proxy.sql import Statement, classify, is_plain
from pgmigrate_proxy.sql.cache import ByteLRU

#: First words of a Query that, alone in it, cannot take a lock that queues traffic.
_PLAIN_HEADS = (b"select ", b"select\n", b"insert ", b"update ", b"delete ", b"with ", b"values ")
#: Parse messages seen lately, by their bytes: (statement name, guarded statements or None);
#: at most 4 MB of them, all sessions together, none over 64 kB (a long one is parsed again).
_PARSES: ByteLRU[bytes, tuple[str, tuple[Statement, ...] | None]] = ByteLRU(4 << 20, 64 << 10)


def plain_query(payload: bytes) -> bool:
    """The cheapest test, on the Query's bytes: one ordinary DML statement (a SELECT, INSERT,
    UPDATE, DELETE, WITH or VALUES, with at most a final semicolon). Anything else goes to
    the full prefilter and the parser."""
    if not payload[:7].lower().startswith(_PLAIN_HEADS):
        return False
    semicolon = payload.find(b";")
    return semicolon < 0 or not payload[semicolon + 1 : -1].strip()


def check_readable(item: Frame) -> None:
    """Raise DecodeError when a frame the migration runner reads is malformed."""
    if item.type == FrontendType.QUERY:
        extended.query_text(item.payload)
    elif item.type == FrontendType.PARSE:
        extended.parse_statement(item.payload)
    elif item.type == FrontendType.BIND:
        extended.bind_names(item.payload)


def guarded_sql(sql: str, *, failed: bool = False) -> tuple[Statement, ...] | None:
    """The statements of `sql` when one of them needs the guard (None: it passes; so does
    everything while the transaction has failed: the server rejects it)."""
    if failed or is_plain(sql):
        return None
    statements = classify(sql)
    return statements if any(needs_guard(s) for s in statements) else None


def parsed_statements(frames: list[Frame]) -> list[Statement]:
    """The statements of the Parse messages among `frames`."""
    found: list[Statement] = []
    for item in frames:
        if item.type == FrontendType.PARSE:
            try:
                sql = extended.parse_statement(item.payload)[1]
            except DecodeError:
                continue  # PostgreSQL will reject it in its own words
            if not is_plain(sql):
                found.extend(classify(sql))
    return found


class Detector:
    """One ordinary session's detection: what its frames start, and which of its prepared
    statements are guarded (`statements`, by name, read by the relay's Bind shortcut)."""

    __slots__ = ("statements",)

    def __init__(self) -> None:
        self.statements: dict[str, tuple[Statement, ...]] = {}

    def guarded(self, item: Frame, *, failed: bool) -> tuple[Statement, ...] | None:
        """The guarded statements a frame starts (None: it passes)."""
        try:
            if item.type == FrontendType.QUERY:
                return guarded_sql(extended.query_text(item.payload), failed=failed)
            if item.type == FrontendType.PARSE:
                name, found = self._parse(item.payload, failed)
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

    @staticmethod
    def _parse(payload: bytes, failed: bool) -> tuple[str, tuple[Statement, ...] | None]:
        """A Parse's statement name and guarded statements; the same Parse comes again and
        again (one per execution, for most drivers): keep the answer by its bytes."""
        if failed:
            return extended.parse_statement(payload)[0], None
        known = _PARSES.get(payload)
        if known is None:
            name, sql = extended.parse_statement(payload)
            known = (name, guarded_sql(sql))
            _PARSES.put(payload, known, 2 * sys.getsizeof(payload))  # the key, and the text
        return known
