"""Reading libpg_query's JSON parse tree (as pglast.parser.parse_sql_json returns it)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from pgmigrate_proxy.sql.statement import QualifiedName

#: One node of the tree: {"NodeType": {fields}} when wrapped, or the fields alone where the
#: grammar fixes the type (a RangeVar in "relation").
Node = dict[str, Any]


def word_set(text: str) -> frozenset[str]:
    """The whitespace-separated words of `text`, for tables of names written as prose."""
    return frozenset(text.split())


#: Functions that are not volatile (pg_proc.provolatile 'i' or 's'), so a DEFAULT calling only
#: these is evaluated once and stored in the catalog ("fast default", no rewrite). Any other
#: function call is taken as volatile: ADD COLUMN then rewrites the table.
NON_VOLATILE_FUNCTIONS: frozenset[str] = frozenset(
    [
        "now",
        "transaction_timestamp",
        "statement_timestamp",
        "current_setting",
        "timezone",
        "date_trunc",
        "date_part",
        "extract",
        "make_date",
        "make_time",
        "make_timestamp",
        "make_timestamptz",
        "make_interval",
        "to_char",
        "to_date",
        "to_timestamp",
        "to_number",
        "lower",
        "upper",
        "btrim",
        "ltrim",
        "rtrim",
        "substring",
        "replace",
        "left",
        "right",
        "length",
        "concat",
        "concat_ws",
        "md5",
        "abs",
        "round",
        "floor",
        "ceil",
        "jsonb_build_object",
        "jsonb_build_array",
        "json_build_object",
        "json_build_array",
        "to_json",
        "to_jsonb",
        "array_fill",
    ]
)
_SERIAL_TYPES = frozenset({"serial", "serial2", "serial4", "serial8", "smallserial", "bigserial"})
_FALSE_WORDS = frozenset({"false", "off", "0", "no"})


def unwrap(node: Node) -> tuple[str, Node]:
    """The type name and the fields of a wrapped node."""
    ((kind, fields),) = node.items()
    return kind, fields


def relation(range_var: Node) -> QualifiedName:
    """The QualifiedName of a RangeVar, wrapped or not (a catalog name, db.schema.t, is dropped)."""
    fields = range_var.get("RangeVar", range_var)
    return QualifiedName(fields.get("schemaname"), fields["relname"])


def recurses(range_var: Node) -> bool:
    """Whether the statement applies to the relation's inheritors too (no ONLY)."""
    return bool(range_var.get("RangeVar", range_var).get("inh", False))


def strings(items: Iterable[Node]) -> tuple[str, ...]:
    """The values of a list of String nodes."""
    return tuple(item["String"]["sval"] for item in items)


def names(node: Node) -> tuple[str, ...]:
    """The parts of a dotted name: a List of Strings, or one String (a schema)."""
    if "List" in node:
        return strings(node["List"].get("items", ()))
    return strings((node,))


def qualified(parts: tuple[str, ...]) -> QualifiedName:
    """The relation named by the last one or two parts of a dotted name."""
    return QualifiedName(parts[-2] if len(parts) > 1 else None, parts[-1])


def options(defelems: Iterable[Node] | None) -> dict[str, Node | None]:
    """DefElem options by lower-case name (with a namespace: "toast.fillfactor") -> argument."""
    found: dict[str, Node | None] = {}
    for item in defelems or ():
        elem = item["DefElem"]
        prefix = elem["defnamespace"] + "." if "defnamespace" in elem else ""
        found[prefix + elem["defname"].lower()] = elem.get("arg")
    return found


def option_on(defelems: Iterable[Node] | None, name: str) -> bool:
    """Whether a boolean option (VACUUM (FULL), REINDEX (CONCURRENTLY)) is given and not false."""
    found = options(defelems)
    if name not in found:
        return False
    arg = found[name]
    if arg is None:
        return True
    kind, value = unwrap(arg)
    if kind == "Integer":
        return bool(value.get("ival", 0))
    if kind == "Boolean":
        return bool(value.get("boolval", False))
    return str(value.get("sval", "")).lower() not in _FALSE_WORDS


def walk(node: Any) -> Iterator[tuple[str, Node]]:
    """Every wrapped node under `node` (itself included), depth first; without recursion, so
    that an expression nested thousands deep costs time, not the stack."""
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if len(item) == 1:
                ((key, value),) = item.items()
                if key[:1].isupper() and isinstance(value, dict):
                    yield key, value
            stack.extend(reversed(item.values()))
        elif isinstance(item, list):
            stack.extend(reversed(item))


def may_be_volatile(expr: Node) -> bool:
    """Whether an expression may call a volatile function (then ADD COLUMN DEFAULT rewrites)."""
    for kind, fields in walk(expr):
        if kind == "FuncCall" and strings(fields["funcname"])[-1] not in NON_VOLATILE_FUNCTIONS:
            return True
        if kind == "SubLink":  # not allowed in a DEFAULT; do not guess
            return True
    return False


def constraints(column_def: Node) -> list[Node]:
    """The Constraint fields of a ColumnDef's constraints."""
    return [item["Constraint"] for item in column_def.get("constraints", ())]


def is_serial(column_def: Node) -> bool:
    type_names = strings(column_def.get("typeName", {}).get("names", ()))
    return bool(type_names) and type_names[-1] in _SERIAL_TYPES


def validates(constraint: Node) -> bool:
    """Whether adding the constraint checks the existing rows (not NOT VALID)."""
    return not constraint.get("skip_validation", False)
