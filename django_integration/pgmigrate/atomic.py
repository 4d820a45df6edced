"""RunPython keeps a real transaction in an autocommit migration session.

In a migration session the proxy runs each statement as its own transaction; a RunPython
operation that Django runs inside a transaction (an atomic migration, or `atomic=True` in a
non-atomic one) is bracketed with `SET pgmigrate.atomic = on` / `off`, so that its queries
commit or roll back together. On an error no `off` is sent: Django's ROLLBACK ends the real
transaction. Connections that are not routed through the proxy are left alone, and the wrapper
is in place only while the migrate command runs (`bracketing`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.migrations.operations.special import RunPython

from pgmigrate.route import ROUTE_ATTRIBUTE, Route

ATOMIC_ON = "SET pgmigrate.atomic = on"
ATOMIC_OFF = "SET pgmigrate.atomic = off"
_PATCHED = "_pgmigrate_atomic"
_METHODS = ("database_forwards", "database_backwards")

Method = Callable[..., None]


def _bracketed(method: Method) -> Method:
    @functools.wraps(method)
    def run(self: RunPython, app_label: str, schema_editor: BaseDatabaseSchemaEditor,
            *args: Any) -> None:  # fmt: skip
        connection = schema_editor.connection
        route: Route | None = getattr(connection, ROUTE_ATTRIBUTE, None)
        if route is None or not route.autocommit or not connection.in_atomic_block:
            method(self, app_label, schema_editor, *args)
            return
        with connection.cursor() as cursor:
            cursor.execute(ATOMIC_ON)
        method(self, app_label, schema_editor, *args)
        with connection.cursor() as cursor:
            cursor.execute(ATOMIC_OFF)

    setattr(run, _PATCHED, True)
    return run


@contextlib.contextmanager
def bracketing() -> Iterator[None]:
    """While the migrate command runs: RunPython's database_forwards and database_backwards
    wrapped (nested uses keep one wrapper); the originals are back afterwards, so a process
    that loads the app but does not migrate (a web worker, a test run) is left alone."""
    originals = {name: getattr(RunPython, name) for name in _METHODS}
    if any(getattr(method, _PATCHED, False) for method in originals.values()):
        yield  # already wrapped by an outer migrate
        return
    for name, method in originals.items():
        setattr(RunPython, name, _bracketed(method))
    try:
        yield
    finally:
        for name, method in originals.items():
            setattr(RunPython, name, method)
