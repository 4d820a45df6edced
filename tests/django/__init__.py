"""Tests of the Django app `pgmigrate` (pytest-django, a real PostgreSQL from the `pg` fixture)."""
