"""The retry window of protocol/retry.py: which batches open one, whether they may be resent,
and what of the server's replies reaches the client, fed whole and one byte at a time."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pgmigrate_proxy.protocol.framing import Frame, FrameScanner, frame
from pgmigrate_proxy.protocol.messages import ErrorResponse
from pgmigrate_proxy.protocol.retry import RetryWindow, batch, describes, stale_plan
from pgmigrate_proxy.protocol.types import BackendType, FrontendType

B, F = BackendType, FrontendType
FRONTEND = tuple(t.value for t in FrontendType)

BIND = frame(F.BIND, b"\0PGMIGRATE_1\0\0\0\0\0\0\0")
DESCRIBE = frame(F.DESCRIBE, b"P\0")
EXECUTE = frame(F.EXECUTE, b"\0" + struct.pack("!i", 0))
SYNC = frame(F.SYNC)
STALE = ErrorResponse.build(
    "ERROR", "0A000", "cached plan must not change result type", extra={"routine": "x"}
).encode()
OTHER_0A000 = ErrorResponse.build("ERROR", "0A000", "something else").encode()
BIND_COMPLETE = frame(B.BIND_COMPLETE)
ROW_DESCRIPTION = frame(B.ROW_DESCRIPTION, b"\0\0")
DATA_ROW = frame(B.DATA_ROW, b"\0\1\0\0\0\1x")
COMPLETE = frame(B.COMMAND_COMPLETE, b"SELECT 1\0")
READY = frame(B.READY_FOR_QUERY, b"I")
PARAMETER = frame(B.PARAMETER_STATUS, b"TimeZone\0UTC\0")
NOTICE = frame(B.NOTICE_RESPONSE, b"SNOTICE\0Mhi\0\0")


def client_frames(data: bytes) -> list[Frame]:
    return FrameScanner(watched=FRONTEND).feed(data)


def test_stale_plan_by_code_and_message_or_routine() -> None:
    assert stale_plan(STALE[5:])
    routine = ErrorResponse.build(
        "ERROR", "0A000", "translated", extra={"routine": "RevalidateCachedQuery"}
    ).encode()
    assert stale_plan(routine[5:])
    assert not stale_plan(OTHER_0A000[5:])
    assert not stale_plan(b"garbage")


@pytest.mark.parametrize(
    ("data", "first", "expected"),
    [
        (BIND + DESCRIBE + EXECUTE + SYNC, 0, True),
        (BIND + EXECUTE + BIND + DESCRIBE + EXECUTE + SYNC, 0, True),
        (DESCRIBE.replace(b"P", b"S") + SYNC, 0, True),
        (BIND + EXECUTE, 0, False),  # no Sync: the batch goes on in a later chunk
        (BIND + EXECUTE + SYNC + BIND + SYNC, 0, False),  # two batches
        (BIND + frame(F.FLUSH) + EXECUTE + SYNC, 0, False),
        (BIND + frame(F.QUERY, b"SELECT 1\0") + SYNC, 0, False),
        (SYNC, 0, False),
    ],
)
def test_batch(data: bytes, first: int, expected: bool) -> None:
    assert batch(client_frames(data), first, len(data)) is expected
    assert not batch(client_frames(data + b"x"), first, len(data) + 1)  # something after it


def test_describes_every_execute() -> None:
    assert describes(client_frames(BIND + DESCRIBE + EXECUTE + SYNC), idle=True)
    assert not describes(client_frames(BIND + DESCRIBE + EXECUTE + SYNC), idle=False)
    assert not describes(client_frames(BIND + EXECUTE + SYNC), idle=True)  # asyncpg's
    two = BIND + DESCRIBE + EXECUTE + BIND + EXECUTE + SYNC
    assert not describes(client_frames(two), idle=True)


def run(replies: bytes, *, resend: bool, step: int = 0) -> tuple[bytes, bool, int]:
    """Feed `replies` through a window (in chunks of `step` bytes; 0: whole): what passed,
    whether the window was over, how many times on_stale was called."""
    called: list[None] = []
    window = RetryWindow([], lambda _: called.append(None), resend=resend)
    scanner = FrameScanner(watched=range(256))
    passed = b""
    over = False
    chunks = (
        [replies] if not step else [replies[i : i + step] for i in range(0, len(replies), step)]
    )
    for chunk in chunks:
        if over:
            passed += chunk
            continue
        out, over = window.feed(scanner.feed(chunk), chunk)
        passed += out
    return passed, over, len(called)


SUCCESS = BIND_COMPLETE + ROW_DESCRIPTION + DATA_ROW + COMPLETE + READY
FAILED = STALE + READY


@pytest.mark.parametrize("step", [0, 1, 3])
def test_success_passes_everything_in_order(step: int) -> None:
    assert run(SUCCESS, resend=True, step=step) == (SUCCESS, True, 0)
    assert run(NOTICE + SUCCESS, resend=True, step=step) == (NOTICE + SUCCESS, True, 0)


@pytest.mark.parametrize("step", [0, 1, 3])
def test_stale_dropped_to_ready_when_resent(step: int) -> None:
    assert run(FAILED, resend=True, step=step) == (b"", True, 1)
    # a ParameterStatus amid them is passed on (not repeated by the resent batch); a notice
    # is dropped (it is); what follows the ReadyForQuery passes
    replies = NOTICE + PARAMETER + BIND_COMPLETE + STALE + READY + PARAMETER
    assert run(replies, resend=True, step=step) == (PARAMETER + PARAMETER, True, 1)


@pytest.mark.parametrize("step", [0, 1, 3])
def test_stale_passed_when_not_resent(step: int) -> None:
    assert run(BIND_COMPLETE + FAILED, resend=False, step=step) == (
        BIND_COMPLETE + FAILED,
        True,
        1,
    )


def test_error_after_rows_or_another_error_passes() -> None:
    late = BIND_COMPLETE + DATA_ROW + STALE + READY
    assert run(late, resend=True) == (late, True, 0)
    other = OTHER_0A000 + READY
    assert run(other, resend=True) == (other, True, 0)


@given(st.data())
def test_random_splits(data: st.DataObject) -> None:
    replies = data.draw(st.sampled_from([SUCCESS, FAILED, NOTICE + FAILED, BIND_COMPLETE + FAILED]))
    cuts = sorted(data.draw(st.sets(st.integers(1, len(replies) - 1), max_size=6)))
    called: list[None] = []
    window = RetryWindow([], lambda _: called.append(None), resend=True)
    scanner = FrameScanner(watched=range(256))
    passed, over = b"", False
    for start, end in zip([0, *cuts], [*cuts, len(replies)], strict=True):
        chunk = replies[start:end]
        if over:
            passed += chunk
            continue
        out, over = window.feed(scanner.feed(chunk), chunk)
        passed += out
    assert over
    assert passed == (SUCCESS if replies is SUCCESS else b"")
    assert len(called) == (replies is not SUCCESS)
