"""RunPython is wrapped only while the migrate command runs, not in every process that loads
the app (issue: the RunPython wrapper active only while the command runs)."""

from __future__ import annotations

from django.db.migrations.operations.special import RunPython
from pgmigrate import atomic


def wrapped() -> bool:
    methods = (RunPython.database_forwards, RunPython.database_backwards)
    return all(getattr(method, "_pgmigrate_atomic", False) for method in methods)


def test_loading_the_app_leaves_runpython_alone() -> None:
    assert not wrapped()


def test_bracketing_wraps_while_it_lasts_and_restores_after() -> None:
    original = RunPython.database_forwards
    with atomic.bracketing():
        assert wrapped()
        with atomic.bracketing():  # a nested migrate keeps the one wrapper
            assert wrapped()
        assert wrapped()
    assert not wrapped()
    assert RunPython.database_forwards is original


def test_an_error_in_the_command_restores_too() -> None:
    try:
        with atomic.bracketing():
            raise RuntimeError("migration failed")
    except RuntimeError:
        pass
    assert not wrapped()
