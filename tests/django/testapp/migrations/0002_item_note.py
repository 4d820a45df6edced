"""Adds Item.note and fills it with RunPython (which fails on demand, after writing)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.db import migrations, models


def fill_notes(apps: Any, schema_editor: Any) -> None:
    item = apps.get_model("testapp", "Item")
    for row in item.objects.using(schema_editor.connection.alias).all():
        row.note = f"note of {row.name}"
        row.save(update_fields=["note"])
    if settings.TESTAPP_FAIL_RUNPYTHON:
        raise RuntimeError("RunPython failed on purpose")


class Migration(migrations.Migration):
    dependencies = [("testapp", "0001_initial")]
    operations = [
        migrations.AddField("item", "note", models.CharField(max_length=100, null=True)),
        migrations.RunPython(fill_notes, migrations.RunPython.noop),
    ]
