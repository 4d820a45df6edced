"""Config: precedence of file, env and flags; one-line errors naming the key; redaction."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import pytest
from pgmigrate_proxy.config import (
    KEYS,
    RELOADABLE,
    Config,
    ConfigError,
    env_var,
    flag,
    load_config,
)
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
    "upstream": ("host=db", "host=db"),
    "log_level": ("Warning", "warning"),
    "log_format": ("json", "json"),
    "max_message_size": ("8192", 8192),
    "startup_timeout": ("0.5", 0.5),
    "shutdown_grace": ("0", 0.0),
    "client_tls_cert_file": ("", None),
    "client_tls_key_file": ("", None),
    "client_tls_mode": ("disable", "disable"),
    "embedded_data_dir": ("/var/lib/pg", "/var/lib/pg"),
    "embedded_pg": ("15", "15"),
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
        "embedded_data_dir",
        "embedded_pg",
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
