"""systemd's sd_notify protocol with the standard library: state lines sent to $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"


def _address(value: str) -> str | None:
    """The AF_UNIX address for $NOTIFY_SOCKET: a path, or '@name' for the abstract namespace."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock: and other forms are not supported


def notify(*states: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send `states` (e.g. "READY=1") in one datagram; False when there is no socket or it fails."""
    value = (os.environ if environ is None else environ).get(NOTIFY_SOCKET_ENV, "")
    address = _address(value) if value else None
    if address is None or not states or not hasattr(socket, "AF_UNIX"):
        return False
    payload = "\n".join(states).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(payload)
    except OSError:
        return False
    return True


def _with_status(states: list[str], status: str | None) -> tuple[str, ...]:
    if status:
        states.append("STATUS=" + " ".join(status.split()))
    return tuple(states)


def ready(status: str | None = None) -> bool:
    """Tell systemd that start-up (or a reload) is complete."""
    return notify(*_with_status(["READY=1"], status))


def stopping(status: str | None = None) -> bool:
    """Tell systemd that shutdown has begun."""
    return notify(*_with_status(["STOPPING=1"], status))


def reloading(status: str | None = None) -> bool:
    """Tell systemd that a reload has begun, with MONOTONIC_USEC (CLOCK_MONOTONIC in µs)."""
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(*_with_status(["RELOADING=1", f"MONOTONIC_USEC={now}"], status))
