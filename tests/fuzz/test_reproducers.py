"""The socket fuzzer's saved reproducers (`fuzz/reproducers/hang-*.json`) replayed as a strict
regression test: each input goes through the proxy and straight to PostgreSQL (the fuzzer's
table made anew before each), and the proxy must do what the README promises.

- Never a hang: the probe's token comes back, or the connection is closed.
- Ordinary sessions: the client gets PostgreSQL's replies (notices and parameter statuses
  aside; row descriptions by type only, they carry table OIDs), or the first of them and then
  an 08P01 ErrorResponse and a close (a malformed message the proxy must read).
- Migration sessions (autocommit semantics, README "Migration sessions"): the replies may
  differ, but each Query and each Sync still gets its one ReadyForQuery (a pipelining client
  pairs them with its requests), and a close always comes after an ErrorResponse (08P01 when
  PostgreSQL did not close).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pgmigrate_proxy.protocol.messages import ErrorResponse
from pgmigrate_proxy.protocol.types import BackendType

from fuzz.streams import TABLE, Case
from fuzz.wire import Closed, Target, _login, load_case, token_row
from tests.fixtures.postgres import PgInfo
from tests.fixtures.proxy import RunningProxy

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REPRODUCERS = sorted((Path(__file__).parents[2] / "fuzz" / "reproducers").glob("hang-*.json"))
HANG_SECONDS = 10.0
USER = "u_trust"  # the CI fuzz tests' role, owner of the fuzzer's table (no password to send)
#: Server messages that may differ (the proxy's own notices, parameter statuses).
_IGNORED = {BackendType.NOTICE_RESPONSE.value, BackendType.PARAMETER_STATUS.value}
_ROW_DESCRIPTION = BackendType.ROW_DESCRIPTION.value
_ERROR = BackendType.ERROR_RESPONSE.value
_READY = BackendType.READY_FOR_QUERY.value


@dataclass
class Transcript:
    """What the server side said to one replayed case, and how it ended."""

    end: str  # answered | closed | hang | login-failed
    messages: list[tuple[str, bytes]] = field(default_factory=list)

    def normal(self) -> list[tuple[str, bytes]]:
        """Comparable form: errors by severity and SQLSTATE, row descriptions by type."""
        out = []
        for mtype, payload in self.messages:
            if ord(mtype) == _ERROR:
                fields = dict(ErrorResponse.decode(payload).fields)
                payload = f"{fields.get('V', fields.get('S'))} {fields.get('C')}".encode()
            elif ord(mtype) == _ROW_DESCRIPTION:
                payload = b""
            out.append((mtype, payload))
        return out

    def readies(self) -> int:
        return sum(1 for mtype, _ in self.messages if ord(mtype) == _READY)

    def last_error(self) -> str | None:
        """The SQLSTATE of the last message when it is an ErrorResponse."""
        if not self.messages or ord(self.messages[-1][0]) != _ERROR:
            return None
        return dict(ErrorResponse.decode(self.messages[-1][1]).fields).get("C")


async def replay(target: Target, case: Case, one_write: bool) -> Transcript:
    """Send the case on a fresh connection (its chunks as the fuzzer sent them, each drained,
    or all in one write); record every reply up to the token's ReadyForQuery, the close, or
    HANG_SECONDS of silence."""
    try:
        writer, backend = await asyncio.wait_for(_login(target, case.migration), HANG_SECONDS)
    except (Closed, OSError, asyncio.TimeoutError) as exc:
        return Transcript(f"login-failed {exc!r}")
    transcript = Transcript("hang")
    try:
        for chunk in (b"".join(case.chunks),) if one_write else case.chunks:
            writer.write(chunk)
            try:
                await asyncio.wait_for(writer.drain(), HANG_SECONDS)
            except (ConnectionError, RuntimeError, asyncio.TimeoutError):
                break  # closed, or not reading: judged by the replies
        want, after_token = token_row(case.token), -1
        while True:
            try:
                mtype, payload = await asyncio.wait_for(backend.message(), HANG_SECONDS)
            except asyncio.TimeoutError:
                return transcript
            except Closed:
                transcript.end = "closed"
                return transcript
            if mtype not in _IGNORED:
                transcript.messages.append((chr(mtype), payload))
            if payload == want:
                after_token = 0
            elif after_token >= 0 and mtype != BackendType.NOTICE_RESPONSE:
                after_token += 1
                if mtype == _READY:
                    transcript.end = "answered"
                    return transcript
    finally:
        writer.transport.abort()


def judge(case: Case, via: Transcript, direct: Transcript) -> str:
    """'' when the proxy kept the rule (module docstring); else what it did wrong."""
    if via.end not in ("answered", "closed"):
        return f"through the proxy: {via.end}"
    if via.end == "closed" and direct.end != "closed" and via.last_error() != "08P01":
        return f"closed by the proxy without an 08P01 ErrorResponse (last: {via.last_error()})"
    if via.end == "closed" and via.last_error() is None:
        return "closed by the proxy without an ErrorResponse"
    if case.migration:
        if via.end == direct.end == "answered" and via.readies() != direct.readies():
            return f"{via.readies()} ReadyForQuery through the proxy, {direct.readies()} direct"
        return ""
    mine, theirs = via.normal(), direct.normal()
    if mine == theirs:
        return ""
    if via.end == "closed" and mine[:-1] == theirs[: len(mine) - 1]:
        return ""  # PostgreSQL's first replies, then the proxy's 08P01 and a close
    return "replies differ from PostgreSQL's"


@pytest.fixture
def fresh_table(pg: PgInfo) -> Iterator[None]:
    yield
    _reset(pg, create=False)


def _reset(pg: PgInfo, *, create: bool = True) -> None:
    """The fuzzer's objects as a fuzz run starts with them (its table, empty, alone)."""
    with pg.connect() as conn:
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}, fz_gone CASCADE")
        if create:
            conn.execute(f"CREATE TABLE {TABLE} (id int)")
            conn.execute(f"ALTER TABLE {TABLE} OWNER TO {USER}")


@pytest.mark.parametrize("one_write", [False, True], ids=["as-sent", "one-write"])
@pytest.mark.parametrize("path", REPRODUCERS, ids=[p.stem for p in REPRODUCERS])
def test_reproducer(
    proxy: RunningProxy, pg: PgInfo, fresh_table: None, path: Path, one_write: bool
) -> None:
    case = load_case(path)
    user = USER

    async def both() -> tuple[Transcript, Transcript]:
        _reset(pg)
        via = await replay(Target(proxy.host, proxy.port, user), case, one_write)
        _reset(pg)
        direct = await replay(Target(pg.host, pg.port, user), case, one_write)
        return via, direct

    via, direct = asyncio.run(both())
    problem = judge(case, via, direct)
    assert not problem, (
        f"{path.name}: {problem}\nthrough the proxy ({via.end}): {via.normal()}\n"
        f"straight to PostgreSQL ({direct.end}): {direct.normal()}"
    )
