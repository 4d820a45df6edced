"""The README's development tree names each module and package of the two import packages, in
the package where it lives (it once placed the proxy's embedded module in the Django app)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("proxy/pgmigrate_proxy/", "django_integration/pgmigrate/")
SKIPPED = {"__init__.py", "__main__.py", "py.typed", "__pycache__"}
#: the leading names of a tree line: `a.py b.py   what they are`, `sub/   ...`
_NAME = r"[\w{},/]+(?:\.py|/)"
_NAMES = re.compile(rf"^  ({_NAME}(?: +{_NAME})*)(?=\s|$)")


def _tree() -> dict[str, set[str]]:
    """Each package's entries as the README's tree names them (`x.py`, `sub/`, `sub/x.py`)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Development", 1)[1].split("```", 2)[1]
    named: dict[str, set[str]] = {}
    package = None
    for line in block.splitlines():
        if line and not line.startswith(" "):
            package = line.strip() if line.strip() in PACKAGES else None
            continue
        match = _NAMES.match(line)
        if package is None or match is None:
            continue
        for name in match.group(1).split():
            braces = re.fullmatch(r"(.*)\{(.*)\}(.*)", name)
            parts = braces.group(2).split(",") if braces else [""]
            for part in parts:
                full = f"{braces.group(1)}{part}{braces.group(3)}" if braces else name
                named.setdefault(package, set()).add(full)
    return named


def _top(entry: str) -> str:
    return entry.split("/", 1)[0] + "/" if "/" in entry else entry


def test_the_tree_names_every_module_where_it_is() -> None:
    named = _tree()
    assert set(named) == set(PACKAGES)
    for package in PACKAGES:
        where = ROOT / package
        for entry in named[package]:
            assert (where / entry).exists(), f"README places {entry} in {package}: not there"
        actual = {
            path.name + ("/" if path.is_dir() else "")
            for path in where.iterdir()
            if path.name not in SKIPPED
        }
        assert {_top(entry) for entry in named[package]} == actual, package


def test_the_django_section_comes_first() -> None:
    """A Django user finds the app's section first, not after the proxy's internals."""
    sections = re.findall(r"^## (.*)$", (ROOT / "README.md").read_text(), re.MULTILINE)
    assert sections[0] == "The Django app", sections
