"""What the integration tests observe from outside: polling, the proxy's loop, fds, backends."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psycopg

from tests.fixtures.proxy import RunningProxy

T = TypeVar("T")

POLL_SECONDS = 0.02


def wait_until(check: Callable[[], T], what: str, timeout: float = 10.0) -> T:
    """Poll `check` until it returns something truthy (returned); fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:g} s waiting for {what} (last: {result!r})"
            )
        time.sleep(POLL_SECONDS)


def active_sessions(proxy: RunningProxy) -> int:
    """The proxy's active_sessions, read on its own loop."""

    async def read() -> int:
        return proxy.server.active_sessions

    return proxy.call(read())


def proxy_tasks(proxy: RunningProxy) -> list[str]:
    """The tasks alive on the proxy's loop, apart from the one asking."""

    async def read() -> list[str]:
        me = asyncio.current_task()
        return [repr(task) for task in asyncio.all_tasks() if task is not me]

    return proxy.call(read())


def session_status(proxy: RunningProxy) -> str:
    """The transaction status the proxy tracks for its only session ('I', 'T' or 'E')."""

    async def read() -> str:
        sessions = list(proxy.server._sessions)
        assert len(sessions) == 1, f"expected one session, found {len(sessions)}"
        return chr(sessions[0].status)

    return proxy.call(read())


def open_fds() -> int:
    """How many file descriptors this process (tests and in-process proxy alike) has open."""
    return len(os.listdir("/proc/self/fd"))


def close_idle_servers(proxy: RunningProxy) -> bool:
    """Close the servers idle in the proxy's pools (a client that left cleanly leaves its
    server there); True, for use inside a wait_until condition."""

    async def close() -> bool:
        proxy.server.pools.close_idle()
        return True

    return proxy.call(close())


def backend_exists(admin: psycopg.Connection[Any], pid: int) -> bool:
    row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()
    return bool(row and row[0])


def active_query_pid(admin: psycopg.Connection[Any], application_name: str) -> int | None:
    """The pid of the backend of `application_name` while it runs a statement, else None."""
    row = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s AND state = 'active'",
        [application_name],
    ).fetchone()
    return int(row[0]) if row else None


def assert_proxy_settles(
    proxy: RunningProxy,
    admin: psycopg.Connection[Any],
    backend_pid: int | None,
    fd_baseline: int,
) -> None:
    """No session, no server backend (if one was known), no task on the proxy's loop, no fd
    above the baseline."""
    wait_until(lambda: active_sessions(proxy) == 0, "active_sessions to return to 0")
    if backend_pid is not None:
        pid = backend_pid
        wait_until(
            lambda: close_idle_servers(proxy) and not backend_exists(admin, pid),
            f"backend {pid} to exit",
        )
    wait_until(lambda: not proxy_tasks(proxy), "the proxy's tasks to finish")
    close_idle_servers(proxy)
    try:
        wait_until(lambda: open_fds() <= fd_baseline, f"open fds to return to {fd_baseline}")
    except AssertionError:
        raise AssertionError(
            f"open fds {open_fds()} > baseline {fd_baseline}: {fd_targets()}"
        ) from None


def fd_targets() -> list[str]:
    """What each open fd points to (for failure messages)."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            targets.append(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            continue
    return targets
