"""The proxy's pools and guard as Prometheus metric families, read when scraped.

The collector runs on the proxy's event loop (http.py calls generate_latest there), so it reads
the loop-owned sessions, pools and counters as they are, between two callbacks: no lock, no copy
kept, nothing bumped on the relay's path but the integers PoolStats already had.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Protocol

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from pgmigrate_proxy.runtime.guarding import GuardServices
from pgmigrate_proxy.runtime.pool import PoolRegistry
from pgmigrate_proxy.runtime.poolstate import pool_counts
from pgmigrate_proxy.runtime.session import ClientSession
from pgmigrate_proxy.runtime.stats import Buckets

PREFIX = "pgmigrate_proxy_"
LABELS = ("database", "user")

#: Per-pool counters: name, PoolStats attribute, help.
POOL_COUNTERS = (
    ("transactions", "xact_count", "Transactions ended (ReadyForQuery 'I' relayed)"),
    (
        "queries",
        "query_count",
        "Queries ended (ReadyForQuery relayed: one per simple Query or Sync)",
    ),
    ("client_received_bytes", "bytes_received", "Bytes received from the clients"),
    ("client_sent_bytes", "bytes_sent", "Bytes sent to the clients"),
    (
        "server_assignments",
        "server_assignment_count",
        "Times a client was given a server connection",
    ),
    (
        "transaction_seconds",
        "xact_time",
        "Seconds server connections spent in transactions (first request to ReadyForQuery "
        "'I', idle in transaction included)",
    ),
    (
        "query_seconds",
        "query_time",
        "Seconds server connections spent running queries (request to ReadyForQuery)",
    ),
)
_BY = "by the guard or the admin console"
#: The guard's counters: name, GuardCounts attribute, help.
GUARD_COUNTERS = (
    ("guard_held", "held", "Guarded statements held"),
    ("guard_attempts", "attempts", "Attempts of guarded statements sent to PostgreSQL"),
    ("guard_retries", "retries", "Attempts retried after a lock error (55P03, 40P01)"),
    (
        "guard_budgets_spent",
        "budgets_spent",
        "Guarded statements given up on, or failed on a lock error, once their lock budget "
        "was spent",
    ),
    (
        "guard_blockers_found",
        "blockers_found",
        "Blocking sessions found (each counted once per held statement)",
    ),
    ("guard_blockers_terminated", "terminated", f"Blocking sessions terminated ({_BY})"),
    ("guard_blockers_cancelled", "cancelled", f"Blocking sessions cancelled ({_BY})"),
    (
        "guard_blockers_shown",
        "shown",
        "Blocking sessions reported and left alone (blocking_action show, none or drain; "
        "prepared transactions)",
    ),
    (
        "guard_blockers_spared",
        "spared",
        "Blocking sessions a filter spared (blocker_states, min_*_age, users, application_names)",
    ),
)


class MetricsHost(Protocol):
    """What the collector reads of the proxy server (runtime/server.py's ProxyServer)."""

    guard: GuardServices
    pools: PoolRegistry

    @property
    def sessions(self) -> Collection[ClientSession]: ...


class ProxyCollector:
    """A prometheus_client collector of a proxy server's pools and guard."""

    def __init__(self, host: MetricsHost) -> None:
        self.host = host

    def collect(self) -> Iterator[Metric]:
        yield from self._pools()
        yield from self._guard()

    def _pools(self) -> Iterator[Metric]:
        pools = sorted(self.host.pools.pools.items())
        clients = _gauge("clients", "Client connections of a pool by state: active (on a server "
                         "connection), waiting (for one), idle (between transactions, none: "
                         "transaction pooling)", "state")  # fmt: skip
        servers = _gauge("servers", "Server connections of a pool by state: active (a client's), "
                         "idle, used (idle past server_check_delay), tested (being checked or "
                         "reset), login (being opened)", "state")  # fmt: skip
        for key, counts in sorted(pool_counts(self.host.pools, self.host.sessions).items()):
            for state, count in counts.clients.items():
                clients.add_metric([*key, state], count)
            for state, count in counts.servers.items():
                servers.add_metric([*key, state], count)
        yield clients
        yield servers
        for name, attribute, text in POOL_COUNTERS:
            counter = CounterMetricFamily(PREFIX + name, text, labels=LABELS)
            for key, pool in pools:
                counter.add_metric(list(key), getattr(pool.stats, attribute))
            yield counter
        waits = HistogramMetricFamily(
            PREFIX + "client_wait_seconds",
            "How long clients waited for a server connection (each time they got one)",
            labels=LABELS,
        )
        for key, pool in pools:
            _observed(waits, list(key), pool.stats.waits)
        yield waits

    def _guard(self) -> Iterator[Metric]:
        guard = self.host.guard
        held = _gauge("guard_held_statements", "Guarded statements in the pipeline now (held, "
                      "or being sent and retried)")  # fmt: skip
        now: dict[tuple[str, str], int] = {}
        for pipeline in guard.context.held.values():
            key = (pipeline.view.database, str(pipeline.client.get("user") or ""))
            now[key] = now.get(key, 0) + 1
        tallies = sorted(guard.recent.tally.counts.items())
        for key in sorted({*now, *(key for key, _ in tallies)}):
            held.add_metric(list(key), now.get(key, 0))
        yield held
        for name, attribute, text in GUARD_COUNTERS:
            counter = CounterMetricFamily(PREFIX + name, text, labels=LABELS)
            for key, counts in tallies:
                counter.add_metric(list(key), getattr(counts, attribute))
            yield counter
        holds = HistogramMetricFamily(
            PREFIX + "guard_hold_seconds",
            "How long each guarded statement was held out of PostgreSQL: from held until it ended "
            "(applied, failed, gave up, dropped), less the time its attempts ran on the server",
            labels=LABELS,
        )
        for key, counts in tallies:
            _observed(holds, list(key), counts.holds)
        yield holds
        if guard.admin is not None:
            up = GaugeMetricFamily(
                PREFIX + "guard_admin_connection_up",
                "1 while the guard's admin connection is open and usable, else 0",
            )
            up.add_metric([], 1 if guard.admin_up else 0)
            yield up


def _gauge(name: str, text: str, *extra: str) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, text, labels=[*LABELS, *extra])


def _observed(family: HistogramMetricFamily, labels: list[str], buckets: Buckets) -> None:
    cumulative = [(_bound(bound), float(count)) for bound, count in buckets.cumulative()]
    family.add_metric(labels, cumulative, buckets.sum)


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
