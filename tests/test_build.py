"""setup.py compiles the relay's hot path with mypyc; mypy checks exactly those modules for
the narrowing mypyc would miscompile (pyproject.toml's override). The two lists must agree."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def compiled_modules() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "COMPILED" for t in node.targets
        ):
            paths = ast.literal_eval(node.value)
            break
    else:
        raise AssertionError("setup.py has no COMPILED")
    modules = set()
    for path in paths:
        assert (ROOT / path).is_file(), path
        assert path.startswith("proxy/") and path.endswith(".py"), path
        modules.add(path.removeprefix("proxy/").removesuffix(".py").replace("/", "."))
    return modules


def test_mypy_checks_the_compiled_modules_for_unsound_narrowing() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    checked = set()
    for override in config["tool"]["mypy"]["overrides"]:
        if override.get("warn_unreachable"):
            assert "redundant-expr" in override.get("enable_error_code", [])
            checked.update(override["module"])
    assert checked == compiled_modules()


def test_each_exception_name_has_one_type_in_the_compiled_modules() -> None:
    """mypyc gives a local one type: `except A as exc` and `except B as exc` in one function
    make the second handler fail with TypeError (seen: ChannelBindingMismatch in a handler
    after FramingError's)."""
    reused = []
    for module in sorted(compiled_modules()):
        path = ROOT / "proxy" / (module.replace(".", "/") + ".py")
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            types: dict[str, set[str]] = {}
            for node in ast.walk(function):
                if isinstance(node, ast.ExceptHandler) and node.name and node.type is not None:
                    types.setdefault(node.name, set()).add(ast.unparse(node.type))
            reused += [f"{module}.{function.name}: {n}" for n, t in types.items() if len(t) > 1]
    assert not reused
