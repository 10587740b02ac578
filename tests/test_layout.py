"""The shape of the code base, kept by tests: calls go one way (core <- peer, core <- client,
never peer <-> client), no import cycles, one concept per module (a docstring that says it,
at most 350 lines). Read off the source with `ast`, nothing imported."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("swarm", "peer", "client")
MAX_LINES = 350
GENERATED = ROOT / "swarm" / "wire" / "proto"
# What each package may import of the others.
ALLOWED = {"swarm": {"swarm"}, "peer": {"swarm", "peer"}, "client": {"swarm", "client"}}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if GENERATED in path.parents:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (`from . import x` is x, not the package)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            submodules = [f"{module}.{alias.name}" for alias in node.names if f"{module}.{alias.name}" in known]
            targets = submodules or [module]
        else:
            continue
        found.update(target for target in targets if target in known and target != name)
    return found


GRAPH = {name: imports(name, path, modules()) for name, path in modules().items()}


def test_calls_go_one_way():
    wrong = [f"{name} imports {target}" for name, targets in GRAPH.items() for target in sorted(targets)
             if target.split(".")[0] not in ALLOWED[name.split(".")[0]]]
    assert not wrong, wrong


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycles = []

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        stack.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [])
    assert not cycles, cycles


@pytest.mark.parametrize("name", sorted(modules()))
def test_each_module_says_what_it_holds_and_stays_small(name):
    path = modules()[name]
    source = path.read_text()
    lines = source.count("\n")
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines; split it by concept (at most {MAX_LINES})"
    if source.strip():
        assert ast.get_docstring(ast.parse(source)), f"{path.relative_to(ROOT)} opens with no docstring"
