"""The packages' layers, read from their import statements (all of them: module level, inside
functions, under TYPE_CHECKING): sans-IO layers import no I/O, nothing imports upward, the
proxy never imports Django, and no two modules import each other, however indirectly."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"pgmigrate_proxy": ROOT / "proxy", "pgmigrate": ROOT / "django_integration"}
#: Layers that are pure: bytes and values in, bytes and values out.
SANS_IO = (
    "pgmigrate_proxy.protocol",
    "pgmigrate_proxy.sql",
    "pgmigrate_proxy.guard",
    "pgmigrate_proxy.auth",
    "pgmigrate_proxy.console.parse",
    "pgmigrate_proxy.console.rows",
)
IO_MODULES = {
    "asyncio", "socket", "ssl", "time", "logging", "selectors", "threading", "subprocess",
    "psycopg", "uvloop", "os",
}  # fmt: skip
#: Below the runtime: these never import pgmigrate_proxy.runtime.
BELOW_RUNTIME = (
    *SANS_IO,
    "pgmigrate_proxy.config",
    "pgmigrate_proxy.errors",
    "pgmigrate_proxy.notices",
    "pgmigrate_proxy.admin",
    "pgmigrate_proxy.logsetup",
)


def modules() -> Iterator[tuple[str, Path]]:
    for package, base in PACKAGES.items():
        for path in sorted((base / package).rglob("*.py")):
            parts = path.relative_to(base).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            yield name, path


def imports(name: str, path: Path) -> set[str]:
    """Every module `name` imports (absolute names; `from a import b` counts a and a.b)."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


MODULES = dict(modules())
GRAPH = {name: imports(name, path) for name, path in MODULES.items()}


def _inside(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("module", [m for m in MODULES if _inside(m, SANS_IO)])
def test_sans_io_layers_import_no_io(module: str) -> None:
    used = {name.split(".")[0] for name in GRAPH[module]} & IO_MODULES
    assert not used, f"{module} imports {sorted(used)}"


@pytest.mark.parametrize("module", [m for m in MODULES if _inside(m, BELOW_RUNTIME)])
def test_nothing_below_the_runtime_imports_it(module: str) -> None:
    upward = sorted(n for n in GRAPH[module] if _inside(n, ("pgmigrate_proxy.runtime",)))
    assert not upward, f"{module} imports {upward}"


@pytest.mark.parametrize("module", [m for m in MODULES if m.startswith("pgmigrate_proxy")])
def test_the_proxy_never_imports_django(module: str) -> None:
    found = sorted(n for n in GRAPH[module] if _inside(n, ("django", "pgmigrate")))
    assert not found, f"{module} imports {found}"


#: The client side of the runtime, the unit runners, and the server side: a runner is given a
#: server connection and a client writer (runtime/ports.py), and imports neither the client
#: session nor the other runner; the server connection knows none of them.
CLIENT_SIDE = ("pgmigrate_proxy.runtime.session", "pgmigrate_proxy.runtime.hold")
RUNNERS = ("pgmigrate_proxy.runtime.guarding", "pgmigrate_proxy.runtime.migration")
SERVER_SIDE = ("pgmigrate_proxy.runtime.backend", "pgmigrate_proxy.runtime.ports")


@pytest.mark.parametrize("module", [*RUNNERS, *SERVER_SIDE])
def test_runners_and_the_server_connection_know_no_client_session(module: str) -> None:
    forbidden = (*CLIENT_SIDE, *(r for r in RUNNERS if r != module))
    if module in SERVER_SIDE:
        forbidden = (*CLIENT_SIDE, *RUNNERS)
    found = sorted(n for n in GRAPH[module] if _inside(n, forbidden))
    assert not found, f"{module} imports {found}"


def test_no_import_cycles() -> None:
    edges = {
        name: {target for target in targets if target in MODULES and target != name}
        for name, targets in GRAPH.items()
    }
    # a package's __init__ importing its own modules is how packages re-export: not a cycle
    for name in edges:
        edges[name] = {t for t in edges[name] if not t.startswith(name + ".")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_walk_sees_the_packages() -> None:
    """Guards the guards: the graph holds the modules these tests speak of."""
    for expected in ("pgmigrate_proxy.guard.pipeline", "pgmigrate_proxy.runtime.session",
                     "pgmigrate.apps"):  # fmt: skip
        assert expected in MODULES
    assert "pgmigrate_proxy.guard.pipeline" in GRAPH["pgmigrate_proxy.runtime.guarding"]
