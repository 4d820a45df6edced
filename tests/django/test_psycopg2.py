"""The database tests again with psycopg2 as Django's driver, in a subprocess (see conftest.py:
Django picks psycopg 3 whenever it can import it, and this process already has)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.django.conftest import DRIVER, DRIVER_ENV

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(DRIVER == "psycopg2", reason="this is the psycopg2 run")
@pytest.mark.skipif(importlib.util.find_spec("psycopg2") is None, reason="needs psycopg2")
def test_database_tests_with_psycopg2() -> None:
    command = [
        sys.executable, "-m", "pytest", str(Path(__file__).parent), "-m", "django_db",
        "-q", "-x", "-p", "no:cacheprovider", "-o", "addopts=",
    ]  # fmt: skip
    env = {**os.environ, DRIVER_ENV: "psycopg2"}
    env.pop("DJANGO_SETTINGS_MODULE")  # or pytest-django sets Django up before conftest.py
    run = subprocess.run(
        command,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, f"{run.stdout[-8000:]}\n{run.stderr[-4000:]}"
    assert " passed" in run.stdout.splitlines()[-1], run.stdout[-2000:]
