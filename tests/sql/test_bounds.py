"""What one client's statements can cost the classifier: memory kept by its cache (in bytes,
whatever the texts), and work for huge or deeply nested texts (bounded, never an exception)."""

from __future__ import annotations

import gc
import tracemalloc

import pytest
from pgmigrate_proxy.sql import cache_clear, classify, is_plain
from pgmigrate_proxy.sql.classify import classify_script

MB = 1024 * 1024


def _kept_after(work: object) -> int:
    """Bytes still allocated after `work()` (a callable) returned and garbage was collected."""
    assert callable(work)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        work()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def test_cache_keeps_a_few_megabytes_whatever_the_texts() -> None:
    """2000 distinct 16 kB guarded statements (the finding: 2000 x 60 kB kept 115 MB)."""
    cache_clear()
    pad = "x" * 16 * 1024

    def work() -> None:
        for i in range(2000):
            (statement,) = classify(f"ALTER TABLE t{i} ADD COLUMN c text DEFAULT '{pad}'")
            assert statement.guarded

    kept = _kept_after(work)
    cache_clear()
    assert kept < 6 * MB, f"the classification cache kept {kept / MB:.1f} MB"


def test_results_are_still_cached() -> None:
    cache_clear()
    sql = "ALTER TABLE cached ADD c int"
    assert classify(sql) is classify(sql)


def test_a_huge_text_is_not_parsed_and_judged_by_its_first_keyword() -> None:
    """The finding: a million `SELECT 1;` and an ALTER (10 MB) took 22 s to classify."""
    script = "SELECT 1;" * 1_000_000 + " ALTER TABLE t ADD COLUMN x int"
    assert not is_plain(script)
    (statement,) = classify(script)
    assert (statement.kind, statement.guarded) == ("Unclassified", False)
    (ddl,) = classify("ALTER TABLE t ADD COLUMN x int; " + "SELECT 1;" * 1_000_000)
    assert (ddl.kind, ddl.guarded, ddl.transactional) == ("Unclassified", True, False)
    assert ddl.locks == () and ddl.resolve == ()


def test_a_huge_single_plain_statement_is_plain() -> None:
    values = ",".join(["(1, 'a;b')"] * 200_000)
    assert is_plain(f"INSERT INTO t VALUES {','.join(['(1)'] * 200_000)};")
    assert not is_plain(f"INSERT INTO t VALUES {values}")  # a semicolon inside: unsure
    assert not is_plain(" " * 100_000 + "SELECT 1")  # its first keyword is too far in
    assert not is_plain("ALTER TABLE t ADD c text DEFAULT '" + "x" * 100_000 + "'")


@pytest.mark.parametrize("depth", [600, 5000, 50_000])
def test_deeply_nested_ddl_is_guarded_without_raising(depth: int) -> None:
    """The finding: 600 levels of abs() raised RecursionError out of classify()."""
    sql = "ALTER TABLE t ALTER COLUMN c SET DEFAULT " + "abs(" * depth + "1" + ")" * depth
    statements = classify(sql)
    assert statements and all(s.guarded or s.kind == "Unparsable" for s in statements[:1])
    if len(sql) <= 32 * 1024:
        (statement,) = statements
        assert statement.kind in ("AlterTableStmt", "Unclassified", "Unparsable")


def test_classify_script_splits_each_statement() -> None:
    pad = "x" * 20_000
    script = (
        f"BEGIN; CREATE TABLE s (a text DEFAULT '{pad}'); "
        f"ALTER TABLE s ADD b text DEFAULT '{pad}'; COMMIT"
    )
    pieces = classify_script(script)
    assert [text.split()[0] for text, _ in pieces] == ["BEGIN", "CREATE", "ALTER", "COMMIT"]
    assert [tuple(s.kind for s in found) for _, found in pieces] == [
        (),
        ("CreateStmt",),
        ("AlterTableStmt",),
        (),
    ]
    assert pieces[2][1][0].guarded
    assert classify_script("SELECT 'unterminated")[0][1][0].kind == "Unparsable"


def test_classify_apart_gives_what_classify_gives() -> None:
    """The worker thread's classification parses statement by statement; the answer is the
    same as classify's for the whole text (kinds, texts, guard facts)."""
    from pgmigrate_proxy.sql.classify import classify_apart

    from tests.sql.classify_table import ROWS

    script = "; ".join(row.sql for row in ROWS[:200])
    cache_clear()
    whole = classify(script)
    apart = classify_apart(script)
    assert len(whole) > 100
    assert apart == whole
    for sql in ("SELECT 'unterminated", "", "-- only a comment", "BEGIN; ALTER TABLE t ADD c int"):
        assert classify_apart(sql) == classify(sql)


def test_cost_is_zero_for_cached_and_unparsed_texts() -> None:
    from pgmigrate_proxy.sql.classify import MAX_CLASSIFIED, cost

    cache_clear()
    sql = "ALTER TABLE cost_t ADD c int"
    assert cost(sql) == len(sql)
    classify(sql)
    assert cost(sql) == 0  # cached
    assert cost("ALTER TABLE t ADD c int DEFAULT 1" + " " * MAX_CLASSIFIED) == 0  # not parsed
