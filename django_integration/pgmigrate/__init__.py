"""The Django app of django-pgmigrate: runs migrate through pgmigrate-proxy."""
