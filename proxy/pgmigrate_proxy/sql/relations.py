"""The relations a query names: by bare name, what a schema change must invalidate; with their
schemas and the functions called, what a drain holds (guard/drain.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pglast import parser


def referenced_relations(sql: str) -> frozenset[str] | None:
    """The names (without schema, as written: unquoted names lower-cased by the parser) of the
    tables, views and sequences `sql` names in its FROM, INSERT/UPDATE/DELETE targets, JOINs,
    subqueries and CTEs; None when it cannot tell (the text does not parse, or it nests too
    deep), which callers take as "may reference anything". Relations reached only through a
    view or a function are not seen: a view's own name is."""
    try:
        tree = json.loads(parser.parse_sql_json(sql))
        return frozenset(_relnames(tree))
    except (RecursionError, MemoryError):
        return None
    except Exception:  # not SQL PostgreSQL would take either
        return None


def _relnames(node: Any) -> Iterator[str]:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            name = item.get("relname")
            if isinstance(name, str):
                yield name
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


#: Statements whose effect cannot be read from their text (a DO block's body, the SQL-level
#: prepared statement EXECUTE runs): what they lock is unknown.
_OPAQUE = frozenset({"DoStmt", "ExecuteStmt"})
#: Nodes that write to (or lock rows of) the relations they name.
_WRITING = frozenset({"InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt", "lockingClause"})


@dataclass(frozen=True, slots=True)
class References:
    """What a statement names, as written (unquoted names lower-cased by the parser; the schema
    None when not qualified): its relations, the functions it calls, and whether it writes or
    locks rows (INSERT, UPDATE, DELETE, MERGE, SELECT ... FOR UPDATE/SHARE, anything that is not
    a plain SELECT) rather than only reading."""

    relations: frozenset[tuple[str | None, str]]
    functions: frozenset[tuple[str | None, str]]
    writes: bool


def references(sql: str) -> References | None:
    """The relations and functions `sql` names (every statement of it); None when it cannot
    tell: the text does not parse, nests too deep, or holds a DO block or an EXECUTE."""
    try:
        tree = json.loads(parser.parse_sql_json(sql))
    except (RecursionError, MemoryError):
        return None
    except Exception:  # not SQL PostgreSQL would take either
        return None
    relations: set[tuple[str | None, str]] = set()
    functions: set[tuple[str | None, str]] = set()
    writes = False
    for raw in tree.get("stmts", ()):
        stmt = raw.get("stmt", {})
        if set(stmt) & _OPAQUE:
            return None
        writes = writes or "SelectStmt" not in stmt
        stack: list[Any] = [stmt]
        while stack:
            item = stack.pop()
            if isinstance(item, dict):
                writes = writes or not _WRITING.isdisjoint(item)
                name = item.get("relname")
                if isinstance(name, str):
                    schema = item.get("schemaname")
                    relations.add((schema if isinstance(schema, str) else None, name))
                call = item.get("FuncCall")
                if isinstance(call, dict):
                    functions.add(_qualified(call.get("funcname", ())))
                stack.extend(item.values())
            elif isinstance(item, list):
                stack.extend(item)
    return References(frozenset(relations), frozenset(functions), writes)


def _qualified(parts: Any) -> tuple[str | None, str]:
    names = [p.get("String", {}).get("sval", "") for p in parts if isinstance(p, dict)]
    if not names:
        return None, ""
    return (names[-2] if len(names) > 1 else None), names[-1]
