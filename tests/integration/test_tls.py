"""TLS on both links: clients to the proxy (a trustme certificate), the proxy to PostgreSQL in
each sslmode, and SCRAM channel binding, which cannot span the proxy's two TLS channels."""

from __future__ import annotations

import contextlib
import secrets
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trustme
from pgmigrate_proxy.protocol.framing import frame
from pgmigrate_proxy.protocol.messages import Authentication
from pgmigrate_proxy.protocol.types import AuthCode, BackendType, FrontendType
from psycopg.conninfo import make_conninfo

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy
from tests.integration.probes import active_query_pid, active_sessions, open_fds, wait_until
from tests.integration.wire import WireClient

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

ProxyFactory = Callable[..., RunningProxy]


@dataclass(frozen=True)
class ProxyCert:
    """A certificate for the proxy's client side (127.0.0.1 and localhost) and its CA."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def settings(self) -> dict[str, str]:
        """Proxy settings that serve this certificate."""
        return {
            "client_tls_cert_file": str(self.cert_file),
            "client_tls_key_file": str(self.key_file),
        }

    def verify(self) -> dict[str, str]:
        """Client parameters that verify the proxy's certificate."""
        return {"sslmode": "verify-full", "sslrootcert": str(self.ca_file)}

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest.fixture(scope="module")
def proxy_cert(tmp_path_factory: pytest.TempPathFactory) -> ProxyCert:
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    files = tmp_path_factory.mktemp("proxy-tls")
    certs = ProxyCert(files / "ca.pem", files / "proxy.crt", files / "proxy.key")
    ca.cert_pem.write_to_path(str(certs.ca_file))
    certs.cert_file.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(certs.key_file))
    return certs


@pytest.fixture(scope="module")
def other_ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA that signed neither server's certificate."""
    path = tmp_path_factory.mktemp("other-ca") / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return path


def local_alias() -> str | None:
    """A host name other than localhost that resolves to 127.0.0.1 (not in any test certificate)."""
    name = socket.gethostname()
    with contextlib.suppress(OSError):
        if name not in ("localhost", "127.0.0.1") and socket.gethostbyname(name) == "127.0.0.1":
            return name
    return None


def upstream(pg_tls: PgInfo, host: str | None = None, **params: str) -> str:
    """A conninfo from the proxy to pg_tls as its superuser, with these libpq parameters."""
    return make_conninfo(pg_tls.url(), host=host or pg_tls.host, **params)


def connect(
    proxy: RunningProxy, user: str = "u_trust", host: str | None = None, **params: str
) -> psycopg.Connection[Any]:
    """psycopg through the proxy; `host` names the proxy's address otherwise (e.g. localhost)."""
    conninfo = proxy.conninfo(user, connect_timeout="10", **params)
    if host is not None:
        conninfo = make_conninfo(conninfo, host=host)
    return psycopg.connect(conninfo, autocommit=True)


def server_link_is_tls(conn: psycopg.Connection[Any]) -> bool:
    row = conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone()
    assert row is not None
    return bool(row[0])


def refusal(proxy: RunningProxy, user: str = "u_trust") -> tuple[str, str]:
    """Start up on the wire and return the (SQLSTATE, message) the connection ends with."""
    with WireClient(proxy.host, proxy.port) as client:
        client.startup(user)
        error = client.expect_error()
        client.expect_closed()
    assert error.severity == "FATAL"
    return error.code, error.message


# --- clients to the proxy ------------------------------------------------------------------------


def test_client_tls_verify_full(proxy_factory: ProxyFactory, proxy_cert: ProxyCert) -> None:
    proxy = proxy_factory(**proxy_cert.settings())
    for host in ("127.0.0.1", "localhost"):
        with connect(proxy, host=host, **proxy_cert.verify()) as conn:
            assert conn.pgconn.ssl_in_use
            assert conn.execute("SELECT 1").fetchone() == (1,)
    with connect(proxy, sslmode="disable") as plain:  # client_tls_mode auto = allow
        assert not plain.pgconn.ssl_in_use


def test_client_tls_wrong_ca_is_refused_by_the_client(
    proxy_factory: ProxyFactory, proxy_cert: ProxyCert, other_ca_file: Path
) -> None:
    proxy = proxy_factory(**proxy_cert.settings())
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        connect(proxy, sslmode="verify-ca", sslrootcert=str(other_ca_file))


def test_client_tls_require_refuses_plain_clients(
    proxy_factory: ProxyFactory, proxy_cert: ProxyCert
) -> None:
    proxy = proxy_factory(client_tls_mode="require", **proxy_cert.settings())
    with pytest.raises(psycopg.OperationalError, match="requires TLS"):
        connect(proxy, sslmode="disable")
    code, message = refusal(proxy)
    assert code == "28000" and "requires TLS" in message
    with connect(proxy, sslmode="require") as conn:
        assert conn.pgconn.ssl_in_use


# --- the proxy to PostgreSQL ---------------------------------------------------------------------


def test_upstream_sslmode_disable_is_rejected_by_the_server(
    proxy_factory: ProxyFactory, pg_tls: PgInfo
) -> None:
    proxy = proxy_factory(
        upstream(pg_tls, sslmode="disable"),
        target=pg_tls,
        admin_upstream=upstream(pg_tls, sslmode="require"),  # else the proxy would not start
    )
    code, message = refusal(proxy)
    assert code == "28000"
    assert "pg_hba.conf rejects connection" in message and "no encryption" in message


@pytest.mark.parametrize("sslmode", ["prefer", "require", "verify-ca", "verify-full"])
def test_upstream_tls_modes(proxy_factory: ProxyFactory, pg_tls: PgInfo, sslmode: str) -> None:
    params = {"sslmode": sslmode}
    if sslmode.startswith("verify"):
        params["sslrootcert"] = str(pg_tls.ca_file)
    proxy = proxy_factory(upstream(pg_tls, **params), target=pg_tls)
    with connect(proxy) as conn:
        assert server_link_is_tls(conn)
        assert not conn.pgconn.ssl_in_use  # the client's own link stays plain


def test_upstream_verify_ca_with_the_wrong_ca(
    proxy_factory: ProxyFactory, pg_tls: PgInfo, other_ca_file: Path
) -> None:
    proxy = proxy_factory(
        upstream(pg_tls, sslmode="verify-ca", sslrootcert=str(other_ca_file)), target=pg_tls
    )
    code, message = refusal(proxy)
    assert code == "08006"
    assert "TLS handshake with PostgreSQL failed" in message
    assert "certificate verify failed" in message
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        connect(proxy)


def test_upstream_verify_full_checks_the_host_name(
    proxy_factory: ProxyFactory, pg_tls: PgInfo
) -> None:
    alias = local_alias()
    if alias is None:
        pytest.skip("no host name other than localhost resolves to 127.0.0.1")
    rootcert = str(pg_tls.ca_file)
    lenient = proxy_factory(
        upstream(pg_tls, host=alias, sslmode="verify-ca", sslrootcert=rootcert), target=pg_tls
    )
    with connect(lenient) as conn:
        assert server_link_is_tls(conn)
    strict = proxy_factory(
        upstream(pg_tls, host=alias, sslmode="verify-full", sslrootcert=rootcert), target=pg_tls
    )
    code, message = refusal(strict)
    assert code == "08006"
    assert "TLS handshake with PostgreSQL failed" in message
    assert "mismatch" in message and alias in message


# --- SCRAM over TLS on both links ----------------------------------------------------------------


@pytest.fixture
def tls_both(proxy_factory: ProxyFactory, pg_tls: PgInfo, proxy_cert: ProxyCert) -> RunningProxy:
    """A proxy with TLS towards its clients and verify-full towards pg_tls."""
    return proxy_factory(
        upstream(pg_tls, sslmode="verify-full", sslrootcert=str(pg_tls.ca_file)),
        target=pg_tls,
        **proxy_cert.settings(),
    )


def test_scram_without_channel_binding_over_both_links(
    tls_both: RunningProxy, proxy_cert: ProxyCert
) -> None:
    with connect(tls_both, "u_scram", channel_binding="disable", **proxy_cert.verify()) as conn:
        assert conn.pgconn.ssl_in_use
        assert server_link_is_tls(conn)
        assert conn.execute("SELECT current_user").fetchone() == ("u_scram",)


def test_scram_channel_binding_require_fails(tls_both: RunningProxy, proxy_cert: ProxyCert) -> None:
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        connect(tls_both, "u_scram", channel_binding="require", **proxy_cert.verify())


def test_scram_channel_binding_prefer_gets_the_proxys_hint(
    tls_both: RunningProxy, proxy_cert: ProxyCert
) -> None:
    with pytest.raises(psycopg.OperationalError) as refused:
        connect(tls_both, "u_scram", channel_binding="prefer", **proxy_cert.verify())
    assert "channel binding cannot span the proxy" in str(refused.value)

    # the same on the wire: no PLUS mechanism is offered, and gs2 flag "y" gets 28000 + hint
    with WireClient(tls_both.host, tls_both.port) as client:
        client.start_tls(proxy_cert.context(), "127.0.0.1")
        client.startup("u_scram")
        mtype, payload = client.read_message()
        assert mtype == BackendType.AUTHENTICATION
        offer = Authentication.decode(payload)
        assert offer.code == AuthCode.SASL and offer.mechanisms == ["SCRAM-SHA-256"]
        first = b"y,,n=,r=" + secrets.token_urlsafe(18).encode()
        body = b"SCRAM-SHA-256\0" + len(first).to_bytes(4, "big") + first
        client.send(frame(FrontendType.PASSWORD_MESSAGE, body))
        error = client.expect_error()
        client.expect_closed()
    assert error.code == "28000"
    assert error.fields.get("H") == "connect with channel_binding=disable"


def test_scram_channel_binding_prefer_with_a_plain_server_link(
    proxy_factory: ProxyFactory, proxy_cert: ProxyCert
) -> None:
    proxy = proxy_factory(**proxy_cert.settings())  # in front of `pg`, which has no TLS
    with connect(proxy, "u_scram", channel_binding="prefer", **proxy_cert.verify()) as conn:
        assert conn.pgconn.ssl_in_use
        assert not server_link_is_tls(conn)


def test_cancel_over_a_tls_client_link(
    proxy_factory: ProxyFactory, proxy_cert: ProxyCert, admin: psycopg.Connection[Any]
) -> None:
    """libpq 17+ sends its CancelRequest inside TLS too when the session uses TLS."""
    proxy = proxy_factory(client_tls_mode="require", **proxy_cert.settings())
    app = "pgm-tls-cancel"
    with connect(proxy, application_name=app, **proxy_cert.verify()) as conn:
        assert conn.pgconn.ssl_in_use
        outcome: list[BaseException | None] = []

        def run() -> None:
            try:
                conn.execute("SELECT pg_sleep(30)")
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        wait_until(lambda: active_query_pid(admin, app), "pg_sleep to run")
        baseline = open_fds()
        conn.cancel_safe(timeout=10)  # non-blocking in psycopg: safe with the in-process proxy
        worker.join(10)
        assert not worker.is_alive(), "the statement was not cancelled"
        assert isinstance(outcome[0], psycopg.errors.QueryCanceled), outcome
        # the cancel connection is gone on both sides, TLS shutdown included
        wait_until(lambda: active_sessions(proxy) == 1, "the cancel session to end")
        wait_until(lambda: open_fds() <= baseline, "the cancel connection's fds to close")
