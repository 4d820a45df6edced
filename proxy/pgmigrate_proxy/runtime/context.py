"""What every session needs from the server, as one immutable value replaced on reload."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from pgmigrate_proxy.runtime.upstream import UpstreamTarget

#: The startup databases the proxy serves itself: the admin console (pgbouncer's name too).
CONSOLE_DATABASES = ("pgmigrate", "pgbouncer")


@dataclass(frozen=True)
class SessionSettings:
    """The settings a new session starts with; a reload makes new sessions see new values."""

    upstream: UpstreamTarget
    max_message_size: int
    startup_timeout: float
    client_tls: ssl.SSLContext | None
    require_client_tls: bool
    proxy_version: str
