"""Every traceback goes through the proxy's log formatter (issue 9, finding 3): what escapes an
event-loop callback or task is logged on the proxy's logger, a JSON log stays one JSON object a
line, and redaction applies to the traceback too."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Callable, Iterator

import psycopg
import pytest
from pgmigrate_proxy import logsetup

from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy

pytestmark = pytest.mark.timeout(60)

SECRET = "s3cr3t-pw"
DSN = f"postgresql://app:{SECRET}@db.internal:5432/app"


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """configure(fmt="json") into a buffer; the loggers it touches are put back afterwards."""
    names = (logsetup.LOGGER_NAME, *getattr(logsetup, "ADOPTED_LOGGERS", ("asyncio",)))
    saved = {
        name: (list(logger.handlers), logger.propagate, logger.level)
        for name in names
        for logger in (logging.getLogger(name),)
    }
    stream = io.StringIO()
    logsetup.configure("debug", "json", stream)
    yield stream
    for name, (handlers, propagate, level) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.propagate, logger.level = propagate, level


def _entries(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]  # each line is JSON


def test_what_escapes_the_loop_is_logged_as_json_and_redacted(
    proxy_factory: Callable[..., RunningProxy], json_log: io.StringIO, proxy_log: list[str]
) -> None:
    proxy = proxy_factory()

    def boom() -> None:
        raise RuntimeError(f"could not reach {DSN}")

    async def escape() -> None:
        loop = asyncio.get_running_loop()
        loop.call_soon(boom)  # an exception in a callback: the loop's exception handler
        await asyncio.sleep(0.05)

    proxy.call(escape())
    entries = _entries(json_log)
    escaped = [e for e in entries if "boom" in str(e.get("exc", ""))]
    assert len(escaped) == 1, entries
    (entry,) = escaped
    assert entry["level"] == "error" and str(entry["logger"]).startswith("pgmigrate_proxy")
    assert "Traceback" in str(entry["exc"]) and SECRET not in json_log.getvalue()
    assert any("boom" in line for line in proxy_log)  # on the proxy's own logger


def test_asyncio_logger_writes_through_the_proxy_handler(json_log: io.StringIO) -> None:
    try:
        raise ValueError(f"password={SECRET}")
    except ValueError:
        logging.getLogger("asyncio").exception("Fatal error on transport")
    (entry,) = _entries(json_log)
    assert entry["logger"] == "asyncio" and entry["msg"] == "Fatal error on transport"
    assert "Traceback" in str(entry["exc"]) and SECRET not in json_log.getvalue()


def test_json_fields_are_redacted_like_the_text_line(json_log: io.StringIO) -> None:
    """A guard event's fields hold user data (a blocker's query, a statement): a password in
    them is masked in the JSON log as in the text one."""
    query = f"SELECT dblink_connect('{DSN}'), dblink_connect('host=h password={SECRET}')"
    logging.getLogger("pgmigrate_proxy.guard").info(
        "guard terminated", extra={"fields": {"event": "terminated", "query": query, "pid": 7}}
    )
    (entry,) = _entries(json_log)
    assert SECRET not in json_log.getvalue()
    assert entry["pid"] == 7 and "dblink_connect" in str(entry["query"])


@pytest.fixture
def text_log() -> Iterator[io.StringIO]:
    """configure(fmt="text") into a buffer; the loggers it touches are put back afterwards."""
    names = (logsetup.LOGGER_NAME, *logsetup.ADOPTED_LOGGERS)
    saved = {name: (list(lg.handlers), lg.propagate, lg.level) for name in names
             for lg in (logging.getLogger(name),)}  # fmt: skip
    stream = io.StringIO()
    logsetup.configure("info", "text", stream)
    yield stream
    for name, (handlers, propagate, level) in saved.items():
        logger = logging.getLogger(name)
        logger.handlers[:] = handlers
        logger.propagate, logger.level = propagate, level


def test_text_lines_show_each_field_once(
    proxy_factory: Callable[..., RunningProxy], pg: PgInfo, text_log: io.StringIO
) -> None:
    """A guarded ALTER's log lines in the text format: each key=value once (they were repeated
    after the message: `attempts=1 elapsed_ms=38 ... attempts=1 elapsed_ms=38`)."""
    proxy = proxy_factory()
    with psycopg.connect(proxy.conninfo(pg.superuser), autocommit=True) as conn:
        conn.execute("CREATE TABLE log_fields (id int)")
        conn.execute("ALTER TABLE log_fields ADD COLUMN a int")
        conn.execute("DROP TABLE log_fields")
    guard_lines = [line for line in text_log.getvalue().splitlines() if " guard " in line]
    assert any(" guard applied " in line for line in guard_lines), text_log.getvalue()
    for line in guard_lines:
        keys = re.findall(r" ([a-z_]+)=", line)
        assert len(keys) == len(set(keys)), line


def test_text_fields_not_in_the_message_are_appended() -> None:
    record = logging.LogRecord("pgmigrate_proxy.x", logging.INFO, __file__, 1, "guard held "
                               "pid=%d", (7,), None)  # fmt: skip
    record.fields = {"event": "held", "pid": 7, "app_pid": 8}
    line = logsetup.TextFormatter().format(record)
    assert line.endswith(": guard held pid=7 event='held' app_pid=8"), line
