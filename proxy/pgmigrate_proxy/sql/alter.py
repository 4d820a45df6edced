"""ALTER TABLE (and ALTER INDEX / VIEW / SEQUENCE ...): the lock of each subcommand kind."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from pgmigrate_proxy.sql import tree
from pgmigrate_proxy.sql.locks import LockMode
from pgmigrate_proxy.sql.statement import REFERENCES, Facts, QualifiedName, Question
from pgmigrate_proxy.sql.tree import Node

AE = LockMode.AccessExclusiveLock
SRE = LockMode.ShareRowExclusiveLock
SUE = LockMode.ShareUpdateExclusiveLock

# The levels follow AlterTableGetLockLevel() in PostgreSQL's tablecmds.c: ACCESS EXCLUSIVE
# unless a subcommand is listed otherwise; with several subcommands, the strongest wins.

#: Subcommands below ACCESS EXCLUSIVE whatever their arguments.
FIXED_MODES: Mapping[str, LockMode] = {
    **dict.fromkeys(
        tree.word_set(
            """SetStatistics ClusterOn DropCluster SetOptions ResetOptions ValidateConstraint
            AttachPartition DetachPartitionFinalize"""
        ),
        SUE,
    ),
    **dict.fromkeys(
        tree.word_set(
            """EnableTrig EnableAlwaysTrig EnableReplicaTrig EnableTrigAll EnableTrigUser
            DisableTrig DisableTrigAll DisableTrigUser"""
        ),
        SRE,
    ),
}
#: Storage parameters whose change needs ACCESS EXCLUSIVE (the others: SHARE UPDATE EXCLUSIVE).
EXCLUSIVE_OPTIONS = frozenset(
    {"user_catalog_table", "security_barrier", "security_invoker", "check_option", "buffering"}
)
#: Subcommands that rewrite the table (SET DATA TYPE: unless binary coercible, which the SQL
#: alone cannot tell).
REWRITES = tree.word_set(
    """
    AlterColumnType SetTableSpace SetAccessMethod SetLogged SetUnLogged SetExpression
    """
)
SCANS = frozenset({"SetNotNull", "ValidateConstraint"})
#: Subcommands that act on the named relation alone, never on its partitions / children.
NO_RECURSION = tree.word_set(
    """
    SetRelOptions ResetRelOptions ReplaceRelOptions ChangeOwner SetLogged SetUnLogged
    ReplicaIdentity EnableRowSecurity DisableRowSecurity ForceRowSecurity NoForceRowSecurity
    ClusterOn DropCluster SetTableSpace SetAccessMethod AddInherit DropInherit AddOf DropOf
    AttachPartition DetachPartition DetachPartitionFinalize GenericOptions EnableRule
    EnableAlwaysRule EnableReplicaRule DisableRule
    """
)
_OBJECT_WORDS = {"OBJECT_MATVIEW": "MATERIALIZED VIEW", "OBJECT_FOREIGN_TABLE": "FOREIGN TABLE"}

#: A subcommand with its own rules: (command fields, facts, target, why) -> mode on the target.
Special = Callable[[Node, Facts, QualifiedName, str], LockMode]


def alter_table(stmt: Node) -> Facts:
    """Facts of an AlterTableStmt: the strongest mode across its subcommands, and more."""
    facts = Facts()
    objtype = stmt.get("objtype", "OBJECT_TABLE")
    if objtype == "OBJECT_TYPE":  # ALTER TYPE on a composite type: no relation lock
        return facts
    target = tree.relation(stmt["relation"])
    statement = "ALTER " + _OBJECT_WORDS.get(objtype, objtype.removeprefix("OBJECT_"))
    recursive: LockMode | None = None
    for item in stmt.get("cmds", ()):
        cmd = item["AlterTableCmd"]
        sub = cmd["subtype"].removeprefix("AT_")
        why = f"{statement} {_words(sub)}"
        special = (INDEX_SPECIALS if objtype == "OBJECT_INDEX" else SPECIALS).get(sub)
        mode = special(cmd, facts, target, why) if special else FIXED_MODES.get(sub, AE)
        facts.lock(target, mode, why)
        facts.rewrites |= sub in REWRITES
        facts.scans |= sub in SCANS
        if sub not in NO_RECURSION:
            recursive = max(mode, recursive or mode)
    facts.locks = {target: facts.locks.pop(target), **facts.locks}  # the target first
    table = objtype in ("OBJECT_TABLE", "OBJECT_FOREIGN_TABLE")
    if recursive and table and tree.recurses(stmt["relation"]):
        facts.ask(Question.INHERITORS, target, recursive, f"{statement}: inheritors")
    return facts


def _words(subtype: str) -> str:
    """ "AddColumn" -> "ADD COLUMN"."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", subtype).upper()


def _add_column(cmd: Node, facts: Facts, target: QualifiedName, why: str) -> LockMode:
    column = cmd["def"]["ColumnDef"]
    found = {con["contype"]: con for con in tree.constraints(column)}
    default = found.get("CONSTR_DEFAULT")
    generated = found.get("CONSTR_GENERATED")
    facts.rewrites |= (
        (default is not None and tree.may_be_volatile(default.get("raw_expr", {})))
        or "CONSTR_IDENTITY" in found
        or (generated is not None and generated.get("generated_kind") != "v")
        or tree.is_serial(column)
    )
    facts.scans |= (
        ("CONSTR_NOTNULL" in found and default is None)
        or "CONSTR_CHECK" in found
        or "CONSTR_PRIMARY" in found
        or "CONSTR_UNIQUE" in found
    )
    for con in tree.constraints(column):
        if con["contype"] == "CONSTR_FOREIGN":
            _reference(facts, con, why)
    return AE


def _reference(facts: Facts, con: Node, why: str) -> None:
    """A FOREIGN KEY adds triggers on the referenced table (and its partitions): SRE there."""
    referenced = tree.relation(con["pktable"])
    facts.lock(referenced, SRE, why + " (referenced table)", REFERENCES)
    facts.ask(
        Question.INHERITORS, referenced, SRE, why + " (referenced partitions)", right=REFERENCES
    )


def _add_constraint(cmd: Node, facts: Facts, target: QualifiedName, why: str) -> LockMode:
    kind, con = tree.unwrap(cmd["def"])
    if kind != "Constraint":
        return AE
    contype = con["contype"]
    if contype == "CONSTR_FOREIGN":
        facts.scans |= tree.validates(con)
        _reference(facts, con, why + " FOREIGN KEY")
        return SRE
    if contype in ("CONSTR_PRIMARY", "CONSTR_UNIQUE", "CONSTR_EXCLUSION"):
        # builds an index, unless USING INDEX (then a PRIMARY KEY may still SET NOT NULL)
        facts.scans |= "indexname" not in con or contype == "CONSTR_PRIMARY"
    else:
        facts.scans |= tree.validates(con)
    return AE


def _rel_options(cmd: Node, facts: Facts, target: QualifiedName, why: str) -> LockMode:
    names = {name.rpartition(".")[2] for name in tree.options(cmd["def"]["List"]["items"])}
    return AE if names & EXCLUSIVE_OPTIONS else SUE


def _drop_constraint(cmd: Node, facts: Facts, target: QualifiedName, why: str) -> LockMode:
    """A FK's drop removes its triggers from the referenced table: ACCESS EXCLUSIVE there too."""
    facts.ask(Question.CONSTRAINT_PARTNER, target, AE, why + " (FK partner)", cmd["name"])
    if cmd.get("behavior") == "DROP_CASCADE":
        facts.ask(Question.REFERENCING_TABLES, target, AE, why + " CASCADE (referencing FKs)")
    return AE


def _validate(cmd: Node, facts: Facts, target: QualifiedName, why: str) -> LockMode:
    """Validating a FK reads the referenced table under ROW SHARE."""
    rs = LockMode.RowShareLock
    facts.ask(
        Question.CONSTRAINT_PARTNER, target, rs, why + " (FK partner)", cmd["name"], REFERENCES
    )
    return SUE


def _attach(cmd: Node, facts: Facts, target: QualifiedName, why: str) -> LockMode:
    partition = tree.relation(cmd["def"]["PartitionCmd"]["name"])
    facts.lock(partition, AE, why + " (partition)")
    facts.ask(Question.INHERITORS, partition, AE, why + " (sub-partitions)")
    facts.ask(Question.DEFAULT_PARTITION, target, AE, why + " (default partition)")
    facts.scans = True
    return SUE


def _attach_index(cmd: Node, facts: Facts, target: QualifiedName, why: str) -> LockMode:
    facts.lock(tree.relation(cmd["def"]["PartitionCmd"]["name"]), AE, why + " (partition)")
    return SUE


def _detach(cmd: Node, facts: Facts, target: QualifiedName, why: str) -> LockMode:
    partition = tree.relation(cmd["def"]["PartitionCmd"]["name"])
    facts.lock(partition, AE, why + " (partition)")
    if cmd["def"]["PartitionCmd"].get("concurrent", False):
        facts.transactional, facts.concurrently = False, True
        return SUE
    facts.ask(Question.DEFAULT_PARTITION, target, AE, why + " (default partition)")
    facts.ask(Question.REFERENCING_TABLES, target, AE, why + " (referencing FKs)")
    return AE


def _finalize(cmd: Node, facts: Facts, target: QualifiedName, why: str) -> LockMode:
    facts.lock(tree.relation(cmd["def"]["PartitionCmd"]["name"]), AE, why + " (partition)")
    return SUE


def _inherit(cmd: Node, facts: Facts, target: QualifiedName, why: str) -> LockMode:
    facts.lock(tree.relation(cmd["def"]), SUE, why + " (parent)")
    return AE


def _no_inherit(cmd: Node, facts: Facts, target: QualifiedName, why: str) -> LockMode:
    facts.lock(tree.relation(cmd["def"]), LockMode.AccessShareLock, why + " (parent)")
    return AE


SPECIALS: Mapping[str, Special] = {
    "AddColumn": _add_column,
    "AddConstraint": _add_constraint,
    "SetRelOptions": _rel_options,
    "ResetRelOptions": _rel_options,
    "DropConstraint": _drop_constraint,
    "ValidateConstraint": _validate,
    "AttachPartition": _attach,
    "DetachPartition": _detach,
    "DetachPartitionFinalize": _finalize,
    "AddInherit": _inherit,
    "DropInherit": _no_inherit,
}
INDEX_SPECIALS: Mapping[str, Special] = {**SPECIALS, "AttachPartition": _attach_index}
