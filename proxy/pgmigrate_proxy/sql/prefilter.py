"""The cheap first-keyword scan that lets ordinary traffic skip the parser: `is_plain(sql)`."""

from __future__ import annotations

import re

# `is_plain` answers True only when every statement of the text begins with a keyword whose
# statements never take a lock that can queue behind ordinary traffic (SHARE or stronger);
# whatever it is unsure about (another keyword, an unterminated quote or comment, a backslash
# in a plain string) goes to the parser. The keywords, and why each is safe:
#
# - SELECT, TABLE, VALUES, WITH (a CTE holds only SELECT/INSERT/UPDATE/DELETE/MERGE), INSERT,
#   UPDATE, DELETE, MERGE, COPY: ACCESS SHARE, ROW SHARE (FOR UPDATE/SHARE, which waits on rows,
#   not in the table lock queue) or ROW EXCLUSIVE. `SELECT ... INTO t` creates a new table.
# - EXPLAIN: it accepts only those statements, plus EXECUTE, DECLARE and CREATE TABLE AS /
#   CREATE MATERIALIZED VIEW (new objects), even with ANALYZE.
# - PREPARE (only preparable statements, or PREPARE TRANSACTION), EXECUTE (runs one of those),
#   DEALLOCATE, DECLARE, FETCH, MOVE, CLOSE, LISTEN, NOTIFY, UNLISTEN, DISCARD (own temporary
#   tables only).
# - SET, RESET, SHOW: no relation locks, whatever the setting (SET CONSTRAINTS only fires FK
#   checks, ROW SHARE). A guard that must know the session's lock_timeout or search_path has to
#   look at SET itself: "plain" means "takes no guarded lock", not "uninteresting".
# - BEGIN, START, COMMIT, END, ROLLBACK, ABORT, SAVEPOINT, RELEASE: they take no locks
#   (COMMIT PREPARED / ROLLBACK PREPARED only release them).
#
# Not plain, so parsed: CALL and DO (a procedure may run anything; the parser records their
# kind), ANALYZE, and every DDL keyword, LOCK included.
_PLAIN = """
    SELECT TABLE VALUES WITH INSERT UPDATE DELETE MERGE COPY EXPLAIN PREPARE EXECUTE
    DEALLOCATE DECLARE FETCH MOVE CLOSE LISTEN NOTIFY UNLISTEN DISCARD SET RESET SHOW BEGIN
    START COMMIT END ROLLBACK ABORT SAVEPOINT RELEASE
    """
PLAIN_KEYWORDS: frozenset[str] = frozenset(_PLAIN.split())

_TAG = r"A-Za-z0-9_\x80-\U0010FFFF"  # characters of a dollar-quote tag
_IDENT = _TAG + "$"  # characters that continue an identifier
# Whitespace, `--` comments and opening parentheses before a statement's first keyword.
_LEAD = re.compile(r"(?:[ \t\n\r\f\v]+|--[^\n\r]*|\()*")
_KEYWORD = re.compile(rf"[A-Za-z]+(?![{_IDENT}])")
# Where something the scan must understand can begin: the rest is skipped at C speed.
_SPECIAL = re.compile(rf"""[;'"/-]|\$|(?<![{_IDENT}])[eE](?=')""")
_PLAIN_STRING = re.compile(r"'[^']*(?:''[^']*)*'")
_ESCAPE_STRING = re.compile(r"[eE]'[^'\\]*(?:(?:\\.|'')[^'\\]*)*'", re.DOTALL)
_QUOTED_IDENT = re.compile(r'"[^"]*(?:""[^"]*)*"')
_DOLLAR_TAG = re.compile(rf"(?<![{_IDENT}])\$(?:[A-Za-z_\x80-\U0010FFFF][{_TAG}]*)?\$")
_LINE_COMMENT = re.compile(r"--[^\n\r]*")
_BLOCK_EDGE = re.compile(r"/\*|\*/")
_END = -1  # _statement_start: nothing but whitespace and comments up to the end
_UNSURE = -2  # the scan cannot tell: let the parser decide


#: Longer texts are judged by their first statement only, when it is their only one: the
#: full scan costs about 0.1 us a byte in the worst case, and it runs on the event loop.
MAX_SCANNED = 64 * 1024


def is_plain(sql: str) -> bool:
    """True when no statement in `sql` can take a lock that queues behind ordinary traffic."""
    if len(sql) > MAX_SCANNED:
        return _plain_long(sql)
    if ";" not in sql:  # one statement: its first keyword decides
        return _statement_start(sql, 0) != _UNSURE
    body = sql.rstrip()
    if body.endswith(";") and ";" not in body[:-1]:  # one statement and its terminator
        return _statement_start(body, 0) != _UNSURE
    pos = _statement_start(sql, 0)
    while pos >= 0:
        pos = _next_statement(sql, pos)
        if pos >= 0:
            pos = _statement_start(sql, pos)
    return pos == _END


def _plain_long(sql: str) -> bool:
    """A long text: plain when it is one statement (no semicolon but a final one) whose first
    keyword, within the first MAX_SCANNED characters, is plain. Only C-speed scans of it."""
    body = sql.rstrip()
    semicolon = body.find(";")
    if semicolon >= 0 and semicolon != len(body) - 1:
        return False
    head = sql[:MAX_SCANNED]
    pos = _statement_start(head, 0)
    return 0 <= pos < len(head)


def first_keyword(sql: str) -> str | None:
    """The first keyword of `sql` in upper case, after comments and "(", or None."""
    pos = _skip_lead(sql, 0)
    match = _KEYWORD.match(sql, pos) if pos >= 0 else None
    return match.group().upper() if match else None


def _skip_lead(sql: str, pos: int) -> int:
    """The position after whitespace, comments and "(" from `pos`; _UNSURE if a comment is open."""
    while True:
        lead = _LEAD.match(sql, pos)
        pos = lead.end() if lead else pos
        if not sql.startswith("/*", pos):
            return pos
        pos = _skip_block_comment(sql, pos)
        if pos < 0:
            return _UNSURE


def _statement_start(sql: str, pos: int) -> int:
    """After a plain statement's first keyword; _END if the text has no more; else _UNSURE."""
    pos = _skip_lead(sql, pos)
    if pos < 0:
        return _UNSURE
    if pos == len(sql):
        return _END
    if sql[pos] == ";":  # an empty statement
        return pos
    match = _KEYWORD.match(sql, pos)
    if match is None or match.group().upper() not in PLAIN_KEYWORDS:
        return _UNSURE
    return match.end()


def _next_statement(sql: str, pos: int) -> int:
    """The position after the `;` that ends the statement; _END at the end; _UNSURE if lost."""
    while True:
        match = _SPECIAL.search(sql, pos)
        if match is None:
            return _END
        pos = match.start()
        char = sql[pos]
        if char == ";":
            return pos + 1
        pos = _skip_token(sql, pos, char)
        if pos < 0:
            return _UNSURE


def _skip_token(sql: str, pos: int, char: str) -> int:
    """The position after the quote or comment beginning at `pos` (the character itself if it
    begins none); _UNSURE when it is unterminated or its end depends on settings."""
    if char == "'":
        match = _PLAIN_STRING.match(sql, pos)
        # standard_conforming_strings=off would make a backslash escape the quote.
        return match.end() if match and "\\" not in match.group() else _UNSURE
    if char in "eE":
        match = _ESCAPE_STRING.match(sql, pos)
    elif char == '"':
        match = _QUOTED_IDENT.match(sql, pos)
    elif char == "$":
        return _skip_dollar_quote(sql, pos)
    elif sql.startswith("--", pos):
        match = _LINE_COMMENT.match(sql, pos)
    elif sql.startswith("/*", pos):
        return _skip_block_comment(sql, pos)
    else:  # a lone "-" or "/"
        return pos + 1
    return match.end() if match else _UNSURE


def _skip_dollar_quote(sql: str, pos: int) -> int:
    match = _DOLLAR_TAG.match(sql, pos)
    if match is None:  # a parameter ($1) or part of an identifier (a$b)
        return pos + 1
    end = sql.find(match.group(), match.end())
    return _UNSURE if end < 0 else end + len(match.group())


def _skip_block_comment(sql: str, pos: int) -> int:
    """The position after the (nested) /* comment */ at `pos`; _UNSURE if unterminated."""
    depth, pos = 1, pos + 2
    while depth:
        match = _BLOCK_EDGE.search(sql, pos)
        if match is None:
            return _UNSURE
        depth += 1 if match.group() == "/*" else -1
        pos = match.end()
    return pos
