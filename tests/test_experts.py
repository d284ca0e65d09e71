"""LoRA on MoE experts (`target_parameters`): every expert composes as a module of its own.

Tiny Mixtral, Qwen2-MoE and GPT-OSS bases (2 layers, width 32, 4 experts) are built here:
Mixtral and Qwen2-MoE as transformers 5 saves them (one tensor per expert on disk,
`block_sparse_moe.experts.3.w1.weight`; fused `experts.gate_up_proj` in memory),
a Mixtral saved fused (`save_original_format=False`), and GPT-OSS, whose experts are
stored fused and transposed (E, in, out) with a square `down_proj`. Adapters are
PEFT's own, with random factors (`init_lora_weights=False`), on attention modules and
on both expert parameters (two nested ParamWrappers), or on `down_proj` alone.

References are PEFT's: `ParamWrapper.get_delta_weight` per adapter, and the inputs
merged one after another on a scaled copy (`merge_and_unload`; PEFT's
`add_weighted_adapter` refuses `target_parameters`), whose logits, weights and
perplexity the outputs must reproduce.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.merge_utils import ties
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

import peftdsl
from peftdsl.cli import main
from peftdsl.evaluation.evaluate import perplexity
from tests.factories import save_tiny_llama, tiny_tokenizer

PARAMETERS = ("experts.gate_up_proj", "experts.down_proj")
EXPERT_PARAMETERS = [f"model.layers.{layer}.mlp.experts.{name}" for layer in range(2)
                     for name in ("gate_up_proj", "down_proj")]
# PEFT warns that `rank_pattern` keys naming parameters "did not match any targeted module",
# then applies them to the parameters all the same (its check looks at target_modules only).
pytestmark = pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")

TEXTS = ["the cat sat on the mat", "a dog ran under the tree", "this movie is very good"]
TOKENS = torch.tensor([[1, 5, 9, 14, 22, 30, 41, 7, 3, 60], [1, 8, 2, 77, 13, 90, 100, 4, 6, 11]])


def _mixtral(experts: int = 4, intermediate: int = 48) -> MixtralForCausalLM:
    config = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=experts,
                           num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False)
    return MixtralForCausalLM(config)


def _qwen2_moe() -> Qwen2MoeForCausalLM:
    config = Qwen2MoeConfig(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                            shared_expert_intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                            max_position_embeddings=64, tie_word_embeddings=False)
    return Qwen2MoeForCausalLM(config)


def _gpt_oss() -> GptOssForCausalLM:
    config = GptOssConfig(vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                          num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False,
                          layer_types=["sliding_attention", "full_attention"], sliding_window=16,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return GptOssForCausalLM(config)


BUILDERS = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "gpt_oss": _gpt_oss}


def _seeded(build, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build(**kw).eval()


def _lora(folder: Path, base: Path, seed: int, *, r: int, alpha: float, modules=("q_proj",),
          parameters=PARAMETERS, **kw) -> Path:
    """A PEFT adapter with random factors on `modules` and on expert `parameters`."""
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(modules), target_parameters=list(parameters),
                        init_lora_weights=False, **kw)
    get_peft_model(model, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("moe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, build in BUILDERS.items():
            _seeded(build).save_pretrained(root / name)
            tiny_tokenizer().save_pretrained(root / name)
        _seeded(_mixtral).save_pretrained(root / "mixtral_fused", save_original_format=False)
        for name in BUILDERS:
            _lora(root / f"{name}_a", root / name, 1, r=2, alpha=4, modules=("q_proj", "v_proj"))
            _lora(root / f"{name}_b", root / name, 2, r=3, alpha=5, modules=("q_proj",),
                  rank_pattern={"down_proj": 2}, alpha_pattern={"gate_up_proj": 3}, use_rslora=True)
        _lora(root / "mixtral_down", root / "mixtral", 3, r=2, alpha=2, modules=("k_proj",),
              parameters=("experts.down_proj",))
        _lora(root / "mixtral_c", root / "mixtral", 4, r=2, alpha=3, modules=("q_proj",))
        _seeded(_mixtral, experts=8).save_pretrained(root / "mixtral8")
        _lora(root / "mixtral8_a", root / "mixtral8", 5, r=2, alpha=4)
        _seeded(_mixtral, intermediate=40).save_pretrained(root / "mixtral_narrow")
        _lora(root / "mixtral_narrow_a", root / "mixtral_narrow", 6, r=2, alpha=4)
        save_tiny_llama(root / "llama", hidden=32, intermediate=64)
    return root


def _recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = folder / name
    path.write_text("peftdsl: 1\n" + text)
    return path


def _base(moe: Path, name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(moe / name).eval()


def _peft_merged(moe: Path, base: str, terms: list[tuple[str, float]]):
    """The inputs merged by PEFT one after another, each adapter's B scaled by its coefficient."""
    model = _base(moe, base)
    for adapter, coef in terms:
        peft_model = PeftModel.from_pretrained(model, moe / adapter)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(coef)
        model = peft_model.merge_and_unload()
    return model


def _wrapper(peft_model, parameter: str):
    module, _, name = parameter.rpartition(".")
    layer = peft_model.get_submodule(f"base_model.model.{module}")
    while layer.parameter_name != name:
        layer = layer.base_layer
    return layer


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def _stored_keys(folder: Path) -> set[str]:
    keys = set()
    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            keys.update(handle.keys())
    return keys


# ---------------------------------------------------------------- experts as modules


@pytest.mark.parametrize("base", list(BUILDERS))
def test_each_expert_delta_is_peft_s_per_expert_delta(moe: Path, base: str):
    """Per expert, ΔW = Σ cᵢ·(PEFT's get_delta_weight)[e], in the parameter's layout (E, out, in)
    for Mixtral and Qwen2-MoE, (E, in, out) for GPT-OSS; rsLoRA and rank/alpha patterns per
    parameter. `deltas()` names each expert `<parameter>[e]`."""
    recipe = peftdsl.load(_recipe(moe, f"base: {base}\nadapters: {{a: {base}_a, b: {base}_b}}\n"
                                       "compose:\n  x: 0.5 * a - 1.5 * b\n"))
    recipe.raise_for_errors()
    deltas = recipe.compose("x", device="cpu").deltas()
    assert {name for name in deltas if "[" in name} == {f"{p}[{e}]" for p in EXPERT_PARAMETERS for e in range(4)}
    references = [(PeftModel.from_pretrained(_base(moe, base), moe / f"{base}_{n}"), c) for n, c in
                  (("a", 0.5), ("b", -1.5))]
    for parameter in EXPERT_PARAMETERS:
        want = sum(c * _wrapper(m, parameter).get_delta_weight("default").detach() for m, c in references)
        assert want.abs().max() > 1e-2
        for e in range(4):
            torch.testing.assert_close(deltas[f"{parameter}[{e}]"], want[e], atol=1e-6, rtol=1e-5)


def test_a_module_s_nested_wrappers_are_told_apart(moe: Path, tmp_path: Path):
    """`mixtral_down` targets `down_proj` alone: its only wrapper (`experts.lora_A`) is
    `down_proj`, while in `mixtral_a` that key is `down_proj` and `experts.base_layer.lora_A`
    is `gate_up_proj`. Their sum targets both, written as PEFT nests them."""
    recipe = _recipe(moe, f"base: mixtral\nadapters: {{a: mixtral_a, d: mixtral_down}}\n"
                          f"compose:\n  x: a + 2 * d\noutputs:\n  x: {tmp_path}/x\n")
    peftdsl.load(recipe).run(quiet=True, no_eval=True)
    with safe_open(tmp_path / "x/adapter_model.safetensors", "pt") as handle:
        shapes = {k: handle.get_slice(k).get_shape() for k in handle.keys() if "layers.0.mlp" in k}  # noqa: SIM118
    prefix = "base_model.model.model.layers.0.mlp.experts"
    assert shapes == {f"{prefix}.base_layer.lora_A.weight": [4 * 2, 32],  # gate_up_proj, rank 2
                      f"{prefix}.base_layer.lora_B.weight": [96, 4 * 2],
                      f"{prefix}.lora_A.weight": [4 * 4, 48],  # down_proj, rank 2 + 2
                      f"{prefix}.lora_B.weight": [32, 4 * 4]}
    written = PeftModel.from_pretrained(_base(moe, "mixtral"), tmp_path / "x")
    torch.testing.assert_close(_logits(written), _logits(_peft_merged(moe, "mixtral", [("mixtral_a", 1.0),
                                                                                        ("mixtral_down", 2.0)])),
                               atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize("base", list(BUILDERS))
def test_adapter_output_is_peft_s_format_and_matches_peft_s_merge(moe: Path, tmp_path: Path, base: str):
    recipe = _recipe(moe, f"base: {base}\nadapters: {{a: {base}_a, b: {base}_b}}\n"
                          f"compose:\n  x: 0.5 * a - 1.5 * b\noutputs:\n  x: {tmp_path}/x\n")
    peftdsl.load(recipe).run(quiet=True, no_eval=True)
    config = json.loads((tmp_path / "x/adapter_config.json").read_text())
    assert config["target_parameters"] == sorted(EXPERT_PARAMETERS)
    assert config["fan_in_fan_out"] is False  # PEFT's ParamWrapper refuses it, GPT-OSS's (E, in, out) too
    assert config["r"] == 5 and config["rank_pattern"] == {  # 2 + 3 on q_proj and gate_up_proj
        r"^model\.layers\.0\.mlp\.experts\.down_proj": 4, r"^model\.layers\.1\.mlp\.experts\.down_proj": 4,
        r"^model\.layers\.0\.self_attn\.v_proj": 2, r"^model\.layers\.1\.self_attn\.v_proj": 2}
    written = PeftModel.from_pretrained(_base(moe, base), tmp_path / "x")
    reference = _peft_merged(moe, base, [(f"{base}_a", 0.5), (f"{base}_b", -1.5)])
    assert (_logits(reference) - _logits(_base(moe, base))).abs().max() > 1e-2
    torch.testing.assert_close(_logits(written), _logits(reference), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("base", ["mixtral", "mixtral_fused", "qwen2_moe", "gpt_oss"])
def test_merged_output_keeps_the_base_s_layout_and_equals_merge_and_unload(moe: Path, tmp_path: Path, base: str):
    """Mixtral and Qwen2-MoE store one tensor per expert, as transformers 5 saves them; the
    merged checkpoint has exactly the base's tensor names, and transformers loads it."""
    family = base.removesuffix("_fused")
    recipe = _recipe(moe, f"base: {base}\nadapters: {{a: {family}_a, b: {family}_b}}\n"
                          f"compose:\n  x: a - 0.5 * b\noutputs:\n  x: {{path: {tmp_path}/x, merge: true}}\n")
    peftdsl.load(recipe).run(quiet=True, no_eval=True)
    assert _stored_keys(tmp_path / "x") == _stored_keys(moe / base)
    if base in ("mixtral", "qwen2_moe"):
        assert any(".experts.3." in key for key in _stored_keys(tmp_path / "x"))
    merged = _base(tmp_path, "x")
    reference = _peft_merged(moe, base, [(f"{family}_a", 1.0), (f"{family}_b", -0.5)])
    want = reference.state_dict()
    got = merged.state_dict()
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(_logits(merged), _logits(reference), atol=1e-5, rtol=1e-5)


def test_a_matrix_parameter_is_one_expert_merged_under_its_stored_name(moe: Path, tmp_path: Path):
    """Mixtral's router weight, targeted as a parameter: a 2-D ParamWrapper (one "expert"),
    stored as `block_sparse_moe.gate.weight` on disk."""
    _lora(tmp_path / "router", moe / "mixtral", 7, r=2, alpha=4, parameters=("mlp.gate.weight", "experts.down_proj"))
    recipe = _recipe(tmp_path, f"""base: {moe}/mixtral
adapters: {{a: router}}
compose:
  x: 2 * a
  y: 2 * a
outputs:
  x: x
  y: {{path: y, merge: true}}
""")
    loaded = peftdsl.load(recipe)
    assert "model.layers.1.mlp.gate.weight[0]" in loaded.compose("x", device="cpu").deltas()
    loaded.run(quiet=True, no_eval=True)
    reference = _logits(_peft_merged(moe, "mixtral", [(str(tmp_path / "router"), 2.0)]))
    written = PeftModel.from_pretrained(_base(moe, "mixtral"), tmp_path / "x")
    torch.testing.assert_close(_logits(written), reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_logits(_base(tmp_path, "y")), reference, atol=1e-5, rtol=1e-5)
    assert _stored_keys(tmp_path / "y") == _stored_keys(moe / "mixtral")


def test_operators_act_per_expert(moe: Path, tmp_path: Path):
    """`svd`, `pem`, `peft_linear` and `ties` on each expert's matrices, against torch and
    PEFT's `merge_utils`; an `svd` output is written fused and PEFT loads it."""
    recipe = peftdsl.load(_recipe(moe, f"""base: mixtral
adapters: {{a: mixtral_a, c: mixtral_c}}
compose:
  s: svd(0.7 * a - c, rank=2)
  p: pem(0.7 * a - c)
  l: peft_linear(0.7 * a - c)
  t: ties(0.7 * a - c, density=0.5)
outputs:
  s: {tmp_path}/s
  t: {{path: {tmp_path}/t, merge: true}}
"""))
    recipe.raise_for_errors()
    got = {name: recipe.compose(name, device="cpu").deltas() for name in "splt"}
    models = {n: PeftModel.from_pretrained(_base(moe, "mixtral"), moe / f"mixtral_{n}") for n in "ac"}
    for parameter in EXPERT_PARAMETERS[:2]:
        wrappers = {n: _wrapper(m, parameter) for n, m in models.items()}
        deltas = {n: w.get_delta_weight("default").detach() for n, w in wrappers.items()}
        factors = {n: _expert_factors(w) for n, w in wrappers.items()}
        for e in range(4):
            name = f"{parameter}[{e}]"
            exact = 0.7 * deltas["a"][e] - deltas["c"][e]
            U, S, Vh = torch.linalg.svd(exact)
            torch.testing.assert_close(got["s"][name], (U[:, :2] * S[:2]) @ Vh[:2], atol=1e-5, rtol=1e-4)
            (A_a, B_a, s_a), (A_c, B_c, s_c) = factors["a"][e], factors["c"][e]
            pem = (0.7 * s_a * B_a - s_c * B_c) @ (0.7 * A_a + A_c)
            torch.testing.assert_close(got["p"][name], pem, atol=1e-6, rtol=1e-5)
            linear = ((0.7 * s_a) ** 0.5 * B_a + s_c ** 0.5 * B_c) @ ((0.7 * s_a) ** 0.5 * A_a - s_c ** 0.5 * A_c)
            torch.testing.assert_close(got["l"][name], linear, atol=1e-6, rtol=1e-5)
            want = ties(torch.stack([deltas["a"][e], deltas["c"][e]]), torch.tensor([0.7, -1.0]), 0.5)
            torch.testing.assert_close(got["t"][name], want, atol=1e-6, rtol=1e-5)
    recipe.run(quiet=True, no_eval=True)
    written = PeftModel.from_pretrained(_base(moe, "mixtral"), tmp_path / "s")
    merged, base = _base(tmp_path, "t"), _base(moe, "mixtral")  # ties is dense: merged expert by expert
    for parameter in EXPERT_PARAMETERS:
        names = [f"{parameter}[{e}]" for e in range(4)]
        torch.testing.assert_close(_wrapper(written, parameter).get_delta_weight("default"),
                                   torch.stack([got["s"][n] for n in names]), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(merged.get_parameter(parameter) - base.get_parameter(parameter),
                                   torch.stack([got["t"][n] for n in names]), atol=1e-6, rtol=1e-5)


def test_ranks_chosen_per_expert_are_padded_into_the_fused_factors(moe: Path, tmp_path: Path):
    """`svd(keep=)` picks a rank per expert; the fused pair holds the largest, the others padded
    with zero factors, so every expert's ΔW is the one chosen and PEFT loads it."""
    recipe = peftdsl.load(_recipe(moe, f"base: mixtral\nadapters: {{a: mixtral_a, b: mixtral_b}}\n"
                                       f"compose:\n  s: svd(a - b, rank=5, keep=0.8)\noutputs:\n  s: {tmp_path}/s\n"))
    recipe.raise_for_errors()
    got = recipe.compose("s", device="cpu").deltas()
    recipe.run(quiet=True, no_eval=True)
    ranks = json.loads((tmp_path / "s/peftdsl.json").read_text())["ranks"]
    written = PeftModel.from_pretrained(_base(moe, "mixtral"), tmp_path / "s")
    chosen = set()
    for parameter in EXPERT_PARAMETERS:
        chosen |= {ranks[f"{parameter}[{e}]"]["rank"] for e in range(4)}
        want = torch.stack([got[f"{parameter}[{e}]"] for e in range(4)])
        torch.testing.assert_close(_wrapper(written, parameter).get_delta_weight("default"), want,
                                   atol=1e-5, rtol=1e-4)
    assert len(chosen) > 1  # the experts' ranks differ


def _expert_factors(wrapper) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """(A_e, B_e, s) per expert of a PEFT ParamWrapper, as PEFT reshapes them."""
    E = wrapper.num_experts
    A = wrapper.lora_A["default"].weight.detach().reshape(E, -1, wrapper.in_features)
    B = wrapper.lora_B["default"].weight.detach().reshape(wrapper.out_features, -1, E)
    return [(A[e], B[:, :, e], wrapper.scaling["default"]) for e in range(E)]


# ---------------------------------------------------------------- evaluation


@pytest.mark.parametrize("base", list(BUILDERS))
def test_evaluation_patches_the_fused_parameters(moe: Path, tmp_path: Path, base: str):
    """The in-memory patch of a fused parameter gives PEFT's merged model: logits, and the
    perplexity an eval entry reports; the model comes back bit for bit."""
    (tmp_path / "text.txt").write_text("\n".join(TEXTS) + "\n")
    recipe = peftdsl.load(_recipe(moe, f"""base: {base}
adapters: {{a: {base}_a, b: {base}_b}}
compose:
  x: 0.8 * a + 0.6 * b
eval:
  - {{name: ppl, models: [x], metric: perplexity, data: {tmp_path}/text.txt}}
"""))
    reference = _peft_merged(moe, base, [(f"{base}_a", 0.8), (f"{base}_b", 0.6)])
    model = _base(moe, base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with recipe.compose("x", device="cpu").applied(model):
        torch.testing.assert_close(_logits(model), _logits(reference), atol=1e-5, rtol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    if base == "qwen2_moe":
        [result] = recipe.run(quiet=True, report=tmp_path / "report").results
        want = perplexity(reference, tiny_tokenizer(), TEXTS)
        assert result.value == pytest.approx(want, rel=1e-5)


def test_an_adapter_given_in_memory_is_read_like_its_saved_twin(moe: Path):
    peft_model = PeftModel.from_pretrained(_base(moe, "mixtral"), moe / "mixtral_down")
    recipe = _recipe(moe, "base: mixtral\nadapters: {d: mixtral_down}\ncompose:\n  x: 3 * d\n", name="mem.yaml")
    saved = peftdsl.load(recipe).compose("x", device="cpu").deltas()
    given = peftdsl.load(recipe, adapters={"d": peft_model}).compose("x", device="cpu").deltas()
    assert saved.keys() == given.keys() and f"{EXPERT_PARAMETERS[1]}[3]" in saved
    assert all(torch.equal(saved[name], given[name]) for name in saved)


# ---------------------------------------------------------------- bad inputs


def _lint(recipe: Path) -> list[str]:
    return [d.code for d in peftdsl.load(recipe).errors]


@pytest.mark.parametrize(("base", "adapters", "found"), [
    ("mixtral", "{a: mixtral_a, e: mixtral8_a}", "has 8 experts in `e` but 4 in `a`"),
    ("mixtral", "{e: mixtral8_a}", "has 8 experts in `e` but the base model has 4"),  # config.json
    ("mixtral_fused", "{e: mixtral8_a}", "has 8 experts in `e` but 4 in the base model"),  # its header
    ("mixtral_fused", "{n: mixtral_narrow_a}", "each expert is 80×32 in `n` but the base's parameter is 4×96×32"),
])
def test_expert_mismatches_are_found_by_lint(moe: Path, tmp_path: Path, base: str, adapters: str, found: str):
    recipe = _recipe(moe, f"base: {base}\nadapters: {adapters}\ncompose:\n  x: {adapters[1]} + {adapters[1]}\n"
                          f"outputs:\n  x: {tmp_path}/x\n", name="bad.yaml")
    [error] = peftdsl.load(recipe).errors
    assert error.code == "I307" and found in error.message and "`model.layers.0.mlp.experts." in error.message
    assert main(["run", str(recipe), "--quiet"]) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("base", "adapter", "found"), [
    ("mixtral", "mixtral_narrow_a", "each expert is 80×32 in `n` but the base's parameter is 4×96×32"),
    ("llama", "mixtral_a", ("adapts parameter `model.layers.0.mlp.experts.gate_up_proj`, which the base "
                            "model does not have")),
])
def test_what_only_the_model_knows_is_checked_before_anything_is_written(moe: Path, tmp_path: Path, base: str,
                                                                         adapter: str, found: str):
    """A checkpoint that stores experts one tensor each has no fused parameter in its headers:
    `run` checks the adapters against the model transformers builds, and writes nothing."""
    recipe = _recipe(moe, f"base: {base}\nadapters: {{n: {adapter}}}\ncompose:\n  x: 2 * n\n"
                          f"outputs:\n  x: {{path: {tmp_path}/x, merge: true}}\n", name="late.yaml")
    assert _lint(recipe) == []
    with pytest.raises(peftdsl.RecipeError) as err:
        peftdsl.load(recipe).run(quiet=True)
    [error] = err.value.diagnostics
    assert error.code == "I307" and found in error.message
    assert main(["run", str(recipe), "--quiet"]) == 1
    assert not (tmp_path / "x").exists()


def test_an_output_peft_could_not_load_is_not_written(moe: Path, tmp_path: Path):
    """PEFT's ParamWrapper refuses `lora_bias`: experts with a `lora_bias` term go to `merge: true`."""
    model = _base(moe, "mixtral")
    torch.manual_seed(8)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], lora_bias=True, init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(tmp_path / "lb")
    recipe = _recipe(tmp_path, f"base: {moe}/mixtral\nadapters: {{a: {moe}/mixtral_a, lb: lb}}\n"
                               "compose:\n  x: a + lb\noutputs:\n  x: x\n")
    with pytest.raises(peftdsl.RecipeError) as err:
        peftdsl.load(recipe).run(quiet=True, no_eval=True)
    [error] = err.value.diagnostics
    assert error.code == "R601" and "`target_parameters` and `lora_bias`" in error.message
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(("adapter", "targets", "code", "found"), [
    # one saved pair, two parameters `target_parameters` selects: which is which cannot be told
    ("mixtral_down", ["experts.down_proj", "experts.w9"], "I304",
     "`model.layers.0.mlp.experts` has 1 nested LoRA pair"),
    # two pairs, but names whose registration order (PEFT's nesting) peftdsl does not know
    ("mixtral_a", ["experts.w13_weight", "experts.w2_weight"], "I303", "not known for `w13_weight`"),
])
def test_unresolvable_nesting_is_refused(moe: Path, tmp_path: Path, adapter: str, targets: list, code: str,
                                         found: str):
    shutil.copytree(moe / adapter, tmp_path / "odd")
    config_path = tmp_path / "odd/adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "target_parameters": targets}))
    recipe = _recipe(tmp_path, f"adapters: {{o: {tmp_path}/odd}}\ncompose:\n  x: 2 * o\n")
    [error] = peftdsl.load(recipe).errors
    assert error.code == code and found in error.message


def test_lint_reads_expert_adapters_without_torch(moe: Path):
    recipe = _recipe(moe, "base: mixtral_fused\nadapters: {a: mixtral_a, b: mixtral_b}\n"
                          "compose:\n  x: a - b\n", name="lint.yaml")
    code = (f"import sys\nfrom peftdsl.cli import main\nstatus = main(['lint', {str(recipe)!r}])\n"
            "assert status == 0, status\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft')]\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
