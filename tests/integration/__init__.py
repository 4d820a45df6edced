"""Integration tests: real PostgreSQL, real clients, the proxy in between."""
