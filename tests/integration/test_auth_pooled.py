"""Logins the proxy checks itself (auth_type auth_query, auth_file, trust), with real clients:
SCRAM and md5 roles through psycopg, asyncpg and psql, the server connection logged in with the
ClientKey recovered from the client's proof (or the stored md5 hash), wrong passwords, unknown
users and expired roles refused with PostgreSQL's own 28P01, the admin connection down, the
auth_file re-read on reload, and no password, verifier or key in the proxy's log."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from pgmigrate_proxy.auth import scram
from pgmigrate_proxy.auth.authquery import FUNCTION_AUTH_QUERY, LOOKUP_FUNCTION_SQL
from pgmigrate_proxy.auth.backend import LoginFailed
from pgmigrate_proxy.auth.scram import ScramVerifier
from pgmigrate_proxy.protocol.framing import frame
from pgmigrate_proxy.protocol.messages import Authentication
from pgmigrate_proxy.protocol.types import AuthCode, BackendType, FrontendType
from pgmigrate_proxy.runtime.backend import ServerConnection
from psycopg import sql

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.integration.wire import WireClient
from tests.test_cli import run_module

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ProxyFactory = Callable[..., RunningProxy]
PSQL = shutil.which("psql")
EXPIRED = "pa_expired"
PLAIN = "pa_plain"
ADMIN = "pgmigrate_admin"
PASSWORDS = {EXPIRED: secrets.token_urlsafe(12), PLAIN: secrets.token_urlsafe(12)}
ADMIN_PASSWORD = secrets.token_urlsafe(12)


@pytest.fixture(scope="module")
def roles(pg: PgInfo) -> Iterator[PgInfo]:
    """An expired SCRAM role, a SCRAM role for a clear-text auth_file line, and the admin role
    with the SECURITY DEFINER lookup function (the README's setup)."""
    with pg.connect() as conn:
        for role, password, extra in (
            (EXPIRED, PASSWORDS[EXPIRED], " VALID UNTIL '2001-01-01'"),
            (PLAIN, PASSWORDS[PLAIN], ""),
            (ADMIN, ADMIN_PASSWORD, ""),
        ):
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}" + extra).format(
                    sql.Identifier(role), password
                )
            )
        conn.execute(LOOKUP_FUNCTION_SQL.encode())
    yield pg
    with pg.connect() as conn:
        conn.execute("DROP SCHEMA pgmigrate_auth CASCADE")
        for role in (EXPIRED, PLAIN, ADMIN):
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def stored(pg: PgInfo, user: str) -> str:
    with pg.connect() as conn:
        row = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = %s", (user,))
        value = row.fetchone()
    assert value is not None
    return str(value[0])


def password(pg: PgInfo, user: str) -> str:
    return PASSWORDS[user] if user in PASSWORDS else pg.password(user)


def current_user(proxy: RunningProxy, user: str, pw: str | None = None, **params: str) -> Any:
    conninfo = proxy.conninfo(user, pw, connect_timeout="10", **params)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute("SELECT current_user, pg_backend_pid()").fetchone()
        assert row is not None
        assert row[1] == conn.info.backend_pid  # the server's pid in the proxy's BackendKeyData
        return row[0]


async def asyncpg_error(url: str) -> tuple[str, str]:
    """(SQLSTATE, message) asyncpg's login ends with."""
    try:
        conn = await asyncpg.connect(url, timeout=10)
    except asyncpg.PostgresError as exc:
        return str(exc.sqlstate), str(exc)
    await conn.close()
    raise AssertionError("the login succeeded")


def login_error(url: str) -> tuple[str, str]:
    return asyncio.run(asyncio.wait_for(asyncpg_error(url), 30))


def assert_nothing_secret_logged(proxy_log: list[str], pg: PgInfo, *users: str) -> None:
    """No password, stored verifier or md5 hash, nor SCRAM key of these users in the log."""
    needles = []
    for user in users:
        pw = password(pg, user)
        kept = stored(pg, user)
        needles += [pw, kept]
        if kept.startswith("SCRAM-SHA-256$"):
            verifier = ScramVerifier.parse(kept)
            salted = scram.salted_password(pw, verifier.salt, verifier.iterations)
            for key in (scram.client_key(salted), verifier.stored_key, verifier.server_key):
                needles += [scram.b64(key), key.hex()]
        else:
            needles.append(kept[3:])
    leaked = [line for line in proxy_log if any(n in line for n in needles)]
    assert not leaked, f"a secret appears in the proxy log: {leaked[:3]}"


@pytest.fixture
def auth_query_proxy(proxy_factory: ProxyFactory, roles: PgInfo) -> RunningProxy:
    return proxy_factory(auth_type="auth_query")


@pytest.fixture
def function_proxy(proxy_factory: ProxyFactory, roles: PgInfo) -> RunningProxy:
    """auth_query through the SECURITY DEFINER function, as the unprivileged admin role."""
    admin = roles.url().replace(f"{roles.superuser}:", f"{ADMIN}:", 1)
    admin = admin.replace(roles.superuser_password, ADMIN_PASSWORD, 1)
    return proxy_factory(
        auth_type="auth_query", auth_query=FUNCTION_AUTH_QUERY, admin_upstream=admin
    )


# --- auth_query ----------------------------------------------------------------------------------


@pytest.mark.parametrize("user", ["u_scram", "u_md5"])
@pytest.mark.parametrize("how", ["default_query", "function"])
def test_auth_query_logins(
    request: pytest.FixtureRequest, pg: PgInfo, proxy_log: list[str], user: str, how: str
) -> None:
    proxy: RunningProxy = request.getfixturevalue(
        "auth_query_proxy" if how == "default_query" else "function_proxy"
    )
    assert current_user(proxy, user) == user
    assert current_user(proxy, user) == user  # a second login: a new server connection again

    async def with_asyncpg() -> str:
        conn = await asyncpg.connect(proxy.url(user), timeout=10)
        try:
            return str(await conn.fetchval("SELECT current_user"))
        finally:
            await conn.close()

    assert asyncio.run(asyncio.wait_for(with_asyncpg(), 30)) == user
    assert proxy.server.auth is not None and proxy.server.auth.secret(user) is not None
    assert_nothing_secret_logged(proxy_log, pg, user)


@pytest.mark.skipif(PSQL is None, reason="psql is not installed")
@pytest.mark.parametrize("user", ["u_scram", "u_md5"])
def test_psql_logs_in_through_auth_query(
    auth_query_proxy: RunningProxy, pg: PgInfo, user: str
) -> None:
    assert PSQL is not None
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env |= {"PGPASSWORD": pg.password(user), "PGCONNECT_TIMEOUT": "10", "LC_ALL": "C"}
    proxy = auth_query_proxy
    done = subprocess.run(
        [PSQL, "-X", "-At", "-h", proxy.host, "-p", str(proxy.port), "-U", user, "-d", "postgres",
         "-c", "SELECT current_user"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == user


@pytest.mark.parametrize("user", ["u_scram", "u_md5", "nobody_here", EXPIRED])
def test_refusals_are_postgresqls_own_28P01(
    auth_query_proxy: RunningProxy, pg: PgInfo, proxy_log: list[str], user: str
) -> None:
    """A wrong password, an unknown user and an expired role (with its right password) all get
    what PostgreSQL itself answers an unknown user."""
    pw = PASSWORDS[EXPIRED] if user == EXPIRED else f"wrong-{secrets.token_hex(6)}"
    proxy = auth_query_proxy
    through = login_error(f"postgresql://{user}:{pw}@{proxy.host}:{proxy.port}/postgres")
    direct = login_error(f"postgresql://{user}:{pw}@{pg.host}:{pg.port}/postgres")
    unknown = login_error(f"postgresql://nobody_here:{pw}@{pg.host}:{pg.port}/postgres")
    assert through == ("28P01", f'password authentication failed for user "{user}"')
    if user != "u_md5":  # PostgreSQL's own md5 line asks md5; the message is the same
        assert through == direct
    assert through[1].replace(user, "nobody_here") == unknown[1]
    assert_nothing_secret_logged(proxy_log, pg, "u_scram", "u_md5")
    assert not any(pw in line for line in proxy_log)


def test_unknown_user_and_wrong_password_get_the_same_exchange(
    auth_query_proxy: RunningProxy,
) -> None:
    """The same mechanism offer and a salt of the same shape and iteration count; the same salt
    for the same unknown name twice."""

    def first_message(user: str) -> tuple[list[str], str]:
        with WireClient(auth_query_proxy.host, auth_query_proxy.port) as client:
            client.startup(user)
            offer = Authentication.decode(client.read_message()[1])
            assert offer.code == AuthCode.SASL
            nonce = scram.b64(secrets.token_bytes(18))
            data = f"n,,n=,r={nonce}".encode()
            payload = b"SCRAM-SHA-256\0" + len(data).to_bytes(4, "big") + data
            client.send(frame(FrontendType.PASSWORD_MESSAGE, payload))
            cont = Authentication.decode(client.read_message()[1])
            assert cont.code == AuthCode.SASL_CONTINUE
            _, salt, iterations = cont.data.decode().split(",")
            return offer.mechanisms, f"{len(salt)}:{iterations}:{salt}"

    real = first_message("u_scram")
    ghost = first_message("nobody_here")
    assert real[0] == ghost[0] == ["SCRAM-SHA-256"]
    assert real[1].split(":")[:2] == ghost[1].split(":")[:2]
    assert first_message("nobody_here") == ghost


def test_oversized_sasl_message_is_a_protocol_violation(auth_query_proxy: RunningProxy) -> None:
    with WireClient(auth_query_proxy.host, auth_query_proxy.port) as client:
        client.startup("u_scram")
        assert client.read_message()[0] == BackendType.AUTHENTICATION
        client.send(frame(FrontendType.PASSWORD_MESSAGE, b"SCRAM-SHA-256\0" + b"x" * 2000))
        error = client.expect_error()
        client.expect_closed()
    assert error.code == "08P01"


def test_the_servers_own_refusal_reaches_the_client(auth_query_proxy: RunningProxy) -> None:
    """After AuthenticationOk, PostgreSQL's FATAL for the login (no such database) is relayed."""
    url = auth_query_proxy.url("u_scram", dbname="no_such_db")
    assert login_error(url) == ("3D000", 'database "no_such_db" does not exist')


def test_admin_connection_down(proxy_factory: ProxyFactory, roles: PgInfo) -> None:
    """auth_query without its admin connection: a clear error at once, not a hang."""
    proxy = proxy_factory(
        auth_type="auth_query", admin_upstream="host=127.0.0.1 port=1 user=nobody connect_timeout=2"
    )
    code, message = login_error(proxy.url("u_scram"))
    assert (code, message) == (
        "08006",
        'pgmigrate-proxy could not look up user "u_scram": the admin connection is unavailable',
    )


def test_auth_query_that_fails(proxy_factory: ProxyFactory, roles: PgInfo) -> None:
    proxy = proxy_factory(auth_type="auth_query", auth_query="SELECT * FROM no_such_fn($1)")
    code, message = login_error(proxy.url("u_scram"))
    assert (code, message) == (
        "08006",
        'pgmigrate-proxy could not look up user "u_scram": auth_query failed',
    )


def test_cancel_reaches_a_session_the_proxy_logged_in(
    auth_query_proxy: RunningProxy, pg: PgInfo
) -> None:
    app = "pgm-auth-cancel"
    conninfo = auth_query_proxy.conninfo("u_scram", connect_timeout="10", application_name=app)

    def cancel_once_running(conn: psycopg.Connection[Any]) -> None:
        with pg.connect() as watcher:
            while not watcher.execute(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = %s"
                " AND state = 'active' AND query LIKE 'SELECT pg_sleep%%'",
                (app,),
            ).fetchone():
                pass
        conn.cancel_safe(timeout=10)  # cancel() holds the GIL: the in-process proxy would stall

    with psycopg.connect(conninfo, autocommit=True) as conn:
        canceller = threading.Thread(target=cancel_once_running, args=(conn,))
        canceller.start()
        try:
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(30)")
        finally:
            canceller.join(30)
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_cached_secret_is_dropped_when_it_no_longer_logs_in(
    auth_query_proxy: RunningProxy, pg: PgInfo
) -> None:
    proxy = auth_query_proxy
    auth = proxy.server.auth
    assert auth is not None
    assert current_user(proxy, PLAIN, PASSWORDS[PLAIN]) == PLAIN
    opener = auth.opener(lambda: proxy.server.settings.upstream, "postgres", PLAIN)

    async def open_one() -> ServerConnection:
        server, told = await opener()
        assert told["session_authorization"] == PLAIN  # (its login's ParameterStatus)
        return server

    server = proxy.call(open_one())
    try:
        assert server.key is not None and server.listener is None and server.replies.idle
        with pg.connect() as conn:
            row = conn.execute(
                "SELECT usename FROM pg_stat_activity WHERE pid = %s", (server.key.process_id,)
            ).fetchone()
        assert row == (PLAIN,)
    finally:
        proxy.loop.call_soon_threadsafe(server.close)
    new = secrets.token_urlsafe(12)
    with pg.connect() as conn:
        conn.execute(sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(PLAIN), new))
    try:
        with pytest.raises(LoginFailed, match="password has changed"):
            proxy.call(open_one())
        assert auth.secret(PLAIN) is None
    finally:
        with pg.connect() as conn:
            conn.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(PLAIN), PASSWORDS[PLAIN])
            )


# --- auth_file and trust -------------------------------------------------------------------------


def write_auth_file(path: Path, pg: PgInfo) -> None:
    path.write_text(
        "; users of the pooled clients\n"
        f'"u_scram" "{stored(pg, "u_scram")}"\n'
        f'"u_md5" "{stored(pg, "u_md5")}"\n'
        f'"{PLAIN}" "{PASSWORDS[PLAIN]}"\n'
    )


@pytest.mark.parametrize("user", ["u_scram", "u_md5", PLAIN])
def test_auth_file_logins(
    proxy_factory: ProxyFactory, roles: PgInfo, tmp_path: Path, proxy_log: list[str], user: str
) -> None:
    path = tmp_path / "userlist.txt"
    write_auth_file(path, roles)
    proxy = proxy_factory(auth_type="auth_file", auth_file=str(path))
    assert current_user(proxy, user, password(roles, user)) == user
    code, message = login_error(proxy.url(user, password="wrong"))
    assert (code, message) == ("28P01", f'password authentication failed for user "{user}"')
    code, _ = login_error(proxy.url("u_trust", password="whatever"))  # not in the file
    assert code == "28P01"
    assert_nothing_secret_logged(proxy_log, roles, "u_scram", "u_md5", PLAIN)


def test_auth_file_is_read_again_on_reload(
    proxy_factory: ProxyFactory, roles: PgInfo, tmp_path: Path
) -> None:
    path = tmp_path / "userlist.txt"
    path.write_text(f'"u_md5" "{stored(roles, "u_md5")}"\n')
    proxy = proxy_factory(auth_type="auth_file", auth_file=str(path))
    assert login_error(proxy.url("u_scram"))[0] == "28P01"
    write_auth_file(path, roles)

    async def reload() -> list[str]:
        return proxy.server.reload(proxy.server.config)

    assert proxy.call(reload()) == []
    assert current_user(proxy, "u_scram") == "u_scram"
    auth = proxy.server.auth
    assert auth is not None and auth.secret("u_scram") is not None
    path.write_text(f'"u_md5" "{stored(roles, "u_md5")}"\n')  # u_scram taken out again
    assert proxy.call(reload()) == []
    assert proxy.server.auth is auth  # updated in place: the pools' openers hold it
    assert auth.secret("u_scram") is None  # its cached keys went with its line
    assert login_error(proxy.url("u_scram"))[0] == "28P01"


def test_trust(proxy_factory: ProxyFactory, roles: PgInfo, tmp_path: Path) -> None:
    """trust: no password asked; the server login uses the auth_file's md5 hash when the server
    wants one, nothing for a server that trusts the user."""
    path = tmp_path / "userlist.txt"
    path.write_text(f'"u_md5" "{stored(roles, "u_md5")}"\n')
    proxy = proxy_factory(auth_type="trust", auth_file=str(path))
    assert current_user(proxy, "u_trust", "") == "u_trust"
    assert current_user(proxy, "u_md5", "") == "u_md5"
    code, message = login_error(proxy.url("u_scram", password=""))
    assert code == "08001" and "holds none" in message


def test_a_bad_auth_file_exits_2_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "userlist.txt"
    path.write_text('"u_scram" "s3cret-in-file"\n"u_md5" s3cret-unquoted\n')
    done = run_module("--auth-type", "auth_file", "--auth-file", str(path), "--listen-port", "0")
    assert done.returncode == 2, done
    assert done.stderr == (
        f"pgmigrate-proxy: invalid auth_file: {path}:2: expected "
        '"user" "password" (a double-quoted password after the user)\n'
    )
    assert "s3cret" not in done.stderr + done.stdout
