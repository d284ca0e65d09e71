"""`Recipe.run` (what `peftdsl run` does) end to end, every operator against an independent reference.

Runs go through the Python API; the tests whose subject is the command line itself
(exit statuses, stderr, no traceback, `--only`) run `peftdsl run`.
References are PEFT's own functions on tiny random models built here (sums of
`get_delta_weight`, `add_weighted_adapter`, `merge_and_unload`) and plain torch
formulas (a dense SVD's best rank-k approximation, the (IA)³ formula).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import peftdsl
from peftdsl.cli import main
from tests.factories import (
    load_peft,
    make_ia3,
    make_lora,
    save_tiny_gpt2,
    save_tiny_llama,
)

ATOL = 2e-6
LLAMA_MODULES = [f"model.layers.{layer}.self_attn.{proj}" for layer in range(2)
                 for proj in ("q_proj", "k_proj", "v_proj")]


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    """A folder with a tiny Llama and adapters of mixed ranks, alphas and variants."""
    root = tmp_path_factory.mktemp("lab")
    save_tiny_llama(root / "base")
    make_lora(root / "a", seed=1, r=4, alpha=8)
    make_lora(root / "b", seed=2, r=4, alpha=16)
    make_lora(root / "rs", seed=3, r=8, alpha=16, use_rslora=True,
              rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"layers.0.self_attn.v_proj": 4})
    make_lora(root / "k", seed=4, r=2, alpha=2, targets=("q_proj", "k_proj"))
    make_ia3(root / "i", seed=5)
    make_ia3(root / "j", seed=6)
    return root


def run(recipe: Path, **options) -> peftdsl.RunResult:
    """`peftdsl run RECIPE --quiet`, through the API; raises `RecipeError` when the run fails."""
    return peftdsl.load(recipe).run(quiet=True, **options)


def run_fails(recipe: Path, **options) -> peftdsl.RecipeError:
    """A run that must fail: its `RecipeError` (every diagnostic, rendered as the CLI prints them)."""
    with pytest.raises(peftdsl.RecipeError) as err:
        run(recipe, **options)
    return err.value


def error_codes(err: peftdsl.RecipeError) -> list[str]:
    return [d.code for d in err.diagnostics if d.severity is peftdsl.Severity.ERROR]


def cli_run(recipe: Path, *extra: str) -> int:
    return main(["run", str(recipe), "--quiet", *extra])


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def delta(peft_model, adapter: str, module: str) -> torch.Tensor:
    layer = peft_model.get_submodule(f"base_model.model.{module}")
    if adapter in getattr(layer, "lora_A", {}) or adapter in getattr(layer, "lora_embedding_A", {}):
        return layer.get_delta_weight(adapter).detach()
    return torch.zeros_like(layer.weight)


def output_deltas(folder: Path, base: Path, modules: list[str]) -> dict[str, torch.Tensor]:
    """Load a written adapter with PEFT and read back each module's delta."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
    return {m: delta(model, "default", m) for m in modules}


# ---------------------------------------------------------------- exact arithmetic


def test_exact_sum_equals_sum_of_peft_deltas(lab: Path, tmp_path: Path):
    """Mixed ranks and alphas, rsLoRA with rank/alpha patterns, disjoint target modules."""
    recipe = write_recipe(lab, f"""peftdsl: 1
base: base
adapters: {{a: a, b: b, rs: rs, k: k}}
params: {{lam: 0.4}}
compose:
  mix: a - lam * b + 0.5 * rs - k / 4
outputs:
  mix: {tmp_path}/mix
""")
    assert run(recipe).written == ("mix",)
    reference = load_peft(lab / "base", {n: lab / n for n in ("a", "b", "rs", "k")})
    got = output_deltas(tmp_path / "mix", lab / "base", LLAMA_MODULES)
    for module in LLAMA_MODULES:
        want = (delta(reference, "a", module) - 0.4 * delta(reference, "b", module)
                + 0.5 * delta(reference, "rs", module) - delta(reference, "k", module) / 4)
        torch.testing.assert_close(got[module], want, atol=ATOL, rtol=1e-5)
    config = json.loads((tmp_path / "mix/adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["r"] == config["lora_alpha"]
    provenance = json.loads((tmp_path / "mix/peftdsl.json").read_text())
    assert provenance["canonical"] == "a - 0.4*b - 0.25*k + 0.5*rs"
    assert set(provenance["inputs"]) == {"a", "b", "k", "rs"}


def test_loaded_output_forward_equals_base_plus_delta(lab: Path, tmp_path: Path):
    recipe = write_recipe(lab, f"""peftdsl: 1
adapters: {{a: a, b: b}}
compose:
  neg: -a + 2 * b
outputs:
  neg: {tmp_path}/neg
""")
    assert run(recipe).written == ("neg",)
    reference = load_peft(lab / "base", {"a": lab / "a", "b": lab / "b"})
    patched = AutoModelForCausalLM.from_pretrained(lab / "base")
    with torch.no_grad():
        for module in LLAMA_MODULES:
            want = -delta(reference, "a", module) + 2 * delta(reference, "b", module)
            patched.get_submodule(module).weight += want
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lab / "base"), tmp_path / "neg")
    ids = torch.arange(1, 17).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, patched(ids).logits, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- PEFT's add_weighted_adapter


def _peft_combined(lab: Path, names: list[str], weights: list[float], combination: str, **kw):
    model = load_peft(lab / "base", {n: lab / n for n in names})
    model.add_weighted_adapter(names, weights, "combined", combination_type=combination, **kw)
    return model


@pytest.mark.parametrize(("combination", "expression", "kwargs"), [
    ("cat", "0.7 * a - 0.3 * b", {}),
    ("linear", "peft_linear(0.7 * a + 0.3 * b)", {}),
    ("svd", "svd(0.7 * a - 0.3 * b, rank=3)", {"svd_rank": 3}),
    ("ties_svd", "svd(ties(0.7 * a + 0.3 * b, density=0.5), rank=4)", {"svd_rank": 4, "density": 0.5}),
    ("ties_svd", "svd(ties(0.7 * a + 0.3 * b, density=0.6, majority=\"frequency\"), rank=4)",
     {"svd_rank": 4, "density": 0.6, "majority_sign_method": "frequency"}),
    ("magnitude_prune_svd", "svd(magnitude_prune(0.7 * a + 0.3 * b, density=0.4), rank=4)",
     {"svd_rank": 4, "density": 0.4}),
])
def test_matches_peft_add_weighted_adapter(lab: Path, tmp_path: Path, combination, expression, kwargs):
    weights = [0.7, -0.3] if "- 0.3" in expression else [0.7, 0.3]
    recipe = write_recipe(lab, f"""peftdsl: 1
adapters: {{a: a, b: b}}
compose:
  out: {expression}
outputs:
  out: {tmp_path}/out
""", name=f"{combination}.yaml")
    assert run(recipe).written == ("out",)
    reference = _peft_combined(lab, ["a", "b"], weights, combination, **kwargs)
    got = output_deltas(tmp_path / "out", lab / "base", LLAMA_MODULES)
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        torch.testing.assert_close(got[module], delta(reference, "combined", module), atol=5e-6, rtol=1e-4)


def test_svd_is_the_best_rank_k_approximation(lab: Path, tmp_path: Path):
    recipe = write_recipe(lab, f"""peftdsl: 1
adapters: {{a: a, rs: rs}}
compose:
  small: svd(a - rs, rank=3)
outputs:
  small: {tmp_path}/small
""")
    assert run(recipe).written == ("small",)
    reference = load_peft(lab / "base", {"a": lab / "a", "rs": lab / "rs"})
    got = output_deltas(tmp_path / "small", lab / "base", LLAMA_MODULES[:3])
    for module in LLAMA_MODULES[:3]:
        full = delta(reference, "a", module) - delta(reference, "rs", module)
        U, S, Vh = torch.linalg.svd(full)
        best = U[:, :3] @ torch.diag(S[:3]) @ Vh[:3]
        torch.testing.assert_close(got[module], best, atol=5e-6, rtol=1e-4)


def test_pem_is_the_papers_parameter_space_arithmetic(lab: Path, tmp_path: Path):
    recipe = write_recipe(lab, f"""peftdsl: 1
adapters: {{a: a, b: b}}
compose:
  p: pem(0.3 * a - 0.7 * b)
outputs:
  p: {tmp_path}/p
""")
    assert run(recipe).written == ("p",)
    reference = load_peft(lab / "base", {"a": lab / "a", "b": lab / "b"})
    got = output_deltas(tmp_path / "p", lab / "base", LLAMA_MODULES[:1])
    layer = reference.get_submodule(f"base_model.model.{LLAMA_MODULES[0]}")
    A = 0.3 * layer.lora_A["a"].weight + 0.7 * layer.lora_A["b"].weight
    B = 0.3 * layer.scaling["a"] * layer.lora_B["a"].weight - 0.7 * layer.scaling["b"] * layer.lora_B["b"].weight
    torch.testing.assert_close(got[LLAMA_MODULES[0]], (B @ A).detach(), atol=ATOL, rtol=1e-5)


# ---------------------------------------------------------------- (IA)³


def test_ia3_convex_matches_peft_and_negation_is_two_minus_l(lab: Path, tmp_path: Path):
    recipe = write_recipe(lab, f"""peftdsl: 1
adapters: {{i: i, j: j}}
compose:
  mix: 0.3 * i + 0.7 * j
  neg: i - 0.5 * j
outputs:
  mix: {tmp_path}/mix
  neg: {tmp_path}/neg
""")
    assert run(recipe).written == ("mix", "neg")
    reference = load_peft(lab / "base", {"i": lab / "i", "j": lab / "j"})
    reference.add_weighted_adapter(["i", "j"], [0.3, 0.7], "combined")
    mix = load_file(tmp_path / "mix/adapter_model.safetensors")
    neg = load_file(tmp_path / "neg/adapter_model.safetensors")
    for key in mix:
        module = key.removeprefix("base_model.model.").removesuffix(".ia3_l")
        layer = reference.get_submodule(f"base_model.model.{module}")
        torch.testing.assert_close(mix[key], layer.ia3_l["combined"].detach(), atol=ATOL, rtol=1e-6)
        li, lj = layer.ia3_l["i"].detach(), layer.ia3_l["j"].detach()
        torch.testing.assert_close(neg[key], 1 + (li - 1) - 0.5 * (lj - 1), atol=ATOL, rtol=1e-6)
    config = json.loads((tmp_path / "mix/adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and sorted(config["feedforward_modules"])


# ---------------------------------------------------------------- merged models


def test_merged_output_equals_peft_merge_and_unload(lab: Path, tmp_path: Path):
    recipe = write_recipe(lab, f"""peftdsl: 1
base: base
adapters: {{a: a, b: b}}
compose:
  mix: a - 0.4 * b
outputs:
  mix: {{path: {tmp_path}/merged, merge: true}}
""")
    assert run(recipe).written == ("mix",)
    reference = _peft_combined(lab, ["a", "b"], [1.0, -0.4], "cat")
    reference.set_adapter("combined")
    want = reference.merge_and_unload().state_dict()
    got = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)
    assert (tmp_path / "merged/model.safetensors.index.json").exists()
    assert json.loads((tmp_path / "merged/peftdsl.json").read_text())["merge"] is True


def test_gpt2_conv1d_and_embedding_lora(tmp_path: Path):
    save_tiny_gpt2(tmp_path / "base")
    make_lora(tmp_path / "a", base="gpt2", seed=1, targets=("c_attn", "wte"))
    make_lora(tmp_path / "b", base="gpt2", seed=2, r=2, targets=("c_attn",))
    recipe = write_recipe(tmp_path, """peftdsl: 1
base: base
adapters: {a: a, b: b}
compose:
  mix: 0.5 * a - b
outputs:
  mix: out/mix
  merged: {path: out/merged, merge: true}
compose_note: null
""".replace("compose_note: null\n", "").replace("  merged: {path: out/merged, merge: true}\n",
                                                  "  mixm: {path: out/merged, merge: true}\n").replace(
        "  mix: 0.5 * a - b\n", "  mix: 0.5 * a - b\n  mixm: 0.5 * a - b\n"))
    assert run(recipe).written == ("mix", "mixm")
    reference = load_peft(tmp_path / "base", {"a": tmp_path / "a", "b": tmp_path / "b"})
    modules = ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn", "transformer.wte"]
    got = output_deltas(tmp_path / "out/mix", tmp_path / "base", modules)
    for module in modules:
        want = 0.5 * delta(reference, "a", module) - delta(reference, "b", module)
        torch.testing.assert_close(got[module], want, atol=ATOL, rtol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out/merged").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    name = "transformer.h.0.attn.c_attn.weight"
    want = base[name] + 0.5 * delta(reference, "a", name[:-7]) - delta(reference, "b", name[:-7])
    torch.testing.assert_close(merged[name], want, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- reproducibility and seeds


def _file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_reruns_are_byte_identical_and_dare_is_seeded(lab: Path, tmp_path: Path):
    text = f"""peftdsl: 1
seed: SEED
adapters: {{a: a, b: b}}
compose:
  d: svd(dare_ties(0.5 * a + 0.5 * b, density=0.5), rank=4)
  e: svd(a + b, rank=2)
outputs:
  d: {tmp_path}/d
  e: {tmp_path}/e
"""
    recipe = write_recipe(lab, text.replace("SEED", "1"), name="dare.yaml")
    assert run(recipe).written == ("d", "e")
    first = {n: _file_bytes(tmp_path / n) for n in ("d", "e")}
    assert run(recipe, force=True).written == ("d", "e")
    assert {n: _file_bytes(tmp_path / n) for n in ("d", "e")} == first
    recipe.write_text(text.replace("SEED", "2"))
    run(recipe, force=True)
    weights = "adapter_model.safetensors"
    assert _file_bytes(tmp_path / "d")[weights] != first["d"][weights]
    assert _file_bytes(tmp_path / "e")[weights] == first["e"][weights]


# ---------------------------------------------------------------- sources from the Hugging Face cache


def test_hf_source_resolves_offline_from_the_cache(lab: Path, tmp_path: Path, monkeypatch):
    cache = tmp_path / "hub"
    repo = cache / "models--org--adapter-a"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(lab / "a", repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = write_recipe(lab, f"""peftdsl: 1
adapters:
  a: hf:org/adapter-a
  b: b
compose:
  mix: a + b
outputs:
  mix: {tmp_path}/mix
""", name="hf.yaml")
    assert run(recipe).written == ("mix",)
    got = output_deltas(tmp_path / "mix", lab / "base", LLAMA_MODULES[:1])
    reference = load_peft(lab / "base", {"a": lab / "a", "b": lab / "b"})
    want = delta(reference, "a", LLAMA_MODULES[0]) + delta(reference, "b", LLAMA_MODULES[0])
    torch.testing.assert_close(got[LLAMA_MODULES[0]], want, atol=ATOL, rtol=1e-5)


# ---------------------------------------------------------------- failures are diagnostics


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PEFTDSL_DEBUG"}
    return subprocess.run([sys.executable, "-m", "peftdsl", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def _broken_copy(lab: Path, tmp_path: Path) -> Path:
    """A copy of adapter `a` for a test to damage."""
    broken = tmp_path / "broken"
    shutil.copytree(lab / "a", broken)
    return broken


def _recipe_over_broken(lab: Path, tmp_path: Path) -> Path:
    return write_recipe(tmp_path, f"""peftdsl: 1
adapters: {{x: broken, b: {lab}/b}}
compose:
  mix: x + b
outputs:
  mix: out
""")


def test_truncated_weights_fail_cleanly_with_no_output(lab: Path, tmp_path: Path):
    broken = _broken_copy(lab, tmp_path)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    recipe = _recipe_over_broken(lab, tmp_path)
    result = _cli("run", str(recipe), "--quiet", cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "error[I304]" in result.stderr and "truncated" in result.stderr
    assert not (tmp_path / "out").exists()


def test_corrupt_header_is_found_before_any_compute(lab: Path, tmp_path: Path):
    """A tensor whose byte count disagrees with its dtype and shape: I304 from the header alone."""
    broken = _broken_copy(lab, tmp_path)
    weights = broken / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    first = sorted(k for k in header if k != "__metadata__")[0]
    header[first]["dtype"] = "F64"
    encoded = json.dumps(header).encode()
    encoded += b" " * ((8 - len(encoded) % 8) % 8)
    weights.write_bytes(len(encoded).to_bytes(8, "little") + encoded + raw[8 + length:])
    recipe = _recipe_over_broken(lab, tmp_path)
    result = _cli("lint", str(recipe), cwd=tmp_path)
    assert result.returncode == 1 and "error[I304]" in result.stdout and "corrupt" in result.stdout


def test_non_finite_tensor_data_points_at_the_composition(lab: Path, tmp_path: Path):
    """Data that only execution can see (a NaN): R601 at the recipe span, no traceback, no output."""
    from safetensors.torch import save_file

    broken = _broken_copy(lab, tmp_path)
    tensors = load_file(broken / "adapter_model.safetensors")
    first = sorted(tensors)[0]
    tensors[first][0, 0] = float("nan")
    save_file(tensors, broken / "adapter_model.safetensors")
    recipe = _recipe_over_broken(lab, tmp_path)
    result = _cli("run", str(recipe), "--quiet", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert "error[R601]" in result.stderr and "NaN" in result.stderr
    assert "recipe.yaml:4:" in result.stderr  # points at the composition `mix`
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept_without_force(lab: Path, tmp_path: Path):
    (tmp_path / "mix").mkdir()
    (tmp_path / "mix" / "keep.txt").write_text("mine")
    recipe = write_recipe(lab, f"""peftdsl: 1
adapters: {{a: a}}
compose:
  mix: 2 * a
outputs:
  mix: {tmp_path}/mix
""", name="exists.yaml")
    assert error_codes(run_fails(recipe)) == ["R602"]
    assert (tmp_path / "mix" / "keep.txt").read_text() == "mine"
    # Not even --force replaces a folder that peftdsl did not write.
    assert error_codes(run_fails(recipe, force=True)) == ["R602"]
    assert (tmp_path / "mix" / "keep.txt").read_text() == "mine"
    (tmp_path / "mix" / "keep.txt").unlink()
    assert run(recipe, force=True).written == ("mix",)  # an empty folder may be replaced
    first = (tmp_path / "mix" / "adapter_model.safetensors").read_bytes()
    assert error_codes(run_fails(recipe)) == ["R602"]  # now an output: kept without --force
    assert run(recipe, force=True).written == ("mix",)  # and replaced with it
    assert (tmp_path / "mix" / "adapter_model.safetensors").read_bytes() == first


def test_pins_are_checked_before_any_compute(lab: Path, tmp_path: Path):
    from peftdsl.lock import sha256_file

    good = sha256_file(lab / "a" / "adapter_model.safetensors")
    bad = "0" * 64
    recipe = write_recipe(lab, f"""peftdsl: 1
adapters:
  a: {{path: a, sha256: {bad}}}
  b: b
compose:
  mix: a + b
outputs:
  mix: {tmp_path}/mix
""", name="pins.yaml")
    err = run_fails(recipe)
    assert "I309" in error_codes(err) and "error[I309]" in str(err)
    assert not (tmp_path / "mix").exists()
    recipe.write_text(recipe.read_text().replace(bad, good))
    err = run_fails(recipe, locked=True)
    assert "I311" in error_codes(err) and "error[I311]" in str(err)  # `b` is not pinned
    assert run(recipe).written == ("mix",)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_results_match_cpu(lab: Path, tmp_path: Path):
    recipe = write_recipe(lab, f"""peftdsl: 1
adapters: {{a: a, b: b, rs: rs}}
compose:
  small: svd(a - 0.5 * b + rs, rank=4)
  t: svd(ties(0.5 * a + 0.5 * b, density=0.5), rank=4)
outputs:
  small: {tmp_path}/DEV/small
  t: {tmp_path}/DEV/t
""", name="cuda.yaml")
    for device in ("cpu", "cuda"):
        recipe.write_text(recipe.read_text().replace("DEV", device) if "DEV" in recipe.read_text()
                          else recipe.read_text().replace("/cpu/", f"/{device}/"))
        assert run(recipe, device=device).device.startswith(device)
    for name in ("small", "t"):
        cpu = output_deltas(tmp_path / "cpu" / name, lab / "base", LLAMA_MODULES)
        gpu = output_deltas(tmp_path / "cuda" / name, lab / "base", LLAMA_MODULES)
        for module in LLAMA_MODULES:
            torch.testing.assert_close(gpu[module], cpu[module], atol=1e-5, rtol=1e-4)


def test_resource_guard_refuses_a_plan_that_cannot_fit(lab: Path, tmp_path: Path, monkeypatch):
    import peftdsl.runner as runner

    monkeypatch.setattr(runner, "available_memory", lambda device: 1024)
    recipe = write_recipe(lab, f"""peftdsl: 1
adapters: {{a: a, b: b}}
compose:
  mix: a + b
outputs:
  mix: {tmp_path}/mix
""", name="guard.yaml")
    err = run_fails(recipe)
    assert error_codes(err) == ["R603"]
    assert "error[R603]" in str(err) and "GiB" in str(err) and "--no-memory-guard" in str(err)
    assert not (tmp_path / "mix").exists()
    # --force replaces outputs, with the guard still on; the guard has its own switch
    err = run_fails(recipe, force=True)
    assert error_codes(err) == ["R603"]
    assert run(recipe, memory_guard=False).written == ("mix",)
    assert main(["run", str(recipe), "--quiet", "--force", "--no-memory-guard"]) == 0


def test_gpt2_layout_comes_from_the_base_when_the_config_says_otherwise(tmp_path: Path):
    """PEFT rewrites `fan_in_fan_out` for Conv1D at load time; a config saying false must not
    make the merge add an untransposed delta (c_proj is square: the shape alone cannot tell)."""
    save_tiny_gpt2(tmp_path / "base")
    make_lora(tmp_path / "a", base="gpt2", seed=1, targets=("c_attn", "c_proj"))
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["fan_in_fan_out"] = False
    config_path.write_text(json.dumps(config))
    recipe = write_recipe(tmp_path, """peftdsl: 1
base: base
adapters: {a: a}
compose:
  m: 2 * a
outputs:
  m: {path: merged, merge: true}
""")
    assert run(recipe).written == ("m",)
    reference = load_peft(tmp_path / "base", {"a": tmp_path / "a"})
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    for module in ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"):
        want = base[f"{module}.weight"] + 2 * delta(reference, "a", module)
        torch.testing.assert_close(merged[f"{module}.weight"], want, atol=1e-6, rtol=1e-5)


def test_only_writes_the_named_outputs(lab: Path, tmp_path: Path, capsys):
    recipe = write_recipe(lab, f"""peftdsl: 1
adapters: {{a: a, b: b}}
compose:
  x: a + b
  y: a - b
outputs:
  x: {tmp_path}/x
  y: {tmp_path}/y
""", name="only.yaml")
    assert cli_run(recipe, "--only", "y") == 0
    assert (tmp_path / "y").exists() and not (tmp_path / "x").exists()
    assert cli_run(recipe, "--only", "nope") == 2
    assert "no output `nope`" in capsys.readouterr().err


def test_ia3_on_gpt2_conv1d_merges_and_evaluates_like_peft(tmp_path: Path):
    """(IA)³ vectors on Conv1D scale the weight's columns (outputs) or rows (feed-forward inputs)."""
    from tests.factories import tiny_tokenizer

    save_tiny_gpt2(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    make_ia3(tmp_path / "i", base="gpt2", seed=3, targets=("c_attn", "mlp.c_proj"), feedforward=("mlp.c_proj",))
    (tmp_path / "data.txt").write_text("the cat sat on the mat\na dog ran under the tree\n")
    recipe = write_recipe(tmp_path, """peftdsl: 1
base: base
adapters: {i: i}
compose:
  m: 1 * i
outputs:
  m: {path: merged, merge: true}
eval:
  - {name: ppl, models: [i], metric: perplexity, data: data.txt}
""")
    result = run(recipe, report=tmp_path / "report")
    assert result.written == ("m",) and result.report == tmp_path / "report"
    reference = load_peft(tmp_path / "base", {"i": tmp_path / "i"}).merge_and_unload().state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
                 "transformer.h.1.mlp.c_proj.weight"):
        torch.testing.assert_close(merged[name], reference[name], atol=1e-6, rtol=1e-5)
    value = json.loads((tmp_path / "report" / "report.json").read_text())["results"][0]["value"]
    # In-memory evaluation applied the vectors in the Conv1D layout: the same perplexity as
    # PEFT's merged model, measured by plain transformers.
    from transformers import AutoTokenizer

    model = load_peft(tmp_path / "base", {"i": tmp_path / "i"}).merge_and_unload().eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base")
    nll = count = 0.0
    with torch.no_grad():
        for text in ("the cat sat on the mat", "a dog ran under the tree"):
            ids = tokenizer(text, return_tensors="pt").input_ids
            nll += model(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    assert value == pytest.approx(math.exp(nll / count), rel=1e-4)


@pytest.mark.parametrize("expression", ["a - 0.4 * b + 0.5 * rs", "svd(a - rs, rank=3)",
                                        "svd(ties(0.6 * a + 0.4 * b, density=0.5), rank=4)",
                                        "dare_linear(a + b, density=0.7)", "pem(0.5 * a + 0.5 * b)"])
def test_batched_and_module_by_module_execution_agree(lab: Path, expression: str):
    """Grouping is an optimisation: one module per chunk gives the same numbers (DARE included,
    since each module draws from its own generator)."""
    from peftdsl.compiler import analyse
    from peftdsl.diagnostics import Sink
    from peftdsl.runtime.execute import Executor
    from peftdsl.lower import lower

    recipe = write_recipe(lab, f"peftdsl: 1\nadapters: {{a: a, b: b, rs: rs}}\ncompose:\n  x: {expression}\n",
                          name="fused.yaml")
    analysis = analyse(recipe, Sink())
    task = lower(analysis, "x")
    assert max(len(g.modules) for g in task.groups) > 1  # there is something to batch
    with Executor(analysis.adapters, device=torch.device("cpu"), seed=3) as batched:
        fused = batched.run(task)
    with Executor(analysis.adapters, device=torch.device("cpu"), seed=3, chunk_bytes=1) as one_by_one:
        unfused = one_by_one.run(task)
    assert fused.keys() == unfused.keys()
    for module, delta in fused.items():
        other = unfused[module]
        for name in ("A", "B", "delta"):
            if hasattr(delta, name):
                torch.testing.assert_close(getattr(delta, name), getattr(other, name), atol=1e-6, rtol=1e-5)


def test_dense_merged_output_is_computed_just_in_time_and_equals_the_eager_one(lab: Path, tmp_path: Path):
    """A dense merge (ties) computes its deltas chunk by chunk as the shards reach them; the
    weights equal base + the deltas computed eagerly."""
    from peftdsl.compiler import analyse
    from peftdsl.diagnostics import Sink
    from peftdsl.runtime.execute import Executor
    from peftdsl.lower import lower
    from peftdsl.outputs.merge import add_dense_delta

    recipe = write_recipe(lab, f"""peftdsl: 1
base: base
adapters: {{a: a, b: b, k: k}}
compose:
  t: ties(0.6 * a + 0.4 * b - 0.3 * k, density=0.5)
outputs:
  t: {{path: {tmp_path}/merged, merge: true}}
""", name="dense_merge.yaml")
    assert run(recipe).written == ("t",)
    analysis = analyse(recipe, Sink())
    with Executor(analysis.adapters, device=torch.device("cpu"), seed=0) as executor:
        deltas = executor.run(lower(analysis, "t"))
    base = AutoModelForCausalLM.from_pretrained(lab / "base").state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    for module, delta in deltas.items():
        name = f"{module}.weight"
        torch.testing.assert_close(merged[name], add_dense_delta(base[name], delta.delta, delta.layout),
                                   atol=1e-6, rtol=1e-5)
