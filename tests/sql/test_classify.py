"""classify() on its golden table, the cache, and the prefilter (never "plain" when guarded)."""

from __future__ import annotations

import importlib

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pgmigrate_proxy.sql import (
    UNPARSABLE,
    LockMode,
    QualifiedName,
    Question,
    Statement,
    cache_clear,
    cache_info,
    classify,
    first_keyword,
    is_plain,
    targets_query,
)
from pgmigrate_proxy.sql.prefilter import PLAIN_KEYWORDS

from tests.sql.classify_table import ROWS, Row

classify_module = importlib.import_module("pgmigrate_proxy.sql.classify")

MODES = {
    "AS": LockMode.AccessShareLock,
    "RS": LockMode.RowShareLock,
    "RE": LockMode.RowExclusiveLock,
    "SUE": LockMode.ShareUpdateExclusiveLock,
    "S": LockMode.ShareLock,
    "SRE": LockMode.ShareRowExclusiveLock,
    "E": LockMode.ExclusiveLock,
    "AE": LockMode.AccessExclusiveLock,
}
FLAGS = {"guarded", "rewrites", "scans", "concurrently", "notx"}


def _name(text: str) -> QualifiedName:
    schema, _, name = text.rpartition(".")
    return QualifiedName(schema or None, name)


def _expected_locks(spec: str) -> dict[QualifiedName, LockMode]:
    pairs = (item.rsplit(":", 1) for item in spec.split(" ") if item) if spec else ()
    return {_name(rel): MODES[mode] for rel, mode in pairs}


def _expected_asks(spec: str) -> set[tuple[str, QualifiedName, str | None, LockMode]]:
    found = set()
    for item in spec.split(" ") if spec else ():
        call, mode = item.rsplit(":", 1)
        question, _, args = call.rstrip(")").partition("(")
        subject, _, constraint = args.partition(",")
        found.add((question, _name(subject), constraint or None, MODES[mode]))
    return found


def _flags(statement: Statement) -> set[str]:
    flags = {flag for flag in FLAGS - {"notx"} if getattr(statement, flag)}
    return flags | ({"notx"} if not statement.transactional else set())


def _row_id(row: Row) -> str:
    return row.sql[:60]


@pytest.mark.parametrize("row", ROWS, ids=_row_id)
def test_golden_table(row: Row) -> None:
    (statement,) = classify(row.sql)
    assert statement.kind == row.kind
    assert statement.text == row.sql
    assert {lock.relation: lock.mode for lock in statement.locks} == _expected_locks(row.locks)
    asks = {(a.question.value, a.relation, a.constraint, a.mode) for a in statement.resolve}
    assert asks == _expected_asks(row.asks)
    assert _flags(statement) == set(row.flags.split()), statement
    assert all(lock.why for lock in statement.locks + statement.resolve)


def test_the_table_is_large_enough() -> None:
    assert len(ROWS) >= 60
    assert len({row.kind for row in ROWS}) >= 40


def test_every_statement_of_a_query_message_is_classified_with_its_own_text() -> None:
    sql = "SELECT 'é;' ; /* c */ ALTER TABLE t ADD c int;\nCREATE INDEX CONCURRENTLY ON t (c);"
    first, second, third = classify(sql)
    assert (first.kind, first.text, first.guarded) == ("SelectStmt", "SELECT 'é;'", False)
    assert second.text == "ALTER TABLE t ADD c int"  # the parser skips leading comments
    assert second.guarded and second.transactional
    assert third.text == "CREATE INDEX CONCURRENTLY ON t (c)"
    assert third.concurrently and not third.transactional and not third.guarded


def test_target_first_then_the_others_in_statement_order() -> None:
    (statement,) = classify("ALTER TABLE p ATTACH PARTITION c FOR VALUES IN (1)")
    assert [str(lock.relation) for lock in statement.locks] == ["p", "c"]
    assert statement.strongest is LockMode.AccessExclusiveLock
    assert classify("SELECT 1")[0].strongest is None


@pytest.mark.parametrize("sql", ["SELEC 1", "ALTER TABLE", "SELECT 'unterminated", "A\0B"])
def test_unparsable_text_is_one_unguarded_statement(sql: str) -> None:
    assert classify(sql) == (Statement(kind=UNPARSABLE, text=sql),)


@pytest.mark.parametrize("sql", ["", "  ", "-- nothing", ";;", "/* x */ ;"])
def test_empty_text_has_no_statement(sql: str) -> None:
    assert classify(sql) == ()


def test_an_unexpected_tree_is_guarded_with_no_targets(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(stmt: object) -> None:
        raise KeyError("relation")

    monkeypatch.setitem(classify_module.HANDLERS, "IndexStmt", broken)
    cache_clear()
    (statement,) = classify("CREATE INDEX ON t (a)")
    cache_clear()
    assert statement.guarded and statement.locks == () and statement.kind == "IndexStmt"


def test_results_are_cached_by_text() -> None:
    cache_clear()
    sql = "ALTER TABLE cached ADD c int"
    first = classify(sql)
    assert classify(sql) is first
    info = cache_info()
    assert (info.hits, info.misses, info.entries) == (1, 1, 1)
    long_sql = "SELECT 1 " + " " * classify_module.MAX_CLASSIFIED
    assert classify(long_sql) == classify(long_sql)
    assert cache_info().entries == 1  # long texts are never kept


def test_names_are_quoted_for_to_regclass() -> None:
    assert QualifiedName(None, "t").regclass_text == '"t"'
    assert QualifiedName("My Schema", 'we"ird').regclass_text == '"My Schema"."we""ird"'
    assert str(QualifiedName("s", "t")) == "s.t"


def test_targets_query_numbers_targets_and_parameters() -> None:
    (statement,) = classify("ALTER TABLE s.t DROP CONSTRAINT f")
    query = targets_query(statement)
    assert query is not None
    assert query.modes == (LockMode.AccessExclusiveLock,) * 3
    assert query.params == ('"s"."t"', '"s"."t"', "f", '"s"."t"')
    assert query.sql.count("$") == 4 and "$4::text" in query.sql
    assert targets_query(classify("SELECT 1")[0]) is None
    asked = {ask.question for ask in classify("DROP SCHEMA app")[0].resolve}
    assert asked == {Question.SCHEMA_RELATIONS}


# --- the prefilter -------------------------------------------------------------------------

PLAIN = [
    "SELECT 1", "select 1", "  \n\tSeLeCt 1", "((SELECT 1))", "/* c */ SELECT 1",
    "/* a /* nested */ b */SELECT 1", "-- c\nSELECT 1", "-- c\r(VALUES (1))",
    "WITH x AS (SELECT 1) SELECT * FROM x", "INSERT INTO t VALUES ($$ALTER TABLE t$$)",
    "UPDATE t SET a = 1", "DELETE FROM t", "MERGE INTO t USING s ON true DO NOTHING",
    "VALUES (1)", "TABLE t", "SHOW lock_timeout", "SET lock_timeout = 0", "RESET ALL",
    "BEGIN", "START TRANSACTION", "COMMIT", "END", "ABORT", "ROLLBACK TO SAVEPOINT s",
    "SAVEPOINT s", "RELEASE s", "FETCH 10 FROM c", "MOVE c", "CLOSE c",
    "DECLARE c CURSOR FOR SELECT 1", "EXECUTE p(1)", "PREPARE p AS SELECT 1", "DEALLOCATE p",
    "DISCARD ALL", "LISTEN x", "NOTIFY x", "UNLISTEN *", "COPY t FROM STDIN",
    "EXPLAIN ANALYZE SELECT 1", "SELECT 1 FOR UPDATE", "SELECT 1; SELECT 2", "SELECT 1;",
    "SELECT 1; -- done", "SELECT ';DROP TABLE t'", "SELECT $x$;DROP TABLE t$x$",
    "SELECT E'\\';DROP'", 'SELECT "a;b"', "SELECT 'it''s;'; SELECT 2", "", "-- only",
    "SELECT $1; SELECT a$b", "SELECT 1 -- ;\n", "SELECT date ';'; SHOW x",
]  # fmt: skip
NOT_PLAIN = [
    "ALTER TABLE t ADD a int", "/* SELECT */ ALTER TABLE t", "-- SELECT\nDROP TABLE t",
    "(ALTER TABLE t)", "SELECT 1; DROP TABLE t", "SELECT ';'; DROP TABLE t",
    "SELECT 'a\\'; DROP TABLE t; --'", "SELECT $$; DROP TABLE t", "SELECT 'open; x",
    "/* open SELECT 1", "SELECT 1; /* open", "LOCK t", "CALL p()", "DO $$ $$", "ANALYZE t",
    "VACUUM", "CREATE INDEX ON t (a)", "TRUNCATE t", "REINDEX TABLE t", "selectx",
    "select$1", "SELECT 1 -- ;\n; ALTER TABLE t", "SELECT E'\\'; DROP TABLE t",
    "SELECT \"a\"; DROP TABLE t", "SELECT 1;\n\tcreate index on t (a)",
]  # fmt: skip


@pytest.mark.parametrize("sql", PLAIN)
def test_plain_traffic_skips_the_parser(sql: str) -> None:
    assert is_plain(sql)
    assert not any(statement.guarded for statement in classify(sql))


@pytest.mark.parametrize("sql", NOT_PLAIN)
def test_anything_else_goes_to_the_parser(sql: str) -> None:
    assert not is_plain(sql)


def test_first_keyword() -> None:
    assert first_keyword(" /* x /* y */ */ -- z\n ((select 1))") == "SELECT"
    assert first_keyword("-- only") is None
    assert first_keyword("/* open") is None
    assert first_keyword("ALTER TABLE t") == "ALTER"


def test_no_plain_keyword_starts_a_guarded_row() -> None:
    for row in ROWS:
        if first_keyword(row.sql) in PLAIN_KEYWORDS:
            assert not classify(row.sql)[0].guarded, row.sql


# --- hypothesis: the prefilter never says "plain" for a guarded statement ------------------

TRICKY_LITERALS = [
    "';'", "'--'", "'/*'", "'*/'", "$$;$$", "$a$ ; $b$ $a$", "E'\\';'", "e'\\\\'", '"a;b"',
    "'it''s; ok'", "U&'x'", "B'01'", "$1", "a$b$c", "date ';'", "' -- '",
]  # fmt: skip
GAPS = [" ", "\n", "\t", "\r\n", "-- c\n", "/* c */", "/* a /* b */ c */", "/**/", "--\n"]

gap = st.lists(st.sampled_from(GAPS), max_size=3).map("".join)
cased = st.sampled_from([str, str.upper, str.lower, str.swapcase])
literal_select = st.builds(
    lambda lit, paren: f"(SELECT {lit})" if paren else f"SELECT {lit}",
    st.sampled_from(TRICKY_LITERALS),
    st.booleans(),
)
statement = st.one_of(st.sampled_from([row.sql for row in ROWS]), literal_select)
texts = st.lists(
    st.builds(lambda g, case, sql, tail: g + case(sql) + tail, gap, cased, statement, gap),
    min_size=1,
    max_size=3,
).map(";".join)


@given(texts)
@example("SELECT ';' ; ALTER TABLE t ADD c int")
@example("SELECT $a$ ; $b$ $a$; DROP TABLE t")
@example("SELECT E'\\';'; LOCK t")
def test_prefilter_never_lets_a_guarded_statement_through(sql: str) -> None:
    if is_plain(sql):
        assert not any(statement.guarded for statement in classify(sql)), sql


@given(st.lists(st.sampled_from(GAPS + TRICKY_LITERALS + [";", "SELECT", "DROP TABLE t"])))
def test_prefilter_on_token_soup(tokens: list[str]) -> None:
    sql = " ".join(tokens)
    if is_plain(sql):
        assert not any(statement.guarded for statement in classify(sql)), sql


# --- the rights a statement needs (privilege checks before the guard acts) -------------------


@pytest.mark.parametrize(
    ("sql", "rights"),
    [
        ("ALTER TABLE t ADD COLUMN c int", {"ownership"}),
        ("DROP TABLE t", {"ownership"}),
        ("TRUNCATE t", {"TRUNCATE privilege"}),
        ("VACUUM FULL t", {"ownership (or MAINTAIN)"}),
        ("CLUSTER t", {"ownership (or MAINTAIN)"}),
        ("REFRESH MATERIALIZED VIEW t", {"ownership (or MAINTAIN)"}),
        ("CREATE TRIGGER g AFTER INSERT ON t EXECUTE FUNCTION f()", {"TRIGGER privilege"}),
        ("LOCK TABLE t", {"UPDATE or DELETE or TRUNCATE privilege (or MAINTAIN)"}),
        ("LOCK TABLE t IN ACCESS SHARE MODE", {"SELECT privilege (or MAINTAIN)"}),
    ],
)
def test_each_lock_carries_the_right_postgresql_checks(sql: str, rights: set[str]) -> None:
    (statement,) = classify(sql)
    assert {str(right) for right in statement.locks[0].rights} == rights


def test_a_foreign_key_needs_references_on_the_referenced_table() -> None:
    (statement,) = classify("ALTER TABLE a ADD FOREIGN KEY (x) REFERENCES b (id)")
    by_name = {lock.relation.name: {str(r) for r in lock.rights} for lock in statement.locks}
    assert by_name == {"a": {"ownership"}, "b": {"REFERENCES privilege"}}
    query = targets_query(statement)
    assert query is not None
    assert "has_table_privilege(relid, 'REFERENCES')" in query.sql
    assert "pg_has_role(relowner, 'USAGE')" in query.sql


def test_statements_on_relations_only_the_server_knows_are_marked() -> None:
    assert classify("REINDEX DATABASE d")[0].unknown_targets
    assert classify("VACUUM FULL")[0].unknown_targets
    assert not classify("VACUUM FULL t")[0].unknown_targets


# --- deeply nested statements (issue 9, finding 3): classify never raises ----------------------

TOO_DEEP = getattr(classify_module, "TOO_DEEP", "(missing)")


def _nested(depth: int) -> str:
    return "abs(" * depth + "1" + ")" * depth


@pytest.mark.parametrize("depth", [600, 1000, 3000])
def test_deeply_nested_ddl_is_guarded_with_unknown_targets(depth: int) -> None:
    sql = f"SELECT 1; ALTER TABLE t ALTER COLUMN c SET DEFAULT {_nested(depth)}; SELECT 2"
    first, alter, last = classify(sql)
    assert (first.kind, last.kind, first.note, last.note) == ("SelectStmt", "SelectStmt", "", "")
    assert (alter.kind, alter.guarded, alter.note) == ("AlterTableStmt", True, TOO_DEEP)
    assert alter.text.startswith("ALTER TABLE t") and alter.text.endswith(")")


def test_deeply_nested_add_column_default_is_guarded() -> None:
    (alter,) = classify(f"ALTER TABLE t ADD COLUMN x int DEFAULT {_nested(800)}")
    assert (alter.kind, alter.guarded) == ("AlterTableStmt", True)


def test_deeply_nested_select_is_not_guarded() -> None:
    (select,) = classify(f"SELECT {_nested(1000)}")
    assert (select.kind, select.guarded, select.note) == ("SelectStmt", False, TOO_DEEP)


def test_past_the_parsers_own_limit_is_unparsable() -> None:
    (statement,) = classify(f"ALTER TABLE t ALTER COLUMN c SET DEFAULT {_nested(5000)}")
    assert (statement.kind, statement.guarded) == (UNPARSABLE, False)


def test_past_the_classified_length_it_is_judged_by_its_first_keyword() -> None:
    (statement,) = classify(f"ALTER TABLE t ALTER COLUMN c SET DEFAULT {_nested(100_000)}")
    assert (statement.kind, statement.guarded) == (classify_module.UNCLASSIFIED, True)


def test_classify_never_raises_even_deep_in_the_stack() -> None:
    """Near the recursion limit already (a caller deep in callbacks): still an answer."""

    def down(levels: int) -> tuple[Statement, ...]:
        return (
            classify(f"ALTER TABLE t ALTER COLUMN c SET DEFAULT {_nested(300)}")
            if (levels == 0)
            else down(levels - 1)
        )

    cache_clear()
    (statement,) = down(700)
    assert (statement.kind, statement.guarded) == ("AlterTableStmt", True)
