"""The package's layers, read from the code: cli/ on top, nothing imports it, no import cycles,
and the engine speaks to a backend only through the Backend interface."""

from __future__ import annotations

import ast
from pathlib import Path

from trainctl.backends.base import Backend

from .conftest import REPO

PACKAGE = REPO / "trainctl"


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Modules of the package `name` imports, at module level or inside functions."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                prefix = ".".join(parts[: len(parts) - (node.level - 1)])
                base = prefix + ("." + base if base else "")
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def test_nothing_outside_cli_imports_cli():
    bad = [f"{m} imports {d}" for m, deps in graph().items() if not m.startswith("trainctl.cli")
           and m != "trainctl.__main__" for d in deps if d.startswith("trainctl.cli")]
    assert bad == []


def test_layers_point_one_way():
    # DESIGN.md: cli -> launcher/agent -> backends/storage -> the runtime; callbacks -> the runtime
    # (storage.uri is the URI grammar alone, stdlib only: trainctl.toml's [cloud] check uses it);
    # pipelines run sessions through the launcher's engine, so they sit between cli and launcher
    order = {"trainctl.cli": 4, "trainctl.pipelines": 3, "trainctl.launcher": 2, "trainctl.agent": 2, "trainctl.backends": 1,
             "trainctl.storage.uri": 0, "trainctl.storage": 1, "trainctl.callbacks": 1}
    def layer(module: str) -> int:
        return next((v for k, v in order.items() if module == k or module.startswith(k + ".")), 0)
    bad = [f"{m} imports {d}" for m, deps in graph().items() if m != "trainctl.__main__"
           for d in deps if layer(d) > layer(m) and not d.endswith("__init__")]
    assert bad == []


def test_no_import_cycles():
    edges = graph()
    inits = {m for m, p in modules().items() if p.name == "__init__.py"}
    cycles = []

    def visit(node: str, path: list[str], done: set[str]) -> None:
        for nxt in edges.get(node, ()):
            if nxt in inits:
                continue
            if nxt in path:
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]))
            elif nxt not in done:
                visit(nxt, [*path, nxt], done)
        done.add(node)

    done: set[str] = set()
    for module in edges:
        if module not in done:
            visit(module, [module], done)
    assert cycles == []


def test_engine_calls_nothing_on_a_backend_outside_the_interface():
    allowed = {name for name, value in vars(Backend).items() if getattr(value, "__isabstractmethod__", False)}
    assert allowed == {"plan", "launch", "describe", "log_iter", "stop", "release", "list"}
    calls = []
    for path in (PACKAGE / "launcher").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                owner_name = owner.id if isinstance(owner, ast.Name) else (
                    owner.attr if isinstance(owner, ast.Attribute) else "")
                if owner_name in ("backend", "_backend"):
                    calls.append((path.name, node.func.attr))
    assert calls, "the engine should reach its backend through a `backend` name"
    assert [c for c in calls if c[1] not in allowed] == []
    source = "\n".join(p.read_text() for p in (PACKAGE / "launcher").glob("*.py"))
    assert "LocalBackend" not in source and "backends.local" not in source
