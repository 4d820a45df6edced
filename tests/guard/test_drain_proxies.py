"""Several proxies, one drain, with real PostgreSQL and clients spread over three proxies: a drain
on one arms the other two's gates (observed through a recording gate around each one's
drain_gate) and waits for their acks before it waits for the holders; its end releases them.
A drainer killed mid-drain leaves nothing held: the others release once its admin session is
gone. A proxy that never acks delays a drain by drain_ack_timeout only."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from pgmigrate_proxy.guard import coordination as co
from pgmigrate_proxy.guard.drain import DrainScope, Gate, GateHold, HoldRule, NoGate, Reach
from pgmigrate_proxy.guard.steps import HoldPredicate
from pgmigrate_proxy.runtime.coordinate import APPLICATION_NAME, DrainCoordinator
from psycopg import sql

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.guard.live import Connect
from tests.guard.scenarios import BOUND, backend_alive, column_exists, connect_through, wait_for
from tests.test_service import ProxyProcess, proxy_env

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

ProxyFactory = Callable[..., RunningProxy]
CHANNEL = co.channel("pgmigrate_events")


class RecordingGate:
    """A proxy's drain_gate, with each arm and release recorded (from the proxy's thread)."""

    def __init__(self, inner: Gate) -> None:
        self.inner = inner
        self.arms: list[HoldRule] = []
        self.released: list[HoldRule] = []
        self._lock = threading.Lock()

    def arm(self, rule: HoldPredicate) -> GateHold:
        assert isinstance(rule, HoldRule)
        hold = self.inner.arm(rule)
        with self._lock:
            self.arms.append(rule)
        return _Recorded(self, rule, hold)


class _Recorded:
    def __init__(self, gate: RecordingGate, rule: HoldRule, hold: GateHold) -> None:
        self.gate, self.rule, self.hold = gate, rule, hold

    def release(self) -> None:
        with self.gate._lock:
            self.gate.released.append(self.rule)
        self.hold.release()


class Session:
    def __init__(self, backend_pid: int = 0, database: str = "postgres") -> None:
        self.database = database
        self.backend_pid = backend_pid


def recording(proxy: RunningProxy) -> RecordingGate:
    guard = proxy.server.guard
    gate = RecordingGate(guard.drain_gate)
    guard.drain_gate = gate
    return gate


def coordinator(proxy: RunningProxy) -> DrainCoordinator:
    found = proxy.server.guard.coordinator
    assert found is not None
    return found


def knows(proxy: RunningProxy, count: int) -> Callable[[], bool]:
    return lambda: len(coordinator(proxy).peers.up()) >= count


def logged(proxy_log: list[str], *texts: str) -> Callable[[], str | None]:
    return lambda: next((x for x in list(proxy_log) if all(t in x for t in texts)), None)


def q(template: str, name: str) -> sql.Composed:
    return sql.SQL(template).format(sql.Identifier(name))


def through(proxy: RunningProxy, pg: PgInfo) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.conninfo(pg.superuser), autocommit=True, connect_timeout=10)


def test_three_proxies_one_drain(
    pg: PgInfo, proxy_factory: ProxyFactory, table: tuple[str, int], proxy_log: list[str]
) -> None:
    name, oid = table
    drainer = proxy_factory(blocking_action="drain", drain_timeout=30.0)
    b, c = proxy_factory(), proxy_factory()
    gate_b, gate_c = recording(b), recording(c)
    for proxy in (drainer, b, c):
        wait_for(knows(proxy, 2), "each proxy to know the other two")
    # clients spread over the proxies: a transaction on the table through b (a holder, let
    # through everywhere), an idle session through c
    holder = through(b, pg)
    holder.execute("BEGIN")
    holder.execute(q("SELECT * FROM {}", name))
    holder_pid = holder.info.backend_pid
    other = through(c, pg)
    migration = connect_through(drainer, pg)
    with ThreadPoolExecutor(max_workers=1) as pool:
        alter = pool.submit(migration.conn.execute, q("ALTER TABLE {} ADD COLUMN a int", name))
        wait_for(lambda: gate_b.arms and gate_c.arms, "both other proxies to arm")
        announced = wait_for(logged(proxy_log, "guard drain_announced"), "the acks")
        assert wait_for(logged(proxy_log, "guard drain "), "the wait for the holders")
        assert not alter.done()  # the holder through b still runs
        for gate in (gate_b, gate_c):
            [rule] = gate.arms
            assert rule.scope.database == "postgres" and name in rule.scope.relations
            assert holder_pid in rule.let_through  # holds a lock on the table: let through
            select = [f'SELECT * FROM "{name}"']
            assert rule.should_hold(Session(), select)  # new work on the table: held
            assert rule.should_hold(Session(other.info.backend_pid), select)
            assert not rule.should_hold(Session(holder_pid), select)
            assert not rule.should_hold(Session(), ["SELECT 1"])
            assert gate.released == []
        for proxy in (b, c):
            assert str(coordinator(proxy).me) in announced  # both acked
        holder.execute("COMMIT")
        alter.result(timeout=BOUND)
    assert column_exists(pg, name, "a")
    wait_for(lambda: gate_b.released and gate_c.released, "both to release on the end")
    assert wait_for(logged(proxy_log, "released here: its end was announced"), "the log")
    for proxy, gate in ((b, gate_b), (c, gate_c)):
        assert gate.released == gate.arms  # once each
        assert coordinator(proxy).holds == {} and coordinator(proxy).remote.held == []
    assert coordinator(drainer).own == set()
    assert backend_alive(pg, holder_pid)  # nobody was killed
    assert oid
    for conn in (holder, other, migration.conn):
        conn.close()


def test_a_drainer_killed_mid_drain_leaves_nothing_held(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: tuple[str, int],
    sessions: Connect,
    proxy_log: list[str],
) -> None:
    name, _ = table
    b, c = proxy_factory(), proxy_factory()
    gate_b, gate_c = recording(b), recording(c)
    args = ["--listen-port", "0", "--blocking-action", "drain", "--drain-timeout", "60s"]
    drainer = ProxyProcess(args, proxy_env(PGMIGRATE_PROXY_UPSTREAM=pg.url()))
    try:
        port = drainer.port()
        for proxy in (b, c):
            wait_for(knows(proxy, 2), "b and c to know the proxy process")
        holder = sessions()
        holder.execute("BEGIN")
        holder.execute(q("SELECT * FROM {}", name))
        migration = psycopg.connect(
            host="127.0.0.1", port=port, user=pg.superuser, password=pg.superuser_password,
            dbname="postgres", autocommit=True, connect_timeout=10,
        )  # fmt: skip
        with ThreadPoolExecutor(max_workers=1) as pool:
            alter = pool.submit(migration.execute, q("ALTER TABLE {} ADD COLUMN a int", name))
            wait_for(lambda: gate_b.arms and gate_c.arms, "both to arm for the process's drain")
            drainer.wait_for("guard drain_announced")
            [origin] = coordinator(b).remote.origins()
            assert backend_alive(pg, origin)  # the drainer's admin session
            drainer.proc.kill()  # SIGKILL, mid-drain
            drainer.proc.wait(BOUND)
            wait_for(lambda: gate_b.released and gate_c.released, "both to release by themselves")
            with pytest.raises(psycopg.OperationalError):
                alter.result(timeout=BOUND)  # its client's session ended with it
        assert wait_for(logged(proxy_log, "admin session is gone"), "why, in the log")
        for proxy, gate in ((b, gate_b), (c, gate_c)):
            assert gate.released == gate.arms  # once each
            assert coordinator(proxy).holds == {}
            wait_for(knows_only(proxy, 1), "the killed proxy to be forgotten")
        assert not column_exists(pg, name, "a")
        holder.execute("COMMIT")  # untouched
        migration.close()
    finally:
        drainer.stop()
        print(f"--- drainer log ---\n{drainer.output()}")


def knows_only(proxy: RunningProxy, count: int) -> Callable[[], bool]:
    return lambda: len(coordinator(proxy).peers.up()) == count


def test_a_proxy_that_never_acks_delays_the_drain_by_the_ack_timeout_only(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: tuple[str, int],
    sessions: Connect,
    proxy_log: list[str],
) -> None:
    name, _ = table
    drainer = proxy_factory(blocking_action="drain", drain_ack_timeout=0.3)
    b = proxy_factory()
    gate_b = recording(b)
    # a "proxy" that says hello and never acks: its session (its admin session) stays up
    mute = sessions()
    hello = co.encode(co.Hello(co.Proxy("mute", 1, "mute0")))
    mute.execute("SELECT pg_notify(%s, %s)", (CHANNEL, hello))
    wait_for(knows(drainer, 2), "the drainer to know b and the mute one")
    events = sessions()
    events.execute("LISTEN pgmigrate_events")
    migration = connect_through(drainer, pg)
    migration.conn.execute(q("ALTER TABLE {} ADD COLUMN a int", name))
    assert column_exists(pg, name, "a")  # it went on
    late = wait_for(logged(proxy_log, "guard drain_ack_timeout"), "the warning")
    assert "WARNING" in late and "mute:1/mute0" in late and str(coordinator(b).me) in late
    assert gate_b.arms
    wait_for(lambda: gate_b.released == gate_b.arms, "b to release on the end")
    sent = (json.loads(n.payload) for n in events.notifies(timeout=BOUND))
    timeout_event = next(e for e in sent if e.get("event") == "drain_ack_timeout")
    assert timeout_event["missing"] == ["mute:1/mute0"]  # in the events too
    migration.conn.close()


def test_a_drain_start_from_a_role_that_may_not_signal_arms_nothing(
    pg: PgInfo, proxy_factory: ProxyFactory, table: tuple[str, int], proxy_log: list[str]
) -> None:
    """Anyone who may connect may NOTIFY on the drain channel: a start is armed only when its
    backend's role could be an admin connection's (superuser or pg_signal_backend)."""
    name, oid = table
    b = proxy_factory()
    gate_b = recording(b)
    wait_for(lambda: coordinator(b).listening.is_set(), "b to listen")
    forger = co.Proxy("forger", 1, "f0")
    rule = HoldRule(DrainScope("postgres", {name: frozenset({("public", Reach.ANY)})}), 0)
    start = co.Start.of(forger, "f0-1", rule, [oid], 3600.0)
    with pg.connect("u_scram") as plain:
        plain.execute("SELECT pg_notify(%s, %s)", (CHANNEL, co.start_payloads(start)[0]))
        wait_for(logged(proxy_log, "ignored forger:1/f0's messages"), "the refusal")
    assert gate_b.arms == [] and coordinator(b).remote.held == []
    assert coordinator(b).peers.up() == {}


def test_a_lost_listener_connection_comes_back(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: tuple[str, int],
    sessions: Connect,
    proxy_log: list[str],
) -> None:
    name, _ = table
    drainer = proxy_factory(blocking_action="drain")
    b = proxy_factory()
    gate_b = recording(b)
    wait_for(knows(drainer, 1), "the drainer to know b")
    admin = sessions()
    listeners = "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
    for (pid,) in admin.execute(listeners, (APPLICATION_NAME,)).fetchall():
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    wait_for(logged(proxy_log, "listener connection lost"), "the loss to be seen")
    wait_for(
        lambda: len(admin.execute(listeners, (APPLICATION_NAME,)).fetchall()) == 2,
        "both listeners to come back",
    )
    wait_for(lambda: coordinator(b).listening.is_set(), "b to listen again")
    migration = connect_through(drainer, pg)
    migration.conn.execute(q("ALTER TABLE {} ADD COLUMN a int", name))
    assert gate_b.arms
    wait_for(lambda: gate_b.released == gate_b.arms, "b to release on the end")
    assert wait_for(logged(proxy_log, "guard drain_announced"), "b's ack")
    migration.conn.close()


def test_a_drainer_shutting_down_mid_drain_announces_the_end(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: tuple[str, int],
    sessions: Connect,
    proxy_log: list[str],
) -> None:
    name, _ = table
    b = proxy_factory()
    gate_b = recording(b)
    args = ["--listen-port", "0", "--blocking-action", "drain", "--drain-timeout", "60s",
            "--shutdown-grace", "0"]  # fmt: skip
    drainer = ProxyProcess(args, proxy_env(PGMIGRATE_PROXY_UPSTREAM=pg.url()))
    try:
        port = drainer.port()
        wait_for(knows(b, 1), "b to know the proxy process")
        holder = sessions()
        holder.execute("BEGIN")
        holder.execute(q("SELECT * FROM {}", name))
        migration = psycopg.connect(
            host="127.0.0.1", port=port, user=pg.superuser, password=pg.superuser_password,
            dbname="postgres", autocommit=True, connect_timeout=10,
        )  # fmt: skip
        with ThreadPoolExecutor(max_workers=1) as pool:
            alter = pool.submit(migration.execute, q("ALTER TABLE {} ADD COLUMN a int", name))
            wait_for(lambda: gate_b.arms, "b to arm")
            drainer.send(signal.SIGTERM)
            assert drainer.proc.wait(BOUND) == 0
            with pytest.raises(psycopg.OperationalError):
                alter.result(timeout=BOUND)
        wait_for(lambda: gate_b.released == gate_b.arms, "b to release")
        assert wait_for(logged(proxy_log, "released here: its end was announced"), "the end")
        assert not logged(proxy_log, "admin session is gone")()
        wait_for(knows_only(b, 0), "the proxy's bye")
        holder.execute("COMMIT")
        migration.close()
    finally:
        drainer.stop()
        print(f"--- drainer log ---\n{drainer.output()}")


def test_a_proxy_whose_admin_session_changed_is_known_again_by_its_new_one(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: tuple[str, int],
    sessions: Connect,
    proxy_log: list[str],
) -> None:
    """The others know a proxy by its admin backend: after a reconnect it says hello again
    (with its next message), and a drain meanwhile still arms it (its listener is apart)."""
    name, _ = table
    drainer = proxy_factory(blocking_action="drain")
    b = proxy_factory()
    gate_b = recording(b)
    wait_for(knows(drainer, 1), "the drainer to know b")
    admin_b = b.server.guard.admin
    assert admin_b is not None
    old = admin_b.pid
    sessions().execute("SELECT pg_terminate_backend(%s)", (old,))
    migration = connect_through(drainer, pg)
    migration.conn.execute(q("ALTER TABLE {} ADD COLUMN a int", name))
    assert gate_b.arms  # armed all the same
    wait_for(lambda: gate_b.released == gate_b.arms, "b to release on the end")
    instance = coordinator(b).me.instance
    wait_for(
        lambda: coordinator(drainer).peers.sent_by(instance, admin_b.pid) and admin_b.pid != old,
        "the drainer to know b by its new admin backend",
    )
    migration.conn.close()


def test_a_client_of_another_proxy_waits_at_that_proxy_during_the_drain(
    pg: PgInfo,
    proxy_factory: ProxyFactory,
    table: tuple[str, int],
    sessions: Connect,
) -> None:
    """End to end with the gate adapter: a new transaction on the table through another proxy
    waits at that proxy while the drain runs, and runs after the DDL."""
    name, _ = table
    drainer = proxy_factory(blocking_action="drain", drain_timeout=30.0)
    b = proxy_factory()
    if isinstance(b.server.guard.drain_gate, NoGate):
        pytest.skip("this proxy's drain_gate holds nothing yet (the gate adapter)")
    wait_for(knows(drainer, 1), "the drainer to know b")
    holder = sessions()
    holder.execute("BEGIN")
    holder.execute(q("SELECT * FROM {}", name))
    app = through(b, pg)
    migration = connect_through(drainer, pg)
    with ThreadPoolExecutor(max_workers=2) as pool:
        alter = pool.submit(migration.conn.execute, q("ALTER TABLE {} ADD COLUMN a int", name))
        wait_for(lambda: coordinator(b).holds, "b to arm")
        read = pool.submit(lambda: app.execute(q("SELECT * FROM {}", name)).description)
        wait_for(lambda: b.server.guard.gate.waiting == 1, "the read to wait at b")
        assert not read.done() and not alter.done()
        holder.execute("COMMIT")
        alter.result(timeout=BOUND)
        columns = read.result(timeout=BOUND)
    assert columns is not None and [c.name for c in columns] == ["id", "a"]  # after the DDL
    for conn in (app, migration.conn):
        conn.close()
