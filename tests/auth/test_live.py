"""The authentication modules against real PostgreSQL and a real client: libpq (psycopg) logs
in to a small asyncio server that checks it with ClientAuthenticator against the verifier
auth_query reads from pg_authid, and the ClientKey (or md5 hash) recovered there logs in to
PostgreSQL over a raw socket; wrong passwords, unknown users and expired roles all get
PostgreSQL's own 28P01 error, after the same exchange."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import trustme
from pgmigrate_proxy.auth import scram
from pgmigrate_proxy.auth.authquery import (
    DEFAULT_AUTH_QUERY,
    FUNCTION_AUTH_QUERY,
    LOOKUP_FUNCTION_SQL,
    credential_from_row,
)
from pgmigrate_proxy.auth.channel_binding import tls_server_end_point
from pgmigrate_proxy.auth.credentials import (
    UNKNOWN,
    Md5Hash,
    Plain,
    StoredCredential,
    Unknown,
)
from pgmigrate_proxy.auth.frontend import Outcome
from pgmigrate_proxy.auth.scram import ScramKeys, ScramVerifier
from pgmigrate_proxy.protocol.types import AuthCode
from psycopg import sql
from psycopg.conninfo import make_conninfo

from tests.auth.harness import AuthHarness, Login, login_raw
from tests.fixtures.postgres import PgInfo

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

EXPIRED = "auth_expired"
EXPIRED_PASSWORD = "expired-pw"
NO_PASSWORD = "auth_no_password"
ADMIN = "pgmigrate_admin"
ADMIN_PASSWORD = "admin-pw"


@pytest.fixture(scope="module")
def roles(pg: PgInfo) -> Iterator[PgInfo]:
    """An expired SCRAM role, a role without a password, and the admin role with the SECURITY
    DEFINER lookup function."""
    with pg.connect() as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(NO_PASSWORD)))
        for role, extra in ((EXPIRED, "VALID UNTIL '2001-01-01'"), (ADMIN, "")):
            password = EXPIRED_PASSWORD if role == EXPIRED else ADMIN_PASSWORD
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} " + extra).format(
                    sql.Identifier(role), password
                )
            )
        conn.execute(LOOKUP_FUNCTION_SQL.encode())
    yield pg
    with pg.connect() as conn:
        conn.execute("DROP SCHEMA pgmigrate_auth CASCADE")
        conn.execute(f"DROP ROLE {EXPIRED}")
        conn.execute(f"DROP ROLE {ADMIN}")
        conn.execute(f"DROP ROLE {NO_PASSWORD}")


def auth_query(pg: PgInfo, user: str, query: str = DEFAULT_AUTH_QUERY, **as_: str) -> Any:
    """auth_query's first row for `user` (None: no row), `$1` bound as a parameter."""
    with pg.connect(**as_) as conn:
        return psycopg.RawCursor(conn).execute(query, (user,)).fetchone()


def lookup(pg: PgInfo) -> Any:
    def find(user: str) -> StoredCredential | Unknown:
        return credential_from_row(user, auth_query(pg, user))

    return find


def conninfo(port: int, user: str, password: str) -> str:
    return make_conninfo(
        host="127.0.0.1", port=port, user=user, password=password, dbname="postgres",
        sslmode="disable", gssencmode="disable", connect_timeout="10",
    )  # fmt: skip


def through_harness(pg: PgInfo, user: str, password: str) -> tuple[Login, str]:
    """libpq's login to the harness: what the harness saw, and libpq's error ("" if none)."""

    async def scenario() -> tuple[AuthHarness, str]:
        async with AuthHarness(lookup(pg)).running() as harness:
            try:
                conn = await psycopg.AsyncConnection.connect(conninfo(harness.port, user, password))
            except psycopg.OperationalError as exc:
                return harness, fatal_text(exc)
            await conn.close()
            return harness, ""

    harness, error = asyncio.run(scenario())
    (login,) = harness.logins
    return login, error


def fatal_text(exc: Exception) -> str:
    text = str(exc)
    return text[text.index("FATAL:") :].strip()


def direct_error(pg: PgInfo, user: str, password: str) -> str:
    """PostgreSQL's own error for this login (its pg_hba asks every role here for a password)."""
    with pytest.raises(psycopg.OperationalError) as caught:
        psycopg.connect(conninfo(pg.port, user, password))
    return fatal_text(caught.value)


def test_scram_login_recovers_the_client_key_that_logs_in_to_postgresql(pg: PgInfo) -> None:
    password = pg.password("u_scram")
    login, error = through_harness(pg, "u_scram", password)
    assert error == ""
    assert (login.outcome, login.method, login.messages) == (Outcome.ACCEPTED, AuthCode.SASL, 2)
    keys = login.secret
    assert isinstance(keys, ScramKeys)
    verifier = ScramVerifier.parse(auth_query(pg, "u_scram")[1])
    salted = scram.salted_password(password, verifier.salt, verifier.iterations)
    assert keys == verifier.keys(scram.client_key(salted))
    assert login_raw(pg.host, pg.port, "u_scram", keys) == ("SCRAM-SHA-256", "u_scram")


def test_md5_login_and_the_stored_hash_logs_in_to_postgresql(pg: PgInfo) -> None:
    login, error = through_harness(pg, "u_md5", pg.password("u_md5"))
    assert error == ""
    assert (login.outcome, login.method) == (Outcome.ACCEPTED, AuthCode.MD5_PASSWORD)
    assert login.secret == Md5Hash(auth_query(pg, "u_md5")[1])
    assert login_raw(pg.host, pg.port, "u_md5", login.secret) == ("", "u_md5")


@pytest.mark.parametrize(
    ("user", "password"),
    [
        ("u_scram", "wrong"),  # wrong SCRAM password
        ("u_md5", "wrong"),  # wrong md5 password
        ("no_such_user", "wrong"),  # unknown user
        (NO_PASSWORD, "wrong"),  # a role without a password
        (EXPIRED, EXPIRED_PASSWORD),  # the right password of an expired role
    ],
)
def test_refused_logins_get_postgresqls_own_error(roles: PgInfo, user: str, password: str) -> None:
    login, error = through_harness(roles, user, password)
    assert error == f'FATAL:  password authentication failed for user "{user}"'
    assert error == direct_error(roles, user, password)
    assert login.outcome is Outcome.REFUSED and login.secret is None
    # the whole exchange ran, proof included: the refusal comes at the same step
    assert login.messages == (1 if user == "u_md5" else 2)


def test_unknown_expired_and_wrong_password_go_through_the_same_scram_exchange(
    roles: PgInfo,
) -> None:
    seen = [through_harness(roles, user, "wrong")[0] for user in ("u_scram", "nobody", EXPIRED)]
    assert {(s.method, s.messages, s.outcome) for s in seen} == {
        (AuthCode.SASL, 2, Outcome.REFUSED)
    }


def test_the_expired_role_is_refused_by_auth_query(roles: PgInfo) -> None:
    assert auth_query(roles, EXPIRED) == (EXPIRED, None)
    assert credential_from_row(EXPIRED, auth_query(roles, EXPIRED)) is UNKNOWN


def test_the_security_definer_function_answers_as_the_default_query(roles: PgInfo) -> None:
    admin = {"user": ADMIN, "password": ADMIN_PASSWORD}
    info = make_conninfo(roles.direct_conninfo(), **admin)
    with psycopg.connect(info, autocommit=True) as conn:
        cursor = psycopg.RawCursor(conn)
        for user in ("u_scram", "u_md5", EXPIRED):
            expected = auth_query(roles, user)
            assert cursor.execute(FUNCTION_AUTH_QUERY, (user,)).fetchone() == expected
        assert cursor.execute(FUNCTION_AUTH_QUERY, ("nobody",)).fetchone() == (None, None)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            cursor.execute(DEFAULT_AUTH_QUERY, ("u_scram",))
    # nobody else may call it
    other = make_conninfo(roles.direct_conninfo("u_scram"))
    refused = pytest.raises(psycopg.errors.InsufficientPrivilege)
    with psycopg.connect(other, autocommit=True) as conn, refused:
        psycopg.RawCursor(conn).execute(FUNCTION_AUTH_QUERY, ("u_scram",))


@pytest.mark.parametrize(
    ("user", "mechanism"),
    [("u_scram", "SCRAM-SHA-256"), ("u_md5", ""), ("u_password", "")],
)
def test_clear_text_auth_file_passwords_log_in_with_every_method(
    pg: PgInfo, user: str, mechanism: str
) -> None:
    """An auth_file password in clear text answers SCRAM, md5 and password requests."""
    secret = Plain(pg.password(user))
    assert login_raw(pg.host, pg.port, user, secret) == (mechanism, user)


def test_recovered_client_key_logs_in_with_channel_binding(pg_tls: PgInfo) -> None:
    """Over TLS, PostgreSQL offers SCRAM-SHA-256-PLUS: the keys bind to its certificate."""
    verifier = ScramVerifier.parse(auth_query(pg_tls, "u_scram")[1])
    salted = scram.salted_password(pg_tls.password("u_scram"), verifier.salt, verifier.iterations)
    keys = verifier.keys(scram.client_key(salted))
    assert pg_tls.ca_file is not None
    context = ssl.create_default_context(cafile=str(pg_tls.ca_file))
    used = login_raw(pg_tls.host, pg_tls.port, "u_scram", keys, tls=context)
    assert used == ("SCRAM-SHA-256-PLUS", "u_scram")


def test_libpq_requiring_channel_binding_logs_in_over_tls(pg: PgInfo) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())

    async def scenario(info: str) -> AuthHarness:
        harness = AuthHarness(lookup(pg), tls=context, tls_end_point=tls_server_end_point(der))
        async with harness.running():
            info = make_conninfo(info, port=harness.port)
            conn = await psycopg.AsyncConnection.connect(info)
            assert conn.pgconn.ssl_in_use
            await conn.close()
        return harness

    with ca.cert_pem.tempfile() as ca_file:
        info = conninfo(0, "u_scram", pg.password("u_scram"))
        tls = {"sslmode": "verify-full", "sslrootcert": ca_file, "channel_binding": "require"}
        harness = asyncio.run(scenario(make_conninfo(info, **tls)))
    (login,) = harness.logins
    assert login.outcome is Outcome.ACCEPTED and isinstance(login.secret, ScramKeys)
    assert login_raw(pg.host, pg.port, "u_scram", login.secret)[1] == "u_scram"
