"""The socket fuzzer's client side: run Cases against a proxy, batch by batch, and judge each.

Each case logs in (ordinary, or a migration session with `-c pgmigrate.role=migrate`), sends
its chunks and then waits: a whole case must get its probe's token back or see the connection
closed within `hang_seconds` (else: a hang); an incomplete one is read briefly and closed.
After each batch the Fuzzer checks the proxy itself through the Target it is given: a fresh
client of each kind is served, the new log lines hold no traceback, and the proxy's file
descriptors (and RSS, within a margin) come back to their baseline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pgmigrate_proxy.protocol.framing import HEADER, HEADER_SIZE, frame
from pgmigrate_proxy.protocol.messages import StartupMessage
from pgmigrate_proxy.protocol.types import PROTOCOL_3_0, BackendType, FrontendType

from fuzz.streams import Case, cstr, make_case

MIGRATE = "-c pgmigrate.role=migrate"
APPLICATION = "pgmigrate-fuzz"
#: Lines of the proxy's log (or of asyncio's) that mean an exception escaped somewhere (or, on
#: stderr, a coroutine was dropped unawaited).
TRACEBACK_MARKS = ("Traceback (most recent call last)", "exception was never retrieved",
                   "Exception in callback", "Unhandled exception", "RecursionError",
                   "was never awaited")  # fmt: skip
SETTLE_SECONDS = 0.2
RSS_MARGIN_KB = 64 * 1024


class Closed(Exception):
    """The proxy closed the connection."""


@dataclass
class Target:
    """Where the proxy is and how to look at it from outside."""

    host: str
    port: int
    user: str
    dbname: str = "postgres"
    log_lines: Callable[[], list[str]] = list  # the log lines since the previous call
    fds: Callable[[], int] | None = None  # the proxy's open file descriptors
    rss_kb: Callable[[], int] | None = None  # the proxy's resident memory


@dataclass(frozen=True)
class Outcome:
    case: Case
    kind: str  # answered | closed | left-open | hang | login-failed | desync
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.kind in ("hang", "login-failed", "desync")


@dataclass
class Report:
    inputs: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    failures: list[Outcome] = field(default_factory=list)
    batch_problems: list[str] = field(default_factory=list)
    seconds: float = 0.0
    rss_kb: list[int] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.inputs += 1
        self.kinds[outcome.kind] = self.kinds.get(outcome.kind, 0) + 1
        if outcome.failed:
            self.failures.append(outcome)

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items()))
        rss = f"; RSS {self.rss_kb[0]}..{max(self.rss_kb)} kB" if self.rss_kb else ""
        fds = f"; fds {self.fds[0]}..{max(self.fds)}" if self.fds else ""
        return (
            f"{self.inputs} inputs in {self.seconds:.0f} s ({kinds}); {len(self.failures)} "
            f"failing input(s); {len(self.batch_problems)} batch problem(s){rss}{fds}"
        )


class _Reader:
    """Backend messages off a StreamReader."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader

    async def message(self) -> tuple[int, bytes]:
        try:
            header = await self.reader.readexactly(HEADER_SIZE)
            mtype, length = HEADER.unpack(header)
            if length < 4 or length > 1 << 30:
                raise ValueError(f"bad backend header {header!r}")
            return mtype, await self.reader.readexactly(length - 4)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise Closed from exc


def token_row(token: int) -> bytes:
    text = str(token).encode()
    return struct.pack("!Hi", 1, len(text)) + text


async def _login(target: Target, migration: bool) -> tuple[asyncio.StreamWriter, _Reader]:
    reader, writer = await asyncio.open_connection(target.host, target.port)
    params = {"user": target.user, "database": target.dbname, "application_name": APPLICATION}
    if migration:
        params["options"] = MIGRATE
    writer.write(StartupMessage(PROTOCOL_3_0, params).encode())
    backend = _Reader(reader)
    while True:
        mtype, payload = await backend.message()
        if mtype == BackendType.ERROR_RESPONSE:
            raise Closed(f"login refused: {payload[:200]!r}")
        if mtype == BackendType.READY_FOR_QUERY:
            return writer, backend


async def _await_token(backend: _Reader, token: int) -> str:
    """Read until the token's DataRow, its CommandComplete and ReadyForQuery."""
    want = token_row(token)
    while True:
        mtype, payload = await backend.message()
        if mtype == BackendType.DATA_ROW and payload == want:
            break
    mtype, payload = await backend.message()
    if mtype != BackendType.COMMAND_COMPLETE:
        return f"after the token: {chr(mtype)!r} {payload[:80]!r}"
    mtype, payload = await backend.message()
    if mtype != BackendType.READY_FOR_QUERY:
        return f"after the token's CommandComplete: {chr(mtype)!r} {payload[:80]!r}"
    return ""


async def run_case(target: Target, case: Case, hang_seconds: float) -> Outcome:
    """Send one case on a fresh connection and judge what came back."""
    try:
        writer, backend = await asyncio.wait_for(_login(target, case.migration), hang_seconds)
    except (Closed, OSError, asyncio.TimeoutError) as exc:
        return Outcome(case, "login-failed", repr(exc))
    try:
        try:
            for chunk in case.chunks:
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), hang_seconds)
        except (ConnectionError, RuntimeError, asyncio.TimeoutError):
            # the proxy closed (uvloop says so with a RuntimeError), or stopped reading:
            # judged by the reads below
            pass
        if not case.whole:
            with contextlib.suppress(asyncio.TimeoutError, Closed, ValueError):
                await asyncio.wait_for(_drain(backend), SETTLE_SECONDS)
                return Outcome(case, "closed")
            return Outcome(case, "left-open")
        try:
            problem = await asyncio.wait_for(_await_token(backend, case.token), hang_seconds)
        except Closed:
            return Outcome(case, "closed")
        except asyncio.TimeoutError:
            return Outcome(case, "hang", f"no token and no close within {hang_seconds:g} s")
        except ValueError as exc:
            return Outcome(case, "desync", str(exc))
        return Outcome(case, "desync", problem) if problem else Outcome(case, "answered")
    finally:
        writer.transport.abort()


async def _drain(backend: _Reader) -> None:
    while True:
        await backend.message()


async def served(target: Target, migration: bool, hang_seconds: float) -> str:
    """'' when a fresh client logs in and gets `SELECT 1` answered; else what went wrong."""
    case = Case(-1, migration, (frame(FrontendType.QUERY, cstr("SELECT 4242")),), True, 4242)
    outcome = await run_case(target, case, hang_seconds)
    return "" if outcome.kind == "answered" else f"{outcome.kind}: {outcome.detail}"


class Fuzzer:
    """Runs batches of cases with bounded concurrency and checks the proxy after each."""

    def __init__(
        self,
        target: Target,
        *,
        seed: int,
        concurrency: int = 16,
        hang_seconds: float = 10.0,
        kinds: Iterable[bool] = (False, True),  # migration? per case, in turn
        out: Path | None = None,
        fd_settle_seconds: float = 15.0,
        nested: bool = True,
        mid_batch_ddl: bool = True,
    ) -> None:
        self.nested = nested
        self.mid_batch_ddl = mid_batch_ddl
        self.target = target
        self.seed = seed
        self.concurrency = concurrency
        self.hang_seconds = hang_seconds
        self.kinds = tuple(kinds)
        self.out = out
        self.fd_settle_seconds = fd_settle_seconds
        self.report = Report()
        self._fd_baseline: int | None = None
        self._rss_baseline: int | None = None

    async def run(self, inputs: int, batch: int, start: int = 0) -> Report:
        began = time.monotonic()
        for first in range(start, start + inputs, batch):
            last = min(first + batch, start + inputs)
            await self.batch(range(first, last))
            self.report.seconds = time.monotonic() - began
        return self.report

    async def batch(self, indexes: range) -> None:
        gate = asyncio.Semaphore(self.concurrency)

        async def one(index: int) -> None:
            case = make_case(
                self.seed,
                index,
                self.kinds[index % len(self.kinds)],
                self.nested,
                self.mid_batch_ddl,
            )
            async with gate:
                outcome = await run_case(self.target, case, self.hang_seconds)
            self.report.add(outcome)
            if outcome.failed:
                self._save(outcome)

        await asyncio.gather(*(one(i) for i in indexes))
        await self.check(f"after inputs {indexes.start}..{indexes.stop - 1}")

    async def check(self, when: str) -> None:
        """The proxy after a batch: serves, logged no traceback, holds no more fds (or RSS)."""
        problems = []
        for migration in self.kinds:
            problem = await served(self.target, migration, self.hang_seconds)
            if problem:
                problems.append(f"a fresh {'migration' if migration else 'ordinary'} client "
                                f"was not served: {problem}")  # fmt: skip
        lines = self.target.log_lines()
        bad = [line for line in lines if any(mark in line for mark in TRACEBACK_MARKS)]
        if bad:
            problems.append(f"{len(bad)} traceback line(s) in the log, first: {bad[0][:300]}")
        problems += await self._resources()
        self.report.batch_problems += [f"{when}: {p}" for p in problems]

    async def _resources(self) -> list[str]:
        problems = []
        if self.target.fds is not None:
            fds = await self._settled_fds(self.target.fds)
            self.report.fds.append(fds)
            if self._fd_baseline is None:
                self._fd_baseline = fds
            elif fds > self._fd_baseline:
                problems.append(f"{fds} fds open, baseline {self._fd_baseline}")
        if self.target.rss_kb is not None:
            rss = self.target.rss_kb()
            self.report.rss_kb.append(rss)
            if self._rss_baseline is None:
                self._rss_baseline = rss
            elif rss > self._rss_baseline + RSS_MARGIN_KB:
                problems.append(f"RSS {rss} kB, baseline {self._rss_baseline} kB")
        return problems

    async def _settled_fds(self, count: Callable[[], int]) -> int:
        deadline = time.monotonic() + self.fd_settle_seconds
        fds = count()
        while (
            self._fd_baseline is not None and fds > self._fd_baseline
            and time.monotonic() < deadline
        ):  # fmt: skip
            await asyncio.sleep(0.05)
            fds = count()
        return fds

    def _save(self, outcome: Outcome) -> None:
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        case = outcome.case
        path = self.out / f"{outcome.kind}-{self.seed}-{case.index}.json"
        path.write_text(json.dumps(reproducer(self.seed, outcome), indent=1) + "\n")


def reproducer(seed: int, outcome: Outcome) -> dict[str, object]:
    case = outcome.case
    return {
        "kind": outcome.kind,
        "detail": outcome.detail,
        "seed": seed,
        "index": case.index,
        "migration": case.migration,
        "whole": case.whole,
        "token": case.token,
        "chunks": [chunk.hex() for chunk in case.chunks],
        "replay": f"scripts/fuzz replay FILE  (or: make_case({seed}, {case.index}, "
        f"{case.migration}))",
    }


def load_case(path: Path) -> Case:
    data = json.loads(path.read_text())
    chunks = tuple(bytes.fromhex(chunk) for chunk in data["chunks"])
    return Case(data["index"], data["migration"], chunks, data["whole"], data["token"])
