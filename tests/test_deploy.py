"""deploy/: the systemd unit starts the proxy from the virtualenv its install lines create, as
the README says, and a virtualenv's script runs without activation (PATH without it)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pgmigrate_proxy

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "pgmigrate-proxy.service"


def _exec_start() -> list[str]:
    (line,) = re.findall(r"^ExecStart=(.*)$", UNIT.read_text(), re.MULTILINE)
    return shlex.split(line)


def test_exec_start_is_the_virtualenv_that_the_install_lines_create() -> None:
    text = UNIT.read_text()
    (venv,) = re.findall(r"^#\s+python3 -m venv (\S+)$", text, re.MULTILINE)
    assert re.search(rf"^#\s+{re.escape(venv)}/bin/pip install ", text, re.MULTILINE)
    program, *args = _exec_start()
    assert program == f"{venv}/bin/pgmigrate-proxy"
    assert args == ["--config", "/etc/pgmigrate-proxy/proxy.toml"]
    readme = (ROOT / "README.md").read_text()
    assert f"python3 -m venv {venv}\n" in readme
    assert f"ExecStart={' '.join(_exec_start())}" in readme


def test_a_virtualenv_script_runs_without_activation() -> None:
    """ExecStart's form, with this test run's virtualenv: no PATH, no VIRTUAL_ENV."""
    script = Path(sys.prefix) / "bin" / "pgmigrate-proxy"
    done = subprocess.run(
        [str(script), "--version"],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert pgmigrate_proxy.__version__ in done.stdout
