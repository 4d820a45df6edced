"""In-process fuzz targets of the sans-IO layers, shared by the hypothesis tests (tests/fuzz) and
the atheris long runs (`scripts/fuzz inproc --runs 1000000`).

Each target takes arbitrary bytes and may raise only the exceptions its layer documents:
FrameScanner FramingError; ReplyQueue UnexpectedReply; Handshake DecodeError and
ChannelBindingMismatch; the virtual transaction and the extended-protocol decoders nothing but
DecodeError. Anything else (IndexError, struct.error, RecursionError...) is a crash.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable

from pgmigrate_proxy.protocol import extended
from pgmigrate_proxy.protocol.framing import FrameScanner, FramingError
from pgmigrate_proxy.protocol.handshake import ChannelBindingMismatch, Handshake
from pgmigrate_proxy.protocol.messages import DecodeError
from pgmigrate_proxy.protocol.replies import Expect, Owner, ReplyQueue, UnexpectedReply
from pgmigrate_proxy.protocol.types import BackendType, FrontendType, TransactionStatus
from pgmigrate_proxy.runtime.autocommit import Kind, State, VirtualTransaction


def _cuts(data: bytes) -> list[bytes]:
    """Split data into chunks at the places its first byte picks (deterministic)."""
    if not data:
        return [b""]
    step = data[0] % 7 + 1
    return [data[i : i + step] for i in range(1, len(data), step)] or [b""]


def framing(data: bytes) -> None:
    """Chunked feeding and cut() agree with feeding the whole, and frames re-encode to it."""
    body = data[1:]
    whole, chunked = FrameScanner(max_size=4096), FrameScanner(max_size=4096)
    try:
        expected = whole.feed(body)
    except FramingError:
        expected = None
    got: list[bytes] = []
    try:
        for chunk in _cuts(data):
            got += [f.raw for f in chunked.feed(chunk)]
    except FramingError:
        assert expected is None or len(got) >= len(expected), "chunked failed earlier"
        return
    if expected is not None:
        assert [f.raw for f in expected] == got[: len(expected)], "chunked != whole"
        assert whole.at_boundary == chunked.at_boundary


_FRONTEND = tuple(FrontendType)
_BACKEND = tuple(BackendType)


def replies(data: bytes) -> None:
    """Any interleaving of forwarded frontend messages (the client's or the proxy's) and backend
    messages: only UnexpectedReply, and the queue's counts stay consistent after each step."""
    queue = ReplyQueue()
    for i in range(0, len(data) - 1, 2):
        side, code = data[i], data[i + 1]
        try:
            if side & 1:
                owner = Owner.PROXY if side & 2 else Owner.CLIENT
                queue.sent(_FRONTEND[code % len(_FRONTEND)], owner)
            else:
                queue.received(_BACKEND[code % len(_BACKEND)])
        except UnexpectedReply:
            continue
        if not side & 4:
            continue  # pending() counts the open batch one by one: not after every step
        pending = queue.pending()
        assert all(count > 0 for _, _, count in pending), pending
        assert queue.proxy_owed == any(owner is Owner.PROXY for _, owner, _ in pending)
        ready = (Expect.QUERY, Expect.SYNC)
        assert queue.readies == sum(c for kind, _, c in pending if kind in ready)
        assert queue.empty == (not pending)
        if queue.idle:
            assert not pending and not queue.batch_open and not queue.copy_in


def handshake(data: bytes) -> None:
    """Authentication frames in both directions: documented errors only; bytes out are frames."""
    hs = Handshake(secret_key=b"\1\2\3\4", server_tls=bool(data[:1] and data[0] & 1))
    scanner = FrameScanner(max_size=1 << 16)
    try:
        frames = scanner.feed(data[1:])
    except FramingError:
        return
    for item in frames:
        try:
            if item.type in (FrontendType.PASSWORD_MESSAGE,) and item.payload[:1] == b"F":
                out = hs.frontend(item.type, item.payload[1:])
            else:
                out = hs.backend(item.type, item.payload)
        except (DecodeError, ChannelBindingMismatch):
            continue
        assert FrameScanner().feed(out) or out == b"" or len(out) >= 5


def extended_decoders(data: bytes) -> None:
    for decode in (extended.parse_statement, extended.bind_names, extended.query_text):
        with contextlib.suppress(DecodeError):
            decode(data)


_STATEMENTS = (
    "BEGIN", "COMMIT", "ROLLBACK", "END", "ABORT", "START TRANSACTION", "SAVEPOINT a",
    "SAVEPOINT \"a b\"", "RELEASE a", "RELEASE SAVEPOINT a", "ROLLBACK TO a",
    "ROLLBACK TO SAVEPOINT \"a b\"", "SET pgmigrate.atomic = on", "SET pgmigrate.atomic = off",
    "SET LOCAL lock_timeout = '1s'", "ALTER TABLE t ADD COLUMN c int", "SELECT 1",
    "COMMIT PREPARED 'x'", "-- c\nBEGIN", "/* c */ COMMIT",
)  # fmt: skip


def autocommit(data: bytes) -> None:
    """The virtual transaction fed statements (from a table, or raw text) and their outcomes:
    it never raises and its status always matches its state."""
    vt = VirtualTransaction()
    for i, byte in enumerate(data):
        if byte < 200:
            sql = _STATEMENTS[byte % len(_STATEMENTS)]
        else:
            sql = data[i + 1 : i + 1 + byte - 190].decode("utf-8", "replace")
        reply = vt.statement(sql)
        if reply.kind is Kind.FORWARD:
            vt.forwarded(sql, error=bool(byte & 1))
        if reply.kind is Kind.REJECT:
            assert reply.error is not None
        expected = {State.OUTSIDE: TransactionStatus.IDLE, State.FAILED: TransactionStatus.FAILED}
        assert vt.status is expected.get(vt.state, TransactionStatus.IN_TRANSACTION)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "framing": framing,
    "replies": replies,
    "handshake": handshake,
    "extended": extended_decoders,
    "autocommit": autocommit,
}


def all_targets(data: bytes) -> None:
    if not data:
        return
    names = list(TARGETS)
    TARGETS[names[data[0] % len(names)]](data[1:])


def main(target: str, runs: int) -> int:
    """atheris over one target (or all of them, picked by the first byte)."""
    import atheris  # the `fuzz` extra

    chosen = all_targets if target == "all" else TARGETS[target]
    atheris.instrument_all()  # coverage feedback from every module loaded so far
    atheris.Setup([sys.argv[0], f"-runs={runs}", "-timeout=10", "-rss_limit_mb=2048"], chosen)
    atheris.Fuzz()
    return 0
