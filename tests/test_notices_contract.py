"""The notice texts the guard builds are the ones the Django app's patterns read back."""

from __future__ import annotations

from pgmigrate_proxy import notices


def test_blocker_notices_round_trip() -> None:
    who = "pid 41, idle in transaction, for 3.0 s, user 'app'"
    terminated = notices.TERMINATED_RE.match(notices.blocker(notices.TERMINATED, who))
    cancelled = notices.CANCELLED_RE.match(notices.blocker(notices.CANCELLED, who))
    blocked = notices.BLOCKED_BY_RE.match(notices.blocker(notices.BLOCKED_BY, who))
    assert terminated and terminated.group(1) == "41"
    assert cancelled and cancelled.group(1) == "41"
    assert blocked and blocked.group(1) == "41"
    prepared = notices.blocker(notices.BLOCKED_BY, "prepared transaction 'g1'")
    match = notices.BLOCKED_BY_RE.match(prepared)
    assert match and match.group(2) == "prepared transaction 'g1'"


def test_retry_and_autocommit_notices_round_trip() -> None:
    retry = notices.RETRYING_RE.match(notices.retrying("canceling statement (x)", 120, 3))
    assert retry and retry.groups() == ("canceling statement (x)", "120", "3")
    applied = notices.APPLIED_RE.match(notices.applied_despite_rollback(2, "ALTER ...; DROP ..."))
    assert applied and applied.group(1) == "2"


def test_every_text_carries_the_prefix_the_app_recognises() -> None:
    for text in (
        notices.budget_spent(2, 1.5),
        notices.gave_up(5.0),
        notices.admin_down(),
        notices.admin_down("role \"root\" does not exist"),
    ):
        match = notices.ANY_RE.match(text)
        assert match and match.group(1) == text.removeprefix(notices.PREFIX)


def test_event_notices_round_trip_and_are_not_generic_notices() -> None:
    fields = {"ts": "2026-01-01T00:00:00+00:00", "event": "held", "statement": "DROP TABLE t"}
    text = notices.event(fields)
    assert notices.read_event(text) == fields
    assert notices.ANY_RE.match(text) is None  # the Django app does not print it
    assert notices.read_event("pgmigrate: terminated pid 1") is None
    assert notices.read_event(notices.EVENT_PREFIX + "[1]") is None
