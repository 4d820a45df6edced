"""Fuzz inputs for the socket fuzzer: frontend message streams, generated and mutated from a seed.

A Case is what one fuzz connection sends after a valid startup: a list of chunks (the stream,
split at random places) and whether every frame in it is whole. Whole streams end with a probe
(Sync, two ROLLBACKs, then `SELECT <token>`) that PostgreSQL answers in every protocol state, so
a connection that neither answers the token nor closes has hung. Pure: no I/O, no clock.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

from pgmigrate_proxy.protocol.framing import frame
from pgmigrate_proxy.protocol.types import FrontendType as F

TABLE = "fz_t"
#: Statements the fuzzer draws from: plain traffic, transaction control (answered by the proxy
#: in migration sessions), guarded DDL on the fuzzer's own tables, COPY, and broken SQL.
SQL = (
    "SELECT 1",
    "SELECT repeat('x', 3000)",
    "SELECT 1; SELECT 2",
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "START TRANSACTION",
    "END",
    "SAVEPOINT s1",
    "ROLLBACK TO SAVEPOINT s1",
    "RELEASE s1",
    "SET pgmigrate.atomic = on",
    "SET pgmigrate.atomic = off",
    "SET LOCAL lock_timeout = '1s'",
    "SET search_path = public",
    f"CREATE TABLE IF NOT EXISTS {TABLE} (id int)",
    f"ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS c int",
    f"ALTER TABLE {TABLE} DROP COLUMN IF EXISTS c",
    f"ALTER TABLE IF EXISTS {TABLE} ALTER COLUMN id SET DEFAULT 1",
    f"CREATE INDEX IF NOT EXISTS fz_i ON {TABLE} (id)",
    "DROP INDEX IF EXISTS fz_i",
    f"CREATE INDEX CONCURRENTLY IF NOT EXISTS fz_j ON {TABLE} (id)",
    f"LOCK TABLE {TABLE} IN SHARE MODE",
    f"TRUNCATE {TABLE}",
    f"VACUUM {TABLE}",
    f"INSERT INTO {TABLE} VALUES (1)",
    f"SELECT * FROM {TABLE}",
    f"COPY {TABLE} FROM STDIN",
    f"COPY {TABLE} TO STDOUT",
    "COPY (SELECT 1) TO STDOUT",
    "LISTEN fz",
    "NOTIFY fz, 'x'",
    "DROP TABLE IF EXISTS fz_gone",
    "",
    ";",
    "SELEC 1",
    "ALTER TABLE",
    "SELECT 1/0",
    "SELECT pg_sleep(0.01)",
)
_STATEMENT_TYPES = (F.QUERY, F.PARSE)


@dataclass(frozen=True)
class Case:
    """One fuzz input: chunks to send after startup, and whether its frames are all whole."""

    index: int
    migration: bool
    chunks: tuple[bytes, ...]
    whole: bool
    token: int

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)


def cstr(text: str | bytes) -> bytes:
    return (text.encode() if isinstance(text, str) else text) + b"\0"


def _sql(rng: random.Random, nested: bool) -> str:
    roll = rng.random()
    if roll < 0.04 and nested:  # deeply nested DDL (the classifier's recursion)
        depth = rng.choice((10, 100, 300, 700, 1500))
        return f"ALTER TABLE {TABLE} ALTER COLUMN id SET DEFAULT {'abs(' * depth}1{')' * depth}"
    if roll < 0.08:  # several statements in one Query
        return "; ".join(rng.choice(SQL) for _ in range(rng.randint(2, 5)))
    return rng.choice(SQL)


def _frame(rng: random.Random, nested: bool) -> bytes:
    """One frontend frame, well formed (its payload may still be nonsense to PostgreSQL)."""
    kind = rng.choices(
        ("query", "parse", "bind", "describe", "execute", "close", "sync", "flush", "copydata",
         "copydone", "copyfail", "function", "password", "terminate", "unknown"),
        weights=(30, 12, 10, 5, 10, 3, 12, 3, 6, 3, 2, 1, 1, 0.3, 1),
    )[0]  # fmt: skip
    name = rng.choice(("", "", "s1", "p1"))
    if kind == "query":
        return frame(F.QUERY, cstr(_sql(rng, nested)))
    if kind == "parse":
        count = rng.randint(0, 2)
        types = struct.pack(f"!H{count}I", count, *[rng.choice((0, 23, 25))] * count)
        return frame(F.PARSE, cstr(name) + cstr(_sql(rng, nested)) + types)
    if kind == "bind":
        params = rng.randint(0, 2)
        values = b"".join(struct.pack("!i", 1) + b"1" for _ in range(params))
        return frame(F.BIND, cstr(name) + cstr(name) + b"\0\0" + struct.pack("!H", params)
                     + values + b"\0\0")  # fmt: skip
    if kind == "describe":
        return frame(F.DESCRIBE, rng.choice((b"S", b"P", b"X")) + cstr(name))
    if kind == "execute":
        return frame(F.EXECUTE, cstr(name) + struct.pack("!i", rng.choice((0, 0, 1, 5))))
    if kind == "close":
        return frame(F.CLOSE, rng.choice((b"S", b"P")) + cstr(name))
    if kind == "sync":
        return frame(F.SYNC)
    if kind == "flush":
        return frame(F.FLUSH)
    if kind == "copydata":
        return frame(F.COPY_DATA, rng.choice((b"1\n", b"2\n3\n", b"x\n", rng.randbytes(20))))
    if kind == "copydone":
        return frame(F.COPY_DONE)
    if kind == "copyfail":
        return frame(F.COPY_FAIL, cstr("fuzz"))
    if kind == "function":
        return frame(F.FUNCTION_CALL, struct.pack("!IHHiH", 1598, 0, 0, 0, 0))  # random()
    if kind == "password":
        return frame(F.PASSWORD_MESSAGE, cstr("nope"))
    if kind == "terminate":
        return frame(F.TERMINATE)
    return frame(rng.choice(b"!AGJKLMRTUVWYZ_abegz\0\xff"), rng.randbytes(rng.randint(0, 8)))


def _mutate_payload(rng: random.Random, raw: bytes) -> bytes:
    """Change a frame's payload, keeping its length field true (the frame stays whole)."""
    mtype, payload = raw[0], bytearray(raw[5:])
    op = rng.randrange(5)
    if op == 0 and payload:  # flip bytes
        for _ in range(rng.randint(1, 4)):
            payload[rng.randrange(len(payload))] = rng.randrange(256)
    elif op == 1 and payload:  # drop the tail (e.g. the NUL terminator of a string)
        del payload[rng.randrange(len(payload)) :]
    elif op == 2:  # insert junk
        at = rng.randint(0, len(payload))
        payload[at:at] = rng.randbytes(rng.randint(1, 16))
    elif op == 3:  # NUL inside
        payload.insert(rng.randint(0, len(payload)), 0)
    else:  # another type byte for the same payload
        mtype = rng.choice(b"QPBDESHdcfFpX")
    return frame(mtype, bytes(payload))


def _break_header(rng: random.Random, raw: bytes) -> bytes:
    """Make a frame's length field lie (the stream is no longer whole)."""
    declared = rng.choice((0, 1, 3, 4, 5, len(raw) + 100, 1 << 20, 0x7FFFFFFF, 0xFFFFFFFF))
    return raw[:1] + struct.pack("!I", declared) + raw[5:]


def probe(token: int) -> bytes:
    """Frames that get `token` back in any protocol state: Sync ends a batch (and is ignored in
    COPY), the first ROLLBACK may end a COPY with an error, the second ends any transaction."""
    return (
        frame(F.SYNC)
        + frame(F.QUERY, cstr("ROLLBACK"))
        + frame(F.QUERY, cstr("ROLLBACK"))
        + frame(F.QUERY, cstr(f"SELECT {token}"))
    )


def _split(rng: random.Random, data: bytes) -> tuple[bytes, ...]:
    """Cut `data` into chunks: mostly whole, sometimes byte by byte or at random places."""
    style = rng.random()
    if style < 0.6 or len(data) < 2:
        return (data,)
    if style < 0.7:
        return (*tuple(data[i : i + 1] for i in range(min(len(data), 64))), data[64:])
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 8))))
    return tuple(data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True))


_EXTENDED = frozenset(b"PBDEC")
_DDL = ("ALTER", "CREATE", "DROP", "TRUNCATE", "LOCK", "VACUUM")


def _no_ddl_mid_batch(frames: list[bytes]) -> list[bytes]:
    """A Query with DDL between an extended-protocol message and its Sync becomes SELECT 1
    (a known proxy bug: see README, "Fuzzing"; `mid_batch_ddl=False` leaves it out)."""
    batch = False
    for i, raw in enumerate(frames):
        if raw[0] in _EXTENDED:
            batch = True
        elif raw[0] == F.SYNC:
            batch = False
        elif raw[0] == F.QUERY and batch and any(w in raw.upper().decode("latin-1") for w in _DDL):
            frames[i] = frame(F.QUERY, cstr("SELECT 1"))
    return frames


def make_case(
    seed: int, index: int, migration: bool, nested: bool = True, mid_batch_ddl: bool = True
) -> Case:
    """The `index`-th input of a run seeded with `seed` (`nested`: deeply nested DDL too;
    `mid_batch_ddl`: DDL Queries inside an unsynced extended-protocol batch too)."""
    rng = random.Random(seed * 1_000_003 + index)
    frames = [_frame(rng, nested) for _ in range(rng.randint(1, 12))]
    if not mid_batch_ddl:
        frames = _no_ddl_mid_batch(frames)
    whole = True
    for i, raw in enumerate(frames):
        roll = rng.random()
        if roll < 0.15:
            frames[i] = _mutate_payload(rng, raw)
        elif roll < 0.17:
            frames[i] = _break_header(rng, raw)
            whole = False
    data = b"".join(frames)
    roll = rng.random()
    if roll < 0.05:  # truncated
        data = data[: rng.randint(0, max(len(data) - 1, 0))]
        whole = False
    elif roll < 0.07:  # garbage after the frames
        data += rng.randbytes(rng.randint(1, 40))
        whole = False
    token = rng.randint(10_000, 2_000_000_000)
    if whole:
        data += probe(token)
    return Case(index, migration, _split(rng, data), whole, token)
