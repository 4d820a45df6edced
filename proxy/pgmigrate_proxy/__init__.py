"""pgmigrate-proxy: a PostgreSQL wire-protocol proxy that clears lock blockers before DDL."""

__version__ = "2.0.0.dev0"
