"""Which failures of the admin connection's login are a setup error (the proxy does not start),
and the line that says so; libpq's own texts."""

from __future__ import annotations

import pytest
from pgmigrate_proxy import adminlogin

AT = 'connection failed: connection to server at "127.0.0.1", port 5432 failed: '


@pytest.mark.parametrize(
    ("message", "refused"),
    [
        (AT + 'FATAL:  role "root" does not exist', True),
        (AT + 'FATAL:  password authentication failed for user "app"', True),
        (AT + 'FATAL:  database "nope" does not exist', True),
        (AT + 'FATAL:  no pg_hba.conf entry for host "10.0.0.1", user "app", database "x"', True),
        (AT + "fe_sendauth: no password supplied", True),
        (AT + "Connection refused\n\tIs the server running on that host?", False),
        (AT + "FATAL:  sorry, too many clients already", False),
        (AT + "FATAL:  the database system is starting up", False),
        (AT + "FATAL:  the database system is shutting down", False),
        ("connection timeout expired", False),
    ],
)
def test_refused(message: str, refused: bool) -> None:
    assert adminlogin.refused(message) is refused


def test_refusal_names_the_user_the_reason_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    message = AT + 'FATAL:  role "root" does not exist'
    assert adminlogin.refusal("postgresql://app:pw@db/app", message) == (
        "the admin connection's login as 'app' was refused: role \"root\" does not exist; it "
        "logs in as the user of admin_upstream, else of upstream: give one that PostgreSQL "
        "accepts, a superuser, or a role granted pg_read_all_stats and pg_signal_backend"
    )
    monkeypatch.setenv("PGUSER", "root")
    assert adminlogin.refusal("postgresql://db/app", message).startswith(
        "the admin connection's login as 'root' (the URL names no user: libpq took PGUSER or "
        "the OS user) was refused: role \"root\" does not exist;"
    )
