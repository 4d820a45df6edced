"""The test project with PostgreSQL databases only: a correct setup, on which `manage.py check`
must report nothing."""

from tests.django.settings import *  # noqa: F403
from tests.django.settings import DATABASES as _ALL

DATABASES = {alias: db for alias, db in _ALL.items() if alias != "other"}
