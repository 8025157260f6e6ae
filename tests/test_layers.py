"""The code's layers, read from its imports: dependencies point one way, and nats-py is spoken
in one place. Static, milliseconds."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of the file (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def modules(*folders: str) -> dict[str, set[str]]:
    """Module name -> what it imports, for every Python file under `folders`."""
    found = {}
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = imports(path)
    return found


def test_only_the_bus_speaks_nats_py():
    speaking = sorted(name for name, imported in modules("dalston", "actors").items()
                      if not name.startswith("dalston.bus")
                      and any(m == "nats" or m.startswith("nats.") for m in imported))
    assert speaking == []


def test_handlers_get_deliveries_not_nats_messages():
    """Outside the bus nobody names nats-py's `Msg` nor reads a message's JetStream metadata:
    handlers get a `Delivery` (or a decoded payload), and the bus settles and counts."""
    naming = []
    for folder in ("dalston", "actors"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.is_relative_to(ROOT / "dalston" / "bus"):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if (isinstance(node, ast.Name) and node.id == "Msg"
                        or isinstance(node, ast.Attribute) and node.attr in ("Msg", "metadata")
                        or isinstance(node, ast.alias) and node.name == "Msg"):
                    naming.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert naming == []


def package_of(module: str) -> str:
    """The package a module belongs to, one level below `dalston` (`dalston.cli.jobs` ->
    `dalston.cli`); top-level modules are their own package."""
    return ".".join(module.split(".")[:2])


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = defaultdict(set)
    for name, imported in modules("dalston", "actors").items():
        for target in imported:
            if target.startswith(("dalston.", "actors.")) and package_of(target) != package_of(name):
                graph[package_of(name)].add(package_of(target))
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        for target in graph.get(node, ()):
            if target in path:
                cycles.append(path[path.index(target):] + [target])
            elif len(path) < 12:
                visit(target, path + [target])

    for start in list(graph):
        visit(start, [start])
    assert cycles == []


def test_the_cli_does_not_reach_into_the_gateway():
    reaching = sorted(name for name, imported in modules("dalston/cli").items()
                      if any(m.startswith("dalston.services.gateway") for m in imported))
    assert reaching == []


def test_the_intake_knows_no_front_door():
    """Jobs are taken in the same way by every surface (HTTP, Wyoming): the shared intake
    imports none of them, and no surface reaches into another."""
    surfaces = ("dalston.services.gateway", "dalston.services.wyoming")
    reaching = sorted(f"{name} -> {m}" for name, imported in modules("dalston/services").items()
                      if name.startswith(("dalston.services.intake", *surfaces))
                      for m in imported for surface in surfaces
                      if m.startswith(surface) and not name.startswith(surface))
    assert reaching == []


def test_bench_and_scripts_do_not_import_the_tests():
    importing = sorted(name for name, imported in modules("bench", "scripts").items()
                       if any(m == "tests" or m.startswith("tests.") for m in imported))
    assert importing == []
