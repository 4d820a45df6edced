"""LockMode and the conflict matrix, checked against the table of the PostgreSQL docs."""

from __future__ import annotations

import pytest
from pgmigrate_proxy.sql.locks import (
    CONFLICTS,
    TRAFFIC_MODES,
    LockMode,
    conflicts,
    queues_behind_traffic,
)

# "Conflicting Lock Modes" (PG docs, Explicit Locking), copied cell by cell: rows are the
# requested mode, columns the held mode, in the order of the first column.
DOCS_TABLE = """
Requested Lock Mode     | AS | RS | RE | SUE | S | SRE | E | AE
ACCESS SHARE            |    |    |    |     |   |     |   | X
ROW SHARE               |    |    |    |     |   |     | X | X
ROW EXCLUSIVE           |    |    |    |     | X | X   | X | X
SHARE UPDATE EXCLUSIVE  |    |    |    | X   | X | X   | X | X
SHARE                   |    |    | X  | X   |   | X   | X | X
SHARE ROW EXCLUSIVE     |    |    | X  | X   | X | X   | X | X
EXCLUSIVE               |    | X  | X  | X   | X | X   | X | X
ACCESS EXCLUSIVE        | X  | X  | X  | X   | X | X   | X | X
"""


def _docs_pairs() -> list[tuple[LockMode, LockMode, bool]]:
    header, *rows = DOCS_TABLE.strip().splitlines()
    assert len(header.split("|")) == 9
    order = [LockMode.from_sql(row.split("|")[0]) for row in rows]
    pairs = []
    for row in rows:
        name, *cells = row.split("|")
        for held, cell in zip(order, cells, strict=True):
            pairs.append((LockMode.from_sql(name), held, cell.strip() == "X"))
    return pairs


@pytest.mark.parametrize(("requested", "held", "expected"), _docs_pairs())
def test_conflicts_is_the_docs_table(requested: LockMode, held: LockMode, expected: bool) -> None:
    assert conflicts(requested, held) is expected


def test_the_matrix_is_symmetric() -> None:
    for requested in LockMode:
        for held in LockMode:
            assert conflicts(requested, held) == conflicts(held, requested)


def test_modes_are_named_and_numbered_as_postgresql_names_them() -> None:
    assert [mode.name for mode in LockMode] == [
        "AccessShareLock",
        "RowShareLock",
        "RowExclusiveLock",
        "ShareUpdateExclusiveLock",
        "ShareLock",
        "ShareRowExclusiveLock",
        "ExclusiveLock",
        "AccessExclusiveLock",
    ]  # pg_locks.mode; values as in lockdefs.h
    assert [int(mode) for mode in LockMode] == list(range(1, 9))
    assert LockMode["ShareRowExclusiveLock"].sql == "SHARE ROW EXCLUSIVE"
    assert LockMode.from_sql("  share\trow  exclusive ") is LockMode.ShareRowExclusiveLock
    assert set(CONFLICTS) == set(LockMode)


def test_only_share_and_stronger_queue_behind_traffic() -> None:
    queueing = {mode for mode in LockMode if queues_behind_traffic(mode)}
    assert queueing == {mode for mode in LockMode if mode >= LockMode.ShareLock}
    assert not any(queues_behind_traffic(mode) for mode in TRAFFIC_MODES)
    assert not queues_behind_traffic(LockMode.ShareUpdateExclusiveLock)  # CIC, VALIDATE
