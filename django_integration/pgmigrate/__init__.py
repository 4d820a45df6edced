"""The Django app of django-pgmigrate: migrate through pgmigrate-proxy (arrives in a later issue)."""
