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
