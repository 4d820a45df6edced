"""The metrics tests use the console tests' `opened` fixture (connections closed at the end)."""

from tests.console.conftest import opened as opened
