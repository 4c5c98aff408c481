"""The DoRA core (d2ora.dora) stands alone: nothing in it reaches up to models, recipes or the CLI;
and the engine and mixers read no other object's private fields."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import d2ora
import d2ora.dora

UPPER_LAYERS = ("d2ora.models", "d2ora.recipes", "d2ora.engine", "d2ora.commands", "d2ora.mixers", "d2ora.data")


def test_dora_core_imports_no_upper_layer() -> None:
    modules = [f"d2ora.dora.{m.name}" for m in pkgutil.iter_modules(d2ora.dora.__path__)]
    assert "d2ora.dora.analysis" in modules  # the listing found the package's modules
    # A fresh interpreter: this test process may already hold the upper layers from other tests.
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = json.loads(out.splitlines()[-1])
    leaked = [m for m in loaded if m.startswith(UPPER_LAYERS)]
    assert leaked == [], f"d2ora.dora pulls in {leaked}"


def private_reach_ins(source: str) -> list[str]:
    """``obj._name`` where ``obj`` is not ``self`` / ``cls``: reading another object's private field."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            if not (isinstance(owner, ast.Name) and owner.id in ("self", "cls")):
                found.append(f"line {node.lineno}: .{node.attr}")
    return found


def test_the_check_finds_a_reach_in() -> None:
    assert private_reach_ins("def f(s):\n    return s.scheduler._step_count\n") == ["line 2: ._step_count"]
    assert private_reach_ins("class A:\n    def f(self):\n        return self._x, type(self).__name__\n") == []


def test_engine_and_mixers_read_no_other_objects_private_fields() -> None:
    root = Path(d2ora.__file__).parent
    files = sorted((root / "engine").rglob("*.py")) + sorted((root / "mixers").rglob("*.py"))
    assert len(files) > 20
    offenders = {str(f.relative_to(root)): hits for f in files if (hits := private_reach_ins(f.read_text()))}
    assert offenders == {}
