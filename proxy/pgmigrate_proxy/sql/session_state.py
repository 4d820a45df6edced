"""Which statements leave state on a server connection past their transaction (so that a
transaction pooler must pin the client to that connection), and which drop every prepared
statement: `session_state(sql)`, `drops_prepared(sql)`.

A cheap scan answers for ordinary traffic without parsing: a text is parsed (with pglast,
cached by text) only when a statement begins with one of STATE_KEYWORDS or the text mentions
`advisory_lock`, `set_config` or a word starting with `temp` anywhere. The parser then decides,
so that a string literal holding 'LISTEN', a column named `set_config` or `SET LOCAL` is not
taken for state. What no parse tree shows is not seen: a function or a DO block that runs SET
inside (its body is a string) leaves state unreported.
"""

from __future__ import annotations

import enum
import json
import re
from typing import Any

from pglast import parser

from pgmigrate_proxy.sql import tree
from pgmigrate_proxy.sql.cache import ByteLRU
from pgmigrate_proxy.sql.prefilter import first_keyword


class StateKind(enum.Enum):
    """A kind of state a statement leaves on its server connection; values name it for logs."""

    SET = "SET"  # SET / RESET without LOCAL, SET SESSION CHARACTERISTICS, SET ROLE ...
    LISTEN = "LISTEN"  # LISTEN and UNLISTEN
    ADVISORY_LOCK = "session advisory lock"  # pg_advisory_lock*, pg_try_advisory_lock*
    TEMP_OBJECT = "temporary object"  # CREATE TEMP TABLE/VIEW/SEQUENCE, SELECT INTO TEMP
    PREPARE = "PREPARE"  # SQL PREPARE and DEALLOCATE
    HOLD_CURSOR = "DECLARE ... WITH HOLD"
    SET_CONFIG = "set_config(..., false)"
    LOAD = "LOAD"


#: A statement beginning with one of these is parsed (DISCARD for drops_prepared).
STATE_KEYWORDS: frozenset[str] = tree.word_set(
    "SET RESET LISTEN UNLISTEN PREPARE DEALLOCATE DECLARE LOAD CREATE DISCARD"
)
_KEYWORD_ANYWHERE = re.compile(r"\b(?:" + "|".join(sorted(STATE_KEYWORDS)).lower() + r")\b")
_ADVISORY = frozenset(
    {"pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock",
     "pg_try_advisory_lock_shared"}
)  # fmt: skip
_TRUE_WORDS = frozenset({"t", "true", "y", "yes", "on", "1"})
_CURSOR_OPT_HOLD = 0x0020  # parsenodes.h
#: VariableSetStmt names whose SET lasts for the transaction only (SET TRANSACTION ...).
_TRANSACTION_SCOPED = frozenset({"TRANSACTION"})

Effects = tuple[frozenset[StateKind], bool]
_NONE: Effects = (frozenset(), False)
_cache: ByteLRU[str, Effects] = ByteLRU(1024 * 1024, 64 * 1024)


#: What is_candidate looks for anywhere in a text, as bytes (runtime/detect.names_no_state).
STATE_WORDS = (b"advisory_lock", b"set_config", b"temp")


def session_state(sql: str) -> frozenset[StateKind]:
    """The kinds of state the statements of `sql` leave on the server connection past their
    transaction; empty for ordinary statements (and for text PostgreSQL would reject)."""
    return _effects(sql)[0]


def drops_prepared(sql: str) -> bool:
    """Whether a statement of `sql` is DEALLOCATE ALL or DISCARD ALL (every prepared statement
    of the session goes)."""
    return _effects(sql)[1]


def is_candidate(sql: str) -> bool:
    """The cheap scan: False means no statement of `sql` can leave state (no parse needed).
    The function names and `temp` are looked for anywhere, as plain substrings of the
    lower-cased text (the fastest test); statement keywords at the start of statements."""
    lowered = sql.lower()
    if "advisory_lock" in lowered or "set_config" in lowered or "temp" in lowered:
        return True
    body = lowered.rstrip()
    semicolon = body.find(";")
    if semicolon < 0 or semicolon == len(body) - 1:  # one statement
        return first_keyword(sql) in STATE_KEYWORDS
    return _KEYWORD_ANYWHERE.search(lowered) is not None


def _effects(sql: str) -> Effects:
    if not is_candidate(sql):
        return _NONE
    found = _cache.get(sql)
    if found is None:
        found = _parse(sql)
        _cache.put(sql, found, 2 * len(sql) + 200)
    return found


def _parse(sql: str) -> Effects:
    try:
        text = parser.parse_sql_json(sql)
    except Exception:  # PostgreSQL will reject it too: no state
        return _NONE
    kinds: set[StateKind] = set()
    drops = False
    try:
        for item in json.loads(text).get("stmts", ()):
            stmt = item["stmt"]
            kinds |= _statement_kinds(stmt)
            drops = drops or _drops_all(stmt)
    except RecursionError:  # too deep to walk: take the scan's word for it
        return frozenset({StateKind.SET}), False
    if '"relpersistence":"t"' in text and _creates_lasting_temp(text):
        kinds.add(StateKind.TEMP_OBJECT)
    return frozenset(kinds), drops


def _statement_kinds(stmt: tree.Node) -> set[StateKind]:
    kind, fields = tree.unwrap(stmt)
    found: set[StateKind] = _TOP.get(kind, _no_state)(fields)
    for sub_kind, sub in tree.walk(stmt):
        if sub_kind == "FuncCall":
            found |= _function_kinds(sub)
        elif sub_kind == "CreateStmt" and _lasting_temp(sub.get("relation"), sub.get("oncommit")):
            found.add(StateKind.TEMP_OBJECT)
    return found


def _no_state(fields: tree.Node) -> set[StateKind]:
    return set()


def _set(fields: tree.Node) -> set[StateKind]:
    if fields.get("is_local") or fields.get("name") in _TRANSACTION_SCOPED:
        return set()
    return {StateKind.SET}


def _declare(fields: tree.Node) -> set[StateKind]:
    return {StateKind.HOLD_CURSOR} if int(fields.get("options", 0)) & _CURSOR_OPT_HOLD else set()


_TOP: dict[str, Any] = {
    "VariableSetStmt": _set,
    "ListenStmt": lambda fields: {StateKind.LISTEN},
    "UnlistenStmt": lambda fields: {StateKind.LISTEN},
    "PrepareStmt": lambda fields: {StateKind.PREPARE},
    "DeallocateStmt": lambda fields: {StateKind.PREPARE},
    "DeclareCursorStmt": _declare,
    "LoadStmt": lambda fields: {StateKind.LOAD},
}


def _function_kinds(call: tree.Node) -> set[StateKind]:
    name = tree.strings(call["funcname"])[-1].lower()
    if name in _ADVISORY:
        return {StateKind.ADVISORY_LOCK}
    args = call.get("args", [])
    if name == "set_config" and len(args) == 3 and not _is_true(args[2]):
        return {StateKind.SET_CONFIG}
    return set()


def _is_true(arg: tree.Node) -> bool:
    """Whether set_config's is_local argument is the constant true (else: state, to be safe)."""
    if "A_Const" not in arg:
        return False
    const = arg["A_Const"]
    if "boolval" in const:
        return bool(const["boolval"].get("boolval", False))
    if "sval" in const:
        return str(const["sval"].get("sval", "")).strip().lower() in _TRUE_WORDS
    if "ival" in const:
        return bool(const["ival"].get("ival", 0))
    return False


def _lasting_temp(target: object, oncommit: object) -> bool:
    """Whether `target` (a RangeVar being created) is temporary (TEMP, or in pg_temp) and
    outlives the transaction (not ON COMMIT DROP)."""
    if not isinstance(target, dict) or oncommit == "ONCOMMIT_DROP":
        return False
    return target.get("relpersistence") == "t" or target.get("schemaname") == "pg_temp"


def _creates_lasting_temp(text: str) -> bool:
    """A temporary relation is created, other than CREATE TEMP TABLE ... ON COMMIT DROP."""
    for _kind, fields in tree.walk(json.loads(text)):
        for key in ("view", "sequence"):  # CREATE TEMP VIEW / SEQUENCE (CreateStmt: above)
            if _lasting_temp(fields.get(key), None):
                return True
        for key in ("into", "intoClause"):  # CREATE TABLE AS, SELECT INTO
            into = fields.get(key)
            if isinstance(into, dict) and _lasting_temp(into.get("rel"), into.get("onCommit")):
                return True
    return False


def _drops_all(stmt: tree.Node) -> bool:
    kind, fields = tree.unwrap(stmt)
    if kind == "DeallocateStmt":
        return bool(fields.get("isall"))
    return kind == "DiscardStmt" and fields.get("target") == "DISCARD_ALL"
