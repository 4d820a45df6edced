"""sd_notify against real AF_UNIX datagram sockets: a path, and the abstract '@' namespace."""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pgmigrate_proxy import sdnotify


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (AF_UNIX paths are limited to 107 bytes)."""
    with tempfile.TemporaryDirectory(prefix="sdn-") as name:
        yield Path(name)


@pytest.fixture
def path_socket(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = short_dir / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


@pytest.fixture
def abstract_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"pgmigrate-test-{os.getpid()}-{secrets.token_hex(4)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


def received(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().split("\n")


def test_without_notify_socket_nothing_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False


def test_ready_on_a_path_socket(path_socket: socket.socket) -> None:
    assert sdnotify.ready() is True
    assert received(path_socket) == ["READY=1"]


def test_ready_on_an_abstract_socket(abstract_socket: socket.socket) -> None:
    assert sdnotify.ready("listening on 127.0.0.1:6432") is True
    assert received(abstract_socket) == ["READY=1", "STATUS=listening on 127.0.0.1:6432"]


def test_several_states_go_in_one_datagram(path_socket: socket.socket) -> None:
    assert sdnotify.notify("STATUS=busy", "WATCHDOG=1") is True
    assert received(path_socket) == ["STATUS=busy", "WATCHDOG=1"]


def test_stopping(abstract_socket: socket.socket) -> None:
    assert sdnotify.stopping() is True
    assert received(abstract_socket) == ["STOPPING=1"]


def test_reloading_carries_monotonic_usec(path_socket: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = received(path_socket)
    assert first == "RELOADING=1"
    name, _, value = second.partition("=")
    assert name == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_status_is_one_line(path_socket: socket.socket) -> None:
    sdnotify.ready("two\nlines")
    assert received(path_socket) == ["READY=1", "STATUS=two lines"]


def test_environ_argument_wins(path_socket: socket.socket) -> None:
    assert sdnotify.notify("READY=1", environ={}) is False


@pytest.mark.parametrize("value", ["", "relative/path", "vsock:2:1234"])
def test_unsupported_addresses_are_ignored(value: str) -> None:
    assert sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": value}) is False


def test_a_missing_socket_is_not_an_error(short_dir: Path) -> None:
    environ = {"NOTIFY_SOCKET": str(short_dir / "absent")}
    assert sdnotify.notify("READY=1", environ=environ) is False
