"""The relay's cheapest test on a Query's bytes never lets a lock-taking statement through."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pgmigrate_proxy.runtime.detect import plain_query
from pgmigrate_proxy.sql import classify


def payload(sql: str) -> bytes:
    return sql.encode() + b"\0"


@pytest.mark.parametrize(
    ("sql", "plain"),
    [
        ("SELECT abalance FROM pgbench_accounts WHERE aid = 5;", True),
        ("select 1", True),
        ("UPDATE t SET v = v + 1 WHERE id = 3", True),
        ("insert into t values (1) ; ", True),
        ("WITH x AS (SELECT 1) SELECT * FROM x", True),
        ("SELECT 1 -- ; a comment\n", False),  # text after the ';': the full prefilter
        ("SELECT 1; DROP TABLE t", False),
        ("SELECT ';'; ALTER TABLE t ADD c int", False),
        ("ALTER TABLE t ADD c int", False),
        ("/* c */ SELECT 1", False),  # not obviously plain: the full prefilter decides
        ("SELECT 1;;", False),
        ("selectx 1", False),
        ("", False),
    ],
)
def test_plain_query(sql: str, plain: bool) -> None:
    assert plain_query(payload(sql)) is plain


HEADS = ["SELECT ", "select ", "INSERT ", "update ", "DELETE ", "WITH ", "VALUES ", "DROP "]
TAILS = [
    "1", "1;", "1 ; DROP TABLE t", "* FROM t; ALTER TABLE t ADD c int",
    "x; CREATE INDEX i ON t (a)", "t SET a = 1; TRUNCATE t", "(SELECT 1) SELECT 1",
    "'a;b'; LOCK TABLE t", "1 -- ;\nDROP TABLE t",
]  # fmt: skip


@given(head=st.sampled_from(HEADS), tail=st.sampled_from(TAILS), pad=st.text(" \n\t", max_size=3))
def test_plain_query_never_passes_a_guarded_statement(head: str, tail: str, pad: str) -> None:
    sql = head + tail + pad
    if plain_query(payload(sql)):
        assert not any(s.guarded for s in classify(sql)), sql
