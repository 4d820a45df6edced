"""The catalog queries (text only, no I/O) that turn a Statement's lock targets into OIDs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pgmigrate_proxy.sql.locks import LockMode
from pgmigrate_proxy.sql.statement import Question, Statement

#: One SELECT per question, returning the relids of its answer: {rel} and {con} stand for the
#: parameters holding the subject's regclass text and the constraint name.
QUERIES: Mapping[Question, str] = {
    Question.INDEX_TABLE: (  # DROP INDEX of a partitioned index locks every partition
        "WITH RECURSIVE t(oid) AS (SELECT indrelid FROM pg_index"
        " WHERE indexrelid = to_regclass({rel})"
        " UNION SELECT inhrelid FROM pg_inherits JOIN t ON inhparent = t.oid"
        " WHERE (SELECT relkind FROM pg_class WHERE oid = to_regclass({rel})) = 'I')"
        " SELECT oid FROM t"
    ),
    Question.PARTITION_PARENT: (
        "SELECT inhparent FROM pg_inherits JOIN pg_class ON pg_class.oid = inhrelid"
        " WHERE inhrelid = to_regclass({rel}) AND relispartition"
    ),
    Question.CONSTRAINT_PARTNER: (
        "SELECT confrelid FROM pg_constraint WHERE conrelid = to_regclass({rel})"
        " AND conname = {con} AND contype = 'f' AND confrelid <> conrelid"
    ),
    Question.INHERITORS: (
        "WITH RECURSIVE tree(oid) AS (SELECT inhrelid FROM pg_inherits"
        " WHERE inhparent = to_regclass({rel})"
        " UNION SELECT inhrelid FROM pg_inherits JOIN tree ON inhparent = tree.oid)"
        " SELECT oid FROM tree"
    ),
    Question.TABLE_INDEXES: "SELECT indexrelid FROM pg_index WHERE indrelid = to_regclass({rel})",
    Question.REFERENCED_TABLES: (
        "SELECT confrelid FROM pg_constraint WHERE conrelid = to_regclass({rel})"
        " AND contype = 'f' AND confrelid <> conrelid"
    ),
    Question.REFERENCING_TABLES: (
        "SELECT conrelid FROM pg_constraint WHERE confrelid = to_regclass({rel})"
        " AND contype = 'f' AND conrelid <> confrelid"
    ),
    Question.DEFAULT_PARTITION: (
        "SELECT partdefid FROM pg_partitioned_table"
        " WHERE partrelid = to_regclass({rel}) AND partdefid <> 0"
    ),
    Question.DEPENDENT_VIEWS: (
        "WITH RECURSIVE v(oid) AS (SELECT r.ev_class FROM pg_depend d"
        " JOIN pg_rewrite r ON r.oid = d.objid"
        " WHERE d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass"
        " AND d.refobjid = to_regclass({rel}) AND r.ev_class <> d.refobjid"
        " UNION SELECT r.ev_class FROM v JOIN pg_depend d ON d.refobjid = v.oid"
        " AND d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass"
        " JOIN pg_rewrite r ON r.oid = d.objid AND r.ev_class <> v.oid)"
        " SELECT oid FROM v"
    ),
    Question.SCHEMA_RELATIONS: (
        "SELECT oid FROM pg_class WHERE relnamespace = to_regnamespace({rel})::oid"
        " AND relkind IN ('r', 'p', 'v', 'm', 'S', 'f')"
    ),
}


@dataclass(frozen=True, slots=True)
class TargetQuery:
    """One query for all the lock targets of a statement: rows of (target int, relid oid)."""

    sql: str
    params: tuple[str, ...]
    modes: tuple[LockMode, ...]  # by target number
    whys: tuple[str, ...]


def targets_query(statement: Statement) -> TargetQuery | None:
    """The query resolving every relation the statement locks; None if it names none.

    Run it on the session's own server connection, so that its search_path resolves
    unqualified names; it returns one row (target, relid) per relation, `target` indexing
    `modes`. Parameters are PostgreSQL's own ($1, $2 ...), all text; names go through
    to_regclass(), so a relation that does not exist (yet) yields no row.
    """
    parts: list[str] = []
    params: list[str] = []
    modes: list[LockMode] = []
    whys: list[str] = []

    def param(value: str) -> str:
        params.append(value)
        return f"${len(params)}::text"

    for lock in statement.locks:
        target = len(modes)
        parts.append(f"SELECT {target}, to_regclass({param(lock.relation.regclass_text)})::oid")
        modes.append(lock.mode)
        whys.append(lock.why)
    for ask in statement.resolve:
        rel = param(ask.relation.regclass_text)  # a quoted schema name for SCHEMA_RELATIONS
        con = param(ask.constraint) if ask.constraint is not None else "NULL"
        query = QUERIES[ask.question].format(rel=rel, con=con)
        parts.append(f"SELECT {len(modes)}, relid FROM ({query}) AS answer(relid)")
        modes.append(ask.mode)
        whys.append(ask.why)
    if not parts:
        return None
    union = " UNION ALL ".join(f"({part})" for part in parts)
    sql = f"SELECT target, relid FROM ({union}) AS t(target, relid) WHERE relid IS NOT NULL"
    return TargetQuery(sql, tuple(params), tuple(modes), tuple(whys))
