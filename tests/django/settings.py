"""Django settings of the test project: `default` and `second` are filled in by conftest.py
from the `pg` fixture (pytest-django's test databases on that server); `other` is SQLite."""

SECRET_KEY = "django-pgmigrate-tests"
INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "pgactivity",
    "pglock",
    "pgmigrate",
    "tests.django.testapp",
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "pgmigrate_django",
        "HOST": "127.0.0.1",
        "PORT": "",
        "USER": "",
        "PASSWORD": "",
    },
    "second": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "pgmigrate_django_second",
        "HOST": "127.0.0.1",
        "PORT": "",
        "USER": "",
        "PASSWORD": "",
    },
    "other": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"},
}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = True
#: Read by testapp's 0002 RunPython: fail after writing, to test its rollback.
TESTAPP_FAIL_RUNPYTHON = False
