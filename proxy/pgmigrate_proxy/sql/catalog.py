"""The catalog queries (text only, no I/O) that turn a Statement's lock targets into OIDs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pgmigrate_proxy.sql.locks import LockMode
from pgmigrate_proxy.sql.statement import Question, Right, Statement

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


#: Whether the current user may run a statement that locks nothing the SQL names (REINDEX
#: DATABASE, bare CLUSTER or VACUUM FULL, DROP TYPE ... CASCADE): the database's owner (or a
#: superuser); a conservative bar, since the server decides each relation's check itself.
DATABASE_OWNER_SQL = (
    "SELECT pg_has_role(datdba, 'USAGE') FROM pg_database WHERE datname = current_database()"
)


def right_sql(right: Right, relid: str) -> str:
    """A boolean SQL expression: the current user has `right` on the relation `relid` (an SQL
    expression of type oid), as PostgreSQL checks it (pg_has_role on the owner is its "must
    be owner": membership with inheritance, superusers included)."""
    if right.privileges:
        test = f"has_table_privilege({relid}, '{', '.join(right.privileges)}')"
    else:
        test = f"(SELECT pg_has_role(relowner, 'USAGE') FROM pg_class WHERE oid = {relid})"
    if right.maintain:  # MAINTAIN exists from PostgreSQL 17: CASE keeps older ones from it
        test = (
            f"({test} OR CASE WHEN current_setting('server_version_num')::int >= 170000"
            f" THEN has_table_privilege({relid}, 'MAINTAIN') ELSE false END)"
        )
    return test


def _schema_owner_sql(schema: str) -> str:
    return f"(SELECT pg_has_role(nspowner, 'USAGE') FROM pg_namespace WHERE oid = {schema})"


@dataclass(frozen=True, slots=True)
class TargetQuery:
    """One query for all the lock targets of a statement: rows of (target int, relid oid,
    allowed bool), `allowed` saying whether the current user has the rights that PostgreSQL
    checks before it lets the statement take that lock."""

    sql: str
    params: tuple[str, ...]
    modes: tuple[LockMode, ...]  # by target number
    whys: tuple[str, ...]


def targets_query(statement: Statement) -> TargetQuery | None:
    """The query resolving every relation the statement locks; None if it names none.

    Run it on the session's own server connection, so that its search_path resolves
    unqualified names; it returns one row (target, relid) per relation, `target` indexing
    `modes`. Parameters are PostgreSQL's own ($1, $2 ...), all text; names go through
    to_regclass(), so a relation that does not exist (yet) yields no row. The third column
    says whether the current user may take that lock (see right_sql); a question's answers are
    checked each, except SCHEMA_RELATIONS: there the schema's ownership is what counts.
    """
    parts: list[str] = []
    params: list[str] = []
    modes: list[LockMode] = []
    whys: list[str] = []
    checks: list[str] = []

    def param(value: str) -> str:
        params.append(value)
        return f"${len(params)}::text"

    for lock in statement.locks:
        target = len(modes)
        parts.append(f"SELECT {target}, to_regclass({param(lock.relation.regclass_text)})::oid")
        modes.append(lock.mode)
        whys.append(lock.why)
        checks.append(" AND ".join(right_sql(r, "relid") for r in sorted(lock.rights, key=str)))
    for ask in statement.resolve:
        rel = param(ask.relation.regclass_text)  # a quoted schema name for SCHEMA_RELATIONS
        con = param(ask.constraint) if ask.constraint is not None else "NULL"
        query = QUERIES[ask.question].format(rel=rel, con=con)
        parts.append(f"SELECT {len(modes)}, relid FROM ({query}) AS answer(relid)")
        modes.append(ask.mode)
        whys.append(ask.why)
        if ask.question is Question.SCHEMA_RELATIONS:
            checks.append(_schema_owner_sql(f"to_regnamespace({rel})::oid"))
        else:
            rights = sorted(ask.rights, key=str)
            checks.append(" AND ".join(right_sql(r, "relid") for r in rights))
    if not parts:
        return None
    union = " UNION ALL ".join(f"({part})" for part in parts)
    allowed = " ".join(f"WHEN {n} THEN {check}" for n, check in enumerate(checks))
    sql = (
        f"SELECT target, relid, coalesce(CASE target {allowed} END, false)"
        f" FROM ({union}) AS t(target, relid) WHERE relid IS NOT NULL"
    )
    return TargetQuery(sql, tuple(params), tuple(modes), tuple(whys))
