"""RunPython keeps a real transaction in an autocommit migration session.

In a migration session the proxy runs each statement as its own transaction; a RunPython
operation that Django runs inside a transaction (an atomic migration, or `atomic=True` in a
non-atomic one) is bracketed with `SET pgmigrate.atomic = on` / `off`, so that its queries
commit or roll back together. On an error no `off` is sent: Django's ROLLBACK ends the real
transaction. Connections that are not routed through the proxy are left alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from django.db.backends.base.schema import BaseDatabaseSchemaEditor
from django.db.migrations.operations.special import RunPython

from pgmigrate.route import ROUTE_ATTRIBUTE, Route

ATOMIC_ON = "SET pgmigrate.atomic = on"
ATOMIC_OFF = "SET pgmigrate.atomic = off"
_PATCHED = "_pgmigrate_atomic"

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


def install() -> None:
    """Wrap RunPython's database_forwards and database_backwards (once)."""
    for name in ("database_forwards", "database_backwards"):
        method = getattr(RunPython, name)
        if not getattr(method, _PATCHED, False):
            setattr(RunPython, name, _bracketed(method))
