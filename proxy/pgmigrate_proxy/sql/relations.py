"""The relations a query names, by bare name: what a schema change must invalidate."""

from __future__ import annotations

import json
from collections.abc import Iterator
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
