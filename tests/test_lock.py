"""`peftdsl lock`: pins written at the right places, nothing else changed, runs --locked."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftdsl.cli import main
from peftdsl.lock import sha256_file
from tests.factories import make_lora

RECIPE = """# a comment that must survive
peftdsl: 1
adapters:
  a: a            # short form
  b:
    path: b       # long form
    kind: lora
  c: {path: c, kind: lora}
  d:
    path: d
    sha256: "0000000000000000000000000000000000000000000000000000000000000000"
compose:
  m: a + b + c + d   # all used
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lock")
    for seed, name in enumerate("abcd"):
        make_lora(root / name, seed=seed)
    return root


def test_lock_pins_every_form_and_keeps_the_rest(folder: Path, tmp_path: Path):
    recipe = folder / "r.yaml"
    recipe.write_text(RECIPE)
    assert main(["lock", str(recipe)]) == 0
    text = recipe.read_text()
    pins = {n: sha256_file(folder / n / "adapter_model.safetensors") for n in "abcd"}
    assert f'  a: {{path: "a", sha256: "{pins["a"]}"}}            # short form\n' in text
    assert f'    path: b       # long form\n    sha256: "{pins["b"]}"\n    kind: lora\n' in text
    assert f'  c: {{path: c, kind: lora, sha256: "{pins["c"]}"}}\n' in text
    assert f'    sha256: "{pins["d"]}"\n' in text and "0" * 64 not in text
    # Every line that holds no pin is unchanged.
    untouched = [line for line in RECIPE.splitlines() if not line.startswith(("  a:", "  c:", "    sha256"))]
    assert all(line in text.splitlines() for line in untouched)
    assert main(["lint", str(recipe)]) == 0
    before = recipe.read_bytes()
    assert main(["lock", str(recipe)]) == 0
    assert recipe.read_bytes() == before  # idempotent


def test_run_locked_accepts_a_locked_recipe(folder: Path, tmp_path: Path):
    recipe = folder / "locked.yaml"
    recipe.write_text(RECIPE + f"outputs:\n  m: {tmp_path}/m\n")
    assert main(["run", str(recipe), "--locked", "--quiet"]) == 1  # unpinned sources
    assert not (tmp_path / "m").exists()
    assert main(["lock", str(recipe)]) == 0
    assert main(["run", str(recipe), "--locked", "--quiet"]) == 0
    assert (tmp_path / "m" / "adapter_model.safetensors").exists()


def test_lock_reports_missing_adapters_and_leaves_the_file(folder: Path):
    recipe = folder / "missing.yaml"
    recipe.write_text("peftdsl: 1\nadapters:\n  x: nowhere\ncompose:\n  y: 2 * x\n")
    before = recipe.read_bytes()
    assert main(["lock", str(recipe)]) == 1
    assert recipe.read_bytes() == before


def test_lock_keeps_odd_layouts_meaning_the_same(folder: Path):
    """CRLF line ends, a trailing comma in a flow mapping, a path that YAML flow syntax would split."""
    odd = folder / "run,v2"
    if not odd.exists():
        make_lora(odd, seed=9)
    recipe = folder / "odd.yaml"
    recipe.write_text("peftdsl: 1\r\nadapters:\r\n  a: {path: a, }\r\n  b:\r\n    path: b\r\n  c: run,v2\r\n"
                      "compose:\r\n  m: a + b + c\r\n", newline="")
    assert main(["lock", str(recipe)]) == 0
    raw = recipe.read_bytes()
    assert b"\n" not in raw.replace(b"\r\n", b"")  # every line still ends in CRLF
    assert main(["lint", str(recipe)]) == 0
    from peftdsl.build import load_recipe
    from peftdsl.diagnostics import Sink

    built = load_recipe(recipe, Sink())
    assert built.adapter("c").location == "run,v2"
    for name, path in (("a", "a"), ("b", "b"), ("c", "run,v2")):
        assert built.adapter(name).sha256 == sha256_file(folder / path / "adapter_model.safetensors")
