"""`pgmigrate`, and `migrate` (django-pgmigrate's or Django's, per PGMIGRATE_PATCH_MIGRATE)."""
