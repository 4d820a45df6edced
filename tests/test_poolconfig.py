"""Pool settings: [databases.NAME] / [users.NAME] overrides in the TOML file and the resolver
(user over database over global, as pgbouncer does); one-line errors naming the dotted key."""

from __future__ import annotations

from pathlib import Path

import pytest
from pgmigrate_proxy import settings
from pgmigrate_proxy.config import Config, ConfigError, load_config
from pgmigrate_proxy.poolconfig import (
    AuthType,
    PoolMode,
    PoolSettings,
    SessionStateAction,
    pool_settings,
)


@pytest.fixture
def toml(tmp_path: Path) -> Path:
    return tmp_path / "proxy.toml"


def load(toml: Path, text: str, *argv: str) -> Config:
    toml.write_text(text)
    return load_config(["--config", str(toml), *argv], {})


def error(toml: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(toml, text)
    assert "\n" not in str(caught.value)
    return caught.value


def test_the_enums_are_the_schemas_values() -> None:
    assert tuple(m.value for m in PoolMode) == settings.POOL_MODES
    assert tuple(a.value for a in SessionStateAction) == settings.SESSION_STATE_ACTIONS
    assert tuple(a.value for a in AuthType) == settings.AUTH_TYPES


def test_pgbouncer_defaults() -> None:
    pool = pool_settings(Config(), "app", "web")
    assert pool == PoolSettings(
        pool_mode=PoolMode.SESSION,
        pool_size=20,
        min_pool_size=0,
        reserve_pool_size=0,
        reserve_pool_timeout=5.0,
        max_db_connections=0,
        max_user_connections=0,
        server_lifetime=3600.0,
        server_idle_timeout=600.0,
        server_connect_timeout=15.0,
        server_check_delay=30.0,
        server_check_query="<empty>",
        server_reset_query="DISCARD ALL",
        query_wait_timeout=120.0,
        client_idle_timeout=0.0,
        idle_transaction_timeout=0.0,
        max_prepared_statements=200,
        session_state=SessionStateAction.PIN,
    )
    assert Config().auth_type == "passthrough"
    assert "pg_catalog.pg_authid" in Config().auth_query
    assert "rolvaliduntil" in Config().auth_query


FILE = """
pool_mode = "transaction"
default_pool_size = 10
query_wait_timeout = "30s"

[proxy]
users = ["app*"]

[databases.app]
pool_mode = "session"
pool_size = 16
max_db_connections = 40
query_wait_timeout = "5s"

[databases.reports]
server_lifetime = "2min"

[users.migrator]
pool_mode = "session"
max_user_connections = 2

[users.web]
pool_mode = "transaction"
pool_size = 4
idle_transaction_timeout = "500ms"
"""


def test_user_over_database_over_global(toml: Path) -> None:
    config = load(toml, FILE)
    assert config.users == ("app*",)  # the guard's filter, under [proxy]
    other = pool_settings(config, "other", "someone")
    assert (other.pool_mode, other.pool_size, other.query_wait_timeout) == (
        PoolMode.TRANSACTION,
        10,
        30.0,
    )
    app = pool_settings(config, "app", "someone")
    assert (app.pool_mode, app.pool_size, app.max_db_connections) == (PoolMode.SESSION, 16, 40)
    assert app.query_wait_timeout == 5.0
    web_on_app = pool_settings(config, "app", "web")
    assert (web_on_app.pool_mode, web_on_app.pool_size) == (PoolMode.TRANSACTION, 4)
    assert web_on_app.max_db_connections == 40  # the database's, the user sets none
    assert web_on_app.query_wait_timeout == 5.0
    assert web_on_app.idle_transaction_timeout == 0.5
    migrator = pool_settings(config, "reports", "migrator")
    assert migrator.pool_mode is PoolMode.SESSION
    assert (migrator.max_user_connections, migrator.server_lifetime) == (2, 120.0)
    assert migrator.pool_size == 10


def test_flags_change_the_globals_not_the_entries(toml: Path) -> None:
    config = load(toml, FILE, "--pool-mode", "session", "--default-pool-size", "8")
    assert pool_settings(config, "other", "x").pool_size == 8
    assert pool_settings(config, "other", "web").pool_mode is PoolMode.TRANSACTION


@pytest.mark.parametrize(
    ("text", "key", "allowed"),
    [
        (
            '[databases.app]\npool_mode = "statement"\n',
            "databases.app.pool_mode",
            "session | transaction",
        ),
        (
            "[databases.app]\npool_size = 0\n",
            "databases.app.pool_size",
            "an integer from 1 to 1000000",
        ),
        (
            '[users.web]\nidle_transaction_timeout = "soon"\n',
            "users.web.idle_transaction_timeout",
            "a duration",
        ),
        ('[users.web]\nsession_state = "ignore"\n', "users.web.session_state", "pin | refuse"),
        ("[databases]\napp = 5\n", "databases.app", "a table of pool_mode, pool_size"),
        ("databases = 5\n", "databases", "a table of [databases.NAME] tables"),
    ],
)
def test_bad_entry_value_names_the_dotted_key(
    toml: Path, text: str, key: str, allowed: str
) -> None:
    exc = error(toml, text)
    assert exc.key == key
    assert str(exc).startswith(f"invalid {key}: ")
    assert f"(allowed: {allowed}" in str(exc)
    assert str(exc).endswith(f"set by {toml}")


def test_readme_error_example(toml: Path) -> None:
    exc = error(toml, '[databases.app]\npool_mode = "statement"\n')
    assert str(exc) == (
        f"invalid databases.app.pool_mode: 'statement' (allowed: session | transaction), "
        f"set by {toml}"
    )


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[databases.app]\nmax_user_connections = 1\n", "databases.app.max_user_connections"),
        ("[users.web]\nmax_db_connections = 1\n", "users.web.max_db_connections"),
        ("[users.web]\nlisten_port = 1\n", "users.web.listen_port"),
    ],
)
def test_unknown_entry_key_lists_the_allowed(toml: Path, text: str, key: str) -> None:
    exc = error(toml, text)
    assert exc.key == key
    assert str(exc).startswith(f"unknown key in {toml}: {key} (allowed: pool_mode, pool_size")


def test_the_cli_exits_2_on_a_bad_entry(toml: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pgmigrate_proxy.cli import load_or_report

    toml.write_text('[users.web]\npool_mode = "statement"\n')
    assert load_or_report(["--config", str(toml)], {}) == 2
    err = capsys.readouterr().err
    assert err.startswith("pgmigrate-proxy: invalid users.web.pool_mode: 'statement'")
    assert err.count("\n") == 1


@pytest.mark.parametrize("auth", ["auth_file", "auth_query"])
def test_auth_type_needs_its_source(toml: Path, auth: str) -> None:
    extra = 'auth_query = ""\n' if auth == "auth_query" else ""
    exc = error(toml, f'auth_type = "{auth}"\n{extra}')
    assert exc.key == auth
    assert f"a non-empty value when auth_type is {auth}" in str(exc)


def test_auth_file_with_its_file(toml: Path) -> None:
    users = toml.parent / "userlist.txt"  # read and checked with the config
    users.write_text('"app" "md5' + "0" * 32 + '"\n')
    config = load(toml, f'auth_type = "auth_file"\nauth_file = "{users}"\n')
    assert (config.auth_type, config.auth_file) == ("auth_file", str(users))


def test_entries_are_compared_and_reported_on_reload(toml: Path) -> None:
    from pgmigrate_proxy.config import RELOADABLE, changed_keys

    old = load(toml, FILE)
    new = load(toml, FILE.replace("pool_size = 4", "pool_size = 5"))
    assert old != new
    assert changed_keys(old, new) == ["pool_overrides"]
    assert "pool_overrides" in RELOADABLE
    assert load(toml, FILE) == old


def test_no_pool_setting_is_a_session_option() -> None:
    assert not set(settings.POOL_KEYS) & set(settings.SESSION_NAMES)
