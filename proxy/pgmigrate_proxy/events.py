"""Guard events on the database itself (LISTEN/NOTIFY): the channels' names, the proxy's identity,
and the JSON payloads (events, requests for the statements held now, answers), each under
PostgreSQL's 8000-byte limit and holding nothing a role with no rights could not see itself.

Anyone who may connect to the database may LISTEN, so a payload carries of the blocking sessions
only what pg_stat_activity shows every role (pid, user, application_name) plus their state and
ages: never their query text, pga_context or client address. The guarded statement's text is
there, redacted as the logs redact it and cut short: it is DDL, whose effect every role can read
in the catalogs anyway.
"""

from __future__ import annotations

import json
import os
import re
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Final

from pgmigrate_proxy.guard.blockers import redact_query

#: The default channel of the guard events (setting `events_channel`).
DEFAULT_CHANNEL: Final = "pgmigrate_events"
#: Requests for the held statements go on the events channel's name with this suffix (a channel
#: of their own: the proxies LISTEN only to it, never to the busy events channel).
REQUEST_SUFFIX: Final = "_request"
#: A NOTIFY payload must be shorter than 8000 bytes (PostgreSQL's default build).
PAYLOAD_LIMIT: Final = 7999
#: The guarded statement's text is cut to this many characters.
STATEMENT_LIMIT: Final = 1000
#: A channel name: an identifier short enough for the request suffix (NAMEDATALEN 64).
CHANNEL_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,54}")

#: Event fields that only a role allowed to see the blocker's session may have: never sent.
PRIVATE_FIELDS: Final = frozenset({"query", "context", "client_addr"})

#: The events after which a unit is held no more.
FINAL_EVENTS: Final = frozenset({"applied", "failed", "gave_up", "dropped", "not_guarded"})


@dataclass(frozen=True)
class Identity:
    """Which proxy sent a payload: its host, process and a random id of this run."""

    host: str
    pid: int
    instance: str

    @classmethod
    def current(cls) -> Identity:
        return cls(socket.gethostname(), os.getpid(), uuid.uuid4().hex[:12])

    def as_dict(self) -> dict[str, object]:
        return {"host": self.host, "pid": self.pid, "instance": self.instance}


def request_channel(channel: str) -> str:
    return channel + REQUEST_SUFFIX


def now_text() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def public(fields: Mapping[str, object]) -> dict[str, object]:
    """The fields anyone on the channel may have: no other session's query, context or address;
    the guarded statement redacted and cut short; no empty values."""
    shown: dict[str, object] = {}
    for key, value in fields.items():
        if value is None or key in PRIVATE_FIELDS:
            continue
        if key == "statement" and isinstance(value, str):
            value = redact_query(value)[:STATEMENT_LIMIT]
        shown[key] = value
    return shown


def event_payload(name: str, fields: Mapping[str, object], identity: Identity) -> str:
    """One guard event as a NOTIFY payload."""
    body = {"kind": "event", "event": name, "ts": now_text(), "proxy": identity.as_dict()}
    return fit({**body, **public(fields)})


def request_payload(request_id: str) -> str:
    """Asks every proxy listening on the request channel to announce its held statements."""
    return json.dumps({"kind": "request", "id": request_id})


def holding_payload(request_id: str, held: Mapping[str, object], identity: Identity) -> str:
    """One held statement, in answer to request `request_id`."""
    body = {"kind": "holding", "request": request_id, "ts": now_text(), "proxy": identity.as_dict()}
    return fit({**body, **public(held)})


def fit(body: Mapping[str, object]) -> str:
    """`body` as JSON shorter than PAYLOAD_LIMIT bytes: the longest texts cut until it fits."""
    body = dict(body)
    text = _dumps(body)
    while len(text.encode()) > PAYLOAD_LIMIT:
        longest = max(
            (k for k, v in body.items() if isinstance(v, str) and len(v) > 32),
            key=lambda k: len(str(body[k])),
            default=None,
        )
        if longest is None:  # no long text left to cut: keep what says what it is
            keep = ("kind", "event", "request", "ts", "proxy", "unit", "statement_pid")
            return _dumps({k: body[k] for k in keep if k in body} | {"truncated": True})
        value = str(body[longest])
        excess = len(text.encode()) - PAYLOAD_LIMIT
        # each cut leaves a shorter text, or one of 19 characters that is no longer cut
        body[longest] = value[: max(16, len(value) - excess - 8)] + "..."
        text = _dumps(body)
    return text


def parse(payload: str) -> dict[str, Any] | None:
    """A payload of ours as a dict (None for anything else on the channel)."""
    try:
        found = json.loads(payload)
    except ValueError:
        return None
    return found if isinstance(found, dict) and isinstance(found.get("kind"), str) else None


def describe(message: Mapping[str, Any]) -> str:
    """A payload in one line, as `pgmigrate-proxy watch` prints it."""
    proxy = message.get("proxy") or {}
    origin = f"{proxy.get('host', '?')}:{proxy.get('pid', '?')}"
    ts = str(message.get("ts", ""))[11:23]
    name = message.get("event") or message.get("kind")
    skip = {"kind", "event", "ts", "proxy"}
    rest = " ".join(f"{k}={_shown(v)}" for k, v in message.items() if k not in skip)
    return f"{ts} {origin} {name} {rest}".rstrip()


def _shown(value: object) -> str:
    if isinstance(value, str) and value and not re.search(r"\s|[\"=]", value):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)


def _dumps(body: Mapping[str, object]) -> str:
    return json.dumps(body, ensure_ascii=False, default=str, separators=(",", ":"))
