"""The package's layout is a rule: a torch-free front end, torch in the wings, imports one way.

    peftdsl/*.py        the front end and the drivers: never import torch (or peft,
                        transformers, safetensors) at import time
    peftdsl/runtime/    execute, kernels, tensor I/O, in-memory sources
    peftdsl/outputs/    adapter directories, merged models, atomic writes
    peftdsl/evaluation/ patching, metrics, sweeps, reports

Wings may import the front end; the front end reaches a wing only inside a function
(the drivers `api` and `runner`, when a composition executes).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "peftdsl"
WINGS = ("runtime", "outputs", "evaluation")
HEAVY = ("torch", "peft", "transformers", "safetensors", "ray", "matplotlib")
FRONT_END = sorted([p for p in PACKAGE.glob("*.py")] + list((PACKAGE / "render").glob("*.py")))


def _module_level_imports(path: Path) -> list[str]:
    """Modules imported at import time: top-level statements, outside functions and TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    names: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for child in ast.walk(node) if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) else ():
            if isinstance(child, ast.Import):
                names += [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module:
                names += [child.module] + [f"{child.module}.{a.name}" for a in child.names]
    return names


@pytest.mark.parametrize("path", FRONT_END, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_front_end_modules_import_neither_torch_nor_a_wing(path: Path):
    for name in _module_level_imports(path):
        assert name.split(".")[0] not in HEAVY, f"{path.name} imports {name}"
        assert not any(name.startswith(f"peftdsl.{wing}") for wing in WINGS), f"{path.name} imports {name}"


def test_importing_every_front_end_module_loads_no_torch():
    modules = [f"peftdsl.{p.stem}" if p.parent == PACKAGE else f"peftdsl.render.{p.stem}"
               for p in FRONT_END if p.stem != "__main__"]
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_wings_never_import_the_drivers():
    """Imports point one way: `cli`, `api` and `runner` drive the wings, never the reverse."""
    for wing in WINGS:
        for path in (PACKAGE / wing).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    assert node.module not in ("peftdsl.cli", "peftdsl.api", "peftdsl.runner"), (path, node.module)


def test_canonical_invariants_are_checked_while_tests_run(monkeypatch):
    """The checker is on (conftest), and a form that breaks an invariant is caught as it is made."""
    import peftdsl.canonical as canonical
    from peftdsl import build, ir
    from peftdsl.diagnostics import Sink
    from peftdsl.spans import SourceFile

    assert canonical.CHECK_INVARIANTS
    sink = Sink()
    recipe = build.build_recipe(SourceFile(Path("r.yaml"), "peftdsl: 1\nadapters: {a: a, b: b}\n"
                                           "compose:\n  x: b + a\n"), sink)
    kinds = {"a": ir.Kind.LORA, "b": ir.Kind.LORA, "x": ir.Kind.LORA}
    assert canonical.canonicalise(recipe, kinds, sink)["x"].terms  # sorted, fine
    monkeypatch.setattr(canonical._Canonicaliser, "_combine", _unsorted(canonical._Canonicaliser._combine))
    with pytest.raises(AssertionError, match="not in leaf order"):
        canonical.canonicalise(recipe, kinds, sink)


def _unsorted(combine):
    """A broken pass: terms in reverse leaf order."""
    import dataclasses

    def wrapper(self, parts, span):
        result = combine(self, parts, span)
        return None if result is None else dataclasses.replace(result, terms=result.terms[::-1])

    return wrapper
