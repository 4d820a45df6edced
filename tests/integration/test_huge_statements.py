"""A huge Query does not stop the proxy from serving other clients while it is classified."""

from __future__ import annotations

import gc
import threading
import tracemalloc
from typing import Any

import psycopg
import pytest
from pgmigrate_proxy.protocol.framing import frame
from pgmigrate_proxy.protocol.types import BackendType, FrontendType

from tests.fixtures.proxy import RunningProxy
from tests.integration.probes import active_sessions, wait_until
from tests.integration.wire import WireClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

#: The finding's query: a million `SELECT 1;` and an ALTER, 10 MB.
MB = 1024 * 1024
HUGE = "SELECT 1;" * 1_000_000 + " ALTER TABLE huge_target ADD COLUMN x int"


class RoundTrips(threading.Thread):
    """`SELECT 1` through the proxy, one after the other, counted, until stopped."""

    def __init__(self, conninfo: str) -> None:
        super().__init__(name="round-trips", daemon=True)
        self.conn: psycopg.Connection[Any] = psycopg.connect(conninfo, autocommit=True)
        self.count = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            assert self.conn.execute("SELECT 1").fetchone() == (1,)
            self.count += 1


def test_other_clients_are_served_while_a_huge_query_is_classified(proxy: RunningProxy) -> None:
    other = RoundTrips(proxy.conninfo("u_trust", connect_timeout="10"))
    other.start()
    try:
        wait_until(lambda: other.count > 0, "the other client's first round trip")
        with WireClient(proxy.host, proxy.port, timeout=150) as client:
            client.login("u_trust")
            client.send(b"Q" + (len(HUGE) + 5).to_bytes(4, "big") + HUGE.encode() + b"\0")
            before = other.count
            # The first reply byte comes once the proxy has classified the text and
            # PostgreSQL has parsed it: the other client must have been served meanwhile.
            assert client.sock.recv(1)
            served = other.count - before
        assert served >= 10, f"the other client got {served} answers meanwhile"
    finally:
        other.stop.set()
        other.join(30)
        other.conn.close()


MIGRATE = {"options": "-c pgmigrate.role=migrate"}


def test_migration_session_refuses_a_query_of_too_many_statements(proxy: RunningProxy) -> None:
    """Splitting a million statements would stall every session: 54000, and the session
    carries on."""
    with WireClient(proxy.host, proxy.port, timeout=150) as client:
        client.startup("u_trust", options=MIGRATE)
        client.read_until(ord("Z"))
        client.send(b"Q" + (len(HUGE) + 5).to_bytes(4, "big") + HUGE.encode() + b"\0")
        error = client.expect_error()
        assert (error.severity, error.code) == ("ERROR", "54000")
        client.read_until(ord("Z"))
        assert client.query("SELECT 1")[-1] == (ord("Z"), b"I")


def test_migration_session_splits_a_long_script_off_the_loop(proxy: RunningProxy) -> None:
    """A script above the on-loop limit is still run statement by statement, its BEGIN and
    COMMIT answered by the proxy as in any migration session."""
    pad = "x" * 20_000
    script = (
        "BEGIN; CREATE TEMP TABLE long_script (a text); "
        f"INSERT INTO long_script VALUES ('{pad}'); INSERT INTO long_script VALUES ('{pad}'); "
        "COMMIT"
    )
    with psycopg.connect(
        proxy.conninfo("u_trust", connect_timeout="10", options=MIGRATE["options"]),
        autocommit=True,
    ) as conn:
        conn.execute(script.encode())
        assert conn.execute("SELECT count(*) FROM long_script").fetchone() == (2,)


def test_parse_cache_keeps_a_few_megabytes_after_huge_parses(proxy: RunningProxy) -> None:
    """The finding: 10 x 50 MB Parse messages stayed in the process-wide Parse cache after
    the client left (here 10 x 5 MB, measured by tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        with WireClient(proxy.host, proxy.port) as client:
            client.login("u_trust")
            for i in range(10):
                sql = f"SELECT {i}, '" + "x" * 5 * MB + "'"
                client.send(parse(f"s{i}", sql) + frame(FrontendType.SYNC))
                client.read_until(BackendType.READY_FOR_QUERY)
        wait_until(lambda: active_sessions(proxy) == 0, "the session to close")
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 8 * MB, f"{kept / MB:.1f} MB kept after the client left"


def parse(name: str, sql: str) -> bytes:
    payload = name.encode() + b"\0" + sql.encode() + b"\0" + (0).to_bytes(2, "big")
    return frame(FrontendType.PARSE, payload)
