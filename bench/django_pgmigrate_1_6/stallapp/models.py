"""The benchmark's table: the application workers read and update it by id."""

from django.db import models


class Item(models.Model):
    id = models.IntegerField(primary_key=True)
    v = models.IntegerField()
    note = models.CharField(max_length=100, null=True)  # added by 0002: the migration timed

    class Meta:
        db_table = "stall_item"
        constraints = [  # added by 0003 (the busy scenario)
            models.UniqueConstraint(fields=["id", "v"], name="stall_item_id_v_uniq"),
        ]
