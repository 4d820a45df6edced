"""The busy scenario's second step (bench/stall.py --scenario busy): an index-backed constraint,
ALTER TABLE "stall_item" ADD CONSTRAINT ... UNIQUE ("id", "v"): builds the index while holding
ACCESS EXCLUSIVE."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("stallapp", "0002_item_note")]

    operations = [
        migrations.AddConstraint(
            model_name="item",
            constraint=models.UniqueConstraint(fields=["id", "v"], name="stall_item_id_v_uniq"),
        ),
    ]
