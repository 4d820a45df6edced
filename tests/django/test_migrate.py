"""migrate through the proxy: autocommit sessions and RunPython transactions, Django's options,
several databases, PGMIGRATE_PATCH_MIGRATE, PGMIGRATE_PROXY, and the connection put back."""

from __future__ import annotations

import io
from collections.abc import Iterator

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError, SystemCheckError
from django.db import connection, connections
from pgmigrate import route
from pytest_django.fixtures import Settings as SettingsWrapper

from tests.django.scenario import migrate

pytestmark = pytest.mark.django_db(transaction=True)


def _rows(sql: str) -> list[tuple[object, ...]]:
    with connection.cursor() as cursor:
        cursor.execute(sql)
        return list(cursor.fetchall())


def _columns() -> set[str]:
    return {
        str(name)
        for (name,) in _rows(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'testapp_item'"
        )
    }


def _applied() -> list[str]:
    rows = _rows("SELECT name FROM django_migrations WHERE app = 'testapp' ORDER BY id")
    return [str(name) for (name,) in rows]


@pytest.fixture
def items() -> Iterator[None]:
    """testapp at 0001 with two rows; testapp back to zero (and no leftovers) afterwards."""
    migrate("testapp", "0001", verbosity=0)
    with connection.cursor() as cursor:
        cursor.execute("INSERT INTO testapp_item (name) VALUES ('a'), ('b')")
    yield
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE testapp_item DROP COLUMN IF EXISTS note")
    migrate("testapp", "0001", "--fake", verbosity=0)
    migrate("testapp", "zero", verbosity=0)


@pytest.mark.usefixtures("items")
def test_runpython_commits_as_a_whole() -> None:
    output = migrate("testapp")
    assert "Applying testapp.0002_item_note... OK" in output
    assert "Applying testapp.0003_item_flag... OK" in output
    assert _rows("SELECT name, note, flag FROM testapp_item ORDER BY name") == [
        ("a", "note of a", True),
        ("b", "note of b", True),
    ]
    assert _applied() == ["0001_initial", "0002_item_note", "0003_item_flag"]
    migrate("testapp", "0001", verbosity=0)  # and backwards
    assert _columns() == {"id", "name"}


@pytest.mark.usefixtures("items")
def test_failed_runpython_rolls_back_but_earlier_ddl_stays(settings: SettingsWrapper) -> None:
    settings.TESTAPP_FAIL_RUNPYTHON = True
    out = io.StringIO()
    with pytest.raises(RuntimeError, match="on purpose"):
        call_command("migrate", "testapp", "0002", stdout=out, no_color=True)
    # The autocommit caveat: AddField ran as its own transaction and stays ...
    assert "note" in _columns()
    assert "stay applied despite the rollback..." in out.getvalue()
    # ... while RunPython's updates were one real transaction, rolled back.
    assert _rows("SELECT note FROM testapp_item") == [(None,), (None,)]
    assert _applied() == ["0001_initial"]


@pytest.mark.usefixtures("items")
def test_without_autocommit_the_migration_is_one_transaction(settings: SettingsWrapper) -> None:
    settings.TESTAPP_FAIL_RUNPYTHON = True
    settings.PGMIGRATE_AUTOCOMMIT = False
    with pytest.raises(RuntimeError, match="on purpose"):
        migrate("testapp", "0002")
    assert _columns() == {"id", "name"}
    assert _applied() == ["0001_initial"]


def test_connection_is_put_back_also_after_an_error(settings: SettingsWrapper) -> None:
    original = connection.settings_dict
    before = dict(original)
    settings.TESTAPP_FAIL_RUNPYTHON = True
    migrate("testapp", "0001", verbosity=0)
    try:
        with pytest.raises(RuntimeError):
            migrate("testapp", "0002", verbosity=0)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("ALTER TABLE testapp_item DROP COLUMN IF EXISTS note")
        migrate("testapp", "zero", verbosity=0)
    assert connection.settings_dict is original
    assert connection.settings_dict == before
    assert not hasattr(connection, route.ROUTE_ATTRIBUTE)
    assert route.external_proxy(connection) is None  # direct again


def test_plan_fake_and_fake_initial() -> None:
    plan = migrate("testapp", "--plan")
    assert "Planned operations:" in plan
    assert "testapp.0001_initial" in plan
    assert _applied() == []
    migrate("testapp", "0001", "--fake", verbosity=0)
    assert _applied() == ["0001_initial"]
    assert "id" not in _columns()  # faked: no table
    migrate("testapp", "zero", "--fake", verbosity=0)
    migrate("testapp", "0001", verbosity=0)
    migrate("testapp", "zero", "--fake", verbosity=0)
    assert "Applying testapp.0001_initial... FAKED" in migrate("testapp", "0001", "--fake-initial")
    migrate("testapp", "zero", verbosity=0)


def test_sqlmigrate_is_untouched() -> None:
    out = io.StringIO()
    call_command("sqlmigrate", "testapp", "0002", stdout=out)
    assert 'ADD COLUMN "note"' in out.getvalue()
    assert "pgmigrate" not in out.getvalue()


@pytest.mark.django_db(transaction=True, databases=["default", "other"])
def test_another_database_that_is_not_postgresql() -> None:
    migrate("testapp", "zero", "--database", "other", verbosity=0)
    output = migrate("--database", "other")
    assert "Postgres process ID" not in output
    assert "Applying testapp.0003_item_flag... OK" in output
    with connections["other"].cursor() as cursor:
        cursor.execute("SELECT count(*) FROM django_migrations WHERE app = 'testapp'")
        assert cursor.fetchone() == (3,)


@pytest.mark.django_db(transaction=True, databases=["default", "second"])
def test_another_postgresql_database() -> None:
    default = connection.settings_dict
    output = migrate("testapp", "zero", "--database", "second")
    assert output.startswith("Postgres process ID: ")
    assert "Unapplying testapp.0001_initial... OK" in output
    assert "Applying" not in migrate("testapp", "--database", "second", "--plan")
    assert "Applying testapp.0003_item_flag... OK" in migrate("--database", "second")
    assert connection.settings_dict is default
    with connections["second"].cursor() as cursor:
        cursor.execute("SELECT count(*) FROM django_migrations WHERE app = 'testapp'")
        assert cursor.fetchone() == (3,)


def test_check_option() -> None:
    with pytest.raises(SystemExit) as info:
        migrate("testapp", "--check")
    assert info.value.code == 1
    assert _applied() == []


def test_patch_migrate_off(settings: SettingsWrapper) -> None:
    settings.PGMIGRATE_PATCH_MIGRATE = False
    assert "Postgres process ID" not in migrate("testapp", "0001")
    out = io.StringIO()
    call_command("pgmigrate", "testapp", "zero", stdout=out)
    assert out.getvalue().startswith("Postgres process ID: ")
    assert "Unapplying testapp.0001_initial... OK" in out.getvalue()


def test_external_mode_needs_a_proxy(settings: SettingsWrapper) -> None:
    settings.PGMIGRATE_PROXY = "external"
    with pytest.raises(CommandError, match="is not a pgmigrate-proxy"):
        migrate("testapp", "--plan")


def test_external_proxy_is_detected(external_proxy: tuple[str, int]) -> None:
    version = route.external_proxy(connection)
    assert version
    lines = migrate("testapp", "0001", verbosity=2).splitlines()
    assert lines[0].startswith("Postgres process ID: ")
    assert lines[1] == f"Through the external pgmigrate-proxy {version}"
    migrate("testapp", "zero", verbosity=0)


def test_embedded_mode_ignores_an_external_proxy(
    external_proxy: tuple[str, int], settings: SettingsWrapper
) -> None:
    settings.PGMIGRATE_PROXY = "embedded"
    output = migrate("testapp", "0001", verbosity=2)
    assert "\nThrough the embedded pgmigrate-proxy on 127.0.0.1:" in output
    assert "Applying testapp.0001_initial... OK" in output
    migrate("testapp", "zero", verbosity=0)


def test_bad_settings_stop_migrate(settings: SettingsWrapper) -> None:
    settings.PGMIGRATE_PROXY = "sidecar"
    with pytest.raises(CommandError, match="PGMIGRATE_PROXY: must be one of"):
        migrate("testapp", "--plan", "--skip-checks")
    with pytest.raises(SystemCheckError, match=r"pgmigrate\.E008"):
        call_command("check", databases=[])  # Django 6.1 checks all databases by default


def test_embedded_proxy_stops_migrate_on_a_refused_admin_login(settings: SettingsWrapper) -> None:
    """A wrong PASSWORD: the embedded proxy's admin login is refused; migrate stops saying why
    (it used to start anyway, the guard degraded to retries and said only "admin connection
    down")."""
    settings.PGMIGRATE_PROXY = "embedded"
    original = connection.settings_dict
    connection.close()
    connection.settings_dict = {**original, "PASSWORD": "not-the-password"}
    try:
        with pytest.raises(CommandError) as info:
            migrate("testapp", "0001", verbosity=0)
    finally:
        connection.close()
        connection.settings_dict = original
    user = original["USER"]
    assert str(info.value) == (
        "cannot start the embedded pgmigrate-proxy: PostgreSQL refused the login of its admin "
        f"connection to database 'default' (USER {user!r}): password authentication failed for "
        f"user \"{user}\". It logs in as DATABASES['default'] does; the guard needs a "
        "superuser, or a role granted pg_read_all_stats and pg_signal_backend"
    )
    assert "not-the-password" not in str(info.value)
