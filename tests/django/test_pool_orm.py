"""Django's ORM through transaction pooling: 32 threads (CONN_MAX_AGE 60, each its own
connection) on a pool of 4 server connections, with atomic blocks and plain queries; with
psycopg 3 here, and with psycopg2 in test_psycopg2.py's run (marked django_db for it)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from tests.django.conftest import DRIVER
from tests.fixtures.postgres import PgInfo

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(120),
    pytest.mark.django_db(transaction=True),
]

THREADS = 32
POOL_SIZE = 4


@pytest.fixture
def pooling_proxy(pg: PgInfo, transactional_db: None) -> Iterator[Any]:
    """A transaction-pooling proxy with DATABASES["default"] pointing at it."""
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connections
    from pgmigrate_proxy.config import Config
    from pgmigrate_proxy.embedded_proxy import EmbeddedProxy

    # its table (other tests migrate the test app back and forth: run after them, it may be gone)
    call_command("migrate", "testapp", verbosity=0)
    database = settings.DATABASES["default"]
    config = Config(
        upstream=pg.url(dbname=database["NAME"]),
        listen_port=0,
        pool_mode="transaction",
        default_pool_size=POOL_SIZE,
        max_client_conn=THREADS + 8,
    )
    proxy = EmbeddedProxy(config)
    proxy.start()
    saved = dict(database)
    connections.close_all()
    database.update(
        HOST=proxy.host,
        PORT=str(proxy.port),
        CONN_MAX_AGE=60,
        # psycopg 3: no named prepared statement (it would pin); psycopg2 prepares none
        OPTIONS={"prepare_threshold": None} if DRIVER == "psycopg" else {},
    )
    try:
        yield proxy
    finally:
        connections.close_all()
        database.clear()
        database.update(saved)
        proxy.stop()


def test_orm_threads_on_a_small_pool(pooling_proxy: Any, pg: PgInfo) -> None:
    from django.db import connection, transaction
    from django.db.backends.postgresql.base import is_psycopg3  # type: ignore[attr-defined]

    assert is_psycopg3 == (DRIVER == "psycopg")  # the driver this run is about

    from tests.django.testapp.models import Item

    failures: list[BaseException] = []
    pids: set[int] = set()

    def work(n: int) -> None:
        try:
            for i in range(10):
                with transaction.atomic():
                    item = Item.objects.create(name=f"t{n}-{i}")
                    Item.objects.filter(pk=item.pk).update(flag=True)
                    with connection.cursor() as cursor:
                        cursor.execute("SELECT pg_backend_pid()")
                        pids.add(cursor.fetchone()[0])
                assert Item.objects.filter(name=f"t{n}-{i}", flag=True).count() == 1
        except BaseException as exc:
            failures.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=work, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[:3]
    assert Item.objects.filter(flag=True).count() == THREADS * 10
    assert 1 <= len(pids) <= POOL_SIZE
