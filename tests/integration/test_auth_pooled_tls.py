"""Logins the proxy checks itself over TLS: SCRAM-SHA-256-PLUS with channel_binding=require on
the client's link (bound to the proxy's certificate), and on the proxy's own link to a TLS
PostgreSQL (bound to the server's certificate) with the recovered ClientKey."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import trustme
from psycopg.conninfo import make_conninfo

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.integration.test_tls import ProxyCert

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ProxyFactory = Callable[..., RunningProxy]


@pytest.fixture(scope="module")
def proxy_cert(tmp_path_factory: pytest.TempPathFactory) -> ProxyCert:
    """A certificate for the proxy (127.0.0.1 and localhost) and its CA."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    files = tmp_path_factory.mktemp("proxy-tls")
    certs = ProxyCert(files / "ca.pem", files / "proxy.crt", files / "proxy.key")
    ca.cert_pem.write_to_path(str(certs.ca_file))
    certs.cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(certs.key_file))
    return certs


def connect(proxy: RunningProxy, user: str, **params: str) -> psycopg.Connection[Any]:
    return psycopg.connect(proxy.conninfo(user, connect_timeout="10", **params), autocommit=True)


def server_link(conn: psycopg.Connection[Any]) -> Any:
    return conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()


@pytest.mark.parametrize("auth_type", ["auth_query", "auth_file"])
def test_channel_binding_require_to_the_proxy(
    proxy_factory: ProxyFactory,
    pg: PgInfo,
    proxy_cert: ProxyCert,
    tmp_path: Any,
    auth_type: str,
) -> None:
    extra: dict[str, str] = {}
    if auth_type == "auth_file":
        with pg.connect() as conn:
            row = conn.execute("SELECT rolpassword FROM pg_authid WHERE rolname = 'u_scram'")
            verifier = row.fetchone()
        assert verifier is not None
        path = tmp_path / "userlist.txt"
        path.write_text(f'"u_scram" "{verifier[0]}"\n')
        extra = {"auth_file": str(path)}
    proxy = proxy_factory(auth_type=auth_type, **proxy_cert.settings(), **extra)
    with connect(proxy, "u_scram", channel_binding="require", **proxy_cert.verify()) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT current_user").fetchone() == ("u_scram",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        connect(
            proxy, "u_scram", password="wrong", channel_binding="require", **proxy_cert.verify()
        )
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        connect(proxy, "u_scram", channel_binding="require", sslmode="disable")


def test_channel_binding_on_both_links(
    proxy_factory: ProxyFactory, pg_tls: PgInfo, proxy_cert: ProxyCert, proxy_log: list[str]
) -> None:
    """The ClientKey recovered on the client's TLS link logs in over the proxy's own TLS link
    with SCRAM-SHA-256-PLUS (what PostgreSQL offers there)."""
    upstream = make_conninfo(
        pg_tls.url(), sslmode="verify-full", sslrootcert=str(pg_tls.ca_file), host=pg_tls.host
    )
    proxy = proxy_factory(upstream, target=pg_tls, auth_type="auth_query", **proxy_cert.settings())
    with connect(proxy, "u_scram", channel_binding="require", **proxy_cert.verify()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("u_scram",)
        assert server_link(conn) == (True,)
    assert any(
        "server login as u_scram on postgres: SCRAM-SHA-256-PLUS" in line for line in proxy_log
    )
