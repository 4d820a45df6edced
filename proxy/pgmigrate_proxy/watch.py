"""`pgmigrate-proxy watch`: LISTEN on the events channel and print each guard event as it comes."""

from __future__ import annotations

import json
import sys
from typing import TextIO

import psycopg
from psycopg import sql

from pgmigrate_proxy import events
from pgmigrate_proxy.logsetup import redact

PROG = "pgmigrate-proxy watch"


def run(
    conninfo: str, channel: str | None = None, *, as_json: bool = False, out: TextIO | None = None
) -> int:
    """Print the events until Ctrl-C (exit 0); a bad channel or a failed connection: one line
    on stderr, exit 2. The connection needs no privilege: any role may LISTEN."""
    out = out or sys.stdout
    channel = channel or events.DEFAULT_CHANNEL
    if not events.CHANNEL_RE.fullmatch(channel):
        print(f"{PROG}: --channel: {channel!r} is not allowed; letters, digits and _ "
              "(at most 55)", file=sys.stderr)  # fmt: skip
        return 2
    try:
        conn = psycopg.connect(conninfo, autocommit=True)
    except psycopg.Error as exc:
        line = " ".join(str(exc).split()) or type(exc).__name__
        print(f"{PROG}: cannot connect: {redact(line)}", file=sys.stderr)
        return 2
    try:
        with conn:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            print(f"{PROG}: listening on channel {channel}", file=sys.stderr, flush=True)
            while True:  # a timeout now and then: Ctrl-C is seen between the waits
                for notify in conn.notifies(timeout=1.0):
                    message = events.parse(notify.payload)
                    if message is None or message.get("kind") == "request":
                        continue
                    shown = events.describe(message)
                    print(json.dumps(message, ensure_ascii=False) if as_json else shown,
                          file=out, flush=True)  # fmt: skip
    except KeyboardInterrupt:
        return 0
    except psycopg.Error as exc:
        print(f"{PROG}: connection lost: {' '.join(str(exc).split())}", file=sys.stderr)
        return 1
