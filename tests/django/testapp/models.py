"""The test app's model, as its migrations leave it."""

from __future__ import annotations

from django.db import models


class Item(models.Model):
    """A row to migrate."""

    name: models.CharField[str, str] = models.CharField(max_length=100)
    note: models.CharField[str | None, str | None] = models.CharField(max_length=100, null=True)
    flag: models.BooleanField[bool, bool] = models.BooleanField(default=False)
