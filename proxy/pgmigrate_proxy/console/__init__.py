"""The admin console: the virtual database `pgmigrate` (or `pgbouncer`) served by the proxy."""
