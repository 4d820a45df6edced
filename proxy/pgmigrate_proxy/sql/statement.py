"""What the classifier says about one SQL statement: the frozen result types of the sql layer."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pgmigrate_proxy.sql.locks import LockMode, queues_behind_traffic


@dataclass(frozen=True, slots=True)
class QualifiedName:
    """A relation as written in the statement: `schema` is None when the session's search_path
    decides. Names are as the parser left them (unquoted names folded to lower case)."""

    schema: str | None
    name: str

    @property
    def regclass_text(self) -> str:
        """The name quoted for to_regclass() ('"Sch"."tbl"'), resolving exactly as written."""
        parts = (self.name,) if self.schema is None else (self.schema, self.name)
        return ".".join('"' + part.replace('"', '""') + '"' for part in parts)

    def __str__(self) -> str:
        return self.name if self.schema is None else f"{self.schema}.{self.name}"


@dataclass(frozen=True, slots=True)
class Right:
    """What PostgreSQL requires of the current user before it lets the statement lock a relation:
    ownership (`privileges` empty), or any one of the named table privileges. `maintain`: on
    PostgreSQL 17 and later the MAINTAIN privilege also suffices (VACUUM, CLUSTER, REINDEX,
    REFRESH MATERIALIZED VIEW, LOCK TABLE)."""

    privileges: tuple[str, ...] = ()
    maintain: bool = False

    def __str__(self) -> str:
        text = " or ".join(self.privileges) + " privilege" if self.privileges else "ownership"
        return text + (" (or MAINTAIN)" if self.maintain else "")


#: Ownership of the relation: ALTER, DROP, CREATE INDEX, COMMENT, ... (PG's "must be owner").
OWNER = Right()
#: Ownership, or MAINTAIN on PostgreSQL 17+: VACUUM FULL, CLUSTER, REINDEX, REFRESH.
OWNER_OR_MAINTAIN = Right(maintain=True)
#: The referenced table of a FOREIGN KEY.
REFERENCES = Right(("REFERENCES",))


def lock_table_right(mode: LockMode) -> Right:
    """LOCK TABLE's check (LockTableAclCheck): SELECT for ACCESS SHARE, a write privilege for
    ROW EXCLUSIVE, UPDATE, DELETE or TRUNCATE above; MAINTAIN for any mode on PostgreSQL 17+."""
    if mode is LockMode.AccessShareLock:
        return Right(("SELECT",), maintain=True)
    if mode is LockMode.RowExclusiveLock:
        return Right(("INSERT", "UPDATE", "DELETE", "TRUNCATE"), maintain=True)
    return Right(("UPDATE", "DELETE", "TRUNCATE"), maintain=True)


@dataclass(frozen=True, slots=True)
class RelationLock:
    """A table-level lock the statement takes on a named relation (table, index, view, ...),
    and the rights the current user needs on it (all of them) to run the statement."""

    relation: QualifiedName
    mode: LockMode
    why: str
    rights: frozenset[Right] = frozenset({OWNER})


class Question(enum.Enum):
    """Catalog facts SQL alone cannot tell; catalog.py holds the query that answers each one.

    Each answer is a set of relations (OIDs) on which the statement takes the question's mode.
    """

    INDEX_TABLE = "index_table"  # the index's table, and its partitions if the index is partitioned
    CONSTRAINT_PARTNER = "constraint_partner"  # the referenced table, if the constraint is a FK
    INHERITORS = "inheritors"  # every partition / child, at any depth
    PARTITION_PARENT = "partition_parent"  # the partitioned table, if the table is a partition
    TABLE_INDEXES = "table_indexes"  # every index of the table
    REFERENCED_TABLES = "referenced_tables"  # tables the table's FKs point to
    REFERENCING_TABLES = "referencing_tables"  # tables whose FKs point to the table
    DEFAULT_PARTITION = "default_partition"  # the partitioned table's DEFAULT partition
    DEPENDENT_VIEWS = "dependent_views"  # views and materialized views built on it, at any depth
    SCHEMA_RELATIONS = "schema_relations"  # every relation in the schema (`relation.name`)


@dataclass(frozen=True, slots=True)
class CatalogQuestion:
    """A question for the server: the statement takes `mode` on every relation in the answer."""

    question: Question
    relation: QualifiedName  # the subject; for SCHEMA_RELATIONS `name` is the schema
    mode: LockMode
    why: str
    constraint: str | None = None  # CONSTRAINT_PARTNER only
    #: Needed on every relation of the answer (for SCHEMA_RELATIONS: ownership of the schema).
    rights: frozenset[Right] = frozenset({OWNER})


@dataclass(frozen=True, slots=True)
class Statement:
    """One statement of a Query message and the locks it will take.

    `locks` lists the relations the statement changes or locks explicitly, one entry per
    relation with the strongest mode it takes there; relations only read by an embedded query
    (ACCESS SHARE) are left out. `resolve` lists the lock targets that need the catalog.
    `rewrites` (the table is rewritten) implies `scans` (the lock is held for a time that grows
    with the table); both say what may happen, judged from the SQL alone.
    `guarded` means the statement can queue behind ordinary traffic (SHARE or stronger on an
    existing relation, or a strong lock on relations no one can name in advance) and so must go
    through the guard; LOCK ... NOWAIT never queues, so it is not guarded.
    """

    kind: str  # the parser node name ("AlterTableStmt"), or "Unparsable"
    text: str
    locks: tuple[RelationLock, ...] = ()
    resolve: tuple[CatalogQuestion, ...] = ()
    transactional: bool = True  # may run inside a transaction block
    rewrites: bool = False
    scans: bool = False
    guarded: bool = False
    concurrently: bool = False
    unknown_targets: bool = False  # takes strong locks on relations only the server knows
    note: str = ""  # why the classification is partial (a tree nested too deep to read)

    @property
    def strongest(self) -> LockMode | None:
        """The strongest mode among locks and questions, None when it takes none we know of."""
        modes = [lock.mode for lock in self.locks] + [ask.mode for ask in self.resolve]
        return max(modes, default=None)


def needs_guard(locks: tuple[RelationLock, ...], resolve: tuple[CatalogQuestion, ...]) -> bool:
    """Whether any of these locks can queue behind ordinary traffic."""
    modes = [lock.mode for lock in locks] + [ask.mode for ask in resolve]
    return any(queues_behind_traffic(mode) for mode in modes)


@dataclass
class Facts:
    """What a handler learns about one statement, turned into a Statement by `build`."""

    locks: dict[QualifiedName, RelationLock] = field(default_factory=dict)
    resolve: dict[tuple[Question, QualifiedName, str | None], CatalogQuestion] = field(
        default_factory=dict
    )
    transactional: bool = True
    rewrites: bool = False
    scans: bool = False
    concurrently: bool = False
    nowait: bool = False  # LOCK ... NOWAIT: fails instead of queueing
    unknown_targets: bool = False  # strong locks on relations the SQL does not name

    def lock(self, relation: QualifiedName, mode: LockMode, why: str, right: Right = OWNER) -> None:
        """Record `mode` on `relation`, keeping the strongest mode taken there and every right
        asked for it."""
        known = self.locks.get(relation)
        rights = frozenset({right}) if known is None else known.rights | {right}
        if known is None or mode > known.mode:
            self.locks[relation] = RelationLock(relation, mode, why, rights)
        else:
            self.locks[relation] = RelationLock(relation, known.mode, known.why, rights)

    def ask(
        self,
        question: Question,
        relation: QualifiedName,
        mode: LockMode,
        why: str,
        constraint: str | None = None,
        right: Right = OWNER,
    ) -> None:
        """Record a catalog question, keeping the strongest mode asked for it and every right."""
        key = (question, relation, constraint)
        known = self.resolve.get(key)
        rights = frozenset({right}) if known is None else known.rights | {right}
        if known is None or mode > known.mode:
            self.resolve[key] = CatalogQuestion(question, relation, mode, why, constraint, rights)
        else:
            self.resolve[key] = CatalogQuestion(
                question, relation, known.mode, known.why, constraint, rights
            )

    def build(self, kind: str, text: str, note: str = "") -> Statement:
        locks, resolve = tuple(self.locks.values()), tuple(self.resolve.values())
        guarded = self.unknown_targets or (not self.nowait and needs_guard(locks, resolve))
        return Statement(
            kind=kind,
            text=text,
            locks=locks,
            resolve=resolve,
            transactional=self.transactional,
            rewrites=self.rewrites,
            scans=self.scans or self.rewrites,
            guarded=guarded,
            concurrently=self.concurrently,
            unknown_targets=self.unknown_targets,
            note=note,
        )
