"""Every statement class but ALTER TABLE: one handler per parser node type, in one table."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from pgmigrate_proxy.sql import tree
from pgmigrate_proxy.sql.alter import alter_table
from pgmigrate_proxy.sql.locks import LockMode
from pgmigrate_proxy.sql.statement import (
    OWNER,
    OWNER_OR_MAINTAIN,
    REFERENCES,
    Facts,
    QualifiedName,
    Question,
    Right,
    lock_table_right,
)
from pgmigrate_proxy.sql.tree import Node

AS = LockMode.AccessShareLock
SUE = LockMode.ShareUpdateExclusiveLock
SHARE = LockMode.ShareLock
SRE = LockMode.ShareRowExclusiveLock
EXCL = LockMode.ExclusiveLock
AE = LockMode.AccessExclusiveLock

#: Relation kinds as the parser names them (ObjectType) -> SQL words.
RELATION_OBJECTS: Mapping[str, str] = {
    "OBJECT_TABLE": "TABLE",
    "OBJECT_INDEX": "INDEX",
    "OBJECT_VIEW": "VIEW",
    "OBJECT_MATVIEW": "MATERIALIZED VIEW",
    "OBJECT_SEQUENCE": "SEQUENCE",
    "OBJECT_FOREIGN_TABLE": "FOREIGN TABLE",
}
#: Objects named "name ON table": their statements lock the table.
TABLE_MEMBERS: Mapping[str, str] = {
    "OBJECT_TRIGGER": "TRIGGER",
    "OBJECT_RULE": "RULE",
    "OBJECT_POLICY": "POLICY",
    "OBJECT_TABCONSTRAINT": "CONSTRAINT",
    "OBJECT_COLUMN": "COLUMN",
}
#: DROP of these names relations (or a schema of them); other DROPs name no relation.
NAMED_DROPS = frozenset(RELATION_OBJECTS) | frozenset(TABLE_MEMBERS) | {"OBJECT_SCHEMA"}
#: Utility statements that error with 25001 inside a transaction block, whatever their options.
NOT_IN_TRANSACTION = tree.word_set(
    """
    CreatedbStmt DropdbStmt CreateTableSpaceStmt DropTableSpaceStmt AlterSystemStmt
    CreateSubscriptionStmt DropSubscriptionStmt
    """
)
#: ALTER DOMAIN subtypes that check every column of the domain (ShareLock on their tables).
DOMAIN_CHECKS = frozenset({"O", "C", "V"})  # SET NOT NULL, ADD CONSTRAINT, VALIDATE

Handler = Callable[[Node], Facts]


TRUNCATE_RIGHT = Right(("TRUNCATE",))
TRIGGER_RIGHT = Right(("TRIGGER",))


def _target(facts: Facts, node: Node, mode: LockMode, why: str, right: Right = OWNER) -> None:
    """Lock a RangeVar, and its inheritors unless ONLY."""
    name = tree.relation(node)
    facts.lock(name, mode, why, right)
    if tree.recurses(node):
        facts.ask(Question.INHERITORS, name, mode, why + " (inheritors)", right=right)


def create_index(stmt: Node) -> Facts:
    facts = Facts(scans=True)
    if stmt.get("concurrent", False):
        facts.transactional, facts.concurrently = False, True
        facts.lock(tree.relation(stmt["relation"]), SUE, "CREATE INDEX CONCURRENTLY")
    else:
        _target(facts, stmt["relation"], SHARE, "CREATE INDEX")
    return facts


def reindex(stmt: Node) -> Facts:
    """REINDEX: SHARE on the table and ACCESS EXCLUSIVE on each index (SUE if CONCURRENTLY)."""
    concurrently = tree.option_on(stmt.get("params"), "concurrently")
    facts = Facts(scans=True, concurrently=concurrently, transactional=not concurrently)
    table_mode, index_mode = (SUE, SUE) if concurrently else (SHARE, AE)
    kind = stmt["kind"]
    if kind == "REINDEX_OBJECT_INDEX":
        index = tree.relation(stmt["relation"])
        facts.lock(index, index_mode, "REINDEX INDEX", OWNER_OR_MAINTAIN)
        facts.ask(
            Question.INDEX_TABLE,
            index,
            table_mode,
            "REINDEX INDEX (its table)",
            right=OWNER_OR_MAINTAIN,
        )
        facts.ask(
            Question.INHERITORS,
            index,
            index_mode,
            "REINDEX INDEX (partition indexes)",
            right=OWNER_OR_MAINTAIN,
        )
    elif kind == "REINDEX_OBJECT_TABLE":
        table = tree.relation(stmt["relation"])
        facts.lock(table, table_mode, "REINDEX TABLE", OWNER_OR_MAINTAIN)
        facts.ask(
            Question.TABLE_INDEXES,
            table,
            index_mode,
            "REINDEX TABLE (its indexes)",
            right=OWNER_OR_MAINTAIN,
        )
        facts.ask(
            Question.INHERITORS,
            table,
            table_mode,
            "REINDEX TABLE (partitions)",
            right=OWNER_OR_MAINTAIN,
        )
    else:  # SCHEMA, DATABASE, SYSTEM: every table of them, one transaction each
        facts.transactional = False
        facts.unknown_targets = not concurrently
    return facts


def drop(stmt: Node) -> Facts:
    remove = stmt["removeType"]
    cascade = stmt.get("behavior") == "DROP_CASCADE"
    facts = Facts(concurrently=stmt.get("concurrent", False))
    facts.transactional = not facts.concurrently
    if remove not in NAMED_DROPS:
        facts.unknown_targets = cascade  # types, functions...: CASCADE may drop columns, tables
        return facts
    for parts in map(tree.names, stmt.get("objects", ())):
        if remove in RELATION_OBJECTS:
            _drop_relation(facts, remove, tree.qualified(parts), cascade)
        elif remove == "OBJECT_SCHEMA":  # its relations are locked, then dropped or refused
            schema = QualifiedName(None, parts[-1])
            facts.ask(Question.SCHEMA_RELATIONS, schema, AE, "DROP SCHEMA (its relations)")
        else:  # DROP TRIGGER t ON tbl: the last part names the member
            table = tree.qualified(parts[:-1])
            why = f"DROP {TABLE_MEMBERS[remove]}"
            facts.lock(table, AE, why)
            facts.ask(Question.INHERITORS, table, AE, why + " (partitions)")
    return facts


def _drop_relation(facts: Facts, remove: str, name: QualifiedName, cascade: bool) -> None:
    why = "DROP " + RELATION_OBJECTS[remove]
    mode = SUE if facts.concurrently else AE
    facts.lock(name, mode, why)
    if remove == "OBJECT_INDEX":  # the table is locked first, in the same mode
        facts.ask(Question.INDEX_TABLE, name, mode, why + " (its table)")
        return
    if remove == "OBJECT_TABLE":
        facts.ask(Question.INHERITORS, name, AE, why + " (partitions, children)")
        facts.ask(Question.PARTITION_PARENT, name, AE, why + " (the partitioned table)")
        facts.ask(Question.REFERENCED_TABLES, name, AE, why + " (its FKs' triggers)")
    if cascade:
        facts.ask(Question.DEPENDENT_VIEWS, name, AE, why + " CASCADE (views)")
        facts.ask(Question.REFERENCING_TABLES, name, AE, why + " CASCADE (referencing FKs)")


def truncate(stmt: Node) -> Facts:
    facts = Facts()
    for node in stmt["relations"]:
        _target(facts, node, AE, "TRUNCATE", TRUNCATE_RIGHT)
        if stmt.get("behavior") == "DROP_CASCADE":
            name = tree.relation(node)
            facts.ask(
                Question.REFERENCING_TABLES, name, AE, "TRUNCATE CASCADE", right=TRUNCATE_RIGHT
            )
    return facts


def create_table(stmt: Node) -> Facts:
    """A new table locks others only through PARTITION OF, INHERITS and REFERENCES."""
    facts = Facts()
    own = tree.relation(stmt["relation"])
    for node in stmt.get("inhRelations", ()):
        parent = tree.relation(node)
        if "partbound" in stmt:  # the default partition, if any, is scanned
            why = "CREATE TABLE PARTITION OF"
            facts.scans = True
            facts.lock(parent, AE, why)
            facts.ask(Question.DEFAULT_PARTITION, parent, AE, why + " (default partition)")
        else:
            facts.lock(parent, SUE, "CREATE TABLE INHERITS")
    for element in stmt.get("tableElts", ()):
        kind, fields = tree.unwrap(element)
        found = [fields] if kind == "Constraint" else tree.constraints(fields)
        for con in found:
            if con["contype"] == "CONSTR_FOREIGN" and tree.relation(con["pktable"]) != own:
                referenced = tree.relation(con["pktable"])
                facts.lock(referenced, SRE, "CREATE TABLE REFERENCES", REFERENCES)
    return facts


def rename(stmt: Node) -> Facts:
    """ALTER ... RENAME: ACCESS EXCLUSIVE, but SHARE UPDATE EXCLUSIVE for an index."""
    facts = Facts()
    kind = stmt["renameType"]
    if kind in RELATION_OBJECTS:
        mode = SUE if kind == "OBJECT_INDEX" else AE
        facts.lock(tree.relation(stmt["relation"]), mode, f"ALTER {RELATION_OBJECTS[kind]} RENAME")
    elif kind in TABLE_MEMBERS and stmt.get("relationType") != "OBJECT_TYPE":
        why = f"ALTER TABLE RENAME {TABLE_MEMBERS[kind]}"
        if kind in ("OBJECT_COLUMN", "OBJECT_TABCONSTRAINT", "OBJECT_TRIGGER"):
            _target(facts, stmt["relation"], AE, why)
        else:
            facts.lock(tree.relation(stmt["relation"]), AE, why)
    return facts


def set_schema(stmt: Node) -> Facts:
    facts = Facts()
    kind = stmt["objectType"]
    if kind in RELATION_OBJECTS:
        why = f"ALTER {RELATION_OBJECTS[kind]} SET SCHEMA"
        facts.lock(tree.relation(stmt["relation"]), AE, why)
    return facts


def comment(stmt: Node) -> Facts:
    """COMMENT ON a relation or a column: SHARE UPDATE EXCLUSIVE on the relation; on a trigger,
    constraint, rule or policy: a lock on that object, and ACCESS SHARE on its table."""
    facts = Facts()
    kind = stmt["objtype"]
    parts = tree.names(stmt["object"]) if "List" in stmt["object"] else ()
    if kind in RELATION_OBJECTS:
        facts.lock(tree.qualified(parts), SUE, "COMMENT ON " + RELATION_OBJECTS[kind])
    elif kind in TABLE_MEMBERS:
        mode = SUE if kind == "OBJECT_COLUMN" else AS
        facts.lock(tree.qualified(parts[:-1]), mode, "COMMENT ON " + TABLE_MEMBERS[kind])
    return facts


def vacuum(stmt: Node) -> Facts:
    """VACUUM (never in a transaction block), VACUUM FULL (a rewrite) and ANALYZE."""
    is_vacuum = stmt.get("is_vacuumcmd", False)
    full = is_vacuum and tree.option_on(stmt.get("options"), "full")
    facts = Facts(transactional=not is_vacuum, rewrites=full, scans=True)
    mode, why = (AE, "VACUUM FULL") if full else (SUE, "VACUUM" if is_vacuum else "ANALYZE")
    for item in stmt.get("rels", ()):
        _target(facts, item["VacuumRelation"]["relation"], mode, why, OWNER_OR_MAINTAIN)
    facts.unknown_targets = full and not stmt.get("rels")
    return facts


def cluster(stmt: Node) -> Facts:
    """CLUSTER t: a rewrite under ACCESS EXCLUSIVE; bare CLUSTER: every clustered table."""
    facts = Facts(rewrites=True)
    if "relation" in stmt:
        _target(facts, stmt["relation"], AE, "CLUSTER", OWNER_OR_MAINTAIN)
    else:
        facts.transactional, facts.unknown_targets = False, True
    return facts


def lock_table(stmt: Node) -> Facts:
    facts = Facts(nowait=stmt.get("nowait", False))
    mode = LockMode(stmt.get("mode", AE))
    for node in stmt["relations"]:
        _target(facts, node, mode, f"LOCK TABLE IN {mode.sql} MODE", lock_table_right(mode))
    return facts


def refresh(stmt: Node) -> Facts:
    concurrently = stmt.get("concurrent", False)
    facts = Facts(scans=True, rewrites=not concurrently, concurrently=concurrently)
    why = "REFRESH MATERIALIZED VIEW" + (" CONCURRENTLY" if concurrently else "")
    facts.lock(
        tree.relation(stmt["relation"]), EXCL if concurrently else AE, why, OWNER_OR_MAINTAIN
    )
    return facts


def _one(mode: LockMode, field: str, why: str) -> Handler:
    """A handler for statements that lock the one relation in `field`."""

    def handler(stmt: Node) -> Facts:
        facts = Facts()
        facts.lock(tree.relation(stmt[field]), mode, why)
        return facts

    return handler


def _trigger(stmt: Node) -> Facts:
    facts = Facts()
    _target(facts, stmt["relation"], SRE, "CREATE TRIGGER", TRIGGER_RIGHT)
    return facts


def _view(stmt: Node) -> Facts:
    facts = Facts()
    if stmt.get("replace", False):  # the existing view, if any
        facts.lock(tree.relation(stmt["view"]), AE, "CREATE OR REPLACE VIEW")
    return facts


def _statistics(stmt: Node) -> Facts:
    facts = Facts()
    for node in stmt.get("relations", ()):
        facts.lock(tree.relation(node), SUE, "CREATE STATISTICS")
    return facts


def _not_in_transaction(stmt: Node) -> Facts:
    return Facts(transactional=False)


def _transaction(stmt: Node) -> Facts:
    prepared = ("TRANS_STMT_COMMIT_PREPARED", "TRANS_STMT_ROLLBACK_PREPARED")
    return Facts(transactional=stmt.get("kind") not in prepared)


def _discard(stmt: Node) -> Facts:
    return Facts(transactional=stmt.get("target") != "DISCARD_ALL")


def _alter_database(stmt: Node) -> Facts:
    return Facts(transactional="tablespace" not in tree.options(stmt.get("options")))


def _alter_domain(stmt: Node) -> Facts:
    """Checking a domain's columns takes SHARE on tables that only the catalog knows."""
    return Facts(unknown_targets=stmt.get("subtype") in DOMAIN_CHECKS)


def _move_all(stmt: Node) -> Facts:
    return Facts(rewrites=True, unknown_targets=True)


# Statements missing from HANDLERS take no lock worth guarding (SELECT, SET, GRANT, CREATE
# FUNCTION, ...): their kind is still recorded. Lock levels follow LOCKS.md section 2 where
# tests/sql/test_locks_live.py found the servers (15, 18) agree, and the servers where not.
HANDLERS: Mapping[str, Handler] = {
    "AlterTableStmt": alter_table,
    "IndexStmt": create_index,
    "ReindexStmt": reindex,
    "DropStmt": drop,
    "TruncateStmt": truncate,
    "CreateStmt": create_table,
    "RenameStmt": rename,
    "AlterObjectSchemaStmt": set_schema,
    "CommentStmt": comment,
    "VacuumStmt": vacuum,
    "ClusterStmt": cluster,
    "LockStmt": lock_table,
    "RefreshMatViewStmt": refresh,
    "CreateTrigStmt": _trigger,
    "ViewStmt": _view,
    "CreateStatsStmt": _statistics,
    "AlterSeqStmt": _one(SRE, "sequence", "ALTER SEQUENCE"),
    "RuleStmt": _one(AE, "relation", "CREATE RULE"),
    "CreatePolicyStmt": _one(AE, "table", "CREATE POLICY"),
    "AlterPolicyStmt": _one(AE, "table", "ALTER POLICY"),
    "TransactionStmt": _transaction,
    "DiscardStmt": _discard,
    "AlterDatabaseStmt": _alter_database,
    "AlterDomainStmt": _alter_domain,
    "AlterTableMoveAllStmt": _move_all,
    **dict.fromkeys(NOT_IN_TRANSACTION, _not_in_transaction),
}
