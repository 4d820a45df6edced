"""The test project for a subprocess of a test: DATABASES from PGMIGRATE_TEST_DATABASES (JSON),
the test's own (its test database, its proxy), and settings from PGMIGRATE_TEST_SETTINGS (JSON)."""

import json
import os

from tests.django.settings import *  # noqa: F403

DATABASES = json.loads(os.environ["PGMIGRATE_TEST_DATABASES"])
globals().update(json.loads(os.environ.get("PGMIGRATE_TEST_SETTINGS", "{}")))
