"""The migration bench/stall.py times: ALTER TABLE "stall_item" ADD COLUMN "note" ... NULL."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("stallapp", "0001_initial")]

    operations = [
        migrations.AddField(
            model_name="item",
            name="note",
            field=models.CharField(max_length=100, null=True),
        ),
    ]
