"""The console's sans-IO parts: the command language (a table of texts and what they mean) and
the wire replies (golden bytes); the README's table of the console's settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from pgmigrate_proxy import settings
from pgmigrate_proxy.console.commands import LIVE
from pgmigrate_proxy.console.parse import Command, CommandError, Verb, parse
from pgmigrate_proxy.console.rows import Table, result

README = Path(__file__).resolve().parents[2] / "README.md"

PARSED = [
    ("SHOW POOLS", Command(Verb.SHOW, "POOLS")),
    ("show stats_totals;", Command(Verb.SHOW, "STATS_TOTALS")),
    ("SHOW EVENTS", Command(Verb.SHOW, "EVENTS", "20")),
    ("SHOW EVENTS 5", Command(Verb.SHOW, "EVENTS", "5")),
    ("pause", Command(Verb.PAUSE)),
    ("PAUSE app", Command(Verb.PAUSE, argument="app")),
    ('RESUME "My Db"', Command(Verb.RESUME, argument="My Db")),
    ("RECONNECT", Command(Verb.RECONNECT)),
    ("KILL_CLIENT 12", Command(Verb.KILL_CLIENT, argument="12")),
    ("RELOAD", Command(Verb.RELOAD)),
    ("SHUTDOWN", Command(Verb.SHUTDOWN)),
    ("shutdown wait_for_clients", Command(Verb.SHUTDOWN, argument="WAIT_FOR_CLIENTS")),
    ("SET default_pool_size = 5", Command(Verb.SET, "default_pool_size", "5")),
    ("SET lock_timeout TO '100ms'", Command(Verb.SET, "lock_timeout", "100ms")),
    ("SET a_query = 'DISCARD ''ALL'''", Command(Verb.SET, "a_query", "DISCARD 'ALL'")),
    ("RELEASE 3", Command(Verb.RELEASE, argument="3")),
    ("TERMINATE BLOCKERS", Command(Verb.TERMINATE_BLOCKERS)),
    ("cancel blockers 4", Command(Verb.CANCEL_BLOCKERS, argument="4")),
    ("", Command(Verb.EMPTY)),
    (" ; ", Command(Verb.EMPTY)),
]

REFUSED = [
    "SELECT 1", "SHOW", "SHOW TABLES", "SHOW POOLS x", "SHOW EVENTS many", "KILL_CLIENT",
    "KILL_CLIENT abc", "KILL_CLIENT -1", "RELEASE", "TERMINATE", "TERMINATE BLOCKERS x",
    "SHUTDOWN NOW", "SET a", "SET a = ", "RELOAD now", "PAUSE a b", "SHOW POOLS; SHOW STATS",
    "BEGIN",
]  # fmt: skip


@pytest.mark.parametrize(("text", "command"), PARSED)
def test_parse(text: str, command: Command) -> None:
    assert parse(text) == command


@pytest.mark.parametrize("text", REFUSED)
def test_refused_with_42601(text: str) -> None:
    with pytest.raises(CommandError) as refused:
        parse(text)
    assert refused.value.code == "42601"


def test_read_only() -> None:
    assert parse("SHOW HELD").read_only
    assert not parse("PAUSE").read_only
    assert not parse("TERMINATE BLOCKERS").read_only


def test_result_golden_bytes() -> None:
    table = Table(("name", "n", "ok"), [("a", 1, True), (None, 2, False)])
    assert result(table) == (
        b"T\x00\x00\x00\x46\x00\x03"
        b"name\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x19\xff\xff\xff\xff\xff\xff\x00\x00"
        b"n\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x14\x00\x08\xff\xff\xff\xff\x00\x00"
        b"ok\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x10\x00\x01\xff\xff\xff\xff\x00\x00"
        b"D\x00\x00\x00\x15\x00\x03\x00\x00\x00\x01a\x00\x00\x00\x011\x00\x00\x00\x01t"
        b"D\x00\x00\x00\x14\x00\x03\xff\xff\xff\xff\x00\x00\x00\x012\x00\x00\x00\x01f"
        b"C\x00\x00\x00\x09SHOW\x00"
    )


def test_readme_lists_the_console_settings() -> None:
    assert settings.markdown_table(settings.CONSOLE_KEYS) in README.read_text()


def test_readme_lists_what_set_may_change() -> None:
    paragraph = README.read_text().split("- **`SET key = value`**", 1)[1].split("\n- ", 1)[0]
    assert all(f"`{key}`" in paragraph for key in LIVE)
