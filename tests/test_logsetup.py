"""Every traceback goes through the proxy's log formatter (issue 9, finding 3): what escapes an
event-loop callback or task is logged on the proxy's logger, a JSON log stays one JSON object a
line, and redaction applies to the traceback too."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable, Iterator

import pytest
from pgmigrate_proxy import logsetup

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
