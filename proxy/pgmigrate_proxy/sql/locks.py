"""The eight table-level lock modes and their conflict matrix (PG docs, "Explicit Locking")."""

from __future__ import annotations

import enum
from collections.abc import Mapping


class LockMode(enum.IntEnum):
    """A table-level lock mode, named as pg_locks.mode names it; values as in PG's lockdefs.h."""

    AccessShareLock = 1
    RowShareLock = 2
    RowExclusiveLock = 3
    ShareUpdateExclusiveLock = 4
    ShareLock = 5
    ShareRowExclusiveLock = 6
    ExclusiveLock = 7
    AccessExclusiveLock = 8

    @property
    def sql(self) -> str:
        """The mode as SQL spells it (`LOCK TABLE t IN <sql> MODE`): "SHARE ROW EXCLUSIVE"."""
        return _SQL_NAMES[self]

    @classmethod
    def from_sql(cls, words: str) -> LockMode:
        """The mode for its SQL spelling, in any case and spacing ("share  row exclusive")."""
        return _BY_SQL[" ".join(words.upper().split())]


_SQL_NAMES: Mapping[LockMode, str] = {
    LockMode.AccessShareLock: "ACCESS SHARE",
    LockMode.RowShareLock: "ROW SHARE",
    LockMode.RowExclusiveLock: "ROW EXCLUSIVE",
    LockMode.ShareUpdateExclusiveLock: "SHARE UPDATE EXCLUSIVE",
    LockMode.ShareLock: "SHARE",
    LockMode.ShareRowExclusiveLock: "SHARE ROW EXCLUSIVE",
    LockMode.ExclusiveLock: "EXCLUSIVE",
    LockMode.AccessExclusiveLock: "ACCESS EXCLUSIVE",
}
_BY_SQL: Mapping[str, LockMode] = {name: mode for mode, name in _SQL_NAMES.items()}

#: The docs' table, row by row: requested mode -> the held modes it conflicts with.
#: Columns, in order: AccessShare, RowShare, RowExcl, ShareUpdateExcl, Share, ShareRowExcl,
#: Excl, AccessExcl.
_MATRIX: Mapping[LockMode, str] = {
    LockMode.AccessShareLock: ".......X",
    LockMode.RowShareLock: "......XX",
    LockMode.RowExclusiveLock: "....XXXX",
    LockMode.ShareUpdateExclusiveLock: "...XXXXX",
    LockMode.ShareLock: "..XX.XXX",
    LockMode.ShareRowExclusiveLock: "..XXXXXX",
    LockMode.ExclusiveLock: ".XXXXXXX",
    LockMode.AccessExclusiveLock: "XXXXXXXX",
}

#: requested mode -> the set of held modes that make it wait.
CONFLICTS: Mapping[LockMode, frozenset[LockMode]] = {
    requested: frozenset(LockMode(i + 1) for i, mark in enumerate(row) if mark == "X")
    for requested, row in _MATRIX.items()
}

#: The modes that ordinary traffic takes: SELECT, SELECT FOR UPDATE/SHARE, INSERT/UPDATE/DELETE.
TRAFFIC_MODES: frozenset[LockMode] = frozenset(
    {LockMode.AccessShareLock, LockMode.RowShareLock, LockMode.RowExclusiveLock}
)


def conflicts(requested: LockMode, held: LockMode) -> bool:
    """Whether a request for `requested` must wait while another backend holds `held`."""
    return held in CONFLICTS[requested]


def queues_behind_traffic(mode: LockMode) -> bool:
    """Whether a request for `mode` can wait for (and then stall) ordinary reads and writes.

    True for SHARE and stronger: exactly the modes that conflict with a TRAFFIC_MODES lock.
    """
    return not CONFLICTS[mode].isdisjoint(TRAFFIC_MODES)
