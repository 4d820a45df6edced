"""Several proxies, one drain, pure: the messages proxies exchange by NOTIFY on the drain channel
(hello, bye, drain start, ack, end) as JSON payloads under PostgreSQL's 8000-byte limit, and the
state each proxy keeps of them (the proxies up, the acknowledgements a drain waits for, the
drains of others it holds for and when it lets them go).

Every message goes out through the sender's admin connection, so PostgreSQL stamps it with the
admin session's backend pid (the notification's `pid`): that is how a proxy is known, and it is
forgotten (and whatever it asked to hold is released) when that backend is no longer in
pg_stat_activity. A drain start too large for one payload goes in parts (`part` of `parts`),
sent in one statement so that they arrive together and in order.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from pgmigrate_proxy.events import PAYLOAD_LIMIT
from pgmigrate_proxy.guard.drain import DrainScope, HoldRule, Reach

#: The drain channel's name: the events channel's with this suffix.
CHANNEL_SUFFIX: Final = "_drain"
#: Bumped when a message changes incompatibly; other versions' messages are ignored.
VERSION: Final = 1
#: Beyond the drainer's own bound (drain_timeout + its attempt's lock_timeout), how long a
#: proxy holds for a drain whose end never came while its proxy still seems up.
HOLD_MARGIN: Final = 30.0
#: Parts of a drain start not completed within this long are dropped.
ASSEMBLY_SECONDS: Final = 10.0


def channel(events_channel: str) -> str:
    return events_channel + CHANNEL_SUFFIX


class Kind(enum.Enum):
    """The messages on the drain channel."""

    HELLO = "hello"  # I am up (`ask`: everyone, say hello back)
    BYE = "bye"  # I am shutting down
    START = "drain_start"  # hold these relations' new work (one part of it)
    ACK = "drain_ack"  # armed for your drain
    END = "drain_end"  # release it


@dataclass(frozen=True)
class Proxy:
    """A proxy as its messages name it: host, process id, a random id of this run."""

    host: str
    pid: int
    instance: str

    def as_dict(self) -> dict[str, object]:
        return {"host": self.host, "pid": self.pid, "instance": self.instance}

    def __str__(self) -> str:
        return f"{self.host}:{self.pid}/{self.instance}"


@dataclass(frozen=True)
class Hello:
    proxy: Proxy
    ask: bool = False


@dataclass(frozen=True)
class Bye:
    proxy: Proxy


@dataclass(frozen=True)
class Ack:
    proxy: Proxy
    drain: str
    to: str  # the draining proxy's instance
    armed: bool = True  # False: this proxy could not arm a gate (it holds nothing)


@dataclass(frozen=True)
class End:
    proxy: Proxy
    drain: str


@dataclass(frozen=True)
class Start:
    """A drain, as announced: its scope (the relations a HoldRule holds, with the targets'
    OIDs), the draining session's backend, the pids let through and how long to hold at most."""

    proxy: Proxy
    drain: str
    database: str
    own_pid: int
    hold_seconds: float
    oids: tuple[int, ...] = ()
    let_through: frozenset[int] = frozenset()
    relations: tuple[tuple[str, str, Reach], ...] = ()  # schema, name, reach
    functions: frozenset[str] = frozenset()

    @classmethod
    def of(cls, proxy: Proxy, drain: str, rule: HoldRule, oids: Iterable[int],
           hold_seconds: float) -> Start:  # fmt: skip
        scope = rule.scope
        relations = tuple(
            sorted(
                (schema, name, reach)
                for name, places in scope.relations.items()
                for schema, reach in places
            )
        )
        return cls(proxy, drain, scope.database, rule.own_pid, hold_seconds,
                   tuple(sorted(oids)), frozenset(rule.let_through), relations,
                   scope.functions)  # fmt: skip

    def rule(self) -> HoldRule:
        """The rule a receiving proxy arms its gate with."""
        places: dict[str, set[tuple[str, Reach]]] = {}
        for schema, name, reach in self.relations:
            places.setdefault(name, set()).add((schema, reach))
        relations = {name: frozenset(found) for name, found in places.items()}
        scope = DrainScope(self.database, relations, self.functions)
        return HoldRule(scope, self.own_pid, set(self.let_through))


Message = Hello | Bye | Ack | End | Start


class ProtocolError(ValueError):
    """A payload on the drain channel that is not a message of ours (ignored by receivers)."""


# -- encoding ---------------------------------------------------------------------------------


def _dumps(body: Mapping[str, object]) -> str:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def _head(kind: Kind, proxy: Proxy) -> dict[str, object]:
    return {"kind": kind.value, "v": VERSION, "proxy": proxy.as_dict()}


def encode(message: Hello | Bye | Ack | End) -> str:
    """One payload (a drain start: start_payloads)."""
    match message:
        case Hello(proxy=proxy, ask=ask):
            return _dumps({**_head(Kind.HELLO, proxy), "ask": ask})
        case Bye(proxy=proxy):
            return _dumps(_head(Kind.BYE, proxy))
        case Ack(proxy=proxy, drain=drain, to=to, armed=armed):
            return _dumps({**_head(Kind.ACK, proxy), "drain": drain, "to": to, "armed": armed})
        case End(proxy=proxy, drain=drain):
            return _dumps({**_head(Kind.END, proxy), "drain": drain})
    raise TypeError(f"not a message: {message!r}")


#: A drain start's lists, in the order they are split over parts.
_LISTS = ("oids", "let_through", "relations", "functions")


def start_payloads(start: Start, limit: int = PAYLOAD_LIMIT) -> list[str]:
    """A drain start as payloads each shorter than `limit` bytes: the header in each, the
    lists (OIDs, pids, relations, functions) split over as many parts as they need."""
    head = {
        **_head(Kind.START, start.proxy),
        "drain": start.drain,
        "database": start.database,
        "own_pid": start.own_pid,
        "hold_ms": round(start.hold_seconds * 1000),
        "part": 0,
        "parts": 0,
    }
    items: dict[str, Sequence[object]] = {
        "oids": list(start.oids),
        "let_through": sorted(start.let_through),
        "relations": [[schema, name, reach.value] for schema, name, reach in start.relations],
        "functions": sorted(start.functions),
    }
    # room: the header with the largest part numbers and empty lists, and a margin for commas
    empty = {**head, "part": 99999, "parts": 99999, **{key: [] for key in _LISTS}}
    room = limit - len(_dumps(empty).encode()) - 1
    bodies: list[dict[str, list[object]]] = [{key: [] for key in _LISTS}]
    used = 0
    for key in _LISTS:
        for item in items[key]:
            size = len(_dumps({"x": item}).encode()) - 6 + 1  # the item and its comma
            if size > room:
                raise ValueError(f"a {key} item does not fit in a payload: {item!r}")
            if used + size > room:
                bodies.append({k: [] for k in _LISTS})
                used = 0
            bodies[-1][key].append(item)
            used += size
    parts = len(bodies)
    return [_dumps({**head, "part": i, "parts": parts, **body}) for i, body in enumerate(bodies)]


# -- decoding ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartPart:
    """One part of a drain start, as received."""

    start: Start
    part: int
    parts: int


def decode(payload: str) -> Message | StartPart:
    """A payload from the drain channel; ProtocolError when it is not ours (or another
    version's)."""
    try:
        body = json.loads(payload)
    except ValueError as exc:
        raise ProtocolError("not JSON") from exc
    if not isinstance(body, dict) or body.get("v") != VERSION:
        raise ProtocolError("not a message of this version")
    try:
        return _decode(body)
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed {body.get('kind')!r} message: {exc}") from exc


def _decode(body: dict[str, Any]) -> Message | StartPart:
    origin = body["proxy"]
    proxy = Proxy(str(origin["host"]), int(origin["pid"]), str(origin["instance"]))
    kind = Kind(body["kind"])
    if kind is Kind.HELLO:
        return Hello(proxy, bool(body.get("ask", False)))
    if kind is Kind.BYE:
        return Bye(proxy)
    if kind is Kind.ACK:
        return Ack(proxy, str(body["drain"]), str(body["to"]), bool(body.get("armed", True)))
    if kind is Kind.END:
        return End(proxy, str(body["drain"]))
    relations = tuple((str(s), str(n), Reach(r)) for s, n, r in body["relations"])
    start = Start(
        proxy, str(body["drain"]), str(body["database"]), int(body["own_pid"]),
        int(body["hold_ms"]) / 1000, tuple(int(o) for o in body["oids"]),
        frozenset(int(p) for p in body["let_through"]), relations,
        frozenset(str(f) for f in body["functions"]),
    )  # fmt: skip
    part, parts = int(body["part"]), int(body["parts"])
    if not 0 <= part < parts:
        raise ValueError(f"part {part} of {parts}")
    return StartPart(start, part, parts)


# -- state ------------------------------------------------------------------------------------


@dataclass
class Peers:
    """The other proxies known to be up: instance -> (the proxy, its admin backend pid)."""

    me: str  # this proxy's instance: its own messages are not about a peer
    known: dict[str, tuple[Proxy, int]] = field(default_factory=dict)

    def seen(self, proxy: Proxy, admin_pid: int) -> bool:
        """A message from `proxy`, sent by backend `admin_pid`; True when it is new (or its
        admin session changed)."""
        if proxy.instance == self.me or admin_pid <= 0:
            return False
        before = self.known.get(proxy.instance)
        self.known[proxy.instance] = (proxy, admin_pid)
        return before is None or before[1] != admin_pid

    def sent_by(self, instance: str, admin_pid: int) -> bool:
        """Whether `instance` is known with this admin backend (its acks, ends and byes are
        taken only from it: anyone may NOTIFY on the channel)."""
        found = self.known.get(instance)
        return found is not None and found[1] == admin_pid

    def forget(self, instance: str) -> Proxy | None:
        found = self.known.pop(instance, None)
        return found[0] if found else None

    def admin_pids(self) -> set[int]:
        return {pid for _, pid in self.known.values()}

    def prune(self, alive: Collection[int]) -> list[Proxy]:
        """Forget the proxies whose admin backend is not among `alive`; those forgotten."""
        gone = [i for i, (_, pid) in self.known.items() if pid not in alive]
        return [p for p in map(self.forget, gone) if p is not None]

    def up(self) -> dict[str, Proxy]:
        return {instance: proxy for instance, (proxy, _) in self.known.items()}


@dataclass
class AckWait:
    """A drain's wait for the acknowledgements of the proxies up when it was announced."""

    drain: str
    expected: Mapping[str, Proxy]
    acked: dict[str, Ack] = field(default_factory=dict)

    def receive(self, ack: Ack) -> bool:
        """Count `ack` (if it is for this drain from an expected proxy); True when all are in."""
        if ack.drain == self.drain and ack.proxy.instance in self.expected:
            self.acked[ack.proxy.instance] = ack
        return self.complete

    @property
    def complete(self) -> bool:
        return all(instance in self.acked for instance in self.expected)

    @property
    def missing(self) -> list[Proxy]:
        return [p for i, p in sorted(self.expected.items()) if i not in self.acked]


@dataclass
class _Holding:
    start: Start
    admin_pid: int  # the draining proxy's admin backend
    deadline: float


class RemoteDrains:
    """The drains of other proxies this one holds for: parts assembled into starts, each held
    until its end, its proxy's admin session is gone, or its bound. Released once each: every
    method that lets a drain go returns it only the first time."""

    def __init__(self, me: str) -> None:
        self.me = me
        self._parts: dict[str, tuple[float, dict[int, Start], int]] = {}
        self._holding: dict[str, _Holding] = {}
        self._ended: set[str] = set()  # drains released (their start again is not armed again)

    def receive(self, part: StartPart, admin_pid: int, now: float) -> Start | None:
        """A part of a start; the whole start once its last part is in (to arm and ack), None
        before that, or for a drain of this proxy's own, one already held or already ended.
        Its parts must all come from one backend (`admin_pid`)."""
        start = part.start
        if start.proxy.instance == self.me or start.drain in self._holding:
            return None
        if start.drain in self._ended:
            return None
        since, got, sender = self._parts.get(start.drain, (now, {}, admin_pid))
        if sender != admin_pid:
            return None
        got[part.part] = start
        self._parts[start.drain] = (since, got, sender)
        for drain, (began, _, _) in list(self._parts.items()):
            if now - began > ASSEMBLY_SECONDS:
                del self._parts[drain]
        if len(got) < part.parts:
            return None
        self._parts.pop(start.drain, None)
        whole = _merge([got[i] for i in sorted(got)])
        deadline = now + whole.hold_seconds + HOLD_MARGIN
        self._holding[start.drain] = _Holding(whole, admin_pid, deadline)
        return whole

    @property
    def held(self) -> list[str]:
        return list(self._holding)

    def origins(self) -> set[int]:
        """The admin backends of the proxies whose drains are held (to look for)."""
        return {h.admin_pid for h in self._holding.values()}

    def end(self, drain: str, sender: int | None = None) -> bool:
        """The drain's end (`sender`: the backend that announced it; an end from any other is
        ignored): True the first time (release it)."""
        held = self._holding.get(drain)
        if held is None or (sender is not None and sender != held.admin_pid):
            return False
        del self._holding[drain]
        self._ended.add(drain)  # a start seen again is not armed again
        if len(self._ended) > 1024:
            self._ended = {drain}
        return True

    def refuse(self, drain: str) -> None:
        """Forget a start that is not to be armed (its sender may not ask for it)."""
        self._holding.pop(drain, None)

    def of(self, instance: str) -> list[str]:
        """Let go every drain of proxy `instance` (it said bye); those to release."""
        mine = [d for d, h in self._holding.items() if h.start.proxy.instance == instance]
        return [d for d in mine if self.end(d)]

    def gone(self, alive: Collection[int]) -> list[str]:
        """Let go the drains whose proxy's admin backend is not among `alive`."""
        dead = [d for d, h in self._holding.items() if h.admin_pid not in alive]
        return [d for d in dead if self.end(d)]

    def expired(self, now: float) -> list[str]:
        """Let go the drains held past their bound."""
        late = [d for d, h in self._holding.items() if now >= h.deadline]
        return [d for d in late if self.end(d)]

    def all(self) -> list[str]:
        """Let go everything (this proxy shuts down)."""
        return [d for d in list(self._holding) if self.end(d)]


def _merge(parts: Sequence[Start]) -> Start:
    first = parts[0]
    return Start(
        first.proxy, first.drain, first.database, first.own_pid, first.hold_seconds,
        tuple(o for p in parts for o in p.oids),
        frozenset(pid for p in parts for pid in p.let_through),
        tuple(r for p in parts for r in p.relations),
        frozenset(f for p in parts for f in p.functions),
    )  # fmt: skip
