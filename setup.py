"""Build hook of django-pgmigrate (the metadata is in pyproject.toml): the relay's hot-path
modules are compiled with mypyc when a wheel or a regular install is built, so that
`pip install ./django-pgmigrate` gets the fast relay. The same modules stay importable as
pure Python: an editable install (`pip install -e`, what scripts/test uses) is never
compiled, so that what a developer edits is what runs; PGMIGRATE_PURE=1 builds pure Python
anywhere; and a build that cannot compile (no C compiler, no Python headers, mypyc missing)
warns and installs the pure modules, which behave the same, slower (README, "Speed").
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

#: The modules every relayed message and every transaction-pooling hand-over runs through
#: (bench/pooler.py measures them); the rest of the proxy stays interpreted.
COMPILED = (
    "proxy/pgmigrate_proxy/protocol/batches.py",
    "proxy/pgmigrate_proxy/protocol/framing.py",
    "proxy/pgmigrate_proxy/protocol/replies.py",
    "proxy/pgmigrate_proxy/runtime/backend.py",
    "proxy/pgmigrate_proxy/runtime/detect.py",
    "proxy/pgmigrate_proxy/runtime/hold.py",
    "proxy/pgmigrate_proxy/runtime/pool.py",
    "proxy/pgmigrate_proxy/runtime/pooling.py",
    "proxy/pgmigrate_proxy/runtime/roundwrites.py",
    "proxy/pgmigrate_proxy/runtime/session.py",
    "proxy/pgmigrate_proxy/runtime/stats.py",
    "proxy/pgmigrate_proxy/runtime/upstream.py",
)


#: mypy options for the compile: the type check is `mypy --strict`'s job (CI); here the
#: dependencies may be missing (pip's isolated build environment): typed as Any.
_LENIENT = (
    "--ignore-missing-imports", "--no-warn-return-any", "--no-warn-unused-ignores",
    "--allow-subclassing-any", "--allow-untyped-calls", "--allow-untyped-decorators",
    "--follow-imports=silent",  # (the modules not compiled are read for their types only)
)  # fmt: skip


def _why_pure() -> str | None:
    """Why this build installs the pure modules (None: it compiles them)."""
    if os.environ.get("PGMIGRATE_PURE", "") not in ("", "0"):
        return "PGMIGRATE_PURE is set"
    if platform.python_implementation() != "CPython":
        return f"{platform.python_implementation()} (mypyc needs CPython)"
    return None


class OptionalBuildExt(build_ext):
    """build_ext that falls back to the pure modules when compiling fails: the outputs of a
    partial build are removed (a module's stub without its shared library cannot import)."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # (CompileError, LinkError, a missing compiler: all alike)
            for output in self.get_outputs():
                Path(output).unlink(missing_ok=True)
            self.extensions = []
            print(
                f"django-pgmigrate: could not compile the relay with mypyc "
                f"({type(exc).__name__}: {str(exc)[:200]}); installing the pure-Python "
                "modules (slower, same behaviour)",
                file=sys.stderr,
            )

    def get_outputs(self) -> list[str]:
        return list(super().get_outputs()) if self.extensions else []


def _ext_modules() -> list[Any]:
    if not {"bdist_wheel", "build", "build_ext", "install"} & set(sys.argv):
        return []  # (metadata, an sdist, an editable install: nothing to compile)
    why = _why_pure()
    if why is not None:
        print(f"django-pgmigrate: pure-Python build ({why})", file=sys.stderr)
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("django-pgmigrate: mypyc not found: pure-Python build", file=sys.stderr)
        return []
    here = Path(__file__).parent
    os.chdir(here)  # (mypyc names the modules from the paths, relative to the project)
    shutil.rmtree(here / "build" / "mypyc", ignore_errors=True)
    try:
        return list(
            mypycify(
                [*_LENIENT, *COMPILED],
                opt_level="3",
                target_dir=str(Path("build") / "mypyc"),
            )
        )
    except (Exception, SystemExit) as exc:  # (mypy's type errors exit)
        print(
            f"django-pgmigrate: mypyc could not compile the relay ({exc!r}, the type errors "
            "above); installing the pure-Python modules (slower, same behaviour)",
            file=sys.stderr,
        )
        return []


setup(ext_modules=_ext_modules(), cmdclass={"build_ext": OptionalBuildExt})
