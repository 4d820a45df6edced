"""/metrics on metrics_listen, scraped over HTTP (urllib) from a real proxy in front of a real
PostgreSQL and parsed with prometheus_client's parser: the guard's numbers move with a guarded
ALTER TABLE and its blocker, the pools' with clients; other paths are 404; a bad value of
metrics_listen is one line and exit 2."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from pgmigrate_proxy.metrics.http import MetricsListenError
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from tests.console.conftest import client
from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.fixtures.tables import scratch_table
from tests.guard.scenarios import connect_through, wait_for
from tests.test_cli import run_module

pytestmark = pytest.mark.integration

P = "pgmigrate_proxy_"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
Keep = Callable[[psycopg.Connection[Any]], psycopg.Connection[Any]]


def url(proxy: RunningProxy, path: str = "/metrics") -> str:
    assert proxy.server.metrics is not None
    return f"http://127.0.0.1:{proxy.server.metrics.port}{path}"


def scrape(proxy: RunningProxy) -> Samples:
    """Every sample of /metrics by (name, labels)."""
    with urllib.request.urlopen(url(proxy), timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value; 0 when it is not there (no pool or statement of those labels yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def held_now(proxy: RunningProxy, who: dict[str, str]) -> float:
    """The held-statements gauge: a unit leaves it once its pipeline is over, a moment after its
    client has the replies (the session's lock_timeout is restored after them)."""
    return value(scrape(proxy), P + "guard_held_statements", **who)


@pytest.fixture
def table(pg: PgInfo) -> Iterator[str]:
    with scratch_table(pg, "metrics") as name:
        yield name


def test_a_guarded_alter_with_a_terminated_blocker_moves_the_guard_metrics(
    proxy_factory: Callable[..., RunningProxy], pg: PgInfo, table: str, opened: Keep
) -> None:
    proxy = proxy_factory(metrics_listen="127.0.0.1:0", blocking_action="terminate")
    who = {"database": "postgres", "user": pg.superuser}
    before = scrape(proxy)
    assert value(before, P + "guard_admin_connection_up") == 1
    assert value(before, P + "guard_held_total", **who) == 0
    blocker = opened(pg.connect(application_name="metrics-blocker"))
    blocker.execute("BEGIN")
    blocker.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table)))
    migration = opened(connect_through(proxy, pg).conn)
    migration.execute(sql.SQL("ALTER TABLE {} ADD COLUMN added int").format(sql.Identifier(table)))
    assert blocker.closed or blocker.broken or _terminated(blocker)
    after = scrape(proxy)
    assert value(after, P + "guard_held_total", **who) == 1
    assert value(after, P + "guard_attempts_total", **who) >= 1
    assert value(after, P + "guard_blockers_found_total", **who) == 1
    assert value(after, P + "guard_blockers_terminated_total", **who) == 1
    assert value(after, P + "guard_blockers_cancelled_total", **who) == 0
    assert value(after, P + "guard_budgets_spent_total", **who) == 0
    assert value(after, P + "guard_hold_seconds_count", **who) == 1
    assert value(after, P + "guard_hold_seconds_bucket", **who, le="+Inf") == 1
    assert value(after, P + "guard_admin_connection_up") == 1
    wait_for(lambda: not held_now(proxy, who), "the pipeline to end (it restores lock_timeout)")


def test_a_held_statement_shows_in_the_gauge_until_its_blocker_ends(
    proxy_factory: Callable[..., RunningProxy], pg: PgInfo, table: str, opened: Keep
) -> None:
    proxy = proxy_factory(metrics_listen="127.0.0.1:0", blocking_action="show", max_hold="10min")
    who = {"database": "postgres", "user": pg.superuser}
    blocker = opened(pg.connect(application_name="metrics-blocker"))
    blocker.execute("BEGIN")
    blocker.execute(sql.SQL("SELECT * FROM {}").format(sql.Identifier(table)))
    migration = opened(connect_through(proxy, pg).conn)
    alter = sql.SQL("ALTER TABLE {} ADD COLUMN added int").format(sql.Identifier(table))
    with ThreadPoolExecutor(1) as executor:
        running = executor.submit(migration.execute, alter)

        def shown() -> Samples | None:
            samples = scrape(proxy)
            return samples if value(samples, P + "guard_blockers_shown_total", **who) else None

        samples = wait_for(shown, "the blocker to be shown")
        assert value(samples, P + "guard_held_statements", **who) == 1
        assert value(samples, P + "guard_blockers_found_total", **who) == 1
        assert value(samples, P + "guard_attempts_total", **who) == 0
        assert value(samples, P + "guard_hold_seconds_count", **who) == 0
        blocker.execute("ROLLBACK")
        running.result(timeout=60)
    samples = scrape(proxy)
    assert value(samples, P + "guard_hold_seconds_count", **who) == 1
    wait_for(lambda: not held_now(proxy, who), "the pipeline to end (it restores lock_timeout)")
    assert value(samples, P + "guard_blockers_terminated_total", **who) == 0


def _terminated(conn: psycopg.Connection[Any]) -> bool:
    try:
        conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return True
    return False


def test_clients_connected_move_the_client_gauges(
    proxy_factory: Callable[..., RunningProxy], opened: Keep
) -> None:
    proxy = proxy_factory(metrics_listen="127.0.0.1:0")
    pool = {"database": "postgres", "user": "u_trust"}
    first = opened(client(proxy))
    opened(client(proxy))
    samples = scrape(proxy)
    assert value(samples, P + "clients", **pool, state="active") == 2
    assert value(samples, P + "clients", **pool, state="waiting") == 0
    assert value(samples, P + "servers", **pool, state="active") == 2
    first.close()

    def one_left() -> bool:
        return value(scrape(proxy), P + "clients", **pool, state="active") == 1

    wait_for(one_left, "the closed client to leave the gauge")


def test_a_transaction_pool_counts_its_transactions_and_idle_clients(
    proxy_factory: Callable[..., RunningProxy], opened: Keep
) -> None:
    proxy = proxy_factory(metrics_listen="127.0.0.1:0", pool_mode="transaction")
    pool = {"database": "postgres", "user": "u_trust"}
    conn = opened(client(proxy))
    before = value(scrape(proxy), P + "transactions_total", **pool)
    for _ in range(3):
        conn.execute("SELECT 1")
    with conn.transaction():
        conn.execute("SELECT 2")
    samples = scrape(proxy)
    assert value(samples, P + "transactions_total", **pool) == before + 4
    assert value(samples, P + "queries_total", **pool) >= before + 5
    assert value(samples, P + "client_received_bytes_total", **pool) > 0
    assert value(samples, P + "client_sent_bytes_total", **pool) > 0
    assert value(samples, P + "client_wait_seconds_count", **pool) >= 4
    assert value(samples, P + "query_seconds_total", **pool) > 0
    assert value(samples, P + "transaction_seconds_total", **pool) >= value(
        samples, P + "query_seconds_total", **pool
    )
    assert value(samples, P + "clients", **pool, state="idle") == 1  # between transactions
    assert value(samples, P + "clients", **pool, state="active") == 0


def test_other_paths_are_404_and_other_methods_405(
    proxy_factory: Callable[..., RunningProxy],
) -> None:
    proxy = proxy_factory(metrics_listen="127.0.0.1:0")
    for path in ("/", "/metric", "/metrics/x", "/favicon.ico"):
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(url(proxy, path), timeout=10)
        assert caught.value.code == 404, path
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(urllib.request.Request(url(proxy), b"", method="POST"), timeout=10)
    assert caught.value.code == 405
    head = urllib.request.Request(url(proxy), method="HEAD")
    with urllib.request.urlopen(head, timeout=10) as response:
        assert response.status == 200 and response.read() == b""
    with urllib.request.urlopen(url(proxy, "/metrics?x=1"), timeout=10) as response:
        assert response.status == 200


def raw(proxy: RunningProxy, data: bytes) -> bytes:
    assert proxy.server.metrics is not None
    with socket.create_connection(("127.0.0.1", proxy.server.metrics.port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_a_malformed_or_oversized_request_gets_an_error_status(
    proxy_factory: Callable[..., RunningProxy],
) -> None:
    proxy = proxy_factory(metrics_listen="127.0.0.1:0")
    assert raw(proxy, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    huge = b"GET /metrics HTTP/1.1\r\nX-Filler: " + b"x" * 20000 + b"\r\n\r\n"
    assert raw(proxy, huge).startswith(b"HTTP/1.1 431 ")
    assert raw(proxy, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200 OK\r\n")


def test_metrics_are_off_by_default(proxy: RunningProxy) -> None:
    assert proxy.server.metrics is None


def test_a_metrics_address_in_use_fails_the_start_naming_the_setting(
    proxy_factory: Callable[..., RunningProxy],
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsListenError, match=f"metrics_listen 127.0.0.1:{port}"):
            proxy_factory(metrics_listen=f"127.0.0.1:{port}")


@pytest.mark.parametrize("bad", ["9187", "localhost", "host:port", "::1:9187", "[::1]", "h:70000"])
def test_a_bad_metrics_listen_is_one_line_and_exit_2(bad: str) -> None:
    done = run_module("--metrics-listen", bad)
    assert done.returncode == 2, done
    assert done.stderr.startswith(f"pgmigrate-proxy: invalid metrics_listen: {bad!r} (allowed: ")
    assert done.stderr.count("\n") == 1
