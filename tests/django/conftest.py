"""pytest-django setup: Django's driver (psycopg 3, or psycopg2 when PGMIGRATE_DJANGO_DRIVER
says so), the settings module, the test database on the `pg` server, and an external proxy.

Django uses psycopg 3 whenever it is importable, and the proxy needs it in this very process,
so a psycopg2 run hides psycopg while Django's backend, django-pgactivity and django-pglock
pick their driver, then puts it back for everyone else. test_psycopg2.py runs the database
tests again that way, in a subprocess.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterator

import django
import pytest

from tests.fixtures.postgres import PgInfo

DRIVER_ENV = "PGMIGRATE_DJANGO_DRIVER"
DRIVER = os.environ.get(DRIVER_ENV, "psycopg")


def _use_psycopg2() -> None:
    """Import Django's PostgreSQL backend (and pgactivity, pglock) while psycopg is hidden."""
    saved = {n: m for n, m in sys.modules.items() if n == "psycopg" or n.startswith("psycopg.")}
    sys.modules["psycopg"] = None  # type: ignore[assignment]  # `import psycopg` now fails
    try:
        import django.db.backends.postgresql.base  # noqa: F401
        import pgactivity.core  # type: ignore[import-untyped]  # noqa: F401
        import pglock.core  # noqa: F401
    finally:
        del sys.modules["psycopg"]
        sys.modules.update(saved)
    psycopg_any = importlib.import_module("django.db.backends.postgresql.psycopg_any")
    assert not psycopg_any.is_psycopg3, "Django picked psycopg 3"


if DRIVER == "psycopg2":
    _use_psycopg2()
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.django.settings")
django.setup()


@pytest.fixture(scope="session")
def django_db_modify_db_settings(
    django_db_modify_db_settings_parallel_suffix: None, pg: PgInfo
) -> None:
    """The PostgreSQL databases: pytest-django's test databases on the `pg` server."""
    from django.conf import settings

    for alias in ("default", "second"):
        settings.DATABASES[alias].update(
            HOST=pg.host, PORT=str(pg.port), USER=pg.superuser, PASSWORD=pg.superuser_password
        )


@pytest.fixture
def external_proxy(pg: PgInfo, transactional_db: None) -> Iterator[tuple[str, int]]:
    """A pgmigrate-proxy started by the test, with DATABASES["default"] pointing at it."""
    from django.conf import settings
    from django.db import connections
    from pgmigrate_proxy.config import Config
    from pgmigrate_proxy.embedded_proxy import EmbeddedProxy

    database = settings.DATABASES["default"]
    proxy = EmbeddedProxy(Config(upstream=pg.url(dbname=database["NAME"]), listen_port=0))
    proxy.start()
    saved = database["HOST"], database["PORT"]
    connections.close_all()
    database.update(HOST=proxy.host, PORT=str(proxy.port))
    try:
        yield proxy.host, proxy.port
    finally:
        connections.close_all()
        database.update(HOST=saved[0], PORT=saved[1])
        proxy.stop()
