"""The migration report: guard events (the JSON log's lines, or what a listener collected) made
into one self-contained HTML page, a timeline per held statement; pure, no I/O.

Every text that comes from the events (statements, queries, application names, migration
names) is user data: redacted like the log, and escaped. The page loads nothing (inline CSS
and SVG, no script; its Content-Security-Policy forbids any).
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pgmigrate_proxy.logsetup import redact

#: The events of the guard's pipeline that belong to one held statement (they carry `unit`).
BLOCKER_EVENTS = ("terminated", "cancelled", "blocked_by")
OUTCOME_EVENTS = ("applied", "failed", "gave_up", "dropped", "not_guarded")
#: What a blocker looks like to a client's role that may not see its session.
HIDDEN = "<insufficient privilege>"
QUERY_CHARS = 200
_HIDDEN_FIELDS = frozenset({"state", "xact_age", "query_age", "query", "context", "client_addr"})

Event = Mapping[str, Any]


def read_jsonl(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The guard events among JSON log lines (other lines, and text log lines, are skipped)."""
    events: list[dict[str, Any]] = []
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "event" in entry and "ts" in entry:
            events.append(entry)
    return events


@dataclass
class Attempt:
    number: int
    start: float  # seconds since held
    lock_wait: float
    run: float
    code: str | None


@dataclass
class Statement:
    """One held statement's events, read."""

    key: tuple[object, object]
    held: datetime
    fields: dict[str, Any] = field(default_factory=dict)  # the held event's
    events: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    blockers: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)
    outcome: str = "unfinished"
    outcome_class: str = "open"
    elapsed: float = 0.0

    @property
    def label(self) -> str:
        """The migration's name, or who ran the statement (a report from the proxy's log)."""
        named = self.fields.get("migration")
        if named:
            return str(named)
        who = self.fields.get("application_name") or self.fields.get("client") or "session"
        return f"{who} (backend {self.key[0]})"

    @property
    def text(self) -> str:
        return redact(str(self.fields.get("statement", "")))


def _time(event: Event) -> datetime:
    return datetime.fromisoformat(str(event["ts"]))


def statements(events: Iterable[Event]) -> tuple[list[Statement], list[Event]]:
    """The held statements in the order they were held, and the events of no statement."""
    found: dict[tuple[object, object], Statement] = {}
    other: list[Event] = []
    for event in events:
        name = str(event["event"])
        key = (event.get("statement_pid"), event.get("unit"))
        if name == "held":
            found[key] = Statement(key, _time(event), dict(event))
            continue
        current = found.get(key)
        if current is None or event.get("unit") is None:
            other.append(event)
            continue
        _add(current, name, dict(event), (_time(event) - current.held).total_seconds())
    return list(found.values()), other


def _add(statement: Statement, name: str, fields: dict[str, Any], at: float) -> None:
    statement.events.append((at, name, fields))
    statement.elapsed = max(statement.elapsed, at)
    if name == "attempt":
        wait = float(fields.get("lock_wait_ms") or 0) / 1000
        run = float(fields.get("run_ms") or 0) / 1000
        number = int(fields.get("attempt") or len(statement.attempts) + 1)
        statement.attempts.append(Attempt(number, at - wait - run, wait, run, fields.get("code")))
    elif name in BLOCKER_EVENTS:
        statement.blockers.append((at, name, fields))
    elif name in OUTCOME_EVENTS:
        statement.outcome, statement.outcome_class = _outcome(name, fields)


def _outcome(name: str, fields: Mapping[str, Any]) -> tuple[str, str]:
    code = fields.get("code")
    if name == "applied":
        return "applied", "ok"
    if name == "gave_up" or (name == "failed" and code == "55P03"):
        return "gave up (55P03 lock_not_available)", "bad"
    if name == "failed":
        return f"error {code}", "bad"
    if name == "dropped":
        return "dropped: the client left while it was held", "bad"
    return "sent unguarded: the client lacks the rights", "open"


# --- HTML --------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d232a;background:#fafbfc}
h1{font-size:22px;margin:0 0 4px}h2{font-size:16px;margin:0}
.sub{color:#5c6670;margin-bottom:16px}
table{border-collapse:collapse;margin:8px 0;background:#fff}
td,th{border:1px solid #d9dee3;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef1f4;font-weight:600}
pre{white-space:pre-wrap;word-break:break-word;background:#f1f3f5;padding:6px 8px;margin:6px 0}
section.stmt{background:#fff;border:1px solid #d9dee3;border-radius:6px;padding:12px 16px;
margin:16px 0}
.badge{display:inline-block;border-radius:10px;padding:1px 10px;font-weight:600;margin-left:8px}
.ok{background:#d3f3dc;color:#14532d}.bad{background:#fde0e0;color:#7f1d1d}
.open{background:#fff1c2;color:#6b4e00}
.meta{color:#5c6670}.legend{margin:10px 0 4px}.legend span{margin-right:14px}
.sw{display:inline-block;width:12px;height:12px;vertical-align:-2px;margin-right:4px}
svg{display:block;max-width:100%}
"""
_COLORS = {"hold": "#c9d1d9", "wait": "#f0a020", "run": "#2ea44f", "error": "#d73a49"}
_MARKS = {"terminated": "#d73a49", "cancelled": "#b35900", "blocked_by": "#6f42c1",
          "retry": "#0969da"}  # fmt: skip
_CSP = "default-src 'none'; style-src 'unsafe-inline'"
_WHO = (
    ("database", "database"),
    ("user", "user"),
    ("application_name", "application_name"),
    ("client", "client"),
    ("action", "blocking action"),
)
_BLOCKER_COLUMNS = (
    "At", "Done", "pid", "State", "Transaction age", "Query age", "application_name", "User",
    "Query",
)  # fmt: skip


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


def render(
    events: Iterable[Event], *, title: str = "Migration report", source: str = "",
    client_view: bool = False,
) -> str:  # fmt: skip
    """The page. `client_view`: show blockers as the client's role sees them in
    pg_stat_activity (the migrate command's report), not as the operator's log has them."""
    found, other = statements(events)
    applied = sum(1 for s in found if s.outcome_class == "ok")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f'<div class="sub">{_e(source)}{" · " if source else ""}{len(found)} held statement(s),'
        f" {applied} applied, {len(found) - applied} not</div>",
        _summary(found),
        _legend(),
        _overview(found),
        *(_section(i, s, client_view) for i, s in enumerate(found, 1)),
        _others(other),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def _summary(found: list[Statement]) -> str:
    if not found:
        return "<p>No guard events: no statement was held.</p>"
    rows = [
        f'<tr><td><a href="#s{i}">{i}</a></td><td>{_e(s.label)}</td>'
        f"<td><code>{_e(_short(s.text, 90))}</code></td>"
        f'<td><span class="badge {s.outcome_class}">{_e(s.outcome)}</span></td>'
        f"<td>{len(s.attempts)}</td><td>{len(s.blockers)}</td><td>{_ms(s.elapsed)}</td></tr>"
        for i, s in enumerate(found, 1)
    ]
    head = (
        "<tr><th>#</th><th>Migration</th><th>Statement</th><th>Outcome</th><th>Attempts</th>"
        "<th>Blockers</th><th>Held to end</th></tr>"
    )
    return f'<table class="summary">{head}{"".join(rows)}</table>'


def _legend() -> str:
    names = {"hold": "held, clearing blockers", "wait": "lock wait", "run": "running",
             "error": "attempt failed"}  # fmt: skip
    items = [
        f'<span><i class="sw" style="background:{_COLORS[k]}"></i>{v}</span>'
        for k, v in names.items()
    ]
    items += [
        f'<span><i class="sw" style="background:{c};border-radius:6px"></i>{_e(k)}</span>'
        for k, c in _MARKS.items()
    ]
    return f'<div class="legend">{"".join(items)}</div>'


def _section(index: int, s: Statement, client_view: bool) -> str:
    f = s.fields
    who = ", ".join(f"{label} {_e(f[key])}" for key, label in _WHO if f.get(key))
    return (
        f'<section class="stmt" id="s{index}" data-outcome="{_e(s.outcome_class)}">'
        f'<h2>{index}. <span class="label">{_e(s.label)}</span>'
        f'<span class="badge {s.outcome_class}">{_e(s.outcome)}'
        f"</span></h2>"
        f'<pre class="sql">{_e(s.text)}</pre>'
        f'<div class="meta">held at {_e(s.held.isoformat(timespec="milliseconds"))}; {who}</div>'
        f"{_timeline(s)}{_attempts(s)}{_blockers(s, client_view)}{_log(s, client_view)}</section>"
    )


def _timeline(s: Statement) -> str:
    """The statement on its own time axis: held, then each attempt, with the blocker marks."""
    width, left, right, span = 900.0, 10.0, 10.0, max(s.elapsed, 0.001)
    scale = (width - left - right) / span

    def x(at: float) -> float:
        return round(left + max(0.0, min(at, span)) * scale, 1)

    ticks = _ticks(x, 0.0, span, 70)
    return (
        f'<svg class="timeline" viewBox="0 0 {width:g} 76" width="{width:g}" height="76" '
        f'role="img" aria-label="timeline">'
        f'<line x1="{left}" y1="44" x2="{width - right}" y2="44" stroke="#d9dee3"/>'
        f"{''.join(_shapes(s, x, 14, 18, 44))}{ticks}</svg>"
    )


def _overview(found: list[Statement]) -> str:
    """Every statement on the run's time axis, one row each, linked to its section."""
    if not found:
        return ""
    width, left, right, row = 900.0, 34.0, 10.0, 22
    origin = min(s.held for s in found)
    offsets = [(s.held - origin).total_seconds() for s in found]
    span = max(max(o + s.elapsed for o, s in zip(offsets, found, strict=True)), 0.001)
    scale = (width - left - right) / span
    rows = []
    for i, (offset, s) in enumerate(zip(offsets, found, strict=True)):

        def x(at: float, offset: float = offset) -> float:
            return round(left + max(0.0, min(offset + at, span)) * scale, 1)

        y = 6 + i * row
        shapes = "".join(_shapes(s, x, y, 12, y + 6))
        rows.append(
            f'<a href="#s{i + 1}"><text x="4" y="{y + 11}" font-size="12">{i + 1}</text>'
            f"{shapes}</a>"
        )
    height = 6 + len(found) * row + 18

    def axis(at: float) -> float:
        return round(left + at * scale, 1)

    return (
        f'<svg class="overview" viewBox="0 0 {width:g} {height}" width="{width:g}" '
        f'height="{height}" role="img" aria-label="the run\'s timeline">'
        f"{''.join(rows)}{_ticks(axis, 0.0, span, height - 4)}</svg>"
    )


def _shapes(
    s: Statement, x: Callable[[float], float], y: float, height: float, marks_y: float
) -> list[str]:
    first = s.attempts[0].start if s.attempts else s.elapsed
    shapes = [_rect(x(0), x(first), y, height, _COLORS["hold"], f"held {_ms(first)}")]
    for a in s.attempts:
        end_wait = a.start + a.lock_wait
        tip = f"attempt {a.number}: lock wait {_ms(a.lock_wait)}"
        shapes.append(_rect(x(a.start), x(end_wait), y, height, _COLORS["wait"], tip))
        color = _COLORS["error"] if a.code else _COLORS["run"]
        tip = f"attempt {a.number}: ran {_ms(a.run)}" + (f", {a.code}" if a.code else "")
        shapes.append(_rect(x(end_wait), x(end_wait + a.run), y, height, color, tip))
    for at, name, fields in s.events:
        if name in _MARKS:
            tip = f"{name} at +{_ms(at)}" + (f": pid {fields['pid']}" if "pid" in fields else "")
            shapes.append(
                f'<circle cx="{x(at)}" cy="{marks_y}" r="{min(5.0, height / 3):g}" '
                f'fill="{_MARKS[name]}" stroke="#fff"><title>{_e(tip)}</title></circle>'
            )
    return shapes


def _ticks(x: Callable[[float], float], start: float, span: float, y: float) -> str:
    return "".join(
        f'<text x="{x(at)}" y="{y}" font-size="11" text-anchor="{anchor}" fill="#5c6670">'
        f"+{_e(_ms(at))}</text>"
        for at, anchor in ((start, "start"), (start + span / 2, "middle"), (start + span, "end"))
    )


def _rect(x0: float, x1: float, y: float, height: float, color: str, tip: str) -> str:
    w = max(x1 - x0, 1.0)
    return (
        f'<rect x="{x0}" y="{y}" width="{w:.1f}" height="{height:g}" fill="{color}">'
        f"<title>{_e(tip)}</title></rect>"
    )


def _attempts(s: Statement) -> str:
    if not s.attempts:
        return '<p class="meta">Not sent.</p>'
    rows = "".join(
        f"<tr><td>{a.number}</td><td>+{_ms(a.start)}</td><td>{_ms(a.lock_wait)}</td>"
        f"<td>{_ms(a.run)}</td><td>{_e(a.code or 'ok')}</td></tr>"
        for a in s.attempts
    )
    head = "<tr><th>Attempt</th><th>Sent</th><th>Lock wait</th><th>Run time</th><th>Result</th>"
    return f'<table class="attempts">{head}</tr>{rows}</table>'


def _blockers(s: Statement, client_view: bool) -> str:
    if not s.blockers:
        return ""
    rows = []
    for at, name, seen in s.blockers:
        f = _as_seen(seen, client_view)
        cells = [
            f"+{_ms(at)}", name.replace("_", " "), f.get("pid", ""), f.get("state", ""),
            _age(f.get("xact_age")), _age(f.get("query_age")), f.get("application_name", ""),
            f.get("user", ""), _short(redact(str(f.get("query", ""))), QUERY_CHARS),
        ]  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in _BLOCKER_COLUMNS)
    return f'<table class="blockers"><tr>{head}</tr>{"".join(rows)}</table>'


def _as_seen(fields: dict[str, Any], client_view: bool) -> dict[str, Any]:
    """A blocker event as the client's role sees the session in pg_stat_activity: when it may
    not see it, pid, user and application_name only (PostgreSQL's rule, Blocker.as_seen)."""
    if not client_view or fields.get("visible") is not False:
        return fields
    kept = {k: v for k, v in fields.items() if k not in _HIDDEN_FIELDS}
    return {**kept, "query": HIDDEN}


def _log(s: Statement, client_view: bool) -> str:
    skip = {"ts", "event", "unit", "statement_pid", "statement", "level", "logger", "msg"}
    rows = "".join(
        f"<tr><td>+{_ms(at)}</td><td>{_e(name)}</td><td>"
        + _e(", ".join(f"{k}={_short(redact(str(v)), 80)}" for k, v in f.items() if k not in skip))
        + "</td></tr>"
        for at, name, f in ((at, n, _as_seen(f, client_view)) for at, n, f in s.events)
    )
    return f"<details><summary>Events</summary><table>{rows}</table></details>" if rows else ""


def _others(other: list[Event]) -> str:
    if not other:
        return ""
    rows = "".join(
        f"<tr><td>{_e(e.get('ts', ''))}</td><td>{_e(e.get('event', ''))}</td>"
        f"<td>{_e(redact(str(e.get('reason', ''))))}</td></tr>"
        for e in other
    )
    return f"<h2>Other guard events</h2><table>{rows}</table>"


def _age(seconds: object) -> str:
    return f"{float(seconds):.1f} s" if isinstance(seconds, (int, float)) else ""


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
