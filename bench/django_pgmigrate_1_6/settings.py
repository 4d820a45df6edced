"""Settings of the stall benchmark's Django project: django-pgmigrate 1.6 against one table.

bench/stall.py runs `python manage.py migrate` in a virtualenv of its own with Django and
django-pgmigrate 1.6 from PyPI. The database comes from the environment:

- STALL_DB_HOST, STALL_DB_PORT, STALL_DB_NAME, STALL_DB_USER, STALL_DB_PASSWORD
- STALL_DB_APPLICATION_NAME (default stall-migration)
- STALL_PGMIGRATE: 1 (default) puts pgactivity, pglock and pgmigrate in INSTALLED_APPS, with
  django-pgmigrate's defaults (blocking action Terminate, checked every second, no
  lock_timeout); 0 leaves them out: plain Django `migrate`.
"""

import os

SECRET_KEY = "stall-benchmark-only"
DEBUG = False
USE_TZ = True
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = ["stallapp"]
if os.environ.get("STALL_PGMIGRATE", "1") == "1":
    INSTALLED_APPS = ["pgactivity", "pglock", "pgmigrate", *INSTALLED_APPS]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ.get("STALL_DB_HOST", "127.0.0.1"),
        "PORT": os.environ.get("STALL_DB_PORT", "5432"),
        "NAME": os.environ.get("STALL_DB_NAME", "postgres"),
        "USER": os.environ.get("STALL_DB_USER", "postgres"),
        "PASSWORD": os.environ.get("STALL_DB_PASSWORD", ""),
        "OPTIONS": {
            "application_name": os.environ.get("STALL_DB_APPLICATION_NAME", "stall-migration"),
            "sslmode": "disable",
        },
    }
}
