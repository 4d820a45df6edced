"""Who may use the admin console and how: the password is proven (relayed to PostgreSQL under
passthrough, checked by the proxy under auth_file), only admin_users and stats_users get in,
stats_users only SHOW; simple query protocol only; unknown commands are 42601."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors

from tests.console.conftest import OUTSIDER, STATS_USER, client, console, show
from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy

pytestmark = pytest.mark.integration

Keep = Callable[[psycopg.Connection[Any]], psycopg.Connection[Any]]


def test_a_user_in_neither_list_is_refused(console_proxy: RunningProxy) -> None:
    with pytest.raises(psycopg.OperationalError) as refused:
        console(console_proxy, OUTSIDER)
    assert "not in admin_users or stats_users" in str(refused.value)
    with pytest.raises(psycopg.OperationalError):
        console(console_proxy, OUTSIDER, dbname="pgbouncer")


def test_a_wrong_password_is_refused(console_proxy: RunningProxy) -> None:
    """Under passthrough the password is checked by a login at PostgreSQL (relayed)."""
    with pytest.raises(psycopg.OperationalError) as refused:
        console(console_proxy, STATS_USER, password="not-the-password")
    assert "password authentication failed" in str(refused.value)


def test_a_stats_user_can_show_but_not_pause(console_proxy: RunningProxy, opened: Keep) -> None:
    stats = opened(console(console_proxy, STATS_USER))
    columns, _ = show(stats, "POOLS")
    assert columns[0] == "database"
    for command in ("PAUSE", "RESUME", "RECONNECT", "KILL_CLIENT 1", "SET default_pool_size = 3",
                    "RELEASE 1", "TERMINATE BLOCKERS", "RELOAD", "SHUTDOWN"):  # fmt: skip
        with pytest.raises(errors.InsufficientPrivilege, match="only admin_users"):
            stats.execute(command)
    assert show(stats, "STATE")[1][0] == {"key": "active", "value": "yes"}


def test_auth_file_users_prove_their_password(
    proxy_factory: Callable[..., RunningProxy], pg: PgInfo, tmp_path: Path, opened: Keep
) -> None:
    auth_file = tmp_path / "users.txt"
    auth_file.write_text('"ops" "ops-secret"\n')
    proxy = proxy_factory(auth_type="auth_file", auth_file=str(auth_file), admin_users=("ops",))
    admin = opened(console(proxy, "ops", password="ops-secret"))
    assert show(admin, "VERSION")[1][0]["version"].startswith("pgmigrate-proxy")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        console(proxy, "ops", password="wrong")


def test_extended_protocol_and_unknown_commands_get_clear_errors(
    console_proxy: RunningProxy, pg: PgInfo, opened: Keep
) -> None:
    admin = opened(console(console_proxy, pg.superuser))
    with pytest.raises(errors.SyntaxError, match="invalid command"):
        admin.execute("SELECT 1")
    with pytest.raises(errors.SyntaxError, match="one command per query"):
        admin.execute("SHOW POOLS; SHOW STATS")
    # psycopg's own Cursor binds parameters on the server: Parse, Bind, Execute, Sync
    with pytest.raises(errors.FeatureNotSupported, match="simple query protocol"):
        psycopg.Cursor(admin).execute("SHOW EVENTS %s", (1,))
    with pytest.raises(errors.FeatureNotSupported, match="simple query protocol"):
        psycopg.Cursor(admin).execute("SHOW POOLS", prepare=True)
    assert show(admin, "VERSION")[1]  # still usable afterwards


def test_set_changes_a_live_setting_and_refuses_the_others(
    console_proxy: RunningProxy, pg: PgInfo, opened: Keep
) -> None:
    admin = opened(console(console_proxy, pg.superuser))
    admin.execute("SET default_pool_size = 7")
    admin.execute("SET server_idle_timeout TO '2min'")
    config = {row["key"]: row["value"] for row in show(admin, "CONFIG")[1]}
    assert (config["default_pool_size"], config["server_idle_timeout"]) == ("7", "2min")
    assert console_proxy.server.config.default_pool_size == 7
    with pytest.raises(errors.ObjectNotInPrerequisiteState, match="cannot be changed with SET"):
        admin.execute("SET upstream = 'postgresql://elsewhere/'")
    with pytest.raises(errors.InvalidParameterValue, match="invalid default_pool_size"):
        admin.execute("SET default_pool_size = -1")
    with pytest.raises(errors.UndefinedObject, match="unrecognized configuration parameter"):
        admin.execute("SET no_such_thing = 1")


def test_reload_and_shutdown_need_the_service(
    console_proxy: RunningProxy, pg: PgInfo, opened: Keep
) -> None:
    admin = opened(console(console_proxy, pg.superuser))
    for command in ("RELOAD", "SHUTDOWN"):
        with pytest.raises(errors.ObjectNotInPrerequisiteState, match="pgmigrate-proxy service"):
            admin.execute(command)
    reloads: list[str] = []
    console_proxy.server.reload_hook = reloads.append
    admin.execute("RELOAD")
    assert reloads == ["RELOAD from the admin console"]


def test_kill_client(console_proxy: RunningProxy, pg: PgInfo, opened: Keep) -> None:
    victim = opened(client(console_proxy, application_name="to-be-killed"))
    bystander = opened(client(console_proxy, application_name="bystander"))
    admin = opened(console(console_proxy, pg.superuser))
    (row,) = [r for r in show(admin, "CLIENTS")[1] if r["application_name"] == "to-be-killed"]
    admin.execute(f"KILL_CLIENT {row['id']}")
    with pytest.raises(psycopg.OperationalError, match="administrator command"):
        victim.execute("SELECT 1")
    assert bystander.execute("SELECT 1").fetchone() == (1,)
    with pytest.raises(errors.UndefinedObject, match="no client with id"):
        admin.execute(f"KILL_CLIENT {row['id']}")
