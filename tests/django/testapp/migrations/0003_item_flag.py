"""A non-atomic migration: adds Item.flag, then sets it in an atomic RunPython."""

from __future__ import annotations

from typing import Any

from django.db import migrations, models


def set_flags(apps: Any, schema_editor: Any) -> None:
    item = apps.get_model("testapp", "Item")
    item.objects.using(schema_editor.connection.alias).update(flag=True)


class Migration(migrations.Migration):
    atomic = False
    dependencies = [("testapp", "0002_item_note")]
    operations = [
        migrations.AddField("item", "flag", models.BooleanField(default=False)),
        migrations.RunPython(set_flags, migrations.RunPython.noop, atomic=True),
    ]
