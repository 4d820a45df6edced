"""Authentication relayed through the proxy: trust, password, md5 and SCRAM-SHA-256 logins, the
server's own error for a wrong password, and no password in the proxy's log."""

from __future__ import annotations

import asyncio
import secrets

import asyncpg
import psycopg
import pytest
from pgmigrate_proxy.protocol.framing import frame
from pgmigrate_proxy.protocol.messages import Authentication
from pgmigrate_proxy.protocol.types import AuthCode, BackendType, FrontendType

from tests.fixtures.postgres import AUTH_METHODS, PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.integration.wire import WireClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

PASSWORD_USERS = [user for user, method in AUTH_METHODS.items() if method != "trust"]


def assert_not_logged(proxy_log: list[str], *secrets_: str) -> None:
    leaked = [line for line in proxy_log if any(s in line for s in secrets_)]
    assert not leaked, f"a password appears in the proxy log: {leaked[:3]}"


@pytest.mark.parametrize("user", list(AUTH_METHODS))
def test_login_with_each_method(
    proxy: RunningProxy, pg: PgInfo, proxy_log: list[str], user: str
) -> None:
    with psycopg.connect(proxy.conninfo(user, connect_timeout="10")) as conn:
        row = conn.execute("SELECT current_user, pg_backend_pid()").fetchone()
        assert row == (user, conn.info.backend_pid)

    async def with_asyncpg() -> str:
        conn = await asyncpg.connect(proxy.url(user), timeout=10)
        try:
            return str(await conn.fetchval("SELECT current_user"))
        finally:
            await conn.close()

    assert asyncio.run(asyncio.wait_for(with_asyncpg(), 30)) == user
    assert any("ready as user" in line for line in proxy_log), proxy_log
    assert_not_logged(proxy_log, pg.password(user))


@pytest.mark.parametrize("user", PASSWORD_USERS)
def test_wrong_password_gets_the_servers_error(
    proxy: RunningProxy, pg: PgInfo, proxy_log: list[str], user: str
) -> None:
    wrong = f"wrong-{secrets.token_hex(8)}"
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(proxy.conninfo(user, password=wrong, connect_timeout="10"))

    async def with_asyncpg() -> None:
        await asyncpg.connect(proxy.url(user, password=wrong), timeout=10)

    with pytest.raises(asyncpg.InvalidPasswordError) as refused:
        asyncio.run(asyncio.wait_for(with_asyncpg(), 30))
    assert refused.value.sqlstate == "28P01"
    assert_not_logged(proxy_log, wrong, pg.password(user))


def test_wrong_cleartext_password_on_the_wire(
    proxy: RunningProxy, pg: PgInfo, proxy_log: list[str]
) -> None:
    wrong = f"wrong-{secrets.token_hex(8)}"
    with WireClient(proxy.host, proxy.port) as client:
        client.startup("u_password")
        mtype, payload = client.read_message()
        assert mtype == BackendType.AUTHENTICATION
        assert Authentication.decode(payload).code == AuthCode.CLEARTEXT_PASSWORD
        client.send(frame(FrontendType.PASSWORD_MESSAGE, wrong.encode() + b"\0"))
        error = client.expect_error()
        assert (error.severity, error.code) == ("FATAL", "28P01")
        assert 'password authentication failed for user "u_password"' in error.message
        client.expect_closed()
    assert_not_logged(proxy_log, wrong, pg.password("u_password"))
