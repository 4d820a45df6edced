"""Test configuration: the PostgreSQL and proxy fixtures live in tests/fixtures as plugins."""

pytest_plugins = ("tests.fixtures.postgres", "tests.fixtures.proxy", "tests.fixtures.tunnel")
