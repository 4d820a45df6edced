"""`manage.py` in subprocesses of a test, on the test's own database (or its proxy): the
environment that tells settings_env.py so, and a running command whose output is collected."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from django.db import connections

from tests.django.scenario import WAIT

MANAGE_PY = Path(__file__).with_name("manage.py")
ROOT = MANAGE_PY.parents[2]


def environment(user: str | None = None, **settings: Any) -> dict[str, str]:
    """The environment of a subprocess that uses this test's `default` database, as `user`
    (no password) if given, with these Django settings besides the test project's."""
    keys = ("ENGINE", "NAME", "HOST", "PORT", "USER", "PASSWORD")
    database = {k: connections["default"].settings_dict[k] for k in keys}
    if user is not None:
        database.update(USER=user, PASSWORD="")
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.django.settings_env",
        "PGMIGRATE_TEST_DATABASES": json.dumps({"default": database}),
        "PGMIGRATE_TEST_SETTINGS": json.dumps(settings),
        "PYTHONUNBUFFERED": "1",  # output as it is written, also a line not ended yet
    }


def run(*args: str, user: str | None = None, **settings: Any) -> subprocess.CompletedProcess[str]:
    """`manage.py ARGS` to completion."""
    return subprocess.run(
        [sys.executable, str(MANAGE_PY), *args],
        env=environment(user, **settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=WAIT,
    )


class ManagePy:
    """`manage.py ARGS` running; its stdout and stderr collected by threads as they come (a
    line not ended yet too: the migrate lines end with "OK" only when the migration does)."""

    def __init__(self, *args: str, **settings: Any) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(MANAGE_PY), *args],
            env=environment(**settings),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._chunks: dict[str, list[bytes]] = {"out": [], "err": []}
        self._threads = [
            threading.Thread(target=_read, args=(self.process.stdout, self._chunks["out"])),
            threading.Thread(target=_read, args=(self.process.stderr, self._chunks["err"])),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def out(self) -> list[str]:
        return b"".join(self._chunks["out"]).decode(errors="replace").splitlines()

    @property
    def err(self) -> list[str]:
        return b"".join(self._chunks["err"]).decode(errors="replace").splitlines()

    def wait_for(self, text: str, timeout: float = WAIT) -> None:
        """Poll the output (both streams) until it holds `text`."""
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.out + self.err):
            assert self.process.poll() is None or any(text in x for x in self.out + self.err), (
                f"exited {self.process.returncode} without {text!r}: {self.out} {self.err}"
            )
            assert time.monotonic() < deadline, f"no {text!r} in {self.out} {self.err}"
            time.sleep(0.02)

    def finish(self, timeout: float = WAIT) -> int:
        code = self.process.wait(timeout)
        for thread in self._threads:
            thread.join(timeout)
        return code


def _read(stream: IO[bytes], into: list[bytes]) -> None:
    while chunk := os.read(stream.fileno(), 4096):
        into.append(chunk)
