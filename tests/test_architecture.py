"""The shape of the house: imports run one way, strategies sit on top of what they change, and no
module or class outgrows one job. Read from the source (ast), so it holds for every code path."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

from service.settings import STRATEGIES
from strategies import registered
from strategies.base import Strategy, register

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "strategies")
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 300


@functools.cache
def modules() -> dict[str, Path]:
    """Every hand-written module of the service and the strategies (generated code left out)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


@functools.cache
def imports(path: Path, everywhere: bool) -> frozenset[str]:
    """Our modules that ``path`` imports: at module level (type-only imports included), or anywhere
    (imports inside functions too)."""
    known = modules()
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if everywhere else _module_level(tree.body)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return frozenset(found)


def _module_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """Statements run at import (or read by the type checker): the body and its if/try blocks."""
    out: list[ast.stmt] = []
    for node in body:
        out.append(node)
        if isinstance(node, ast.If | ast.Try):
            for block in (node.body, node.orelse, *(h.body for h in getattr(node, "handlers", []))):
                out.extend(_module_level(block))
    return out


def reachable(start: str, everywhere: bool) -> set[str]:
    """Every module ``start`` imports, directly or through others."""
    paths, seen, todo = modules(), set(), [start]
    while todo:
        for name in imports(paths[todo.pop()], everywhere):
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


def test_no_module_imports_itself_through_others() -> None:
    cycles = [name for name in modules() if name in reachable(name, everywhere=False)]
    assert cycles == []


def test_nothing_the_strategies_stand_on_imports_them() -> None:
    beneath = set().union(
        *(reachable(name, everywhere=True) for name in modules() if name.startswith("strategies"))
    )
    beneath = {name for name in beneath if not name.startswith("strategies")}
    assert "service.learner" in beneath and "service.settings" in beneath
    climbing = {
        name for name in beneath if any(i.startswith("strategies") for i in imports(modules()[name], True))
    }
    assert climbing == set()


def test_no_module_or_class_outgrows_one_job() -> None:
    too_long = []
    for name, path in modules().items():
        source = path.read_text()
        if source.count("\n") > MAX_MODULE_LINES:
            too_long.append(f"{name}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and (node.end_lineno or 0) - node.lineno + 1 > MAX_CLASS_LINES:
                too_long.append(f"{name}.{node.name}: {(node.end_lineno or 0) - node.lineno + 1} lines")
    assert too_long == []


def test_every_name_the_settings_accept_has_one_registered_strategy() -> None:
    assert sorted(registered()) == sorted(STRATEGIES)


@pytest.mark.parametrize("name", ["naive", "not-declared-in-settings"])
def test_the_registry_refuses_a_second_or_an_undeclared_name(name: str) -> None:
    class Another(Strategy):
        pass

    with pytest.raises(ValueError, match=name):
        register(name)(Another)
    assert registered()[STRATEGIES[1]] is not Another


def test_the_client_commands_load_no_model_stack() -> None:
    """`continual predict`, `status` and `adapters` are thin gRPC clients: importing torch, scipy or
    transformers first would make each call take seconds, even one that only fails to connect."""
    probe = (
        "import sys, service.cli, service.client; "
        "print(sorted(m for m in ('torch', 'scipy', 'transformers', 'peft', 'kafka') if m in sys.modules))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert loaded.stdout.strip() == "[]"
