"""Test suite of django-pgmigrate (the proxy and the Django app)."""
