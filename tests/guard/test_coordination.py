"""guard/coordination.py, pure: the drain channel's messages (round trips, every payload under
PostgreSQL's 8000 bytes however large the scope, parts reassembled in any order), the proxies up,
the ack wait, and the other proxies' drains: each released once, by its end, its proxy's admin
session gone, or its bound."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable

import pytest
from pgmigrate_proxy.guard import coordination as co
from pgmigrate_proxy.guard.drain import DrainScope, HoldRule, Reach

A = co.Proxy("app-1", 101, "aaaa")
B = co.Proxy("app-2", 202, "bbbb")
C = co.Proxy("app-3", 303, "cccc")
SCOPE = DrainScope(
    "app",
    {
        "app_item": frozenset({("public", Reach.ANY)}),
        "app_order": frozenset({("public", Reach.WRITES)}),
    },
    frozenset({"my_func"}),
)


class Session:
    def __init__(self, database: str = "app", backend_pid: int = 0) -> None:
        self.database = database
        self.backend_pid = backend_pid


def a_start(**changes: object) -> co.Start:
    rule = HoldRule(SCOPE, own_pid=500, let_through={7, 8})
    start = co.Start.of(A, "aaaa-1", rule, [16384], 32.5)
    return dataclasses.replace(start, **changes)  # type: ignore[arg-type]


def whole(payloads: list[str]) -> co.Start:
    drains = co.RemoteDrains("bbbb")
    found = [drains.receive(_part(p), 4242, 0.0) for p in payloads]
    assert found[:-1] == [None] * (len(payloads) - 1)
    assert found[-1] is not None
    return found[-1]


def _part(payload: str) -> co.StartPart:
    part = co.decode(payload)
    assert isinstance(part, co.StartPart)
    return part


@pytest.mark.parametrize(
    "message",
    [co.Hello(A), co.Hello(A, ask=True), co.Bye(A), co.Ack(B, "aaaa-1", "aaaa"),
     co.Ack(B, "aaaa-1", "aaaa", armed=False), co.End(A, "aaaa-1")],
)  # fmt: skip
def test_messages_round_trip(message: co.Message) -> None:
    assert not isinstance(message, co.Start)
    payload = co.encode(message)
    assert co.decode(payload) == message
    assert json.loads(payload)["v"] == co.VERSION


def test_a_start_round_trips_in_one_part_and_rebuilds_the_rule() -> None:
    start = a_start()
    payloads = co.start_payloads(start)
    assert len(payloads) == 1
    got = whole(payloads)
    assert got == start
    rule = got.rule()
    assert rule.scope == SCOPE and rule.own_pid == 500 and rule.let_through == {7, 8}
    assert rule.should_hold(Session(), ["SELECT * FROM app_item"])
    assert rule.should_hold(Session(), ["UPDATE app_order SET x = 1"])
    assert not rule.should_hold(Session(), ["SELECT * FROM app_order"])  # a partner's read
    assert not rule.should_hold(Session(backend_pid=7), ["SELECT * FROM app_item"])
    assert not rule.should_hold(Session(backend_pid=500), ["SELECT * FROM app_item"])
    assert not rule.should_hold(Session("other"), ["SELECT * FROM app_item"])
    assert rule.should_hold(Session(), ["SELECT my_func()"])


def test_a_huge_scope_goes_in_parts_each_under_the_limit_in_any_order() -> None:
    relations = {
        f"part_{i:05d}_{'x' * 40}": frozenset({("tenant_schema_with_a_long_name", Reach.ANY)})
        for i in range(3000)
    }
    functions = frozenset(f"function_{i}_{'é' * 20}" for i in range(2000))  # multibyte
    rule = HoldRule(DrainScope("app", relations, functions), 500, set(range(1, 900)))
    start = co.Start.of(A, "aaaa-9", rule, range(16384, 19384), 10.0)
    payloads = co.start_payloads(start)
    assert len(payloads) > 10
    assert all(len(p.encode()) < 8000 for p in payloads)
    shuffled = payloads[:]
    random.Random(1).shuffle(shuffled)
    got = whole(shuffled)
    assert got.rule().scope == rule.scope
    assert set(got.oids) == set(range(16384, 19384)) and got.let_through == set(range(1, 900))


def test_a_small_limit_splits_too() -> None:
    payloads = co.start_payloads(a_start(), limit=280)
    assert len(payloads) > 1 and all(len(p.encode()) < 280 for p in payloads)
    assert whole(payloads) == a_start()


@pytest.mark.parametrize(
    "payload",
    ["", "not json", "[1]", '{"kind": "hello"}', '{"v": 99, "kind": "hello"}',
     '{"v": 1, "kind": "hello"}', '{"v": 1, "kind": "nope", "proxy": {}}',
     json.dumps({"v": 1, "kind": "event", "proxy": A.as_dict()})],
)  # fmt: skip
def test_other_payloads_are_protocol_errors(payload: str) -> None:
    with pytest.raises(co.ProtocolError):
        co.decode(payload)


def test_a_part_out_of_range_is_a_protocol_error() -> None:
    body = json.loads(co.start_payloads(a_start())[0])
    body["part"] = 3
    with pytest.raises(co.ProtocolError):
        co.decode(json.dumps(body))


def test_peers_are_known_by_their_admin_backend_and_pruned_when_it_is_gone() -> None:
    peers = co.Peers("aaaa")
    assert not peers.seen(A, 11)  # itself
    assert peers.seen(B, 22) and not peers.seen(B, 22)
    assert peers.seen(B, 23)  # its admin session changed
    assert peers.seen(C, 33)
    assert peers.admin_pids() == {23, 33}
    assert peers.prune({33, 999}) == [B]
    assert set(peers.up()) == {"cccc"}
    assert peers.sent_by("cccc", 33) and not peers.sent_by("cccc", 34)
    assert not peers.sent_by("bbbb", 23)  # forgotten
    assert peers.forget("cccc") == C and peers.forget("cccc") is None


def test_the_ack_wait_completes_with_every_expected_proxy_only() -> None:
    wait = co.AckWait("aaaa-1", {"bbbb": B, "cccc": C})
    assert not wait.receive(co.Ack(B, "aaaa-2", "aaaa"))  # another drain
    assert not wait.receive(co.Ack(co.Proxy("x", 1, "zzzz"), "aaaa-1", "aaaa"))  # not expected
    assert not wait.receive(co.Ack(B, "aaaa-1", "aaaa"))
    assert wait.missing == [C]
    assert wait.receive(co.Ack(C, "aaaa-1", "aaaa"))
    assert wait.missing == [] and co.AckWait("d", {}).complete


def test_a_drain_is_released_once_whatever_ends_it() -> None:
    drains = co.RemoteDrains("bbbb")
    for payload in co.start_payloads(a_start()):
        assert drains.receive(_part(payload), 4242, 100.0) is not None
    assert drains.origins() == {4242}
    # the same start again (a listener that saw it twice) is not armed twice
    assert drains.receive(_part(co.start_payloads(a_start())[0]), 4242, 100.1) is None
    assert not drains.end("aaaa-1", sender=666)  # anyone may NOTIFY: not its announcer
    assert drains.end("aaaa-1", sender=4242) and not drains.end("aaaa-1", sender=4242)
    assert drains.gone(set()) == [] and drains.expired(1e9) == [] and drains.all() == []
    # the same start seen again after its end is not armed again
    assert drains.receive(_part(co.start_payloads(a_start())[0]), 4242, 101.0) is None


def test_parts_from_another_backend_are_not_assembled_and_a_refused_start_is_forgotten() -> None:
    payloads = co.start_payloads(a_start(), limit=280)
    drains = co.RemoteDrains("bbbb")
    assert drains.receive(_part(payloads[0]), 4242, 0.0) is None
    assert all(drains.receive(_part(p), 666, 0.0) is None for p in payloads[1:])
    assert drains.receive(_part(payloads[1]), 4242, 0.0) is not None
    drains.refuse("aaaa-1")
    assert drains.held == [] and drains.all() == []


@pytest.mark.parametrize("ender", ["gone", "expired", "bye", "all"])
def test_each_way_a_drain_ends_releases_it_once(ender: str) -> None:
    drains = co.RemoteDrains("bbbb")
    start = drains.receive(_part(co.start_payloads(a_start())[0]), 4242, 100.0)
    assert start is not None
    ends: dict[str, Callable[[], list[str]]] = {
        "gone": lambda: drains.gone({1, 2}),
        "expired": lambda: drains.expired(100.0 + 32.5 + co.HOLD_MARGIN),
        "bye": lambda: drains.of("aaaa"),
        "all": drains.all,
    }
    if ender == "gone":
        assert drains.gone({4242}) == []  # its proxy's admin session is still there
    if ender == "expired":
        assert drains.expired(100.0 + 32.5) == []  # not past its bound yet
    assert ends[ender]() == ["aaaa-1"]
    assert all(again() == [] for again in ends.values())
    assert not drains.end("aaaa-1")
    assert drains.held == []


def test_a_proxy_ignores_its_own_start() -> None:
    drains = co.RemoteDrains("aaaa")
    assert drains.receive(_part(co.start_payloads(a_start())[0]), 11, 0.0) is None
    assert drains.held == []


def test_incomplete_starts_are_dropped_after_a_while() -> None:
    payloads = co.start_payloads(a_start(), limit=280)
    drains = co.RemoteDrains("bbbb")
    assert drains.receive(_part(payloads[0]), 4242, 0.0) is None
    other = co.start_payloads(a_start(drain="aaaa-2"))[0]
    assert drains.receive(_part(other), 4242, co.ASSEMBLY_SECONDS + 1) is not None
    assert drains._parts == {}  # the stale assembly of aaaa-1 was dropped


def test_the_channel_name_fits_the_events_channel_rule() -> None:
    assert co.channel("pgmigrate_events") == "pgmigrate_events_drain"
    assert len(co.channel("x" * 55)) <= 63
