"""The DoRA core (d2ora.dora) stands alone: nothing in it reaches up to models, recipes or the CLI."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys

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
