"""Whether PostgreSQL refused the admin connection's login (a setup error), and what to say."""

from __future__ import annotations

import getpass
import os
from typing import Final

from psycopg.conninfo import conninfo_to_dict

#: What the admin role needs: see every session's activity and signal them.
PRIVILEGES: Final = "a superuser, or a role granted pg_read_all_stats and pg_signal_backend"

#: libpq's FATAL texts of a server that may accept the same login later (53300, 57P03, ...).
_TRANSIENT: Final = (
    "too many clients",
    "remaining connection slots",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "the database system is not accepting connections",
)
#: libpq's own words when the server asked for a password that the conninfo does not give.
_NO_PASSWORD: Final = "no password supplied"


def refused(message: str) -> bool:
    """True when libpq's `message` is the server refusing the login (not a network failure
    nor a server that is starting, stopping or full)."""
    if _NO_PASSWORD in message:
        return True
    return "FATAL:" in message and not any(text in message for text in _TRANSIENT)


def conninfo_user(conninfo: str) -> str | None:
    """The user the conninfo names, if any."""
    try:
        user = conninfo_to_dict(conninfo).get("user")
    except Exception:  # unparsable: the connect error says so
        return None
    return str(user) if user else None


def server_reason(message: str) -> str:
    """The server's own words in libpq's `message` (after "FATAL:"), else its first line."""
    for line in message.splitlines():
        if "FATAL:" in line:
            return line.split("FATAL:", 1)[1].strip()
    lines = message.strip().splitlines()
    return lines[0] if lines else "refused"


def refusal(conninfo: str, message: str) -> str:
    """One line about a refused admin login: the user, the server's reason and the fix."""
    user = conninfo_user(conninfo)
    who = (
        repr(user)
        if user
        else (
            f"{os.environ.get('PGUSER') or getpass.getuser()!r} (the URL names no user: libpq took "
            "PGUSER or the OS user)"
        )
    )
    return (
        f"the admin connection's login as {who} was refused: {server_reason(message)}; it logs "
        f"in as the user of admin_upstream, else of upstream: give one that PostgreSQL accepts, "
        f"{PRIVILEGES}"
    )
