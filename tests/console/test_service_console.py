"""RELOAD, SHUTDOWN and SHUTDOWN WAIT_FOR_CLIENTS from the admin console of a `pgmigrate-proxy`
process (the service: a config file to read again, a process to stop)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pgmigrate_proxy.embedded_postgres import libpq_url

from tests.fixtures.postgres import PgInfo
from tests.test_service import STEP_SECONDS, ProxyProcess, proxy_env

pytestmark = pytest.mark.integration


@pytest.fixture
def start_proxy() -> Iterator[Callable[..., ProxyProcess]]:
    """pgmigrate-proxy processes (tests/test_service.py's); killed at the end if still running."""
    started: list[ProxyProcess] = []

    def start(*args: str, **env: str) -> ProxyProcess:
        started.append(ProxyProcess(list(args), proxy_env(**env)))
        return started[-1]

    yield start
    for proxy in started:
        proxy.stop()
        print(f"--- proxy log (exit {proxy.proc.returncode}) ---\n{proxy.output()}")


def _console(pg: PgInfo, port: int) -> psycopg.Connection[Any]:
    url = libpq_url("127.0.0.1", port, pg.superuser, pg.superuser_password, "pgbouncer")
    return psycopg.connect(
        url, autocommit=True, connect_timeout=10, cursor_factory=psycopg.ClientCursor
    )


def _client(pg: PgInfo, port: int) -> psycopg.Connection[Any]:
    url = libpq_url("127.0.0.1", port, pg.superuser, pg.superuser_password)
    return psycopg.connect(url, autocommit=True, connect_timeout=10)


def test_reload_then_shutdown(
    pg: PgInfo, tmp_path: Path, start_proxy: Callable[..., ProxyProcess]
) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(f'listen_port = 0\nadmin_users = ["{pg.superuser}"]\n')
    proxy = start_proxy("--config", str(config), PGMIGRATE_PROXY_UPSTREAM=pg.url())
    port = proxy.port()
    with _console(pg, port) as admin:
        config.write_text(f'listen_port = 0\nadmin_users = ["{pg.superuser}"]\n'
                          "default_pool_size = 9\n")  # fmt: skip
        admin.execute("RELOAD")
        proxy.wait_for(r"RELOAD from the admin console: reloading the configuration")
        values = {row[0]: row[1] for row in admin.execute("SHOW CONFIG").fetchall()}
        assert values["default_pool_size"] == "9"
        with _client(pg, port) as conn:
            admin.execute("SHUTDOWN")
            # at once: the open client does not get shutdown_grace (30 s, > STEP_SECONDS)
            assert proxy.proc.wait(STEP_SECONDS) == 0
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
    proxy.wait_for(r"SHUTDOWN from the admin console: shutting down")


def test_shutdown_wait_for_clients(
    pg: PgInfo, tmp_path: Path, start_proxy: Callable[..., ProxyProcess]
) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(f'listen_port = 0\nshutdown_grace = 0\nadmin_users = ["{pg.superuser}"]\n')
    proxy = start_proxy("--config", str(config), PGMIGRATE_PROXY_UPSTREAM=pg.url())
    port = proxy.port()
    conn = _client(pg, port)
    with _console(pg, port) as admin:
        admin.execute("SHUTDOWN WAIT_FOR_CLIENTS")
    proxy.wait_for(r"SHUTDOWN from the admin console: shutting down")
    with pytest.raises(subprocess.TimeoutExpired):
        proxy.proc.wait(0.5)  # the client keeps it running, whatever shutdown_grace says
    assert conn.execute("SELECT 1").fetchone() == (1,)
    conn.close()
    assert proxy.proc.wait(STEP_SECONDS) == 0
