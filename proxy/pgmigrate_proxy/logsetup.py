"""Logging for the `pgmigrate_proxy` namespace: text or JSON lines, and redaction of secrets."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

LOGGER_NAME = "pgmigrate_proxy"
#: Other loggers whose records the proxy's handler formats (asyncio's own reports).
ADOPTED_LOGGERS = ("asyncio",)
MASK = "********"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# libpq ends a URL's user:password at the first "@" or "/", so neither can occur in the secret.
_URL_PASSWORD = re.compile(r"(?i)(postgres(?:ql)?://[^:@/\s]*:)[^@/\s]*@")
# password=... as a URL query parameter: the value ends at "&", "#" or whitespace.
_QUERY_PASSWORD = re.compile(r"(?i)([?&][a-z]*password=)[^&#\s]*")
# password=... in key=value conninfo (and PGPASSWORD=..., sslpassword=...): quoted or bare.
_KV_PASSWORD = re.compile(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'?|[^\s'&]+)")


def redact(text: str) -> str:
    """Return `text` with passwords in libpq URLs and key=value conninfo replaced by the mask."""
    text = _URL_PASSWORD.sub(rf"\g<1>{MASK}@", text)
    text = _QUERY_PASSWORD.sub(rf"\g<1>{MASK}", text)
    return _KV_PASSWORD.sub(rf"\g<1>{MASK}", text)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, dict) else {}


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, then the record's `fields`."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in _fields(record).items():  # user data too (queries): redacted
            entry.setdefault(str(key), redact(value) if isinstance(value, str) else value)
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`<ts> <LEVEL> <logger>: <msg> key=value ...`, redacted: the record's `fields` that the
    message does not already show as `key=...` (the guard's messages show theirs)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        shown = record.getMessage()
        extra = " ".join(
            f"{key}={value!r}"
            for key, value in _fields(record).items()
            if not re.search(rf"(?<![\w.]){re.escape(str(key))}=", shown)
        )
        return redact(f"{line} {extra}" if extra else line)


_FORMATTERS: dict[str, type[logging.Formatter]] = {
    "text": TextFormatter,
    "json": JsonLinesFormatter,
}


class _ProxyHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler `configure` owns, so that reconfiguring replaces it instead of adding one."""


def configure(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """(Re)configure the `pgmigrate_proxy` logger, and asyncio's, which then writes through
    the same handler (a JSON log stays JSON, redaction applies); safe to call again on reload."""
    logger = logging.getLogger(LOGGER_NAME)
    for old in [h for h in logger.handlers if isinstance(h, _ProxyHandler)]:
        logger.removeHandler(old)
        if stream is None:
            stream = old.stream
    handler = _ProxyHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_FORMATTERS[fmt]())
    for adopted in (logger, *map(logging.getLogger, ADOPTED_LOGGERS)):
        for old in [h for h in adopted.handlers if isinstance(h, _ProxyHandler)]:
            adopted.removeHandler(old)
        adopted.addHandler(handler)
        adopted.propagate = False
    logger.setLevel(LEVELS[level])


def loop_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's exception handler: what escaped a callback or a task is logged on the
    proxy's logger (its formatter, its redaction), never printed around it."""
    exc = context.get("exception")
    message = context.get("message") or "unhandled exception in the event loop"
    task = context.get("task") or context.get("future")
    where = f" ({task.get_name()})" if isinstance(task, asyncio.Task) else ""
    logging.getLogger(LOGGER_NAME + ".loop").error(
        "%s%s", message, where, exc_info=exc if isinstance(exc, BaseException) else None
    )
