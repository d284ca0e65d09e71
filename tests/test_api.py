"""The Python API (DESIGN §7) against the CLI and against PEFT.

The same recipe through `Recipe.run` and through `peftdsl run` writes the same bytes;
`Composition.deltas()` equals sums of PEFT's `get_delta_weight`; `applied()` restores a
model bit for bit; sources given in memory compose exactly as their saved twins.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from transformers import AutoModelForCausalLM

import peftdsl
from peftdsl.cli import main
from tests.factories import load_peft, make_ia3, make_lora, save_tiny_gpt2, save_tiny_llama

ATOL = 2e-6
LLAMA_MODULES = [f"model.layers.{layer}.self_attn.{proj}" for layer in range(2) for proj in ("q_proj", "v_proj")]


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("api")
    save_tiny_llama(root / "base")
    make_lora(root / "a", seed=1, r=4, alpha=8)
    make_lora(root / "b", seed=2, r=4, alpha=16, use_rslora=True)
    make_lora(root / "e", seed=3, r=2, alpha=4, targets=("q_proj", "embed_tokens"))
    make_ia3(root / "i", seed=5)
    make_ia3(root / "j", seed=6)
    save_tiny_gpt2(root / "gpt2")
    make_lora(root / "g", base="gpt2", seed=7, r=4, alpha=8, targets=("c_attn",))
    return root


def recipe_text(out: Path) -> str:
    return f"""peftdsl: 1
base: base
adapters: {{a: a, b: b, e: e, i: i, j: j}}
params: {{lam: 0.4}}
compose:
  mix: a - lam * b
  small: svd(mix + e, rank=3)
  scaled: 0.5 * i + 0.5 * j
  merged: mix + 0.5 * e
outputs:
  mix: {out}/mix
  small: {out}/small
  scaled: {out}/scaled
  merged: {{path: {out}/merged, merge: true}}
"""


def write(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def peft_delta(model, adapter: str, module: str) -> torch.Tensor:
    layer = model.get_submodule(f"base_model.model.{module}")
    if adapter in getattr(layer, "lora_A", {}) or adapter in getattr(layer, "lora_embedding_A", {}):
        return layer.get_delta_weight(adapter).detach()
    return torch.zeros_like(layer.weight)


# ---------------------------------------------------------------- run: API and CLI agree


def test_recipe_run_writes_the_bytes_the_cli_writes(lab: Path, tmp_path: Path):
    text = recipe_text(tmp_path / "out")
    cli_recipe = write(lab, text, "same.yaml")
    assert main(["run", str(cli_recipe), "--quiet", "--set", "lam=0.3"]) == 0
    cli = {name: tree_bytes(tmp_path / "out" / name) for name in ("mix", "small", "scaled", "merged")}
    result = peftdsl.load(cli_recipe, params={"lam": 0.3}).run(quiet=True, force=True)
    assert result.written == ("mix", "small", "scaled", "merged")
    for name in result.written:
        assert tree_bytes(tmp_path / "out" / name) == cli[name], name


def test_composition_save_writes_what_run_writes(lab: Path, tmp_path: Path):
    recipe_path = write(lab, recipe_text(tmp_path / "run"), "save.yaml")
    recipe = peftdsl.load(recipe_path)
    recipe.run(no_eval=True, only=["mix", "small", "scaled"])
    for name in ("mix", "small", "scaled"):
        saved = recipe.compose(name).save(tmp_path / "saved" / name)
        assert tree_bytes(saved) == tree_bytes(tmp_path / "run" / name), name


def test_save_of_a_merged_output_writes_the_merged_model(lab: Path, tmp_path: Path):
    recipe = peftdsl.load(write(lab, recipe_text(tmp_path / "run"), "merged.yaml"))
    recipe.run(only=["merged"])
    saved = recipe.compose("merged").save(tmp_path / "again")
    assert tree_bytes(saved) == tree_bytes(tmp_path / "run" / "merged")
    assert (saved / "config.json").is_file()


# ---------------------------------------------------------------- deltas against PEFT


def test_deltas_equal_sums_of_peft_delta_weights(lab: Path, tmp_path: Path):
    recipe = peftdsl.load(write(lab, recipe_text(tmp_path), "deltas.yaml"), params={"lam": 0.25})
    deltas = recipe.compose("mix").deltas()
    reference = load_peft(lab / "base", {"a": lab / "a", "b": lab / "b"})
    assert sorted(deltas) == sorted(LLAMA_MODULES)
    for module in LLAMA_MODULES:
        want = peft_delta(reference, "a", module) - 0.25 * peft_delta(reference, "b", module)
        torch.testing.assert_close(deltas[module], want, atol=ATOL, rtol=1e-5)
    # compose(params=) re-canonicalises at other values without reloading the recipe
    other = recipe.compose("mix", params={"lam": -1.0}).deltas()
    for module in LLAMA_MODULES:
        want = peft_delta(reference, "a", module) + peft_delta(reference, "b", module)
        torch.testing.assert_close(other[module], want, atol=ATOL, rtol=1e-5)


def test_deltas_are_in_the_base_weights_layout(lab: Path, tmp_path: Path):
    """Embeddings (vocab×dim) and GPT-2's Conv1D (in×out) come back as the weight stores them."""
    recipe = peftdsl.load(write(lab, f"""peftdsl: 1
base: base
adapters: {{e: e}}
compose: {{twice: 2 * e}}
""", "layout.yaml"))
    deltas = recipe.compose("twice").deltas()
    reference = load_peft(lab / "base", {"e": lab / "e"})
    embed = reference.get_submodule("base_model.model.model.embed_tokens")
    assert deltas["model.embed_tokens"].shape == embed.weight.shape
    torch.testing.assert_close(deltas["model.embed_tokens"], 2 * embed.get_delta_weight("e").detach(), atol=ATOL,
                               rtol=1e-5)

    gpt2 = peftdsl.load(write(lab, "peftdsl: 1\nbase: gpt2\nadapters: {g: g}\ncompose: {x: -g}\n", "gpt2.yaml"))
    deltas = gpt2.compose("x").deltas()
    reference = load_peft(lab / "gpt2", {"g": lab / "g"})
    for name, value in deltas.items():
        layer = reference.get_submodule(f"base_model.model.{name}")
        assert value.shape == layer.weight.shape  # Conv1D: in×out
        torch.testing.assert_close(value, -layer.get_delta_weight("g").detach(), atol=ATOL, rtol=1e-5)


def test_ia3_deltas_are_the_vectors(lab: Path, tmp_path: Path):
    recipe = peftdsl.load(write(lab, recipe_text(tmp_path), "ia3.yaml"))
    got = recipe.compose("scaled").deltas()
    reference = load_peft(lab / "base", {"i": lab / "i", "j": lab / "j"})
    for name, value in got.items():
        layer = reference.get_submodule(f"base_model.model.{name}")
        want = 1 + 0.5 * (layer.ia3_l["i"] - 1) + 0.5 * (layer.ia3_l["j"] - 1)
        torch.testing.assert_close(value, want.detach(), atol=ATOL, rtol=1e-6)


# ---------------------------------------------------------------- applied


def test_applied_matches_merge_and_unload_and_restores_bit_for_bit(lab: Path, tmp_path: Path):
    recipe = peftdsl.load(write(lab, recipe_text(tmp_path), "applied.yaml"))
    model = AutoModelForCausalLM.from_pretrained(lab / "base").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = load_peft(lab / "base", {"a": lab / "a", "b": lab / "b"})
    reference.add_weighted_adapter(["a", "b"], [1.0, -0.4], "mix", combination_type="cat")
    reference.set_adapter("mix")
    merged = reference.merge_and_unload()
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad(), recipe.compose("mix").applied(model) as patched:
        assert patched is model
        torch.testing.assert_close(model(ids).logits, merged(ids).logits, atol=1e-5, rtol=1e-4)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(RuntimeError, match="inside"), recipe.compose("mix").applied(model):
        raise RuntimeError("inside")
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)


# ---------------------------------------------------------------- in-memory sources


def test_in_memory_sources_equal_their_saved_twins(lab: Path, tmp_path: Path):
    live = load_peft(lab / "base", {"a": lab / "a", "b": lab / "b"})
    state = get_peft_model_state_dict(live, adapter_name="b")
    text = recipe_text(tmp_path / "disk").replace("adapters: {a: a, b: b,", "adapters: {a: nowhere/a, b: nowhere/b,")
    assert "nowhere/a" in text
    recipe = peftdsl.load(write(lab, text, "memory.yaml"),
                          adapters={"a": live, "b": (state, live.peft_config["b"])})
    assert recipe.errors == []  # the declared paths need not exist
    on_disk = peftdsl.load(write(lab, recipe_text(tmp_path / "disk"), "disk.yaml"))
    for name in ("mix", "small"):
        memory, disk = recipe.compose(name).deltas(), on_disk.compose(name).deltas()
        assert memory.keys() == disk.keys()
        assert all(torch.equal(memory[m], disk[m]) for m in disk), name
    # the provenance hash of an in-memory source is that of the file save_pretrained writes
    recipe.compose("mix").save(tmp_path / "mem_mix")
    on_disk.compose("mix").save(tmp_path / "disk_mix")
    import json

    memory_inputs = json.loads((tmp_path / "mem_mix/peftdsl.json").read_text())["inputs"]
    disk_inputs = json.loads((tmp_path / "disk_mix/peftdsl.json").read_text())["inputs"]
    assert {n: v["sha256"] for n, v in memory_inputs.items()} == {n: v["sha256"] for n, v in disk_inputs.items()}
    assert (tmp_path / "mem_mix/adapter_model.safetensors").read_bytes() == \
        (tmp_path / "disk_mix/adapter_model.safetensors").read_bytes()


def test_in_memory_source_can_add_an_adapter_and_named_adapters(lab: Path, tmp_path: Path):
    live = load_peft(lab / "base", {"a": lab / "a", "b": lab / "b"})
    recipe = peftdsl.loads("peftdsl: 1\nbase: base\ncompose: {d: fresh - a}\n", root=lab,
                           adapters={"fresh": (live, "b"), "a": (live, "a")})
    recipe.raise_for_errors()
    deltas = recipe.compose("d").deltas()
    for module in LLAMA_MODULES:
        want = peft_delta(live, "b", module) - peft_delta(live, "a", module)
        torch.testing.assert_close(deltas[module], want, atol=ATOL, rtol=1e-5)


def test_in_memory_sources_are_type_checked_like_files(lab: Path):
    live_lora = load_peft(lab / "base", {"a": lab / "a"})
    live_ia3 = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lab / "base"), lab / "i")
    recipe = peftdsl.loads("peftdsl: 1\ncompose: {bad: a + i}\n", root=lab, adapters={"a": live_lora, "i": live_ia3})
    assert [d.code for d in recipe.errors] == ["T401"]
    with pytest.raises(peftdsl.UsageError, match="no adapter `zz`"):
        peftdsl.loads("peftdsl: 1\ncompose: {x: 2 * a}\n", root=lab, adapters={"a": (live_lora, "zz")})
    with pytest.raises(peftdsl.UsageError, match="must be a PeftModel"):
        peftdsl.loads("peftdsl: 1\ncompose: {x: 2 * a}\n", root=lab, adapters={"a": 42})


# ---------------------------------------------------------------- errors


def test_recipe_errors_are_diagnostics_rendered_like_the_cli(lab: Path):
    recipe = peftdsl.loads("peftdsl: 1\nadapters: {a: a}\ncompose:\n  x: a + nope\n", root=lab, filename="r.yaml")
    [error] = recipe.errors
    assert (error.code, error.severity, error.span.line, error.span.column) == (
        "N201", peftdsl.Severity.ERROR, 4, 10)
    with pytest.raises(peftdsl.RecipeError) as caught:
        recipe.raise_for_errors()
    text = str(caught.value)
    assert "r.yaml:4:10" in text and "error[N201]" in text and "^^^^" in text
    with pytest.raises(peftdsl.RecipeError):
        recipe.compose("x")
    with pytest.raises(peftdsl.RecipeError):
        recipe.run()


def test_usage_errors(lab: Path, tmp_path: Path):
    path = write(lab, recipe_text(tmp_path), "usage.yaml")
    with pytest.raises(peftdsl.UsageError, match="no param `nope`"):
        peftdsl.load(path, params={"nope": 1})
    with pytest.raises(peftdsl.UsageError, match="no such file"):
        peftdsl.load(tmp_path / "missing.yaml")
    recipe = peftdsl.load(path)
    with pytest.raises(peftdsl.UsageError, match="no composition or adapter `mx`"):
        recipe.compose("mx")
    with pytest.raises(peftdsl.UsageError, match="no output `zz`"):
        recipe.run(only=["zz"])
    with pytest.raises(peftdsl.UsageError, match="device"):
        recipe.compose("mix", device="tpu").deltas()


def test_import_and_load_stay_torch_free(lab: Path, tmp_path: Path):
    path = write(lab, recipe_text(tmp_path), "torchfree.yaml")
    code = ("import sys, peftdsl\n"
            f"r = peftdsl.load({str(path)!r})\n"
            "r.raise_for_errors(); r.canonical('small')\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "r.compose('mix').deltas()\n"
            "assert 'torch' in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_public_names():
    assert sorted(peftdsl.__all__) == sorted([
        "Composition", "Diagnostic", "PeftdslError", "Recipe", "RecipeError", "RunOptions", "RunResult",
        "Severity", "UsageError", "__version__", "load", "loads"])
    for name in peftdsl.__all__:
        assert hasattr(peftdsl, name)


# ---------------------------------------------------------------- review findings: bad calls are clear


def test_save_never_replaces_what_peftdsl_did_not_write(lab: Path, tmp_path: Path):
    recipe = peftdsl.load(write(lab, recipe_text(tmp_path / "out"), "guard.yaml"))
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    with pytest.raises(peftdsl.UsageError, match="not written by peftdsl"):
        recipe.compose("mix").save(precious, force=True)
    assert (precious / "thesis.txt").read_text() == "years of work"
    with pytest.raises(peftdsl.RecipeError) as caught:  # an input of the recipe
        recipe.compose("mix").save(lab / "a", force=True)
    assert [d.code for d in caught.value.diagnostics] == ["N210"]
    first = recipe.compose("mix").save(tmp_path / "once")
    with pytest.raises(peftdsl.UsageError, match=r"force=True"):
        recipe.compose("mix").save(first)
    assert recipe.compose("mix").save(first, force=True) == first


def test_save_checks_what_an_output_would_be_checked_for(lab: Path, tmp_path: Path):
    recipe = peftdsl.loads(f"peftdsl: 1\nbase: {lab / 'base'}\nadapters: {{a: {lab / 'a'}, b: {lab / 'b'}}}\n"
                           "compose:\n  d: ties(a + b, density=0.5)\n", root=tmp_path)
    with pytest.raises(peftdsl.RecipeError) as caught:
        recipe.compose("d").save(tmp_path / "dense")
    assert [d.code for d in caught.value.diagnostics] == ["T403"]
    assert not (tmp_path / "dense").exists()


def test_params_are_numbers_and_their_errors_are_diagnostics(lab: Path, tmp_path: Path):
    recipe = peftdsl.loads(f"peftdsl: 1\nadapters: {{a: {lab / 'a'}}}\nparams: {{lam: 1}}\n"
                           "compose:\n  x: a / lam\n  y: lam * a\n", root=tmp_path)
    recipe.raise_for_errors()
    with pytest.raises(peftdsl.UsageError, match="must be a finite number"):
        recipe.compose("x", params={"lam": "0.5"})
    with pytest.raises(peftdsl.UsageError, match="must be a finite number"):
        peftdsl.loads("peftdsl: 1\nparams: {lam: 1}\n", root=tmp_path, params={"lam": float("nan")})
    with pytest.raises(peftdsl.RecipeError) as caught:
        recipe.compose("x", params={"lam": 0})
    assert "T407" in {d.code for d in caught.value.diagnostics}
    with pytest.raises(peftdsl.UsageError, match="zero at these params"):
        recipe.compose("y", params={"lam": 0})


def test_deltas_are_the_callers_to_change(lab: Path, tmp_path: Path):
    recipe = peftdsl.load(write(lab, recipe_text(tmp_path), "clones.yaml"))
    comp = recipe.compose("scaled")
    first = comp.deltas()
    for tensor in first.values():
        tensor.zero_()
    assert all(t.abs().sum() > 0 for t in comp.deltas().values())


def test_applied_refuses_models_that_do_not_fit(lab: Path, tmp_path: Path):
    recipe = peftdsl.load(write(lab, recipe_text(tmp_path), "fit.yaml"))
    gpt2 = AutoModelForCausalLM.from_pretrained(lab / "gpt2")
    before = {k: v.clone() for k, v in gpt2.state_dict().items()}
    with pytest.raises(peftdsl.UsageError, match="does not fit"), recipe.compose("mix").applied(gpt2):
        pass
    assert all(torch.equal(gpt2.state_dict()[k], v) for k, v in before.items())
    peft_model = load_peft(lab / "base", {"a": lab / "a"})
    with pytest.raises(peftdsl.UsageError, match="get_base_model"), recipe.compose("mix").applied(peft_model):
        pass


def test_ray_needs_a_recipe_file(lab: Path, tmp_path: Path):
    text = recipe_text(tmp_path / "out") + (f"eval:\n  - name: p\n    models: [base]\n    metric: perplexity\n"
                                             f"    data: {tmp_path / 'lines.txt'}\n")
    (tmp_path / "lines.txt").write_text("the cat\n")
    recipe = peftdsl.loads(text, root=lab)
    with pytest.raises(peftdsl.UsageError, match="given as text"):
        recipe.run(executor="ray", no_eval=False, only=["mix"])
