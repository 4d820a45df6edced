"""Autocommit semantics of migration sessions, the pure part: the virtual transaction.

Each table is a sequence of statements with what the proxy must answer and the
ReadyForQuery status the client must see after each one; a reference model of PostgreSQL's
own transaction-block rules is checked against random sequences (hypothesis).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pgmigrate_proxy.protocol.types import TransactionStatus
from pgmigrate_proxy.runtime.autocommit import (
    Kind,
    Reply,
    State,
    VirtualTransaction,
    is_control,
    is_migration_session,
)

ABORTED = "25P02"  # in_failed_sql_transaction
NO_TRANSACTION = "25P01"  # no_active_sql_transaction
NO_SAVEPOINT = "3B001"  # invalid_savepoint_specification
ALTER = "ALTER TABLE app_item ADD COLUMN extra int"
ALTER2 = "ALTER TABLE app_item ADD COLUMN more int"
BAD = "ALTER TABLE app_item ADD COLUMN extra int -- fails: exists"

#: Which status the client must see in each state of the virtual transaction.
STATUS_OF = {
    State.OUTSIDE: TransactionStatus.IDLE,
    State.OPEN: TransactionStatus.IN_TRANSACTION,
    State.FAILED: TransactionStatus.FAILED,
    State.ATOMIC: TransactionStatus.IN_TRANSACTION,
}


# --- the table runner -------------------------------------------------------------------------

#: One step: (statement, expected outcome, status after it[, notice substring]).
#: Outcomes: "fwd" forwarded and succeeded; "fwd!" forwarded and the server failed it;
#: a five-character SQLSTATE: rejected with that error; "real:<SQL>": <SQL> sent for real and
#: the client answered SET; anything else: answered with that command tag.
#: With no notice given, the reply must carry none.
Step = tuple[str, str, str] | tuple[str, str, str, str]


def play(vt: VirtualTransaction, sql: str, error: bool = False) -> Reply:
    """What MigrationRunner does with one statement, minus the server."""
    reply = vt.statement(sql)
    if reply.setting is not None and reply.setting not in vt.saved:
        vt.saved[reply.setting] = "old-" + reply.setting  # the value it read first
    if reply.kind is Kind.FORWARD:
        vt.forwarded(sql, error)
    return reply


def check(vt: VirtualTransaction, steps: Sequence[Step]) -> list[Reply]:
    replies = []
    for number, step in enumerate(steps, 1):
        sql, outcome, status = step[:3]
        notice = step[3] if len(step) == 4 else None
        where = f"step {number} {sql!r}"
        reply = play(vt, sql, error=outcome == "fwd!")
        replies.append(reply)
        if outcome in ("fwd", "fwd!"):
            assert reply.kind is Kind.FORWARD, where
        elif len(outcome) == 5 and outcome[0].isdigit():  # a SQLSTATE
            assert reply.kind is Kind.REJECT, (where, reply)
            assert reply.error is not None and reply.error[0] == outcome, (where, reply)
        elif outcome.startswith("real:"):
            assert reply.kind is Kind.SEND_REAL, (where, reply)
            assert (reply.server_sql, reply.tag) == (outcome[5:], "SET"), (where, reply)
        else:
            assert reply.kind is Kind.ANSWER, (where, reply)
            assert reply.tag == outcome, (where, reply)
        if notice is None:
            assert reply.notice is None, (where, reply)
        else:
            assert reply.notice is not None and notice in reply.notice, (where, reply)
        assert chr(vt.status) == status, (where, vt)
        assert vt.status is STATUS_OF[vt.state], (where, vt)
    return replies


SEQUENCES: dict[str, list[Step]] = {
    "begin-commit": [
        ("BEGIN", "BEGIN", "T"),
        (ALTER, "fwd", "T"),
        ("INSERT INTO pgm_log VALUES (1)", "fwd", "T"),
        ("COMMIT", "COMMIT", "I"),
    ],
    "start-transaction-end": [
        ("START TRANSACTION", "BEGIN", "T"),
        (ALTER, "fwd", "T"),
        ("END", "COMMIT", "I"),
    ],
    "lower-case-work-semicolons": [
        ("  begin work;", "BEGIN", "T"),
        (ALTER, "fwd", "T"),
        ("commit transaction ;", "COMMIT", "I"),
    ],
    "autocommit-outside": [
        (ALTER, "fwd", "I"),
        (BAD, "fwd!", "I"),  # an implicit transaction: the error leaves nothing open
        ("SELECT 1", "fwd", "I"),
    ],
    "error-then-rollback": [
        ("BEGIN", "BEGIN", "T"),
        (ALTER, "fwd", "T"),
        (BAD, "fwd!", "E"),
        ("SELECT 1", ABORTED, "E"),
        ("INSERT INTO pgm_log VALUES (2)", ABORTED, "E"),
        ("ROLLBACK", "ROLLBACK", "I", ALTER),  # the WARNING names what stayed applied
        ("SELECT 1", "fwd", "I"),
    ],
    "error-then-commit-answers-rollback": [
        ("BEGIN", "BEGIN", "T"),
        (ALTER, "fwd", "T"),
        ("SELECT 1/0", "fwd!", "E"),
        ("COMMIT", "ROLLBACK", "I", "1 statement(s) stay applied"),
    ],
    "abort": [
        ("BEGIN", "BEGIN", "T"),
        ("SELECT 1/0", "fwd!", "E"),
        ("ABORT", "ROLLBACK", "I"),  # nothing applied: no warning
    ],
    "rollback-with-nothing-applied": [
        ("BEGIN", "BEGIN", "T"),
        ("ROLLBACK", "ROLLBACK", "I"),
    ],
    "begin-twice-warns": [
        ("BEGIN", "BEGIN", "T"),
        ("BEGIN", "BEGIN", "T", "already a transaction in progress"),
        ("COMMIT", "COMMIT", "I"),
    ],
    "commit-outside-warns": [
        ("COMMIT", "COMMIT", "I", "no transaction in progress"),
        ("ROLLBACK", "ROLLBACK", "I", "no transaction in progress"),
        ("END", "COMMIT", "I", "no transaction in progress"),
    ],
    "begin-in-failed-is-aborted": [  # PostgreSQL: only COMMIT/ROLLBACK [TO] pass in E
        ("BEGIN", "BEGIN", "T"),
        ("SELECT 1/0", "fwd!", "E"),
        ("BEGIN", ABORTED, "E"),
        ("SAVEPOINT a", ABORTED, "E"),
        ("RELEASE a", ABORTED, "E"),
        ("SET LOCAL lock_timeout = '1s'", ABORTED, "E"),
        ("SET pgmigrate.atomic = on", ABORTED, "E"),
        ("SET pgmigrate.atomic = off", ABORTED, "E"),
        ("ROLLBACK", "ROLLBACK", "I"),
    ],
    "savepoints-django-style": [
        ("BEGIN", "BEGIN", "T"),
        ('SAVEPOINT "s140_x1"', "SAVEPOINT", "T"),
        (ALTER, "fwd", "T"),
        ('SAVEPOINT "s140_x2"', "SAVEPOINT", "T"),
        (BAD, "fwd!", "E"),
        ('ROLLBACK TO SAVEPOINT "s140_x2"', "ROLLBACK", "T", ALTER),
        ('RELEASE SAVEPOINT "s140_x2"', "RELEASE", "T"),
        ('RELEASE SAVEPOINT "s140_x1"', "RELEASE", "T"),
        ("COMMIT", "COMMIT", "I"),
    ],
    "rollback-to-keeps-the-savepoint": [
        ("BEGIN", "BEGIN", "T"),
        ("SAVEPOINT a", "SAVEPOINT", "T"),
        ("SAVEPOINT b", "SAVEPOINT", "T"),
        ("ROLLBACK TO a", "ROLLBACK", "T"),
        ("RELEASE b", NO_SAVEPOINT, "E"),  # b went with the rollback to a
        ("ROLLBACK TO SAVEPOINT a", "ROLLBACK", "T"),  # a is still there: recovers
        ("RELEASE a", "RELEASE", "T"),
        ("RELEASE a", NO_SAVEPOINT, "E"),
        ("ROLLBACK", "ROLLBACK", "I"),
    ],
    "rollback-to-variants": [
        ("BEGIN", "BEGIN", "T"),
        ("SAVEPOINT a", "SAVEPOINT", "T"),
        ("SELECT 1/0", "fwd!", "E"),
        ("ROLLBACK WORK TO SAVEPOINT a", "ROLLBACK", "T"),
        ("SELECT 1/0", "fwd!", "E"),
        ("rollback transaction to a;", "ROLLBACK", "T"),
        ("SELECT 1/0", "fwd!", "E"),
        ("ROLLBACK TO unknown", NO_SAVEPOINT, "E"),  # stays failed
        ("ROLLBACK TO a", "ROLLBACK", "T"),
        ("COMMIT", "COMMIT", "I"),
    ],
    "release-unknown-fails-the-transaction": [
        ("BEGIN", "BEGIN", "T"),
        ("RELEASE SAVEPOINT nope", NO_SAVEPOINT, "E"),
        ("SELECT 1", ABORTED, "E"),
        ("COMMIT", "ROLLBACK", "I"),
    ],
    "release-releases-the-later-ones": [
        ("BEGIN", "BEGIN", "T"),
        ("SAVEPOINT a", "SAVEPOINT", "T"),
        ("SAVEPOINT b", "SAVEPOINT", "T"),
        ("RELEASE a", "RELEASE", "T"),
        ("ROLLBACK TO b", NO_SAVEPOINT, "E"),
        ("ROLLBACK", "ROLLBACK", "I"),
    ],
    "duplicate-savepoint-names-use-the-latest": [
        ("BEGIN", "BEGIN", "T"),
        ("SAVEPOINT a", "SAVEPOINT", "T"),
        ("SAVEPOINT b", "SAVEPOINT", "T"),
        ("SAVEPOINT a", "SAVEPOINT", "T"),
        ("RELEASE a", "RELEASE", "T"),  # the latest a: the first a and b stay
        ("RELEASE b", "RELEASE", "T"),
        ("RELEASE a", "RELEASE", "T"),
        ("COMMIT", "COMMIT", "I"),
    ],
    "savepoint-outside-a-transaction": [
        ("SAVEPOINT a", NO_TRANSACTION, "I"),
        ("RELEASE SAVEPOINT a", NO_TRANSACTION, "I"),
        ("ROLLBACK TO SAVEPOINT a", NO_TRANSACTION, "I"),
        ("SELECT 1", "fwd", "I"),
    ],
    "savepoints-end-with-the-transaction": [
        ("BEGIN", "BEGIN", "T"),
        ("SAVEPOINT a", "SAVEPOINT", "T"),
        ("COMMIT", "COMMIT", "I"),
        ("BEGIN", "BEGIN", "T"),
        ("RELEASE a", NO_SAVEPOINT, "E"),
        ("ROLLBACK", "ROLLBACK", "I"),
    ],
    "atomic-stretch": [
        ("BEGIN", "BEGIN", "T"),
        (ALTER, "fwd", "T"),
        ("SET pgmigrate.atomic = on", "real:BEGIN", "T"),
        ("INSERT INTO pgm_log VALUES (1)", "fwd", "T"),
        ("SAVEPOINT inner_sp", "fwd", "T"),  # a real savepoint in the real transaction
        ("RELEASE inner_sp", "fwd", "T"),
        ("SET pgmigrate.atomic = off", "real:COMMIT", "T"),
        (ALTER2, "fwd", "T"),
        ("COMMIT", "COMMIT", "I"),
    ],
    "atomic-spellings": [
        ("BEGIN", "BEGIN", "T"),
        ("set session pgmigrate.atomic to 'on';", "real:BEGIN", "T"),
        ("SET pgmigrate.atomic=false", "real:COMMIT", "T"),
        ("SET pgmigrate.atomic = 1", "real:BEGIN", "T"),
        ("SET pgmigrate.atomic TO 0", "real:COMMIT", "T"),
        ("SET pgmigrate.atomic = true", "real:BEGIN", "T"),
        ("SET pgmigrate.atomic = off", "real:COMMIT", "T"),
        ("COMMIT", "COMMIT", "I"),
    ],
    "atomic-on-twice-is-forwarded": [
        ("BEGIN", "BEGIN", "T"),
        ("SET pgmigrate.atomic = on", "real:BEGIN", "T"),
        ("SET pgmigrate.atomic = on", "fwd", "T"),  # a custom setting in the real one
        ("SET pgmigrate.atomic = off", "real:COMMIT", "T"),
        ("SET pgmigrate.atomic = off", "SET", "T"),  # nothing to end
        ("COMMIT", "COMMIT", "I"),
    ],
    "atomic-outside-a-transaction-does-nothing": [
        ("SET pgmigrate.atomic = on", "SET", "I"),
        (ALTER, "fwd", "I"),
        ("SET pgmigrate.atomic = off", "SET", "I"),
    ],
    "atomic-ended-by-commit": [
        ("BEGIN", "BEGIN", "T"),
        ("SET pgmigrate.atomic = on", "real:BEGIN", "T"),
        (ALTER, "fwd", "T"),
        ("COMMIT", "fwd", "I"),  # the real transaction's own COMMIT
        (ALTER2, "fwd", "I"),
    ],
    "atomic-ended-by-rollback": [
        ("BEGIN", "BEGIN", "T"),
        ("SET pgmigrate.atomic = on", "real:BEGIN", "T"),
        (ALTER, "fwd", "T"),
        ("ROLLBACK TO SAVEPOINT x", "fwd", "T"),  # the server's business
        ("ROLLBACK", "fwd", "I"),
    ],
    "set-local-inside": [
        ("BEGIN", "BEGIN", "T"),
        ("SET LOCAL lock_timeout = '5s'", "fwd", "T"),
        ("SET LOCAL statement_timeout TO 0", "fwd", "T"),
        ("SET LOCAL lock_timeout = '6s'", "fwd", "T"),
        ("COMMIT", "COMMIT", "I"),
    ],
    "set-local-outside-is-left-to-postgresql": [
        ("SET LOCAL lock_timeout = '5s'", "fwd", "I"),
    ],
}


@pytest.mark.parametrize("steps", SEQUENCES.values(), ids=SEQUENCES.keys())
def test_sequence(steps: list[Step]) -> None:
    vt = VirtualTransaction()
    check(vt, steps)
    if vt.state is State.OUTSIDE:
        assert (vt.savepoints, vt.applied, vt.saved) == ([], [], {})


def test_the_rollback_warning_names_what_stayed_applied() -> None:
    vt = VirtualTransaction()
    statements = [f"ALTER TABLE t ADD COLUMN c{i} int" for i in range(13)]
    check(vt, [("BEGIN", "BEGIN", "T"), *((s, "fwd", "T") for s in statements)])
    reply = vt.statement("ROLLBACK")
    assert reply.notice is not None
    assert "13 statement(s) stay applied despite the rollback" in reply.notice
    for shown in statements[:10]:
        assert shown in reply.notice
    assert statements[10] not in reply.notice
    assert reply.notice.endswith("and 3 more")


def test_the_rollback_warning_cuts_long_statements() -> None:
    vt = VirtualTransaction()
    long = "ALTER TABLE t ADD COLUMN " + "x" * 200 + " int"
    check(vt, [("BEGIN", "BEGIN", "T"), (long, "fwd", "T")])
    notice = vt.statement("ROLLBACK").notice
    assert notice is not None and long[:80] in notice and long[:81] not in notice


def test_failed_statements_are_not_listed_as_applied() -> None:
    vt = VirtualTransaction()
    check(vt, [("BEGIN", "BEGIN", "T"), (ALTER, "fwd", "T"), (BAD, "fwd!", "E")])
    assert vt.applied == [ALTER]
    assert vt.statement("SELECT 1").kind is Kind.REJECT
    assert vt.applied == [ALTER]


def test_a_new_transaction_starts_clean() -> None:
    vt = VirtualTransaction()
    check(vt, [("BEGIN", "BEGIN", "T"), (ALTER, "fwd", "T"), ("COMMIT", "COMMIT", "I")])
    check(vt, [("BEGIN", "BEGIN", "T"), ("ROLLBACK", "ROLLBACK", "I")])  # no warning


def test_failed_commit_of_an_atomic_stretch_fails_the_transaction() -> None:
    vt = VirtualTransaction()
    check(vt, [("BEGIN", "BEGIN", "T"), ("SET pgmigrate.atomic = on", "real:BEGIN", "T")])
    assert vt.statement("SET pgmigrate.atomic = off").server_sql == "COMMIT"
    vt.atomic_failed()  # e.g. a deferred constraint
    check(vt, [("SELECT 1", ABORTED, "E"), ("ROLLBACK", "ROLLBACK", "I")])


# --- savepoint names ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("create", "use", "found"),
    [
        ("SAVEPOINT a", "RELEASE a", True),
        ("SAVEPOINT a", "RELEASE SAVEPOINT A", True),  # unquoted names fold to lower case
        ("SAVEPOINT Abc", "RELEASE abc", True),
        ("SAVEPOINT a", 'RELEASE "a"', True),
        ("SAVEPOINT A", 'RELEASE "a"', True),
        ('SAVEPOINT "A"', 'RELEASE "A"', True),
        ('SAVEPOINT "A"', "RELEASE A", False),  # quoted names keep their case
        ('SAVEPOINT "A"', "RELEASE a", False),
        ('SAVEPOINT "x""y"', 'RELEASE SAVEPOINT "x""y"', True),
        ("SAVEPOINT s1;", "release savepoint S1 ;", True),
        ('SAVEPOINT "a b"', 'RELEASE SAVEPOINT "a b"', True),
        ('SAVEPOINT "a b"', 'RELEASE SAVEPOINT "a"', False),
        ("SAVEPOINT a", "RELEASE b", False),
    ],
)
def test_savepoint_names(create: str, use: str, found: bool) -> None:
    vt = VirtualTransaction()
    check(vt, [("BEGIN", "BEGIN", "T"), (create, "SAVEPOINT", "T")])
    check(vt, [(use, "RELEASE" if found else NO_SAVEPOINT, "T" if found else "E")])


@pytest.mark.parametrize(
    ("create", "target", "found"),
    [
        ("SAVEPOINT a", "ROLLBACK TO a", True),
        ("SAVEPOINT a", "ROLLBACK TO SAVEPOINT A", True),
        ('SAVEPOINT "A"', "ROLLBACK TO SAVEPOINT a", False),
        ('SAVEPOINT "A"', 'ROLLBACK TO SAVEPOINT "A";', True),
        ('SAVEPOINT "a b"', 'ROLLBACK TO SAVEPOINT "a b"', True),
        ('SAVEPOINT "a;b"', 'ROLLBACK TO SAVEPOINT "a;b";', True),
    ],
)
def test_rollback_to_names_recover_from_failed(create: str, target: str, found: bool) -> None:
    vt = VirtualTransaction()
    check(vt, [("BEGIN", "BEGIN", "T"), (create, "SAVEPOINT", "T"), ("SELECT 1/0", "fwd!", "E")])
    # Never taken for a plain ROLLBACK: the transaction stays open or failed, never ends.
    check(vt, [(target, "ROLLBACK" if found else NO_SAVEPOINT, "T" if found else "E")])


# --- SET LOCAL ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "server_sql", "setting"),
    [
        ("SET LOCAL lock_timeout = '5s'", "SET lock_timeout = '5s'", "lock_timeout"),
        ("set local search_path to app, public", "set search_path to app, public", "search_path"),
        ('SET LOCAL "Statement_Timeout" = 0', 'SET "Statement_Timeout" = 0', "statement_timeout"),
        ("SET LOCAL myapp.flag = 'x'", "SET myapp.flag = 'x'", "myapp.flag"),
        ("  SET  LOCAL role = other", "SET  role = other", "role"),
    ],
)
def test_set_local_becomes_a_session_set(sql: str, server_sql: str, setting: str) -> None:
    vt = VirtualTransaction()
    check(vt, [("BEGIN", "BEGIN", "T")])
    reply = vt.statement(sql)
    assert (reply.kind, reply.server_sql, reply.setting) == (Kind.FORWARD, server_sql, setting)
    assert is_control(sql)


@pytest.mark.parametrize("end", ["COMMIT", "ROLLBACK", "END", "ABORT"])
def test_set_local_values_are_restored_at_the_end(end: str) -> None:
    vt = VirtualTransaction()
    steps: list[Step] = [
        ("BEGIN", "BEGIN", "T"),
        ("SET LOCAL lock_timeout = '5s'", "fwd", "T"),
        ("SET LOCAL search_path = app", "fwd", "T"),
        ("SET LOCAL lock_timeout = '6s'", "fwd", "T"),  # the first old value is kept
    ]
    check(vt, steps)
    assert vt.saved == {"lock_timeout": "old-lock_timeout", "search_path": "old-search_path"}
    reply = vt.statement(end)
    assert set(reply.restore) == {
        ("lock_timeout", "old-lock_timeout"),
        ("search_path", "old-search_path"),
    }
    assert vt.saved == {}
    assert vt.statement("COMMIT").restore == ()  # restored once


def test_set_local_restored_after_a_failed_transaction() -> None:
    vt = VirtualTransaction()
    check(
        vt,
        [
            ("BEGIN", "BEGIN", "T"),
            ("SET LOCAL lock_timeout = '5s'", "fwd", "T"),
            ("SELECT 1/0", "fwd!", "E"),
        ],
    )
    reply = vt.statement("COMMIT")
    assert reply.tag == "ROLLBACK"
    assert reply.restore == (("lock_timeout", "old-lock_timeout"),)


def test_set_local_in_an_atomic_stretch_stays_local() -> None:
    vt = VirtualTransaction()
    check(vt, [("BEGIN", "BEGIN", "T"), ("SET pgmigrate.atomic = on", "real:BEGIN", "T")])
    reply = vt.statement("SET LOCAL lock_timeout = '5s'")
    assert (reply.kind, reply.server_sql, reply.setting) == (Kind.FORWARD, None, None)


@pytest.mark.parametrize("end", ["COMMIT", "ROLLBACK", "ABORT", "END"])
def test_an_atomic_stretch_ending_the_block_restores_and_warns(end: str) -> None:
    """The real COMMIT/ROLLBACK goes to the server; SET LOCAL values are put back after it,
    and a rollback names what was applied before the stretch."""
    vt = VirtualTransaction()
    check(
        vt,
        [
            ("BEGIN", "BEGIN", "T"),
            ("SET LOCAL lock_timeout = '5s'", "fwd", "T"),
            (ALTER, "fwd", "T"),
            ("SET pgmigrate.atomic = on", "real:BEGIN", "T"),
            (ALTER2, "fwd", "T"),
        ],
    )
    reply = vt.statement(end)
    assert (reply.kind, reply.server_sql) == (Kind.FORWARD, None)
    assert vt.state is State.OUTSIDE and vt.saved == {}
    assert reply.restore == (("lock_timeout", "old-lock_timeout"),)
    if end in ("ROLLBACK", "ABORT"):
        assert reply.notice is not None and ALTER in reply.notice and ALTER2 not in reply.notice
    else:
        assert reply.notice is None


# --- what counts as control -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "BEGIN",
        "begin isolation level serializable",
        "START TRANSACTION",
        "COMMIT",
        "END",
        "ABORT",
        "ROLLBACK",
        "ROLLBACK TO SAVEPOINT a",
        "SAVEPOINT a",
        "RELEASE a",
        "SET pgmigrate.atomic = on",
        "SET LOCAL lock_timeout = 0",
        "  \n commit;",
        "/* a comment */ BEGIN",
        "-- a comment\nCOMMIT",
    ],
)
def test_is_control(sql: str) -> None:
    assert is_control(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1",
        ALTER,
        "SET lock_timeout = 0",
        "SET pgmigrate.other = on",
        "COPY t FROM STDIN",
        "BEGINNING",  # not a keyword
        "DO $$ BEGIN PERFORM 1; END $$",
        "COMMIT PREPARED 'x'",  # a real two-phase commit: the server's business
        "ROLLBACK PREPARED 'x'",
    ],
)
def test_is_not_control(sql: str) -> None:
    assert not is_control(sql)
    assert VirtualTransaction().statement(sql).kind is Kind.FORWARD


@pytest.mark.parametrize("sql", ["/* c */ BEGIN", "-- c\nBEGIN", "/* c */\n-- d\n  begin;"])
def test_control_after_a_comment_is_answered(sql: str) -> None:
    """Forwarded, such a BEGIN would open a real transaction behind the virtual one."""
    vt = VirtualTransaction()
    check(vt, [(sql, "BEGIN", "T"), ("-- done\nCOMMIT", "COMMIT", "I")])


# --- marking a migration session ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("parameters", "patterns", "expected"),
    [
        ({"options": "-c pgmigrate.role=migrate"}, (), True),
        ({"options": "-cpgmigrate.role=migrate"}, (), True),
        ({"options": "--pgmigrate.role=migrate"}, (), True),
        ({"options": "-c pgmigrate.role=MIGRATE"}, (), True),
        ({"options": "-c search_path=app -c pgmigrate.role=migrate -c x.y=1"}, (), True),
        ({"options": "-c pgmigrate.lock_budget=3s -c pgmigrate.role=migrate"}, (), True),
        ({"options": "-c pgmigrate.role=app"}, (), False),
        ({"options": "-c pgmigrate.role=migrated"}, (), False),
        ({"options": "-c pgmigrate.role=migrate_not"}, (), False),
        ({"options": "-c pgmigrate.blocking_action=show"}, (), False),
        ({}, (), False),
        ({"application_name": "migrate"}, (), False),
        ({"application_name": "migrate"}, ("migrate*",), True),
        ({"application_name": "migrate-0042"}, ("migrate*",), True),
        ({"application_name": "Migrate"}, ("migrate*",), False),  # case-sensitive globs
        ({"application_name": "app-migrate"}, ("migrate*",), False),
        ({"application_name": "app-migrate"}, ("web", "*-migrate"), True),
        ({"application_name": "worker"}, ("migrat?",), False),
        ({"application_name": "migrat3"}, ("migrat?",), True),
        ({"application_name": ""}, ("*",), True),
        ({}, ("*",), True),
        # An explicit role wins over the application_name patterns, both ways.
        ({"application_name": "migrate", "options": "-c pgmigrate.role=app"}, ("*",), False),
        ({"application_name": "web", "options": "-c pgmigrate.role=migrate"}, ("m*",), True),
    ],
)
def test_is_migration_session(
    parameters: dict[str, str], patterns: tuple[str, ...], expected: bool
) -> None:
    assert is_migration_session(parameters, patterns) is expected


# --- random sequences against a model of PostgreSQL's transaction blocks -------------------------


@dataclass
class PgModel:
    """PostgreSQL's rules for a transaction block, as the client sees them."""

    status: str = "I"
    savepoints: list[str] = field(default_factory=list)

    def run(self, sql: str, error: bool) -> str:
        """The outcome in the table's terms (a tag, a SQLSTATE, "fwd" or "fwd!")."""
        words = sql.lower().replace(";", "").split()
        verb, name = words[0], words[-1]
        if self.status == "E" and verb not in ("commit", "end", "rollback", "abort"):
            return ABORTED
        if verb in ("begin", "start"):
            self.status = "T"
            return "BEGIN"
        if verb in ("commit", "end", "abort") or words == ["rollback"]:
            tag = "COMMIT" if verb in ("commit", "end") and self.status != "E" else "ROLLBACK"
            self.status, self.savepoints = "I", []
            return tag
        if verb in ("savepoint", "release", "rollback"):
            if self.status == "I":
                return NO_TRANSACTION
            if verb == "savepoint":
                self.savepoints.append(name)
                return "SAVEPOINT"
            if name not in self.savepoints:
                self.status = "E"
                return NO_SAVEPOINT
            last = len(self.savepoints) - 1 - self.savepoints[::-1].index(name)
            if verb == "release":
                del self.savepoints[last:]
                return "RELEASE"
            del self.savepoints[last + 1 :]
            self.status = "T"
            return "ROLLBACK"
        if error and self.status == "T":
            self.status = "E"
        return "fwd!" if error else "fwd"


MODEL_STATEMENTS = [
    "BEGIN",
    "START TRANSACTION",
    "COMMIT",
    "END",
    "ROLLBACK",
    "ABORT",
    *(f"SAVEPOINT {n}" for n in "ab"),
    *(f"RELEASE SAVEPOINT {n}" for n in "ab"),
    *(f"ROLLBACK TO SAVEPOINT {n}" for n in "ab"),
    "ALTER TABLE t ADD COLUMN c int",
    "SELECT 1",
]


def outcome_of(reply: Reply, error: bool) -> str:
    """A reply in the table's terms."""
    if reply.kind is Kind.FORWARD:
        return "fwd!" if error else "fwd"
    if reply.kind is Kind.REJECT:
        assert reply.error is not None
        return reply.error[0]
    return reply.tag


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(MODEL_STATEMENTS), st.booleans()), max_size=40))
def test_random_sequences_mirror_postgresql(steps: list[tuple[str, bool]]) -> None:
    vt, model = VirtualTransaction(), PgModel()
    for sql, fails in steps:
        error = fails and sql.startswith(("ALTER", "SELECT"))  # only those reach the server
        expected = model.run(sql, error)
        reply = play(vt, sql, error)
        context = (sql, reply, vt, model)
        assert outcome_of(reply, error) == expected, context
        assert chr(vt.status) == model.status, context
        assert vt.savepoints == model.savepoints, context


#: Control statements, atomic switches, SET LOCAL, ordinary statements that succeed or fail.
ALL_STATEMENTS = [
    *MODEL_STATEMENTS,
    "SET pgmigrate.atomic = on",
    "SET pgmigrate.atomic = off",
    "SET LOCAL lock_timeout = '1s'",
    "SET LOCAL search_path = app",
    "/* c */ BEGIN",
    "-- c\nCOMMIT",
    'SAVEPOINT "A"',
    'RELEASE "A"',
]


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(ALL_STATEMENTS), st.booleans(), st.booleans()), max_size=50)
)
def test_random_sequences_keep_status_consistent(steps: list[tuple[str, bool, bool]]) -> None:
    vt = VirtualTransaction()
    for sql, error, commit_fails in steps:
        before = vt.state
        reply = play(vt, sql, error)
        if reply.kind is Kind.SEND_REAL and reply.server_sql == "COMMIT" and commit_fails:
            vt.atomic_failed()
        context = (sql, before, reply, vt)
        assert vt.status is STATUS_OF[vt.state], context
        if reply.kind is Kind.REJECT:
            assert reply.error is not None and len(reply.error[0]) == 5, context
            assert vt.state is not State.OPEN, context  # an error fails an open block
        if reply.kind is Kind.ANSWER:
            assert reply.tag, context
        if before is State.FAILED and reply.kind is not Kind.REJECT:
            # Only the statements that end the block (or roll back to a savepoint) pass in E.
            assert reply.tag in ("ROLLBACK", "COMMIT"), context
            assert vt.state in (State.OUTSIDE, State.OPEN), context
        if vt.state is State.OUTSIDE:
            assert vt.savepoints == [] and vt.applied == [], context
        if vt.state is State.OUTSIDE:
            assert vt.saved == {}, context
        ends = sql.split()[0] in ("ROLLBACK", "ABORT") and " TO " not in sql
        if before is not State.ATOMIC and ends:
            assert vt.state is State.OUTSIDE, context
