"""The upstream password kept off the command line: the admin connection logs in with a
password from PGPASSWORD or a passfile (libpq's own routes), as the README documents."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from pgmigrate_proxy.admin import AdminLoginRefused

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy


def _admin_opened(proxy_log: list[str]) -> bool:
    return any("admin connection open" in line for line in proxy_log)


def test_password_from_pgpassword(
    pg: PgInfo,
    proxy_factory: Callable[..., RunningProxy],
    proxy_log: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PGPASSWORD", pg.password(pg.superuser))
    proxy_factory(f"postgresql://{pg.superuser}@{pg.host}:{pg.port}/postgres")
    assert _admin_opened(proxy_log), proxy_log


def test_password_from_a_passfile(
    pg: PgInfo,
    proxy_factory: Callable[..., RunningProxy],
    proxy_log: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"{pg.host}:{pg.port}:*:{pg.superuser}:{pg.password(pg.superuser)}\n")
    os.chmod(passfile, 0o600)
    url = f"postgresql://{pg.superuser}@{pg.host}:{pg.port}/postgres?passfile={passfile}"
    proxy_factory(url)
    assert _admin_opened(proxy_log), proxy_log


def test_without_a_password_the_admin_connection_fails(
    pg: PgInfo,
    proxy_factory: Callable[..., RunningProxy],
    proxy_log: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The control: the two tests above log in by their password routes, not by trust. A
    refused admin login stops the start, naming the user."""
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "absent"))
    with pytest.raises(AdminLoginRefused, match=f"login as '{pg.superuser}' was refused"):
        proxy_factory(f"postgresql://{pg.superuser}@{pg.host}:{pg.port}/postgres")
    assert not _admin_opened(proxy_log)
