"""Statements to run against real servers, one per statement class, with the objects they need."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: Created in a fresh schema (first on the search_path) before every case.
SCHEMA_SETUP = """
CREATE TABLE parent (id int PRIMARY KEY, name text);
CREATE TABLE child (
    id int PRIMARY KEY, parent_id int REFERENCES parent (id), a int, b text,
    v varchar(10), n int
);
CREATE INDEX child_a ON child (a);
ALTER TABLE child ADD CONSTRAINT child_a_positive CHECK (a > 0);
CREATE FUNCTION noop() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NEW; END$$;
CREATE TRIGGER child_noop BEFORE INSERT ON child FOR EACH ROW EXECUTE FUNCTION noop();
CREATE VIEW child_view AS SELECT id, a FROM child;
CREATE SEQUENCE counter;
CREATE TABLE events (id int, at date NOT NULL) PARTITION BY RANGE (at);
CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE events_2025 (id int, at date NOT NULL);
CREATE MATERIALIZED VIEW parent_names AS SELECT id, name FROM parent;
CREATE UNIQUE INDEX parent_names_id ON parent_names (id);
INSERT INTO parent VALUES (1, 'one');
INSERT INTO child VALUES (1, 1, 1, 'x', 'v', NULL);
INSERT INTO events VALUES (1, '2024-06-01');
INSERT INTO events_2025 VALUES (2, '2025-06-01');
"""

DEFAULT_PARTITION = "CREATE TABLE events_default PARTITION OF events DEFAULT"
FK_NOT_VALID = (
    "ALTER TABLE child ADD CONSTRAINT child_n_fkey FOREIGN KEY (n) REFERENCES parent (id) NOT VALID"
)
REFERENCED_PARTITIONS = """
CREATE TABLE orders (id int, at date, PRIMARY KEY (id, at)) PARTITION BY RANGE (at);
CREATE TABLE orders_2024 PARTITION OF orders FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE order_lines (id int, at date, FOREIGN KEY (id, at) REFERENCES orders);
"""
PARTITIONED_INDEX = (
    "CREATE INDEX events_id ON ONLY events (id); CREATE INDEX events_2024_id ON events_2024 (id)"
)
WRITER = "INSERT INTO child VALUES (2, 1, 2, 'y', 'w', NULL)"  # holds ROW EXCLUSIVE
READER = "SELECT 1 FROM child LIMIT 1"  # holds ACCESS SHARE


@dataclass(frozen=True)
class LiveCase:
    """One statement; `{other}` in sql or setup names a second, empty schema."""

    sql: str
    setup: str = ""
    min_version: int = 0
    blocker: str | None = None  # not transactional: what another session holds meanwhile
    rewrite_exact: bool = True  # False: "may rewrite" is predicted, the server does not


_LOCK_MODES = [
    "ACCESS SHARE", "ROW SHARE", "ROW EXCLUSIVE", "SHARE UPDATE EXCLUSIVE", "SHARE",
    "SHARE ROW EXCLUSIVE", "EXCLUSIVE", "ACCESS EXCLUSIVE",
]  # fmt: skip

CASES: Mapping[str, LiveCase] = {
    # ALTER TABLE: columns
    "add_column": LiveCase("ALTER TABLE child ADD COLUMN c int"),
    "add_column_constant_default": LiveCase("ALTER TABLE child ADD c int NOT NULL DEFAULT 0"),
    "add_column_stable_default": LiveCase("ALTER TABLE child ADD c timestamptz DEFAULT now()"),
    "add_column_volatile_default": LiveCase(
        "ALTER TABLE child ADD COLUMN c timestamptz DEFAULT clock_timestamp()"
    ),
    "add_column_uuid_default": LiveCase("ALTER TABLE child ADD c uuid DEFAULT gen_random_uuid()"),
    "add_column_serial": LiveCase("ALTER TABLE child ADD COLUMN c bigserial"),
    "add_column_identity": LiveCase("ALTER TABLE child ADD c int GENERATED ALWAYS AS IDENTITY"),
    "add_column_stored": LiveCase("ALTER TABLE child ADD c int GENERATED ALWAYS AS (a * 2) STORED"),
    "add_column_virtual": LiveCase(
        "ALTER TABLE child ADD c int GENERATED ALWAYS AS (a * 2) VIRTUAL", min_version=18
    ),
    "add_column_references": LiveCase("ALTER TABLE child ADD p int REFERENCES parent (id)"),
    "alter_type": LiveCase("ALTER TABLE child ALTER COLUMN n TYPE bigint"),
    "alter_type_widen": LiveCase(
        "ALTER TABLE child ALTER COLUMN v TYPE varchar(20)", rewrite_exact=False
    ),
    "set_not_null": LiveCase("ALTER TABLE child ALTER COLUMN b SET NOT NULL"),
    "drop_not_null": LiveCase(
        "ALTER TABLE child ALTER b DROP NOT NULL", setup="ALTER TABLE child ALTER b SET NOT NULL"
    ),
    "set_default": LiveCase("ALTER TABLE child ALTER COLUMN n SET DEFAULT 0"),
    "drop_column": LiveCase("ALTER TABLE child DROP COLUMN n"),
    "set_statistics": LiveCase("ALTER TABLE child ALTER COLUMN a SET STATISTICS 500"),
    "set_fillfactor": LiveCase("ALTER TABLE child SET (fillfactor = 70)"),
    "set_autovacuum": LiveCase(
        "ALTER TABLE child SET (autovacuum_enabled = false, toast.autovacuum_enabled = false)"
    ),
    "view_security_barrier": LiveCase("ALTER VIEW child_view SET (security_barrier = true)"),
    "cluster_on": LiveCase("ALTER TABLE child CLUSTER ON child_a"),
    "owner": LiveCase("ALTER TABLE child OWNER TO CURRENT_USER"),
    "replica_identity": LiveCase("ALTER TABLE child REPLICA IDENTITY FULL"),
    "set_unlogged": LiveCase("ALTER TABLE events_2025 SET UNLOGGED"),
    # ALTER TABLE: constraints
    "add_fk": LiveCase(
        "ALTER TABLE child ADD CONSTRAINT child_n_fkey FOREIGN KEY (n) REFERENCES parent (id)"
    ),
    "add_fk_not_valid": LiveCase(FK_NOT_VALID),
    "add_fk_to_partitioned": LiveCase(
        "ALTER TABLE order_lines ADD FOREIGN KEY (id, at) REFERENCES orders",
        setup=REFERENCED_PARTITIONS,
    ),
    "add_check": LiveCase("ALTER TABLE child ADD CONSTRAINT n_positive CHECK (n > 0)"),
    "add_check_not_valid": LiveCase("ALTER TABLE child ADD CHECK (n > 0) NOT VALID"),
    "add_unique": LiveCase("ALTER TABLE child ADD CONSTRAINT child_n_key UNIQUE (n)"),
    "add_pk_using_index": LiveCase(
        "ALTER TABLE plain ADD CONSTRAINT plain_pkey PRIMARY KEY USING INDEX plain_id",
        setup="CREATE TABLE plain (id int NOT NULL); CREATE UNIQUE INDEX plain_id ON plain (id)",
    ),
    "add_exclude": LiveCase("ALTER TABLE child ADD EXCLUDE USING btree (n WITH =)"),
    "validate_check": LiveCase(
        "ALTER TABLE child VALIDATE CONSTRAINT n_positive",
        setup="ALTER TABLE child ADD CONSTRAINT n_positive CHECK (n > 0) NOT VALID",
    ),
    "validate_fk": LiveCase(
        "ALTER TABLE child VALIDATE CONSTRAINT child_n_fkey", setup=FK_NOT_VALID
    ),
    "drop_fk": LiveCase("ALTER TABLE child DROP CONSTRAINT child_parent_id_fkey"),
    "drop_check": LiveCase("ALTER TABLE child DROP CONSTRAINT child_a_positive"),
    "drop_pk_cascade": LiveCase("ALTER TABLE parent DROP CONSTRAINT parent_pkey CASCADE"),
    "alter_constraint": LiveCase(
        "ALTER TABLE child ALTER CONSTRAINT child_parent_id_fkey DEFERRABLE"
    ),
    "rename_constraint": LiveCase(
        "ALTER TABLE child RENAME CONSTRAINT child_a_positive TO a_positive"
    ),
    # ALTER TABLE: triggers, names, schema, inheritance
    "disable_trigger": LiveCase("ALTER TABLE child DISABLE TRIGGER child_noop"),
    "enable_trigger_partitioned": LiveCase(
        "ALTER TABLE events ENABLE TRIGGER events_noop",
        setup="CREATE TRIGGER events_noop BEFORE INSERT ON events"
        " FOR EACH ROW EXECUTE FUNCTION noop()",
    ),
    "rename": LiveCase("ALTER TABLE child RENAME TO kid"),
    "rename_column": LiveCase("ALTER TABLE child RENAME COLUMN b TO bb"),
    "rename_view": LiveCase("ALTER VIEW child_view RENAME TO kids"),
    "set_schema": LiveCase("ALTER TABLE child SET SCHEMA {other}"),
    "inherit": LiveCase(
        "ALTER TABLE events_2025 INHERIT base",
        setup="CREATE TABLE base (id int, at date NOT NULL)",
    ),
    "no_inherit": LiveCase(
        "ALTER TABLE sub NO INHERIT base",
        setup="CREATE TABLE base (id int); CREATE TABLE sub () INHERITS (base)",
    ),
    "partitioned_add_column": LiveCase("ALTER TABLE events ADD COLUMN note text"),
    # ALTER TABLE: partitions
    "attach_partition": LiveCase(
        "ALTER TABLE events ATTACH PARTITION events_2025"
        " FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')"
    ),
    "attach_with_default": LiveCase(
        "ALTER TABLE events ATTACH PARTITION events_2025"
        " FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')",
        setup=DEFAULT_PARTITION,
    ),
    "detach_partition": LiveCase("ALTER TABLE events DETACH PARTITION events_2024"),
    "detach_referenced": LiveCase(
        "ALTER TABLE orders DETACH PARTITION orders_2024", setup=REFERENCED_PARTITIONS
    ),
    "detach_concurrently": LiveCase(
        "ALTER TABLE events DETACH PARTITION events_2024 CONCURRENTLY",
        blocker="SELECT 1 FROM events_2024 LIMIT 1",  # the wait for AE on the partition
    ),
    # ALTER INDEX / SEQUENCE
    "alter_index_rename": LiveCase("ALTER INDEX child_a RENAME TO child_a2"),
    "alter_index_fillfactor": LiveCase("ALTER INDEX child_a SET (fillfactor = 80)"),
    "alter_index_attach": LiveCase(
        "ALTER INDEX events_id ATTACH PARTITION events_2024_id", setup=PARTITIONED_INDEX
    ),
    "alter_sequence": LiveCase("ALTER SEQUENCE counter RESTART"),
    "alter_sequence_rename": LiveCase("ALTER SEQUENCE counter RENAME TO counter2"),
    # CREATE
    "create_index": LiveCase("CREATE INDEX child_b ON child (b)"),
    "create_index_partitioned": LiveCase("CREATE INDEX events_at ON events (at)"),
    "create_index_only": LiveCase("CREATE INDEX events_at ON ONLY events (at)"),
    "create_index_concurrently": LiveCase(
        "CREATE INDEX CONCURRENTLY child_b ON child (b)", blocker=WRITER
    ),
    "create_table": LiveCase("CREATE TABLE fresh (id int PRIMARY KEY)"),
    "create_table_references": LiveCase("CREATE TABLE fresh (id int REFERENCES parent (id))"),
    "create_partition": LiveCase(
        "CREATE TABLE events_2026 PARTITION OF events"
        " FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')"
    ),
    "create_partition_with_default": LiveCase(
        "CREATE TABLE events_2026 PARTITION OF events"
        " FOR VALUES FROM ('2026-01-01') TO ('2027-01-01')",
        setup=DEFAULT_PARTITION,
    ),
    "create_table_inherits": LiveCase("CREATE TABLE fresh (x int) INHERITS (parent)"),
    "create_table_like": LiveCase("CREATE TABLE fresh (LIKE child INCLUDING ALL)"),
    "create_table_as": LiveCase("CREATE TABLE fresh AS SELECT * FROM child"),
    "create_matview": LiveCase("CREATE MATERIALIZED VIEW fresh AS SELECT * FROM child"),
    "create_view": LiveCase("CREATE VIEW fresh AS SELECT * FROM child"),
    "replace_view": LiveCase("CREATE OR REPLACE VIEW child_view AS SELECT id, a FROM child"),
    "create_sequence": LiveCase("CREATE SEQUENCE fresh"),
    "create_trigger": LiveCase(
        "CREATE TRIGGER child_upd BEFORE UPDATE ON child FOR EACH ROW EXECUTE FUNCTION noop()"
    ),
    "create_trigger_partitioned": LiveCase(
        "CREATE TRIGGER events_upd BEFORE UPDATE ON events FOR EACH ROW EXECUTE FUNCTION noop()"
    ),
    "create_rule": LiveCase("CREATE RULE child_keep AS ON UPDATE TO child DO INSTEAD NOTHING"),
    "create_policy": LiveCase("CREATE POLICY child_all ON child USING (true)"),
    "create_statistics": LiveCase("CREATE STATISTICS child_ab ON a, b FROM child"),
    # DROP
    "drop_index": LiveCase("DROP INDEX child_a"),
    "drop_index_partitioned": LiveCase("DROP INDEX events_id", setup=PARTITIONED_INDEX),
    "drop_index_concurrently": LiveCase("DROP INDEX CONCURRENTLY child_a", blocker=READER),
    "drop_table_with_fk": LiveCase(
        "DROP TABLE leaf", setup="CREATE TABLE leaf (id int, p int REFERENCES parent (id))"
    ),
    "drop_table_cascade": LiveCase("DROP TABLE parent CASCADE"),
    "drop_table_with_view": LiveCase("DROP TABLE child CASCADE"),
    "drop_partitioned": LiveCase("DROP TABLE events"),
    "drop_partition": LiveCase("DROP TABLE events_2024"),
    "drop_view": LiveCase("DROP VIEW child_view"),
    "drop_matview": LiveCase("DROP MATERIALIZED VIEW parent_names"),
    "drop_sequence": LiveCase("DROP SEQUENCE counter"),
    "drop_trigger": LiveCase("DROP TRIGGER child_noop ON child"),
    "drop_policy": LiveCase(
        "DROP POLICY child_all ON child", setup="CREATE POLICY child_all ON child USING (true)"
    ),
    "drop_schema_cascade": LiveCase(
        "DROP SCHEMA {other} CASCADE", setup="CREATE TABLE {other}.t (id int)"
    ),
    # REINDEX
    "reindex_index": LiveCase("REINDEX INDEX child_a"),
    "reindex_table": LiveCase("REINDEX TABLE child"),
    "reindex_index_concurrently": LiveCase("REINDEX INDEX CONCURRENTLY child_a", blocker=WRITER),
    "reindex_table_concurrently": LiveCase("REINDEX TABLE CONCURRENTLY child", blocker=WRITER),
    "reindex_schema": LiveCase("REINDEX SCHEMA {other}"),
    # TRUNCATE, COMMENT, REFRESH, VACUUM, CLUSTER
    "truncate": LiveCase("TRUNCATE events_2025"),
    "truncate_pair": LiveCase("TRUNCATE parent, child"),
    "truncate_cascade": LiveCase("TRUNCATE parent CASCADE"),
    "truncate_partitioned": LiveCase("TRUNCATE events"),
    "comment_table": LiveCase("COMMENT ON TABLE child IS 'kids'"),
    "comment_column": LiveCase("COMMENT ON COLUMN child.a IS 'a'"),
    "comment_index": LiveCase("COMMENT ON INDEX child_a IS 'a'"),
    "comment_constraint": LiveCase("COMMENT ON CONSTRAINT child_a_positive ON child IS 'a'"),
    "comment_trigger": LiveCase("COMMENT ON TRIGGER child_noop ON child IS 'a'"),
    "refresh": LiveCase("REFRESH MATERIALIZED VIEW parent_names"),
    "refresh_concurrently": LiveCase("REFRESH MATERIALIZED VIEW CONCURRENTLY parent_names"),
    "vacuum": LiveCase("VACUUM child", blocker="LOCK child IN SHARE UPDATE EXCLUSIVE MODE"),
    "vacuum_full": LiveCase("VACUUM FULL child", blocker=READER),
    "analyze": LiveCase("ANALYZE child"),
    "cluster": LiveCase("CLUSTER child USING child_a"),
    # LOCK, GRANT, types, databases
    **{
        "lock_" + mode.lower().replace(" ", "_"): LiveCase(f"LOCK TABLE child IN {mode} MODE")
        for mode in _LOCK_MODES
    },
    "lock_default": LiveCase("LOCK child"),
    "lock_partitioned": LiveCase("LOCK TABLE events IN SHARE MODE"),
    "lock_only": LiveCase("LOCK TABLE ONLY events IN SHARE MODE"),
    "grant": LiveCase("GRANT SELECT ON child TO PUBLIC"),
    "enum_add_value": LiveCase(
        "ALTER TYPE mood ADD VALUE 'meh'", setup="CREATE TYPE mood AS ENUM ('ok')"
    ),
    "create_database": LiveCase("CREATE DATABASE never_created"),
}
