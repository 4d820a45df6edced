"""Management commands of django-pgmigrate."""
