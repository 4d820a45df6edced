"""The proxy-wide gate: armed with one or more predicates (a drain's rules), it is shown each
statement-starting chunk of every client session, and one that an armed predicate picks waits
at the proxy (its client's later data behind it) until every armed predicate that holds it is
released; what one release lets go goes on in arrival order.

What is shown: the statement texts of a received chunk from its first unsent message on (Query
and Parse texts, a Bind's prepared statement looked up by name) with the session's database
and backend pid (0 when the session has no server, as in transaction pooling between
transactions: it is then shown before a server is acquired for it). A text the gate cannot
know (a Bind of a statement it never saw parsed, an Execute of a portal bound earlier, a
FunctionCall, an oversized Query) makes the texts None: the predicate decides, conservatively.
Unarmed, the relay pays one attribute check per chunk (runtime/hold.py).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from pgmigrate_proxy.guard.drain import GateHold
from pgmigrate_proxy.guard.steps import HoldPredicate
from pgmigrate_proxy.protocol import extended
from pgmigrate_proxy.protocol.framing import Frame
from pgmigrate_proxy.protocol.messages import DecodeError
from pgmigrate_proxy.protocol.types import FrontendType


@dataclass(frozen=True, slots=True)
class GatedSession:
    """What a predicate is told of the session whose statements it judges."""

    peer: str
    database: str
    backend_pid: int  # 0: the session has no server connection (it holds no lock)


#: Decides whether to hold a session's statements (their texts; None: not all known).
Predicate = Callable[[GatedSession, Sequence[str] | None], bool]
#: The messages that can start a statement.
GATED_TYPES = frozenset(
    t.value for t in (FrontendType.QUERY, FrontendType.PARSE, FrontendType.BIND,
                      FrontendType.EXECUTE, FrontendType.FUNCTION_CALL)
)  # fmt: skip
_QUERY = FrontendType.QUERY.value
_PARSE = FrontendType.PARSE.value
_BIND = FrontendType.BIND.value
_EXECUTE = FrontendType.EXECUTE.value
_FUNCTION_CALL = FrontendType.FUNCTION_CALL.value
#: A statement text longer than this is not decoded for the gate (unknown: None).
_TEXT_LIMIT = 1 << 20


def statement_texts(frames: Iterable[Frame], prepared: Mapping[str, bytes]) -> list[str] | None:
    """The statement texts that `frames` start (a Bind's statement from a Parse among them or
    from `prepared`, the session's Parse payloads by statement name); None when one is unknown."""
    texts: list[str] = []
    parsed: set[str] = set()
    bound = False
    try:
        for item in frames:
            mtype = item.type
            if mtype not in GATED_TYPES:
                continue
            if len(item.payload) > _TEXT_LIMIT or mtype == _FUNCTION_CALL:
                return None
            if mtype == _QUERY:
                texts.append(extended.query_text(item.payload))
            elif mtype == _PARSE:
                name, sql = extended.parse_statement(item.payload)
                parsed.add(name)
                texts.append(sql)
            elif mtype == _BIND:
                bound = True
                name = extended.bind_names(item.payload)[1]
                if name not in parsed:
                    known = prepared.get(name)
                    if known is None:
                        return None
                    texts.append(extended.parse_statement(known)[1])
            elif not bound:  # an Execute of a portal bound in an earlier chunk
                return None
    except DecodeError:
        return None  # PostgreSQL will refuse it; held meanwhile, conservatively
    return texts


class _Held:
    """One held place: the arms holding it and what they were shown."""

    __slots__ = ("asked", "place", "rules", "session", "texts")

    def __init__(
        self,
        place: asyncio.Future[None],
        rules: set[Arm],
        asked: tuple[Arm, ...],
        session: GatedSession,
        texts: list[str] | None,
    ) -> None:
        self.place = place
        self.rules = rules
        self.asked = asked
        self.session = session
        self.texts = texts


class Arm:
    """One armed predicate; release() lets go what no other armed predicate holds (idempotent)."""

    __slots__ = ("gate", "predicate")

    def __init__(self, gate: Gate, predicate: Predicate) -> None:
        self.gate = gate
        self.predicate = predicate

    def release(self) -> None:
        self.gate.release(self)

    def recheck(self) -> None:
        self.gate.recheck(self)


class Gate:
    """One proxy's gate (see the module docstring); used on the proxy's event loop only."""

    __slots__ = ("_held", "arms")

    def __init__(self) -> None:
        self.arms: tuple[Arm, ...] = ()  # empty: unarmed, nothing is shown or held
        self._held: deque[_Held] = deque()

    @property
    def waiting(self) -> int:
        """Statements held now."""
        return sum(1 for held in self._held if not held.place.done())

    def arm(self, predicate: Predicate) -> Arm:
        """From now on, also hold the statements that `predicate` picks."""
        arm = Arm(self, predicate)
        self.arms = (*self.arms, arm)
        return arm

    def hold(
        self, session: GatedSession, frames: Iterable[Frame], prepared: Mapping[str, bytes]
    ) -> asyncio.Future[None] | None:
        """A place in the queue when an armed predicate holds the statements `frames` start
        (done when released; its holder cancels it when its client leaves); None: they go on."""
        arms = self.arms
        if not any(item.type in GATED_TYPES for item in frames):
            return None
        texts = statement_texts(frames, prepared)
        rules = {arm for arm in arms if arm.predicate(session, texts)}
        if not rules:
            return None
        place: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._held.append(_Held(place, rules, arms, session, texts))
        return place

    def release(self, arm: Arm | None = None) -> None:
        """Disarm `arm` (None: every arm) and let go, in the order held, what no predicate
        still armed holds (one armed since a statement was held is asked about it now)."""
        if arm is not None and arm not in self.arms:
            return
        self.arms = tuple(a for a in self.arms if a is not arm) if arm is not None else ()
        kept: deque[_Held] = deque()
        for held in self._held:
            if held.place.done():
                continue  # its client left: dropped
            if arm is not None:
                held.rules.discard(arm)
            else:
                held.rules.clear()
            if not held.rules:
                new = [a for a in self.arms if a not in held.asked]
                held.asked = self.arms
                held.rules = {a for a in new if a.predicate(held.session, held.texts)}
            if held.rules:
                kept.append(held)
            else:
                held.place.set_result(None)
        self._held = kept

    def recheck(self, arm: Arm) -> None:
        """Ask `arm` again about what it holds (its predicate changed); let go, in order, what
        no predicate holds any more."""
        kept: deque[_Held] = deque()
        for held in self._held:
            if held.place.done():
                continue
            if arm in held.rules and not arm.predicate(held.session, held.texts):
                held.rules.discard(arm)
            if held.rules:
                kept.append(held)
            else:
                held.place.set_result(None)
        self._held = kept


class DrainGate:
    """guard/drain.py's Gate over the proxy's gate: a drain's rule armed as a predicate."""

    __slots__ = ("gate",)

    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def arm(self, rule: HoldPredicate) -> GateHold:
        return self.gate.arm(rule.should_hold)
