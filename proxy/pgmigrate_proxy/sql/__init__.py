"""Statement classification, the only user of pglast: which locks a statement will take."""

from pgmigrate_proxy.sql.catalog import DATABASE_OWNER_SQL, TargetQuery, right_sql, targets_query
from pgmigrate_proxy.sql.classify import UNPARSABLE, cache_clear, cache_info, classify
from pgmigrate_proxy.sql.locks import LockMode, conflicts, queues_behind_traffic
from pgmigrate_proxy.sql.prefilter import first_keyword, is_plain
from pgmigrate_proxy.sql.statement import (
    CatalogQuestion,
    QualifiedName,
    Question,
    RelationLock,
    Right,
    Statement,
)

__all__ = [
    "DATABASE_OWNER_SQL",
    "UNPARSABLE",
    "CatalogQuestion",
    "LockMode",
    "QualifiedName",
    "Question",
    "RelationLock",
    "Right",
    "Statement",
    "TargetQuery",
    "cache_clear",
    "cache_info",
    "classify",
    "conflicts",
    "first_keyword",
    "is_plain",
    "queues_behind_traffic",
    "right_sql",
    "targets_query",
]
