"""Config: precedence of file, env and flags; one-line errors naming the key; redaction."""

from __future__ import annotations

import dataclasses
import math
import random
import re
from collections.abc import Mapping
from pathlib import Path

import pytest
from pgmigrate_proxy.config import (
    BLOCKER_STATES,
    KEYS,
    RELOADABLE,
    Config,
    ConfigError,
    build_parser,
    env_var,
    flag,
    load_config,
)
from pgmigrate_proxy.guard.drain import DrainThen
from pgmigrate_proxy.guard.policy import BackendState, BlockingAction, Filters, RetrySchedule
from pgmigrate_proxy.logsetup import redact

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "proxy.toml.example"


def load(*argv: str, env: Mapping[str, str] | None = None) -> Config:
    return load_config(argv, env or {})


def error(*argv: str, env: Mapping[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load(*argv, env=env)
    assert "\n" not in str(caught.value)
    return caught.value


@pytest.fixture
def toml(tmp_path: Path) -> Path:
    return tmp_path / "proxy.toml"


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[str, str]:
    cert, key = tmp_path / "proxy.crt", tmp_path / "proxy.key"
    cert.write_text("cert")
    key.write_text("key")
    return str(cert), str(key)


# --- precedence -------------------------------------------------------------------------------


def test_nothing_given_is_the_defaults() -> None:
    assert load() == Config()


def test_defaults_match_the_contract() -> None:
    config = Config()
    assert (config.listen_host, config.listen_port) == ("127.0.0.1", 6432)
    assert config.upstream is None
    assert (config.log_level, config.log_format) == ("info", "text")
    assert config.max_message_size == 268435456
    assert (config.startup_timeout, config.shutdown_grace) == (60.0, 30.0)
    assert config.effective_client_tls_mode() == "disable"
    assert (config.guard, config.blocking_action) == (True, "terminate")
    assert (config.lock_timeout, config.lock_budget) == (0.05, None)
    assert (config.retry_delay, config.retry_max_delay) == (0.05, 5.0)
    assert (config.max_hold, config.watch_interval, config.cancel_grace) == (30.0, 0.05, 2.0)
    assert (config.min_transaction_age, config.min_query_age) == (0.0, 0.0)
    assert config.blocker_states == config.application_names == config.users == ()
    assert config.exclude_application_names == config.exclude_users == ()
    assert config.migration_application_names == ()
    assert config.admin_upstream is None


def test_file_then_env_then_flags(toml: Path) -> None:
    toml.write_text("listen_port = 1001\nlog_level = 'debug'\nshutdown_grace = 5\n")
    env = {"PGMIGRATE_PROXY_LISTEN_PORT": "1002", "PGMIGRATE_PROXY_LOG_LEVEL": "warning"}
    config = load("--config", str(toml), "--listen-port", "1003", env=env)
    assert config.listen_port == 1003  # flag over env over file
    assert config.log_level == "warning"  # env over file
    assert config.shutdown_grace == 5.0  # file over default
    assert config.startup_timeout == 60.0  # default


def test_config_file_from_env(toml: Path) -> None:
    toml.write_text("listen_port = 1001\n")
    assert load(env={"PGMIGRATE_PROXY_CONFIG": str(toml)}).listen_port == 1001


def test_config_flag_wins_over_config_env(toml: Path, tmp_path: Path) -> None:
    toml.write_text("listen_port = 1001\n")
    env = {"PGMIGRATE_PROXY_CONFIG": str(tmp_path / "absent.toml")}
    assert load("--config", str(toml), env=env).listen_port == 1001


def test_proxy_table_is_accepted(toml: Path) -> None:
    toml.write_text("[proxy]\nlisten_port = 1001\nlog_format = 'json'\n")
    config = load("--config", str(toml))
    assert (config.listen_port, config.log_format) == (1001, "json")


def test_key_in_both_places_is_an_error(toml: Path) -> None:
    toml.write_text("listen_port = 1\n[proxy]\nlisten_port = 2\n")
    exc = error("--config", str(toml))
    assert exc.key == "listen_port"
    assert "set twice" in str(exc)


def test_flag_equals_form_and_values_are_normalized() -> None:
    config = load("--log-level=DEBUG", "--startup-timeout=5", "--listen-port= 7 ")
    assert (config.log_level, config.startup_timeout, config.listen_port) == ("debug", 5.0, 7)


def test_empty_string_means_unset() -> None:
    env = {"PGMIGRATE_PROXY_UPSTREAM": "postgresql://db/app"}
    assert load("--upstream", "", env=env).upstream is None


GOOD_VALUES: dict[str, tuple[str, object]] = {
    "listen_host": ("0.0.0.0", "0.0.0.0"),
    "listen_port": ("0", 0),
    "metrics_listen": ("[::1]:09187", "[::1]:9187"),
    "upstream": ("host=db", "host=db"),
    "log_level": ("Warning", "warning"),
    "log_format": ("json", "json"),
    "max_message_size": ("8192", 8192),
    "startup_timeout": ("0.5", 0.5),
    "max_startup_clients": ("20", 20),
    "shutdown_grace": ("0", 0.0),
    "client_tls_cert_file": ("", None),
    "client_tls_key_file": ("", None),
    "client_tls_mode": ("disable", "disable"),
    "embedded_data_dir": ("/var/lib/pg", "/var/lib/pg"),
    "embedded_pg": ("15", "15"),
    "guard": ("Off", False),
    "blocking_action": ("Cancel", "cancel"),
    "lock_timeout": ("0.2", 0.2),
    "lock_budget": ("30", 30.0),
    "retry_delay": ("0", 0.0),
    "retry_max_delay": ("1.5", 1.5),
    "max_hold": ("10", 10.0),
    "watch_interval": ("0.1", 0.1),
    "cancel_grace": ("0", 0.0),
    "drain_timeout": ("500ms", 0.5),
    "drain_then": ("GIVE_UP", "give_up"),
    "drain_ack_timeout": ("250ms", 0.25),
    "report_events": ("on", True),
    "min_transaction_age": ("5", 5.0),
    "min_query_age": ("2.5", 2.5),
    "blocker_states": ("idle in transaction, active", ("idle in transaction", "active")),
    "application_names": ("web-*,worker", ("web-*", "worker")),
    "exclude_application_names": ("pgmigrate*", ("pgmigrate*",)),
    "users": ("app, report_?", ("app", "report_?")),
    "exclude_users": ("postgres", ("postgres",)),
    "admin_upstream": ("host=db user=admin", "host=db user=admin"),
    "events_channel": ("deploy_events", "deploy_events"),
    "migration_lock": ("on", True),
    "migration_lock_timeout": ("2min", 120.0),
    "migration_application_names": ("migrate", ("migrate",)),
    "pool_mode": ("Transaction", "transaction"),
    "max_client_conn": ("1000", 1000),
    "default_pool_size": ("16", 16),
    "min_pool_size": ("2", 2),
    "reserve_pool_size": ("4", 4),
    "reserve_pool_timeout": ("500ms", 0.5),
    "max_db_connections": ("50", 50),
    "max_user_connections": ("40", 40),
    "server_lifetime": ("1h", 3600.0),
    "server_idle_timeout": ("0", 0.0),
    "server_connect_timeout": ("5s", 5.0),
    "server_check_delay": ("0", 0.0),
    "server_check_query": ("select 1", "select 1"),
    "server_reset_query": ("", ""),
    "query_wait_timeout": ("2min", 120.0),
    "client_idle_timeout": ("10min", 600.0),
    "idle_transaction_timeout": ("30s", 30.0),
    "max_prepared_statements": ("0", 0),
    "session_state": ("refuse", "refuse"),
    "auth_type": ("trust", "trust"),
    "auth_file": ("/etc/pgmigrate-proxy/userlist.txt", "/etc/pgmigrate-proxy/userlist.txt"),
    "auth_query": (
        "SELECT * FROM pgbouncer.user_lookup($1)",
        "SELECT * FROM pgbouncer.user_lookup($1)",
    ),
    "admin_users": ("ops, postgres", ("ops", "postgres")),
    "stats_users": ("monitor", ("monitor",)),
}


@pytest.mark.parametrize("key", KEYS)
def test_every_key_has_an_env_var_and_a_flag(key: str) -> None:
    text, expected = GOOD_VALUES[key]
    assert getattr(load(env={env_var(key): text}), key) == expected
    assert getattr(load(flag(key), text), key) == expected


def test_names() -> None:
    assert env_var("listen_port") == "PGMIGRATE_PROXY_LISTEN_PORT"
    assert flag("client_tls_cert_file") == "--client-tls-cert-file"


# --- one-line errors naming the key -----------------------------------------------------------

BAD_VALUES = [
    ("metrics_listen", "9187"),
    ("metrics_listen", "::1:9187"),
    ("listen_host", ""),
    ("listen_host", "a b"),
    ("listen_port", "abc"),
    ("listen_port", "70000"),
    ("listen_port", "-1"),
    ("log_level", "verbose"),
    ("log_format", "xml"),
    ("max_message_size", "100"),
    ("max_message_size", "1073741824"),
    ("startup_timeout", "0"),
    ("startup_timeout", "soon"),
    ("startup_timeout", "inf"),
    ("shutdown_grace", "-1"),
    ("shutdown_grace", "nan"),
    ("client_tls_mode", "always"),
    ("upstream", "not a conninfo"),
    ("upstream", "host=db sslmode=sometimes"),
    ("upstream", "postgresql://db/app?sslmode=sometimes"),
    ("embedded_pg", "/no/such/bin"),
    ("guard", "maybe"),
    ("guard", "2"),
    ("blocking_action", "kill"),
    ("lock_timeout", "0"),
    ("lock_timeout", "-1"),
    ("lock_timeout", "inf"),
    ("lock_budget", "0"),
    ("lock_budget", "forever"),
    ("lock_budget", "inf"),
    ("retry_delay", "-0.1"),
    ("retry_delay", "10"),  # over the default retry_max_delay
    ("retry_max_delay", "0.01"),  # under the default retry_delay
    ("retry_max_delay", "nan"),
    ("max_hold", "0"),
    ("watch_interval", "0"),
    ("cancel_grace", "-1"),
    ("drain_timeout", "0"),
    ("drain_ack_timeout", "2min"),
    ("drain_then", "show"),
    ("min_transaction_age", "-1"),
    ("min_query_age", "old"),
    ("blocker_states", "idle in transaction, sleeping"),
    ("blocker_states", "starting"),
    ("admin_upstream", "not a conninfo"),
    ("events_channel", "no spaces"),
    ("events_channel", "x" * 56),
    ("migration_lock", "maybe"),
    ("migration_lock_timeout", "8d"),
    ("admin_upstream", "host=db sslmode=sometimes"),
    ("pool_mode", "statement"),
    ("max_client_conn", "0"),
    ("default_pool_size", "0"),
    ("min_pool_size", "-1"),
    ("reserve_pool_timeout", "5 parsecs"),
    ("server_connect_timeout", "0"),
    ("query_wait_timeout", "-1"),
    ("max_prepared_statements", "lots"),
    ("session_state", "ignore"),
    ("auth_type", "md5"),
]


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_bad_flag_value_names_the_key(key: str, value: str) -> None:
    exc = error(flag(key), value)
    assert exc.key == key
    assert str(exc).startswith(f"invalid {key}: ")
    assert "(allowed: " in str(exc)
    assert str(exc).endswith(f"set by {flag(key)}")


@pytest.mark.parametrize(("key", "value"), BAD_VALUES)
def test_bad_env_value_names_the_key(key: str, value: str) -> None:
    exc = error(env={env_var(key): value})
    assert exc.key == key
    assert str(exc).startswith(f"invalid {key}: ")
    assert str(exc).endswith(f"set by {env_var(key)}")


def test_error_text_example() -> None:
    assert str(error("--listen-port", "abc")) == (
        "invalid listen_port: 'abc' (allowed: an integer from 0 to 65535), set by --listen-port"
    )


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("listen_port = '80x'", "listen_port"),
        ("listen_port = 6432.5", "listen_port"),
        ("listen_port = true", "listen_port"),
        ("startup_timeout = false", "startup_timeout"),
        ("log_level = 3", "log_level"),
        ("upstream = 5", "upstream"),
        ("client_tls_cert_file = ['a']", "client_tls_cert_file"),
        ("guard = 1", "guard"),
        ("guard = 'sometimes'", "guard"),
        ("blocking_action = true", "blocking_action"),
        ("lock_budget = 0", "lock_budget"),
        ("lock_budget = false", "lock_budget"),
        ("max_hold = true", "max_hold"),
        ("blocker_states = ['idle', 'busy']", "blocker_states"),
        ("blocker_states = [1]", "blocker_states"),
        ("users = [['app']]", "users"),
        ("application_names = 5", "application_names"),
        ("admin_upstream = ['host=db']", "admin_upstream"),
        ("retry_delay = 2\nretry_max_delay = 1", "retry_max_delay"),
    ],
)
def test_bad_file_value_names_the_key_and_the_file(toml: Path, line: str, key: str) -> None:
    toml.write_text(line + "\n")
    exc = error("--config", str(toml))
    assert exc.key == key
    assert str(exc).startswith(f"invalid {key}: ")
    assert str(exc).endswith(f"set by {toml}")


def test_a_bad_value_in_the_file_is_reported_even_when_overridden(toml: Path) -> None:
    toml.write_text("listen_port = 'abc'\n")
    assert error("--config", str(toml), "--listen-port", "1").key == "listen_port"


def test_typed_file_values(toml: Path) -> None:
    toml.write_text("listen_port = 1001\nstartup_timeout = 2\nshutdown_grace = 0.5\n")
    config = load("--config", str(toml))
    assert (config.listen_port, config.startup_timeout, config.shutdown_grace) == (1001, 2.0, 0.5)
    assert isinstance(config.startup_timeout, float)


def test_unknown_file_key_lists_the_allowed(toml: Path) -> None:
    toml.write_text("listen_port = 1\nlisten_prot = 2\n[proxy]\nbogus = 1\n")
    exc = error("--config", str(toml))
    assert exc.key == "listen_prot"
    assert "unknown key" in str(exc)
    assert "listen_prot, proxy.bogus" in str(exc)
    assert all(key in exc.allowed for key in KEYS)


def test_unknown_table_is_an_unknown_key(toml: Path) -> None:
    toml.write_text("[guard]\nx = 1\n")
    assert error("--config", str(toml)).key == "guard"


def test_unknown_env_var_lists_the_allowed() -> None:
    exc = error(env={"PGMIGRATE_PROXY_LISTEN_PROT": "1", "PGMIGRATE_PROXY_LISTEN_PORT": "1"})
    assert exc.key == "PGMIGRATE_PROXY_LISTEN_PROT"
    assert str(exc).startswith("unknown environment variable: PGMIGRATE_PROXY_LISTEN_PROT (")
    assert "PGMIGRATE_PROXY_CONFIG" in exc.allowed
    assert all(env_var(key) in exc.allowed for key in KEYS)


def test_other_env_vars_are_ignored() -> None:
    assert load(env={"PGMIGRATE_PG": "15", "PGHOST": "x", "PGMIGRATE_PROXYX": "1"}) == Config()


def test_unknown_flag_lists_the_allowed() -> None:
    exc = error("--listen-prot", "1")
    assert exc.key == "--listen-prot"
    assert str(exc).startswith("unknown option '--listen-prot' (allowed: --config, ")
    assert all(flag(key) in exc.allowed for key in KEYS)


def test_abbreviated_flags_are_not_guessed() -> None:
    assert error("--listen", "1").key == "--listen"


def test_stray_argument() -> None:
    assert str(error("demo")).startswith("unknown argument 'demo' (allowed: ")


def test_argparse_errors_become_config_errors() -> None:
    assert str(error("--listen-port")) == "argument --listen-port: expected one argument"


def test_missing_config_file(tmp_path: Path) -> None:
    exc = error("--config", str(tmp_path / "absent.toml"))
    assert exc.key == "config"
    assert "cannot read config file" in str(exc)


def test_bad_toml_is_one_line(toml: Path) -> None:
    toml.write_text("listen_port = \n[broken\n")
    exc = error("--config", str(toml))
    assert str(exc).startswith(f"invalid TOML in '{toml}': ")


def test_version_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        load("--version")
    assert caught.value.code == 0
    assert capsys.readouterr().out.startswith("pgmigrate-proxy ")


# --- upstream --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "upstream",
    [
        "postgresql://app:s3cret@db.example.com:5432/app?sslmode=require",
        "postgres://db/app",
        "host=db port=5432 dbname=app user=app password='s 3cret'",
        "postgresql:///app?host=/var/run/postgresql",
    ],
)
def test_valid_upstreams(upstream: str) -> None:
    assert load("--upstream", upstream).upstream == upstream


def test_upstream_params() -> None:
    config = Config(upstream="postgresql://app:pw@db:5433/app?sslmode=require")
    assert config.upstream_params() == {
        "user": "app",
        "password": "pw",
        "host": "db",
        "port": "5433",
        "dbname": "app",
        "sslmode": "require",
    }
    assert Config().upstream_params() == {}


def test_verify_full_needs_a_readable_root_cert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.postgresql/root.crt
    exc = error("--upstream", "host=db sslmode=verify-full")
    assert exc.key == "upstream"
    assert "sslrootcert" in str(exc)
    missing = tmp_path / "absent.pem"
    exc = error("--upstream", f"host=db sslmode=verify-ca sslrootcert={missing}")
    assert "absent.pem" in str(exc)
    root = tmp_path / "root.pem"
    root.write_text("pem")
    assert load("--upstream", f"host=db sslmode=verify-full sslrootcert={root}").upstream
    assert load("--upstream", "host=db sslmode=verify-full sslrootcert=system").upstream


def test_default_root_cert_location_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".postgresql").mkdir()
    (tmp_path / ".postgresql" / "root.crt").write_text("pem")
    assert load("--upstream", "postgresql://db/app?sslmode=verify-ca").upstream


def test_upstream_errors_never_show_the_password() -> None:
    for upstream in [
        "postgresql://app:s3cret@db/app?sslmode=bogus",
        "host=db password=s3cret sslmode=bogus",
        "host=db password=s3cret oops",
        "host=db password=s3cret nokey=1",
    ]:
        exc = error("--upstream", upstream)
        assert exc.key == "upstream"
        assert "s3cret" not in str(exc), str(exc)


def test_upstream_parse_error_explains_when_no_password() -> None:
    assert 'missing "=" after "oops"' in str(error("--upstream", "host=db oops"))


@pytest.mark.parametrize(
    ("upstream", "redacted"),
    [
        (
            "postgresql://app:s3cret@db:5432/app",
            "postgresql://app:********@db:5432/app",
        ),
        (
            "postgres://app:s3cret@h1,h2/app?sslmode=require",
            "postgres://app:********@h1,h2/app?sslmode=require",
        ),
        (
            "postgresql://app@db/app?password=s3cret&sslmode=require",
            "postgresql://app@db/app?password=********&sslmode=require",
        ),
        ("postgresql://app@db/app", "postgresql://app@db/app"),
        ("host=db password=s3cret user=app", "host=db password=******** user=app"),
        ("host=db password = 's 3cr\\'et' user=app", "host=db password = ******** user=app"),
        ("host=db user=app", "host=db user=app"),
    ],
)
def test_upstream_redacted(upstream: str, redacted: str) -> None:
    assert Config(upstream=upstream).upstream_redacted() == redacted


def test_a_url_password_is_masked_up_to_its_last_at() -> None:
    """libpq ends a URL's password at the first "@" or "/", the user may have meant more: the
    log masks everything up to the last "@"."""
    upstream = "postgresql://app:a@Sup3rS3cret/x@db/app"
    assert Config(upstream=upstream).upstream_redacted() == "postgresql://app:********@db/app"
    assert "Sup3rS3cret" not in Config(admin_upstream=upstream).admin_upstream_redacted()


def test_upstream_redacted_without_upstream() -> None:
    assert Config().upstream_redacted() == "(embedded)"


def test_redact_free_text() -> None:
    text = "connect postgresql://u:pw1@h/db failed; PGPASSWORD=pw2 sslpassword='pw 3'"
    shown = redact(text)
    assert all(secret not in shown for secret in ("pw1", "pw2", "pw 3"))
    assert shown.startswith("connect postgresql://u:********@h/db failed; ")


# --- client TLS -------------------------------------------------------------------------------


def test_tls_auto_resolves(tls_files: tuple[str, str]) -> None:
    cert, key = tls_files
    config = load("--client-tls-cert-file", cert, "--client-tls-key-file", key)
    assert config.client_tls_mode == "auto"
    assert config.effective_client_tls_mode() == "allow"
    assert load().effective_client_tls_mode() == "disable"


@pytest.mark.parametrize("mode", ["allow", "require"])
def test_tls_modes_needing_files(mode: str, tls_files: tuple[str, str]) -> None:
    exc = error("--client-tls-mode", mode)
    assert exc.key == "client_tls_mode"
    cert, key = tls_files
    files = ("--client-tls-cert-file", cert, "--client-tls-key-file", key)
    config = load("--client-tls-mode", mode, *files)
    assert config.effective_client_tls_mode() == mode


def test_tls_cert_without_key(tls_files: tuple[str, str]) -> None:
    assert error("--client-tls-cert-file", tls_files[0]).key == "client_tls_key_file"
    assert error("--client-tls-key-file", tls_files[1]).key == "client_tls_cert_file"


def test_tls_files_must_exist(tmp_path: Path, tls_files: tuple[str, str]) -> None:
    missing = str(tmp_path / "absent.crt")
    exc = error("--client-tls-cert-file", missing, "--client-tls-key-file", tls_files[1])
    assert exc.key == "client_tls_cert_file"
    assert str(exc).startswith(f"invalid client_tls_cert_file: '{missing}'")


def test_tls_files_are_not_checked_when_disabled(tmp_path: Path) -> None:
    absent = str(tmp_path / "absent")
    args = ("--client-tls-mode", "disable", "--client-tls-cert-file", absent)
    assert load(*args, "--client-tls-key-file", absent).effective_client_tls_mode() == "disable"


# --- embedded ---------------------------------------------------------------------------------


@pytest.mark.parametrize("choice", ["embedded", "15", "18"])
def test_embedded_pg_choices(choice: str) -> None:
    assert load("--embedded-pg", choice).embedded_pg == choice


def test_embedded_pg_directory(tmp_path: Path) -> None:
    assert load("--embedded-pg", str(tmp_path)).embedded_pg == str(tmp_path)


# --- the Config object ------------------------------------------------------------------------


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().listen_port = 1  # type: ignore[misc]


def test_direct_construction_is_validated() -> None:
    with pytest.raises(ConfigError, match=r"^invalid listen_port: 70000"):
        Config(listen_port=70000)
    with pytest.raises(ConfigError, match=r"^invalid log_level"):
        dataclasses.replace(Config(), log_level="loud")


def test_direct_construction_is_normalized() -> None:
    config = Config(log_level="DEBUG", startup_timeout=5)
    assert (config.log_level, config.startup_timeout) == ("debug", 5.0)
    assert isinstance(config.startup_timeout, float)


def test_reloadable_keys() -> None:
    assert frozenset(KEYS) - RELOADABLE == {
        "listen_host",
        "listen_port",
        "metrics_listen",
        "embedded_data_dir",
        "embedded_pg",
        "events_channel",
    }


# --- the example file -------------------------------------------------------------------------


def example_defaults() -> dict[str, str]:
    lines = re.findall(r"^# (\w+) = (.*)$", EXAMPLE.read_text(), re.MULTILINE)
    return dict(lines)


def test_example_shows_every_key_once() -> None:
    lines = re.findall(r"^# (\w+) = ", EXAMPLE.read_text(), re.MULTILINE)
    assert sorted(lines) == sorted(KEYS)


def test_example_uncommented_gives_the_defaults(toml: Path) -> None:
    toml.write_text("".join(f"{key} = {value}\n" for key, value in example_defaults().items()))
    assert load("--config", str(toml)) == Config()


# --- the guard --------------------------------------------------------------------------------


def test_guard_keys_from_the_file(toml: Path) -> None:
    toml.write_text(
        "guard = false\n"
        "blocking_action = 'show'\n"
        "lock_timeout = 1\n"
        "lock_budget = 20\n"
        "retry_delay = 0.1\n"
        "retry_max_delay = 2\n"
        "max_hold = 5\n"
        "watch_interval = 0.25\n"
        "cancel_grace = 1\n"
        "min_transaction_age = 3\n"
        "min_query_age = 4\n"
        "blocker_states = ['idle in transaction', 'idle in transaction (aborted)']\n"
        "application_names = ['web-*', 'worker']\n"
        "exclude_application_names = ['', 'psql']\n"
        "users = ['app']\n"
        "exclude_users = ['postgres', 'rds*']\n"
        "admin_upstream = 'postgresql://admin:pw@db/app'\n"
        "migration_application_names = ['migrate*']\n"
    )
    config = load("--config", str(toml))
    assert (config.guard, config.blocking_action) == (False, "show")
    assert (config.lock_timeout, config.lock_budget) == (1.0, 20.0)
    assert (config.retry_delay, config.retry_max_delay) == (0.1, 2.0)
    assert (config.max_hold, config.watch_interval, config.cancel_grace) == (5.0, 0.25, 1.0)
    assert (config.min_transaction_age, config.min_query_age) == (3.0, 4.0)
    assert all(isinstance(getattr(config, key), float) for key in ("lock_timeout", "lock_budget"))
    assert config.blocker_states == ("idle in transaction", "idle in transaction (aborted)")
    assert config.application_names == ("web-*", "worker")
    assert config.exclude_application_names == ("", "psql")  # an array item is kept as written
    assert (config.users, config.exclude_users) == (("app",), ("postgres", "rds*"))
    assert config.admin_upstream == "postgresql://admin:pw@db/app"
    assert config.migration_application_names == ("migrate*",)


def test_guard_keys_in_the_proxy_table_and_overridden(toml: Path) -> None:
    toml.write_text("[proxy]\nguard = false\nusers = ['a']\nlock_budget = 9\n")
    env = {env_var("users"): "b,c", env_var("lock_budget"): "none"}
    config = load("--config", str(toml), "--guard", "yes", env=env)
    assert (config.guard, config.users, config.lock_budget) == (True, ("b", "c"), None)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        *[(word, True) for word in ("true", "TRUE", " on ", "Yes", "1")],
        *[(word, False) for word in ("false", "False", "OFF", "no", "0")],
    ],
)
def test_guard_accepts_boolean_words(text: str, expected: bool) -> None:
    assert load("--guard", text).guard is expected
    assert load(env={env_var("guard"): text}).guard is expected


@pytest.mark.parametrize("value", ["", "y", "t", "enabled", "01"])
def test_guard_rejects_other_words(value: str) -> None:
    exc = error("--guard", value)
    assert exc.key == "guard"
    assert exc.allowed == "true or false (also on/off, yes/no, 1/0)"


def test_toml_booleans_for_guard(toml: Path) -> None:
    toml.write_text("guard = false\n")
    assert load("--config", str(toml)).guard is False
    toml.write_text("guard = true\n")
    assert load("--config", str(toml)).guard is True


@pytest.mark.parametrize("action", [a.value for a in BlockingAction])
def test_every_blocking_action(action: str) -> None:
    config = load("--blocking-action", action.upper())
    assert config.blocking_action == action
    assert config.blocking_action_value() is BlockingAction(action)


@pytest.mark.parametrize("text", ["none", "NONE", " None ", ""])
def test_lock_budget_unset(text: str) -> None:
    env = {env_var("lock_budget"): "10"}
    assert load("--lock-budget", text, env=env).lock_budget is None


def test_lock_budget_none_in_the_file(toml: Path) -> None:
    toml.write_text("lock_budget = 'none'\n")
    assert load("--config", str(toml)).lock_budget is None


def test_lock_budget_error_mentions_no_limit() -> None:
    assert str(error("--lock-budget", "0")) == (
        "invalid lock_budget: '0' (allowed: a duration from 1ms to 7d (seconds, or with a unit: "
        "50ms, 5s, 2min), or none or empty "
        "for no limit), set by --lock-budget"
    )


# --- lists ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ()),
        (" , ,", ()),
        ("a", ("a",)),
        (" a , b ,", ("a", "b")),
        ("a,b,a", ("a", "b")),
        ("web worker,*-cron", ("web worker", "*-cron")),
    ],
)
def test_pattern_lists_from_strings(text: str, expected: tuple[str, ...]) -> None:
    for key in ("application_names", "exclude_users", "migration_application_names"):
        assert getattr(load(flag(key), text), key) == expected
        assert getattr(load(env={env_var(key): text}), key) == expected


def test_pattern_lists_from_toml(toml: Path) -> None:
    toml.write_text("users = []\nexclude_users = ['a,b', ' c ']\n")
    config = load("--config", str(toml))
    assert config.users == ()
    assert config.exclude_users == ("a,b", " c ")  # array items are patterns as written


def test_a_toml_string_is_split_too(toml: Path) -> None:
    toml.write_text("users = 'a, b'\n")
    assert load("--config", str(toml)).users == ("a", "b")


def test_lists_are_tuples_of_str() -> None:
    config = Config(users=["a", "b"], blocker_states=["ACTIVE"])  # type: ignore[arg-type]
    assert config.users == ("a", "b")
    assert config.blocker_states == ("active",)
    assert hash(config) == hash(Config(users=("a", "b"), blocker_states=("active",)))


def test_every_blocker_state() -> None:
    text = ",".join(name.upper() for name in BLOCKER_STATES)
    assert load("--blocker-states", text).blocker_states == BLOCKER_STATES
    assert set(BLOCKER_STATES) == {s.value for s in BackendState} - {"starting"}


def test_blocker_states_are_normalized() -> None:
    text = " Idle  In Transaction (aborted) ,active,ACTIVE"
    config = load("--blocker-states", text)
    assert config.blocker_states == ("idle in transaction (aborted)", "active")


def test_blocker_states_error_lists_the_states() -> None:
    exc = error("--blocker-states", "idle,busy")
    assert exc.key == "blocker_states"
    assert all(name in exc.allowed for name in BLOCKER_STATES)


# --- retry delays -----------------------------------------------------------------------------


def test_retry_max_delay_may_equal_retry_delay() -> None:
    config = load("--retry-delay", "2", "--retry-max-delay", "2")
    assert (config.retry_delay, config.retry_max_delay) == (2.0, 2.0)


def test_retry_max_delay_under_retry_delay_blames_max() -> None:
    exc = error("--retry-delay", "2", env={env_var("retry_max_delay"): "1"})
    assert str(exc) == (
        "invalid retry_max_delay: 1.0 (allowed: a duration >= retry_delay (2s)), "
        "set by PGMIGRATE_PROXY_RETRY_MAX_DELAY"
    )


def test_retry_delay_over_the_default_max_blames_retry_delay() -> None:
    exc = error("--retry-delay", "10")
    assert exc.key == "retry_delay"
    assert "<= retry_max_delay (5s)" in str(exc)
    assert str(exc).endswith("set by --retry-delay")


def test_retry_delays_are_checked_on_direct_construction() -> None:
    with pytest.raises(ConfigError, match=r"^invalid retry_max_delay: 1\.0 "):
        Config(retry_delay=2, retry_max_delay=1)
    assert Config(retry_delay=10, retry_max_delay=10).retry_max_delay == 10.0


# --- admin_upstream ---------------------------------------------------------------------------


def test_admin_upstream_redacted() -> None:
    config = Config(upstream="postgresql://app:a@db/app", admin_upstream="host=db password=b")
    assert config.admin_upstream_redacted() == "host=db password=********"
    assert Config(upstream="postgresql://app:a@db/app").admin_upstream_redacted() == (
        "postgresql://app:********@db/app"
    )
    assert Config().admin_upstream_redacted() == "(embedded)"


def test_admin_upstream_errors_never_show_the_password() -> None:
    for conninfo in [
        "postgresql://admin:s3cret@db/app?sslmode=bogus",
        "host=db password=s3cret oops",
    ]:
        exc = error("--admin-upstream", conninfo)
        assert exc.key == "admin_upstream"
        assert "s3cret" not in str(exc), str(exc)


def test_admin_upstream_verify_full_needs_a_root_cert(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    exc = error(env={env_var("admin_upstream"): "host=db sslmode=verify-full password=s3cret"})
    assert exc.key == "admin_upstream"
    assert "sslrootcert" in str(exc)
    assert "s3cret" not in str(exc)
    assert str(exc).endswith("set by PGMIGRATE_PROXY_ADMIN_UPSTREAM")
    conninfo = "host=db sslmode=verify-full sslrootcert=system"
    assert load("--admin-upstream", conninfo).admin_upstream == conninfo


# --- helpers for the guard --------------------------------------------------------------------


def test_guard_filters() -> None:
    config = load(
        "--min-transaction-age=3",
        "--min-query-age=4",
        "--blocker-states=idle in transaction,active",
        "--application-names=web-*",
        "--exclude-application-names=psql",
        "--users=app",
        "--exclude-users=postgres",
    )
    assert config.guard_filters() == Filters(
        min_transaction_age=3.0,
        min_query_age=4.0,
        states=frozenset({BackendState.IDLE_IN_TRANSACTION, BackendState.ACTIVE}),
        application_names=("web-*",),
        exclude_application_names=("psql",),
        users=("app",),
        exclude_users=("postgres",),
    )
    assert Config().guard_filters() == Filters()


def test_retry_schedule() -> None:
    config = load("--lock-budget=10", "--lock-timeout=0.2", "--retry-delay=0.1")
    schedule = config.retry_schedule()
    assert (schedule.budget, schedule.lock_timeout) == (10.0, 0.2)
    assert (schedule.base_delay, schedule.max_delay) == (0.1, 5.0)
    assert (schedule.multiplier, schedule.jitter) == (RetrySchedule.multiplier, 0.5)
    assert schedule.lock_timeout_ms(0.0) == 200
    assert schedule.lock_timeout_ms(9.95) == 50  # cut to what is left of the budget
    assert not schedule.attempts_left(10.0)


def test_retry_schedule_without_a_budget() -> None:
    schedule = Config().retry_schedule()
    assert schedule.budget == math.inf
    assert (schedule.lock_timeout, schedule.base_delay, schedule.max_delay) == (0.05, 0.05, 5.0)
    assert schedule.attempts_left(1e9)
    assert schedule.next_delay(100, random.Random(1), elapsed=1e9) <= 5.0


def test_retry_schedule_with_tiny_timeouts() -> None:
    schedule = Config(lock_timeout=0.001, lock_budget=0.002).retry_schedule()
    assert schedule.attempts_left(0.0)
    assert schedule.lock_timeout_ms(0.0) == 1
    schedule = Config(lock_budget=0.005).retry_schedule()
    assert schedule.attempts_left(0.0)
    assert schedule.attempt_timeout(0.0) == 0.005


def test_help_shows_the_guard_defaults() -> None:
    text = " ".join(build_parser().format_help().split())
    assert "--blocker-states BLOCKER_STATES" in text
    assert "Default: true. Env PGMIGRATE_PROXY_GUARD" in text
    assert "Default: empty. Env PGMIGRATE_PROXY_USERS" in text
    assert "Default: unset. Env PGMIGRATE_PROXY_LOCK_BUDGET" in text


# --- the settings schema: durations and ranges from every source ------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("50ms", 0.05),
        ("5s", 5.0),
        ("2min", 120.0),
        ("1.5", 1.5),
        (" 250 ms ", 0.25),
        ("1h", 3600.0),
    ],
)
def test_durations_take_units_everywhere(text: str, seconds: float, toml: Path) -> None:
    assert load("--max-hold", text).max_hold == seconds
    assert load(env={env_var("max_hold"): text}).max_hold == seconds
    toml.write_text(f"max_hold = '{text}'\n")
    assert load("--config", str(toml)).max_hold == seconds


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("watch_interval", "0.000001", "a duration from 10ms to 1min"),
        ("watch_interval", "5min", "a duration from 10ms to 1min"),
        ("lock_timeout", "1e308", "a duration from 1ms to 7d"),
        ("lock_timeout", "nan", "a duration from 1ms to 7d"),
        ("lock_timeout", "-inf", "a duration from 1ms to 7d"),
        ("max_hold", "-1s", "a duration from 1ms to 1d"),
        ("retry_max_delay", "2h", "a duration from 0 to 1h"),
        ("startup_timeout", "1e400", "a duration from 1ms to 1d"),
        ("min_transaction_age", "10d", "a duration from 0 to 7d"),
        ("lock_budget", "5 fortnights", "a duration from 1ms to 7d"),
    ],
)
def test_out_of_range_from_every_source(key: str, value: str, allowed: str, toml: Path) -> None:
    for exc in (
        error(f"{flag(key)}={value}"),
        error(env={env_var(key): value}),
    ):
        assert str(exc).startswith(f"invalid {key}: {value!r} (allowed: {allowed}")
    toml.write_text(f"{key} = {float(value) if value[-1].isdigit() else repr(value)}\n")
    assert error("--config", str(toml)).key == key


def test_toml_numbers_out_of_range(toml: Path) -> None:
    toml.write_text("watch_interval = 1e-6\n")
    assert "from 10ms to 1min" in str(error("--config", str(toml)))
    toml.write_text("lock_timeout = inf\n")
    assert error("--config", str(toml)).key == "lock_timeout"


def test_the_schema_names_every_config_key_and_the_enums() -> None:
    from pgmigrate_proxy import settings

    assert tuple(settings.SETTINGS) == KEYS
    assert tuple(action.value for action in BlockingAction) == settings.BLOCKING_ACTIONS
    assert tuple(then.value for then in DrainThen) == settings.DRAIN_THEN
    assert (
        tuple(s.value for s in BackendState if s is not BackendState.STARTING)
        == settings.BLOCKER_STATES
    )
    assert tuple(__import__("pgmigrate_proxy.logsetup").logsetup.LEVELS) == settings.LOG_LEVELS
    for setting in settings.SETTINGS.values():
        assert setting.parse(setting.default) == setting.default, setting.name
        assert setting.help and "\n" not in setting.help


def test_the_guard_defaults_agree() -> None:
    """Config, RetrySchedule, GuardSettings and Filters start from the same defaults."""
    from pgmigrate_proxy.runtime.guarding import GuardSettings

    config = Config()
    assert config.retry_schedule() == RetrySchedule()
    assert config.guard_filters() == Filters()
    guard = GuardSettings()
    assert (guard.max_hold, guard.watch_interval, guard.cancel_grace) == (
        config.max_hold,
        config.watch_interval,
        config.cancel_grace,
    )


def test_the_readme_tables_are_the_schemas() -> None:
    """The README's two settings tables are `python -m pgmigrate_proxy.settings`'s output."""
    from pgmigrate_proxy import settings

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert settings.markdown_table(settings.PROXY_KEYS) in readme
    assert settings.markdown_table(settings.GUARD_KEYS) in readme
    assert settings.markdown_table(settings.POOL_KEYS) in readme
