"""The guard's decisions on blockers: the rules, the filters, escalation of a cancel, properties."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pgmigrate_proxy.guard.policy import (
    BackendState,
    Blocker,
    BlockingAction,
    Decision,
    Filters,
    Reason,
    Verdict,
    decide,
)

DB = "app"
ADMIN_PID, OWN_PID = 50, 60
IIT = BackendState.IDLE_IN_TRANSACTION


def blocker(pid: int = 100, **fields: Any) -> Blocker:
    values: dict[str, Any] = {
        "state": BackendState.ACTIVE,
        "datname": DB,
        "usename": "web",
        "application_name": "gunicorn",
        "xact_age": 30.0,
        "query_age": 20.0,
    }
    return Blocker(pid=pid, **(values | fields))


def decide_one(
    b: Blocker,
    action: BlockingAction = BlockingAction.TERMINATE,
    filters: Filters | None = None,
    *,
    seen_for: float | None = 0.0,
    grace: float = 5.0,
) -> Decision:
    first_seen = {} if seen_for is None else {b.pid: 1000.0 - seen_for}
    [decision] = decide(
        [b],
        action,
        filters or Filters(),
        database=DB,
        protected_pids={ADMIN_PID, OWN_PID},
        first_seen=first_seen,
        now=1000.0,
        cancel_grace=grace,
    )
    assert decision.blocker is b
    return decision


# --- decide: one row per rule --------------------------------------------------------------------

T, C, R, S = Verdict.TERMINATE, Verdict.CANCEL, Verdict.REPORT, Verdict.SKIP
A = BlockingAction
CASES: list[tuple[str, Blocker, BlockingAction, Verdict, Reason]] = [
    ("terminate", blocker(), A.TERMINATE, T, Reason.ACTION),
    ("terminate iit", blocker(state=IIT), A.TERMINATE, T, Reason.ACTION),
    ("cancel active", blocker(), A.CANCEL, C, Reason.ACTION),
    ("cancel unknown state", blocker(state=None), A.CANCEL, C, Reason.ACTION),
    ("show", blocker(), A.SHOW, R, Reason.ACTION_SHOW),
    ("none", blocker(), A.NONE, R, Reason.ACTION_NONE),
    ("own backend", blocker(OWN_PID), A.TERMINATE, S, Reason.PROTECTED),
    ("admin connection", blocker(ADMIN_PID), A.CANCEL, S, Reason.PROTECTED),
    ("protected under show", blocker(OWN_PID), A.SHOW, S, Reason.PROTECTED),
    ("autovacuum", blocker(backend_type="autovacuum worker"), A.TERMINATE, S,
     Reason.NOT_CLIENT_BACKEND),
    ("walsender", blocker(backend_type="walsender"), A.TERMINATE, S, Reason.NOT_CLIENT_BACKEND),
    ("bgworker", blocker(backend_type="background worker"), A.CANCEL, S,
     Reason.NOT_CLIENT_BACKEND),
    ("parallel worker", blocker(backend_type="parallel worker"), A.TERMINATE, S,
     Reason.NOT_CLIENT_BACKEND),
    ("other database", blocker(datname="other"), A.TERMINATE, S, Reason.OTHER_DATABASE),
    ("no database", blocker(datname=None), A.TERMINATE, S, Reason.OTHER_DATABASE),
    ("prepared", blocker(0, prepared_xact="gid1", backend_type=None, state=None), A.TERMINATE, R,
     Reason.PREPARED),
    ("prepared, cancel", blocker(0, prepared_xact="g", backend_type=None), A.CANCEL, R,
     Reason.PREPARED),
    ("pid 0 without gid", blocker(0), A.TERMINATE, S, Reason.NO_BACKEND),
    ("negative pid", blocker(-3), A.TERMINATE, S, Reason.NO_BACKEND),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "b", "action", "verdict", "reason"), CASES, ids=[c[0] for c in CASES]
)
def test_decide_rules(
    case: str, b: Blocker, action: BlockingAction, verdict: Verdict, reason: Reason
) -> None:
    decision = decide_one(b, action)
    assert (decision.verdict, decision.reason) == (verdict, reason)
    assert decision.acts == (verdict in (T, C))


def test_decide_keeps_order_and_handles_many() -> None:
    blockers = [blocker(101), blocker(OWN_PID), blocker(0, prepared_xact="g"), blocker(102)]
    decisions = decide(
        blockers,
        BlockingAction.TERMINATE,
        Filters(),
        database=DB,
        protected_pids={OWN_PID},
        first_seen={},
        now=0.0,
        cancel_grace=1.0,
    )
    assert [d.blocker for d in decisions] == blockers
    assert [d.verdict for d in decisions] == [T, S, R, T]


def test_blocking_action_parses_setting_values() -> None:
    assert [BlockingAction(v) for v in ("terminate", "cancel", "show", "none", "drain")] == list(A)


# --- escalation ----------------------------------------------------------------------------------

ESCALATION = [
    # state, seen for (None: never seen before), grace, verdict, reason
    (IIT, 0.0, 5.0, R, Reason.ESCALATION_PENDING),
    (IIT, 4.999, 5.0, R, Reason.ESCALATION_PENDING),
    (IIT, 5.0, 5.0, T, Reason.ESCALATED),
    (IIT, 60.0, 5.0, T, Reason.ESCALATED),
    (IIT, None, 5.0, R, Reason.ESCALATION_PENDING),
    (IIT, None, 0.0, T, Reason.ESCALATED),
    (BackendState.IDLE_IN_TRANSACTION_ABORTED, 5.0, 5.0, T, Reason.ESCALATED),
    (BackendState.IDLE_IN_TRANSACTION_ABORTED, 1.0, 5.0, R, Reason.ESCALATION_PENDING),
    (BackendState.ACTIVE, 60.0, 5.0, C, Reason.ACTION),
    (BackendState.IDLE, 60.0, 5.0, Verdict.SKIP, Reason.NOT_IN_TRANSACTION),
]


@pytest.mark.parametrize(("state", "seen_for", "grace", "verdict", "reason"), ESCALATION)
def test_cancel_escalates_idle_in_transaction_after_grace(
    state: BackendState, seen_for: float | None, grace: float, verdict: Verdict, reason: Reason
) -> None:
    decision = decide_one(blocker(state=state), A.CANCEL, seen_for=seen_for, grace=grace)
    assert (decision.verdict, decision.reason) == (verdict, reason)


def test_escalation_respects_filters() -> None:
    spared = Filters(exclude_users=("web",))
    decision = decide_one(blocker(state=IIT), A.CANCEL, spared, seen_for=100.0)
    assert (decision.verdict, decision.reason) == (R, Reason.SPARED_USER)


# --- filters -------------------------------------------------------------------------------------

FILTERS = [
    (Filters(), {}, None),
    (Filters(min_transaction_age=30.0), {"xact_age": 30.0}, None),
    (Filters(min_transaction_age=30.0), {"xact_age": 29.9}, Reason.SPARED_TRANSACTION_AGE),
    (Filters(min_transaction_age=1.0), {"xact_age": None}, Reason.SPARED_TRANSACTION_AGE),
    (Filters(min_query_age=10.0), {"query_age": 9.0}, Reason.SPARED_QUERY_AGE),
    (Filters(min_query_age=10.0), {"query_age": None}, Reason.SPARED_QUERY_AGE),
    (Filters(min_query_age=10.0), {"query_age": 10.0}, None),
    # idle in transaction: old transaction, recent last query; only the transaction age passes
    (Filters(min_transaction_age=60), {"state": IIT, "xact_age": 600, "query_age": 1}, None),
    (Filters(min_query_age=60), {"state": IIT, "xact_age": 600, "query_age": 1},
     Reason.SPARED_QUERY_AGE),
    (Filters(states=frozenset({IIT})), {"state": IIT}, None),
    (Filters(states=frozenset({IIT})), {"state": BackendState.ACTIVE}, Reason.SPARED_STATE),
    (Filters(states=frozenset({IIT})), {"state": None}, Reason.SPARED_STATE),
    (Filters(application_names=("celery*",)), {"application_name": "celery-7"}, None),
    (Filters(application_names=("celery*",)), {"application_name": "gunicorn"},
     Reason.SPARED_APPLICATION),
    (Filters(application_names=("celery*",)), {"application_name": "Celery"},
     Reason.SPARED_APPLICATION),  # case-sensitive, as application_name is
    (Filters(exclude_application_names=("psql", "pg_dump*")), {"application_name": "pg_dump 15"},
     Reason.SPARED_APPLICATION),
    (Filters(exclude_application_names=("psql",)), {"application_name": "gunicorn"}, None),
    (Filters(application_names=("*",), exclude_application_names=("*",)), {},
     Reason.SPARED_APPLICATION),  # exclude wins
    (Filters(users=("web", "worker")), {"usename": "worker"}, None),
    (Filters(users=("web",)), {"usename": "admin"}, Reason.SPARED_USER),
    (Filters(users=("web",)), {"usename": None}, Reason.SPARED_USER),
    (Filters(exclude_users=("admin?",)), {"usename": "admin2"}, Reason.SPARED_USER),
    (Filters(exclude_users=("admin",)), {"usename": None}, None),
]  # fmt: skip


@pytest.mark.parametrize(("filters", "fields", "reason"), FILTERS)
def test_filters(filters: Filters, fields: dict[str, Any], reason: Reason | None) -> None:
    b = blocker(**fields)
    assert filters.spares(b) is reason
    decision = decide_one(b, A.TERMINATE, filters)
    expected = (T, Reason.ACTION) if reason is None else (R, reason)
    assert (decision.verdict, decision.reason) == expected


def test_show_reports_even_what_filters_spare() -> None:
    decision = decide_one(blocker(), A.SHOW, Filters(users=("nobody",)))
    assert (decision.verdict, decision.reason) == (R, Reason.ACTION_SHOW)


# --- properties ----------------------------------------------------------------------------------

PIDS = st.integers(min_value=-2, max_value=12)
names = st.sampled_from(["web", "worker", "admin", "", "celery-1"])
blockers = st.builds(
    Blocker,
    pid=PIDS,
    state=st.none() | st.sampled_from(BackendState),
    backend_type=st.sampled_from(
        [None, "client backend", "autovacuum worker", "walsender", "background worker"]
    ),
    datname=st.sampled_from([None, DB, "other"]),
    usename=st.none() | names,
    application_name=names,
    xact_age=st.none() | st.floats(0, 1e6),
    query_age=st.none() | st.floats(0, 1e6),
    prepared_xact=st.none() | st.text(max_size=5),
)
filters_st = st.builds(
    Filters,
    min_transaction_age=st.floats(0, 100),
    min_query_age=st.floats(0, 100),
    states=st.frozensets(st.sampled_from(BackendState)),
    application_names=st.lists(st.sampled_from(["*", "web*", "celery*"]), max_size=2).map(tuple),
    exclude_application_names=st.lists(st.sampled_from(["w*", "?"]), max_size=2).map(tuple),
    users=st.lists(names, max_size=2).map(tuple),
    exclude_users=st.lists(names, max_size=2).map(tuple),
)


@given(
    st.lists(blockers, max_size=8),
    st.sampled_from(BlockingAction),
    filters_st,
    st.frozensets(PIDS),
    st.dictionaries(PIDS, st.floats(0, 100)),
    st.floats(0, 200),
    st.floats(0, 50),
)
def test_decide_never_acts_out_of_bounds(
    bs: list[Blocker],
    action: BlockingAction,
    filters: Filters,
    protected: frozenset[int],
    first_seen: dict[int, float],
    now: float,
    grace: float,
) -> None:
    decisions = decide(
        bs,
        action,
        filters,
        database=DB,
        protected_pids=protected,
        first_seen=first_seen,
        now=now,
        cancel_grace=grace,
    )
    assert [d.blocker for d in decisions] == bs
    for d in decisions:
        b = d.blocker
        if b.pid in protected:
            assert d.verdict is Verdict.SKIP
        if not d.acts:
            continue
        assert b.pid not in protected and b.pid > 0 and b.prepared_xact is None
        assert b.backend_type == "client backend" and b.datname == DB
        assert action in (BlockingAction.TERMINATE, BlockingAction.CANCEL)
        assert filters.spares(b) is None
        if d.verdict is Verdict.CANCEL:
            assert action is BlockingAction.CANCEL
        if action is BlockingAction.CANCEL and d.verdict is Verdict.TERMINATE:
            assert b.state is not None and b.state.idle_in_transaction
            assert now - first_seen.get(b.pid, now) >= grace
