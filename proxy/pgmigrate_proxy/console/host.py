"""What the admin console needs of the proxy server it runs in (runtime/server.py implements
it), who may use the console and how far, and the PAUSE gate on client sessions."""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection
from typing import Protocol

from pgmigrate_proxy.config import Config
from pgmigrate_proxy.protocol.types import TransactionStatus
from pgmigrate_proxy.runtime import guarding
from pgmigrate_proxy.runtime.clientauth import AuthService
from pgmigrate_proxy.runtime.context import CONSOLE_DATABASES, SessionSettings
from pgmigrate_proxy.runtime.pool import PoolRegistry
from pgmigrate_proxy.runtime.session import ClientSession, Phase


class Access(enum.Enum):
    """How far a console user may go."""

    ADMIN = "admin"  # admin_users: every command
    STATS = "stats"  # stats_users: SHOW only


def access(config: Config, user: str) -> Access | None:
    """The user's access to the console (None: not allowed in)."""
    if user in config.admin_users:
        return Access.ADMIN
    if user in config.stats_users:
        return Access.STATS
    return None


class ConsoleHost(Protocol):
    """The proxy server, as the console sees it."""

    config: Config
    settings: SessionSettings
    guard: guarding.GuardServices
    pools: PoolRegistry
    auth: AuthService | None
    gate: Gate
    started: float  # time.time() at start
    #: set by the pgmigrate-proxy service: re-read the config (SIGHUP's), begin the shutdown
    reload_hook: Callable[[str], None] | None
    stop_hook: Callable[[str], None] | None

    @property
    def sessions(self) -> Collection[ClientSession]: ...
    def client_id(self, session: ClientSession) -> int: ...
    def reload(self, config: Config) -> list[str]: ...
    def stop(self, *, wait_for_clients: bool) -> None: ...


def database_of(session: ClientSession) -> str:
    return session.parameters.get("database") or session.parameters.get("user", "")


def is_console(session: ClientSession) -> bool:
    return database_of(session) in CONSOLE_DATABASES


def at_rest(session: ClientSession) -> bool:
    """Between transactions, nothing owed by its server, no statement held: PAUSE may stop
    reading from it here."""
    if session.phase is not Phase.RELAY or not session.at_boundary:
        return False
    holder, server = session.holder, session.server
    if holder is not None and holder.task is not None:
        return False  # a held statement runs, or a server is being acquired for its data
    if server is None:
        return True  # transaction pooling between transactions (the holder waits for data)
    if holder is not None and holder.holding:
        return False
    return server.status is TransactionStatus.IDLE and server.replies.idle


class Gate:
    """PAUSE's state: the paused databases (None in the set: all), and the gating of sessions
    (their client's messages are not read until RESUME)."""

    def __init__(self) -> None:
        self.paused: set[str | None] = set()

    def is_paused(self, database: str) -> bool:
        return None in self.paused or database in self.paused

    def covers(self, session: ClientSession, database: str | None) -> bool:
        return not is_console(session) and database in (None, database_of(session))

    def close(self, session: ClientSession) -> bool:
        """Stop reading from `session` if it is at rest; True when it is gated (now or before)."""
        if session.gated:
            return True
        if not at_rest(session):
            return False
        session.gated = True
        session.pause_client_reading()
        return True

    def admitted(self, session: ClientSession) -> None:
        """A client just logged in: gated at once while its database is paused."""
        if self.paused and not is_console(session) and self.is_paused(database_of(session)):
            session.gated = True
            session.pause_client_reading()

    def open(self, sessions: Collection[ClientSession]) -> int:
        """RESUME: read again from the gated sessions no pause covers now; how many."""
        count = 0
        for session in sessions:
            if session.gated and not self.is_paused(database_of(session)):
                session.gated = False
                session.resume_client_reading()
                count += 1
        return count
