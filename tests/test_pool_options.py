"""The startup `options` string as transaction pooling reads it (protocol/startup_options.py,
runtime/pool.py): its `-c` settings, the first part it cannot carry, and the synced parameters
a client set."""

from __future__ import annotations

import pytest
from pgmigrate_proxy.protocol.startup_options import startup_settings
from pgmigrate_proxy.runtime.pool import synced, unpoolable


@pytest.mark.parametrize(
    ("options", "settings", "other"),
    [
        ("", {}, None),
        ("-c TimeZone=UTC", {"timezone": "UTC"}, None),
        ("-cDateStyle=ISO --search-path=a,b", {"datestyle": "ISO", "search_path": "a,b"}, None),
        ("-c application_name=my\\ app", {"application_name": "my app"}, None),
        ("-c work_mem=2MB -e", {"work_mem": "2MB"}, "-e"),
        ("-c", {}, "-c"),
        ("-c novalue", {}, "-c"),
    ],
)
def test_startup_settings(options: str, settings: dict[str, str], other: str | None) -> None:
    assert startup_settings(options) == (settings, other)


@pytest.mark.parametrize(
    ("options", "part"),
    [
        ("-c TimeZone=UTC -c pgmigrate.lock_timeout=1s", None),
        ("-c TimeZone=UTC -c work_mem=2MB", "-c work_mem=2MB"),
        ("--statement-timeout=5s", "-c statement_timeout=5s"),
        ("-B 100", "-B"),
    ],
)
def test_unpoolable(options: str, part: str | None) -> None:
    assert unpoolable(options) == part


def test_the_packets_own_parameters_win_over_options() -> None:
    parameters = {
        "user": "u",
        "TimeZone": "UTC",
        "options": "-c timezone=Asia/Tokyo -c DateStyle=ISO",
    }
    assert synced(parameters) == {"timezone": "UTC", "datestyle": "ISO"}
