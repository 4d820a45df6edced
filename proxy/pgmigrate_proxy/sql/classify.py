"""classify(sql): each statement of a Query message with the locks it takes, cached by text.

Its cost is bounded, since it runs on the event loop: a text longer than MAX_CLASSIFIED is not
parsed (parsing grows with the number of statements: 10 MB of `SELECT 1;` took 22 s), and
the cache keeps at most CACHE_BUDGET bytes, whatever the texts.
"""

from __future__ import annotations

import json
import re
import sys
from typing import NamedTuple

from pglast import parser

from pgmigrate_proxy.sql import tree
from pgmigrate_proxy.sql.cache import ByteLRU
from pgmigrate_proxy.sql.ddl import HANDLERS
from pgmigrate_proxy.sql.prefilter import PLAIN_KEYWORDS, first_keyword, is_plain
from pgmigrate_proxy.sql.statement import Facts, Statement

UNPARSABLE = "Unparsable"
#: Kind of a text that was not parsed (too long, or too deeply nested to walk).
UNCLASSIFIED = "Unclassified"
#: Longer texts are not parsed: parsing 32 kB of the densest SQL takes about 30 ms here.
MAX_CLASSIFIED = 32 * 1024
CACHE_BUDGET = 4 * 1024 * 1024  # bytes of texts and results kept, all sessions together
CACHE_MAX_ENTRY = 128 * 1024  # an entry costs about twice its text: the longest one kept
_STATEMENT_COST = 512  # a Statement's own objects, roughly, besides its text


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    entries: int
    bytes: int


_cache: ByteLRU[str, tuple[Statement, ...]] = ByteLRU(CACHE_BUDGET, CACHE_MAX_ENTRY)
_hits = _misses = 0
#: Why a statement's tree could not be read (it nests deeper than Python's recursion limit).
TOO_DEEP = "nested too deeply to classify: guarded with unknown targets"
#: The node type of the first statement, read from the start of the parser's JSON.
_FIRST_KIND = re.compile(r'\{"version":\d+,"stmts":\[\{"stmt":\{"(\w+)"')


def classify(sql: str) -> tuple[Statement, ...]:
    """The statements of `sql`, in order; never raises.

    Text the parser rejects gives one Statement of kind "Unparsable", not guarded: PostgreSQL
    will report the error itself. An empty text (or comments only) gives no statement. A text
    longer than MAX_CLASSIFIED, or one too deeply nested to walk, gives one Statement of kind
    "Unclassified", judged by its first keyword alone (see `unclassified`). A statement whose
    tree nests too deep to read is guarded with unknown targets when its kind takes locks (its
    `note` says why); anything else unexpected gives "Unparsable".
    """
    global _hits, _misses
    if len(sql) > MAX_CLASSIFIED:
        return (unclassified(sql),)
    found = _cache.get(sql)
    if found is not None:
        _hits += 1
        return found
    _misses += 1
    found = _safely(sql)
    _cache.put(sql, found, _cost(sql, found))
    return found


def _safely(sql: str) -> tuple[Statement, ...]:
    """_classify, never raising: a tree too deep to read is read statement by statement."""
    try:
        return _classify(sql)
    except RecursionError:
        return _too_deep(sql)
    except MemoryError:
        return (unclassified(sql),)
    except Exception as exc:  # a promise to every caller: the guard must never fail here
        return (Statement(kind=UNPARSABLE, text=sql, note=f"not classified: {exc!r}"),)


def unclassified(sql: str) -> Statement:
    """A text not parsed: guarded (no known targets, never redone) when its first keyword can
    begin a statement that takes a guarded lock; passed on when it begins as plain traffic
    (a huge script that starts with SELECT or INSERT goes through unguarded)."""
    keyword = first_keyword(sql[:MAX_CLASSIFIED])
    if keyword is None or keyword in PLAIN_KEYWORDS:
        return Statement(kind=UNCLASSIFIED, text=sql)
    facts = Facts(unknown_targets=True, transactional=False)
    return facts.build(UNCLASSIFIED, sql)


def classify_script(sql: str) -> list[tuple[str, tuple[Statement, ...]]]:
    """Each statement of a long text with its classification, for a worker thread (the cache
    is left alone); never raises. The parser runs without the GIL, and each statement is
    classified on its own, so the event loop's thread keeps getting the GIL meanwhile; only
    the split's own loop holds it, about 0.5 us a statement (see MAX_SCRIPT_STATEMENTS).
    A text the parser rejects comes back whole, as one "Unparsable" statement."""
    try:
        pieces = parser.split(sql)
    except (parser.ParseError, ValueError, RecursionError, MemoryError):
        return [(sql, (Statement(kind=UNPARSABLE, text=sql),))]
    return [(piece, _uncached(piece)) for piece in pieces]


def classify_apart(sql: str) -> tuple[Statement, ...]:
    """What classify(sql) gives, for a worker thread (the cache is left alone); never raises.
    Each statement is parsed on its own: the parser runs without the GIL, and the JSON of one
    statement is decoded at a time (json.loads holds the GIL for a whole text: 14 ms for 32 kB
    of `SELECT 1;`), so the event loop's thread keeps getting the GIL meanwhile."""
    if len(sql) > MAX_CLASSIFIED:
        return (unclassified(sql),)
    try:
        pieces = parser.split(sql)
    except (parser.ParseError, ValueError, RecursionError, MemoryError):
        return _safely(sql)  # (what the parser makes of it, in classify's own words)
    if len(pieces) <= 1:
        return _safely(sql)
    return tuple(statement for piece in pieces for statement in _safely(piece))


def cost(sql: str) -> int:
    """What classify(sql) costs, in bytes of text to parse: 0 when the answer is cached or the
    text is too long to parse (judged by its first keyword); about 1.5 ms a kB at the densest."""
    if len(sql) > MAX_CLASSIFIED or sql in _cache:
        return 0
    return len(sql)


def remember(sql: str, statements: tuple[Statement, ...]) -> None:
    """Cache what classify_apart found (on the event loop's thread: the cache is not locked)."""
    global _misses
    _misses += 1
    _cache.put(sql, statements, _cost(sql, statements))


#: Statements (semicolons, counted cheaply first) a script split off the event loop may hold.
MAX_SCRIPT_STATEMENTS = 20000


def _uncached(sql: str) -> tuple[Statement, ...]:
    if is_plain(sql):
        return ()
    if len(sql) > MAX_CLASSIFIED:
        return (unclassified(sql),)
    return _safely(sql)


def _cost(sql: str, statements: tuple[Statement, ...]) -> int:
    texts = sum(sys.getsizeof(s.text) for s in statements)
    return sys.getsizeof(sql) + texts + _STATEMENT_COST * (1 + len(statements))


def cache_info() -> CacheInfo:
    """Hits, misses, entries and bytes of the classification cache."""
    return CacheInfo(_hits, _misses, len(_cache), _cache.size)


def cache_clear() -> None:
    global _hits, _misses
    _cache.clear()
    _hits = _misses = 0


def _classify(sql: str) -> tuple[Statement, ...]:
    # libpg_query (PostgreSQL's own grammar) through pglast's JSON output: several times
    # cheaper than building pglast's Python AST (6 us against 30 us a statement here).
    try:
        parsed = json.loads(parser.parse_sql_json(sql))
    except (parser.ParseError, ValueError):  # ValueError: a NUL character in the text
        return (Statement(kind=UNPARSABLE, text=sql),)
    encoded = None if sql.isascii() else sql.encode()
    return tuple(
        _statement(raw["stmt"], _slice(sql, encoded, raw)) for raw in parsed.get("stmts", ())
    )


def _too_deep(sql: str) -> tuple[Statement, ...]:
    """Statement by statement: those that can be read as usual, the others by kind alone."""
    try:
        texts = parser.split(sql)
    except (parser.ParseError, ValueError):
        return (Statement(kind=UNPARSABLE, text=sql),)
    found: list[Statement] = []
    for text in texts:
        try:
            found.extend(_classify(text))
            continue
        except RecursionError:
            pass
        match = _FIRST_KIND.match(parser.parse_sql_json(text))
        kind = match.group(1) if match else UNPARSABLE
        if kind in HANDLERS:
            found.append(Facts(unknown_targets=True).build(kind, text, note=TOO_DEEP))
        else:
            found.append(Statement(kind=kind, text=text, note=TOO_DEEP))
    return tuple(found)


def _slice(sql: str, encoded: bytes | None, raw: tree.Node) -> str:
    """The statement's own text: stmt_location and stmt_len count UTF-8 bytes (0 = to the end)."""
    start = raw.get("stmt_location", 0)
    length = raw.get("stmt_len", 0)
    if encoded is None:
        return (sql[start : start + length] if length else sql[start:]).strip()
    piece = encoded[start : start + length] if length else encoded[start:]
    return piece.decode().strip()


def _statement(node: tree.Node, text: str) -> Statement:
    kind, fields = tree.unwrap(node)
    handler = HANDLERS.get(kind)
    if handler is None:
        return Statement(kind=kind, text=text)
    try:
        facts = handler(fields)
    except (KeyError, TypeError, ValueError, IndexError, RecursionError):
        # A tree shape this code does not know (a newer grammar): guard it with no known
        # targets rather than let it through unseen; the guard's polling still sees blockers.
        facts = Facts(unknown_targets=True)
    return facts.build(kind, text)
