"""Who is doing what in each pool, read from the live sessions and leases: a client's state,
a server connection's (pgbouncer's words), and their counts per pool (SHOW POOLS and the
metrics exporter both read them here)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from pgmigrate_proxy.runtime.pool import Lease, PoolRegistry
from pgmigrate_proxy.runtime.session import ClientSession, Phase

#: A server connection's states (server_state), in SHOW POOLS's order.
SERVER_STATES = ("active", "idle", "used", "tested", "login")
#: A pooled client's states (PoolCounts.clients): on a server, waiting for one, between
#: transactions with none (transaction pooling).
CLIENT_STATES = ("active", "waiting", "idle")


def waiting_since(session: ClientSession) -> float | None:
    """time.monotonic() when the session began waiting for a server (None: not waiting)."""
    link = session.link
    return link.waiting_since if link is not None and link.waiting_since else None


def client_state(session: ClientSession) -> str:
    """SHOW CLIENTS's state: login, closed, waiting (for a server) or active."""
    if session.phase is not Phase.RELAY:
        return "login" if session.phase is not Phase.CLOSED else "closed"
    return "waiting" if waiting_since(session) is not None else "active"


def server_state(lease: Lease) -> str:
    """active (a client's), idle, used (idle past server_check_delay: checked before its next
    use), tested (its check or check-in runs)."""
    pool = lease.pool
    if lease in pool.idle:
        delay = pool.settings.server_check_delay
        used = pool.settings.server_check_query and time.monotonic() - lease.idle_since >= delay
        return "used" if used else "idle"
    if lease.server.listener is lease:  # parked, not idle: its check or check-in runs
        return "tested"
    return "active"


def pool_clients(sessions: Iterable[ClientSession]) -> dict[tuple[str, str], list[ClientSession]]:
    """The sessions linked to a pool, by pool key (database, user)."""
    found: dict[tuple[str, str], list[ClientSession]] = {}
    for session in sessions:
        if session.link is not None:
            found.setdefault(session.link.pool.key, []).append(session)
    return found


@dataclass
class PoolCounts:
    """One pool's clients and server connections by state, now."""

    clients: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLIENT_STATES, 0))
    servers: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SERVER_STATES, 0))
    cancelling: int = 0  # server connections with a cancel request on its way
    oldest_wait: float | None = None  # time.monotonic() of the longest waiting client's start


def pool_counts(
    pools: PoolRegistry, sessions: Iterable[ClientSession]
) -> dict[tuple[str, str], PoolCounts]:
    """Every pool's counts, by pool key."""
    clients = pool_clients(sessions)
    found: dict[tuple[str, str], PoolCounts] = {}
    for key, pool in pools.pools.items():
        counts = found[key] = PoolCounts()
        for session in clients.get(key, ()):
            since = waiting_since(session)
            if since is not None:
                counts.clients["waiting"] += 1
                counts.oldest_wait = min(since, counts.oldest_wait or since)
            else:
                link = session.link  # (a lent server is idle in its pool: so is its client)
                active = session.server is not None and not (link is not None and link.lent)
                counts.clients["active" if active else "idle"] += 1
        for lease in pool.leases.values():
            counts.servers[server_state(lease)] += 1
            counts.cancelling += 1 if lease.cancels else 0
        counts.servers["login"] = pool.size_opening
    return found
