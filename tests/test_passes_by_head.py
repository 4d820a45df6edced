"""A long Query or Parse text judged by its head (runtime/hold.py) is judged as the whole text
would be: it passes only when classifying the whole would let it pass."""

from __future__ import annotations

import pytest
from pgmigrate_proxy.protocol import extended
from pgmigrate_proxy.runtime import guarding
from pgmigrate_proxy.runtime.detect import _LONG_TEXT
from pgmigrate_proxy.runtime.detect import passes_by_head as _passes_by_head
from pgmigrate_proxy.sql import classify, is_plain

LONG = _LONG_TEXT + 10


def _whole_passes(payload: bytes) -> bool:
    sql = extended.query_text(payload)
    return is_plain(sql) or not any(guarding.needs_guard(s) for s in classify(sql))


@pytest.mark.parametrize(
    "text",
    [
        "SELECT 1;" * (LONG // 9) + "ALTER TABLE t ADD c int",  # the finding: passes, as before
        "ALTER TABLE t ADD c int;" + "SELECT 1;" * (LONG // 9),  # guarded: the usual path
        "/* " + "x" * LONG + " */ ALTER TABLE t ADD c int",  # no keyword in the head: passes
        "-- é\n" * (LONG // 6) + "DROP TABLE t",
        "SELECT 'é';" * (LONG // 13),
        "SELECT 1; DROP TABLE t\0" + "x" * LONG,  # ends early: judged whole (guarded)
        "\0" + "SELECT 1;" * (LONG // 9),
        "é" * (LONG // 2) + " SELECT 1",  # 2-byte characters: still over the limit
    ],
)
def test_judged_as_the_whole_text(text: str) -> None:
    payload = text.encode() + b"\0"
    if _passes_by_head(payload):
        assert _whole_passes(payload)
    parse = b"name\0" + payload + b"\0\0"
    assert _passes_by_head(parse, 5) == _passes_by_head(payload)


def test_the_finding_is_judged_by_its_head() -> None:
    assert _passes_by_head(("SELECT 1;" * 1_000_000 + "ALTER TABLE t ADD c int").encode() + b"\0")
    assert not _passes_by_head(b"SELECT 1; DROP TABLE t\0" + b"x" * LONG)


@pytest.mark.parametrize("kind", ["query", "parse"])
def test_a_long_guarded_text_is_held_by_its_head_without_decoding_the_rest(kind: str) -> None:
    """A 10 MB ALTER is guarded as classify judges it (unknown targets), and the statement the
    guard logs and shows is its head: the whole text is never decoded on the loop (a 100 MB one
    stalled every client for 600 ms)."""
    from pgmigrate_proxy.protocol.framing import Frame
    from pgmigrate_proxy.protocol.types import FrontendType
    from pgmigrate_proxy.runtime.detect import Detector
    from pgmigrate_proxy.sql.classify import MAX_CLASSIFIED

    text = "ALTER TABLE t ADD c int /* " + "x" * 10_000_000 + " */"
    payload = text.encode() + b"\0"
    if kind == "parse":
        frame = Frame(FrontendType.PARSE, b"stmt\0" + payload + b"\0\0", 0)
    else:
        frame = Frame(FrontendType.QUERY, payload, 0)
    found = Detector().guarded(frame, failed=False)
    assert found is not None and len(found) == 1
    whole = classify(text)
    assert found[0].kind == whole[0].kind and found[0].unknown_targets
    assert found[0].text == text[:MAX_CLASSIFIED]
    assert Detector().guarded(frame, failed=True) is None  # the server rejects it anyway
