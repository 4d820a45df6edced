"""Logins the proxy checks itself, in transaction pooling: SCRAM and md5 roles through
auth_query and auth_file share a small pool whose servers the proxy logs in itself (with the
ClientKey recovered from a proof, or the md5 hash); a wrong password and an unknown user get the
same 28P01, an expired role is refused."""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.integration.test_auth_pooled import (
    EXPIRED,
    PASSWORDS,
    assert_nothing_secret_logged,
    login_error,
    roles,
    write_auth_file,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

__all__ = ["roles"]  # (the fixture, used by name)

ProxyFactory = Callable[..., RunningProxy]
POOL_SIZE = 2
CLIENTS = 6


def pooling_proxy(factory: ProxyFactory, how: str, tmp_path: Path, pg: PgInfo) -> RunningProxy:
    settings: dict[str, Any] = {"pool_mode": "transaction", "default_pool_size": POOL_SIZE}
    if how == "auth_query":
        return factory(auth_type="auth_query", **settings)
    path = tmp_path / "userlist.txt"
    write_auth_file(path, pg)
    return factory(auth_type="auth_file", auth_file=str(path), **settings)


def server_pids(pg: PgInfo, user: str) -> set[int]:
    with pg.connect() as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE usename = %s"
            " AND backend_type = 'client backend'",
            [user],
        ).fetchall()
    return {row[0] for row in rows}


@pytest.mark.parametrize("user", ["u_scram", "u_md5"])
@pytest.mark.parametrize("how", ["auth_query", "auth_file"])
def test_clients_share_servers_the_proxy_logs_in(
    proxy_factory: ProxyFactory, roles: PgInfo, tmp_path: Path, proxy_log: list[str],
    user: str, how: str,
) -> None:  # fmt: skip
    proxy = pooling_proxy(proxy_factory, how, tmp_path, roles)
    conninfo = proxy.conninfo(user, connect_timeout="10")
    clients = [psycopg.connect(conninfo, autocommit=True) for _ in range(CLIENTS)]
    for conn in clients:
        conn.prepare_threshold = None

    async def close_idle() -> int:
        return proxy.server.pools.close_idle()

    proxy.call(close_idle())  # the login servers gone: the pool logs its own in
    failures: list[BaseException] = []
    seen: set[int] = set()

    def work(conn: psycopg.Connection[Any]) -> None:
        try:
            for i in range(20):
                with conn.transaction():
                    row = conn.execute("SELECT current_user, %s::int, pg_backend_pid()", [i])
                    found = row.fetchone()
                    assert found is not None and found[:2] == (user, i)
                    seen.add(found[2])
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=work, args=(conn,)) for conn in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[:3]
    assert 1 <= len(seen) <= POOL_SIZE
    assert len(server_pids(roles, user)) <= POOL_SIZE
    for conn in clients:
        conn.close()
    assert_nothing_secret_logged(proxy_log, roles, user)


@pytest.mark.parametrize("how", ["auth_query", "auth_file"])
def test_refusals_in_transaction_mode(
    proxy_factory: ProxyFactory, roles: PgInfo, tmp_path: Path, how: str
) -> None:
    proxy = pooling_proxy(proxy_factory, how, tmp_path, roles)
    wrong = f"wrong-{secrets.token_hex(6)}"
    for user in ("u_scram", "u_md5", "nobody_here"):
        code, message = login_error(proxy.url(user, password=wrong))
        assert (code, message) == ("28P01", f'password authentication failed for user "{user}"')
    if how == "auth_query":  # (the auth_file has no expired role: the file is the authority)
        code, message = login_error(proxy.url(EXPIRED, password=PASSWORDS[EXPIRED]))
        assert (code, message) == ("28P01", f'password authentication failed for user "{EXPIRED}"')
    with psycopg.connect(proxy.conninfo("u_scram", connect_timeout="10"), autocommit=True) as ok:
        assert ok.execute("SELECT current_user").fetchone() == ("u_scram",)


def test_logins_open_no_server_once_the_pool_knows_its_parameters(
    proxy_factory: ProxyFactory, roles: PgInfo, tmp_path: Path
) -> None:
    """Logins the proxy checks itself, in transaction mode, are answered from the pool's
    server parameters: many clients logging in at once through auth_file never make more than
    the pool's servers; each is told its own application_name and the server's values, and a
    cancel right after such a login reaches the server its query runs on."""
    proxy = pooling_proxy(proxy_factory, "auth_file", tmp_path, roles)
    user, logins = "u_scram", 12
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, len(server_pids(roles, user)))

    sampler = threading.Thread(target=sample)
    sampler.start()
    clients: list[psycopg.Connection[Any]] = []
    failures: list[BaseException] = []

    def log_in(i: int) -> None:
        try:
            conninfo = proxy.conninfo(user, connect_timeout="10", application_name=f"app{i}")
            clients.append(psycopg.connect(conninfo, autocommit=True))
        except BaseException as exc:
            failures.append(exc)

    try:
        threads = [threading.Thread(target=log_in, args=(i,)) for i in range(logins)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not failures, failures[:3]
        for conn in clients:
            name = conn.info.parameter_status("application_name")
            assert name is not None and name.startswith("app")
            assert conn.execute("SHOW application_name").fetchone() == (name,)
            assert conn.info.parameter_status("server_version")
            assert conn.info.parameter_status("session_authorization") == user
    finally:
        stop.set()
        sampler.join()
    assert 1 <= peak <= POOL_SIZE
    with psycopg.connect(proxy.conninfo(user, connect_timeout="10"), autocommit=True) as conn:
        assert conn.info.parameter_status("application_name") == ""
        caught: list[BaseException] = []

        def sleep() -> None:
            try:
                conn.execute("SELECT pg_sleep(60)")
            except BaseException as exc:
                caught.append(exc)

        sleeper = threading.Thread(target=sleep)
        sleeper.start()
        with roles.connect() as admin:
            while not admin.execute(
                "SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'"
                " AND state = 'active'"
            ).fetchone():
                pass
        conn.cancel_safe()
        sleeper.join()
        assert caught and isinstance(caught[0], psycopg.errors.QueryCanceled)
        assert conn.execute("SELECT 1").fetchone() == (1,)
    for conn in clients:
        conn.close()
