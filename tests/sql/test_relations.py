"""referenced_relations(sql): the bare names of the relations a query names."""

from __future__ import annotations

import pytest
from pgmigrate_proxy.sql.relations import referenced_relations


@pytest.mark.parametrize(
    ("sql", "names"),
    [
        ("SELECT 1", set()),
        (
            'SELECT * FROM public."App_Item" i JOIN owner o ON o.id = i.owner_id',
            {"App_Item", "owner"},
        ),
        ("INSERT INTO app_item (a) SELECT a FROM staging", {"app_item", "staging"}),
        ("UPDATE App_Item SET a = 1 WHERE id IN (SELECT id FROM other)", {"app_item", "other"}),
        ("DELETE FROM t USING u WHERE t.id = u.id", {"t", "u"}),
        ("WITH x AS (SELECT * FROM base) SELECT * FROM x", {"base", "x"}),
        ("SELECT nextval('seq')", set()),  # through a function: not seen
        ("SELECT 'FROM app_item'", set()),
    ],
)
def test_names(sql: str, names: set[str]) -> None:
    assert referenced_relations(sql) == frozenset(names)


def test_unparsable_is_unknown() -> None:
    assert referenced_relations("SELEC * FROM t") is None


def test_references_keep_schemas_functions_and_whether_it_writes() -> None:
    from pgmigrate_proxy.sql.relations import references

    found = references('SELECT s.f(x), lower(y) FROM "My"."T" t JOIN u ON true')
    assert found is not None
    assert found.relations == {("My", "T"), (None, "u")}
    assert found.functions == {("s", "f"), (None, "lower")}
    assert not found.writes
    for sql in (
        "SELECT * FROM t FOR KEY SHARE",
        "WITH d AS (DELETE FROM t RETURNING id) SELECT * FROM d",
        "INSERT INTO t VALUES (1)",
        "COPY t FROM STDIN",
        "LOCK TABLE t",
    ):
        found = references(sql)
        assert found is not None and found.writes, sql
    assert references("DO $$ BEGIN END $$") is None
    assert references("EXECUTE p(1)") is None
    assert references("SELEC 1") is None
