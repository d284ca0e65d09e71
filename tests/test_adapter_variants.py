"""Adapters as PEFT trains them beyond plain LoRA factors: what composes exactly, what is refused.

Init methods that rewrite the base when PEFT loads the adapter (PiSSA, OLoRA, CorDA, LoftQ,
LoRA-GA) make the saved factors relative to a modified base: composing them as they are
would exit 0 with a wrong result (30 % off on a tiny Llama), so they are refused with a
help line, and the same adapter saved converted composes exactly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import peftdsl
from tests.factories import save_tiny_llama

ATOL = 2e-6


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("variants") / "base")


def _trained(base: Path, init: str, folder: Path, *, convert: bool) -> Path:
    """An adapter with init `init`, "trained" (factors perturbed), saved as is or converted."""
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=init)
    peft_model = get_peft_model(model, config)
    if convert:  # the initial factors, saved before training, as PEFT's conversion needs them
        peft_model.peft_config["default"].init_lora_weights = True
        peft_model.save_pretrained(folder / "initial")
        peft_model.peft_config["default"].init_lora_weights = init
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "lora_" in name:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    out = folder / ("converted" if convert else "raw")
    if convert:
        peft_model.save_pretrained(out, path_initial_model_for_weight_conversion=str(folder / "initial"))
    else:
        peft_model.save_pretrained(out)
    return out


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_base_rewriting_inits_are_refused_with_how_to_convert(base: Path, tmp_path: Path, init: str):
    raw = _trained(base, init, tmp_path, convert=False)
    recipe = peftdsl.loads(f"peftdsl: 1\nbase: {base}\nadapters: {{a: {raw}}}\ncompose: {{x: 2 * a}}\n",
                           root=tmp_path)
    [error] = recipe.errors
    assert error.code == "I303" and f"init_lora_weights: {init}" in error.message
    assert "path_initial_model_for_weight_conversion" in error.help


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_adapters_compose_exactly(base: Path, tmp_path: Path, init: str):
    converted = _trained(base, init, tmp_path, convert=True)
    recipe = peftdsl.loads(f"peftdsl: 1\nbase: {base}\nadapters: {{a: {converted}}}\ncompose: {{x: 2 * a}}\n",
                           root=tmp_path)
    recipe.raise_for_errors()
    deltas = recipe.compose("x").deltas()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), converted)
    original = AutoModelForCausalLM.from_pretrained(base)
    merged = reference.merge_and_unload()
    for name, delta in deltas.items():
        want = merged.get_submodule(name).weight - original.get_submodule(name).weight
        torch.testing.assert_close(delta, 2 * want.detach(), atol=1e-5, rtol=1e-4)


def test_inits_that_leave_the_base_alone_compose(base: Path, tmp_path: Path):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights="gaussian"))
    model.save_pretrained(tmp_path / "g")
    recipe = peftdsl.loads(f"peftdsl: 1\nbase: {base}\nadapters: {{a: {tmp_path / 'g'}}}\ncompose: {{x: -a}}\n",
                           root=tmp_path)
    assert recipe.errors == []


def test_evaluating_a_base_without_the_head_the_metric_needs_is_an_error(tmp_path: Path):
    """A BERT encoder loaded for perplexity would get a random LM head: a different number every run."""
    from transformers import BertConfig, BertModel

    from tests.factories import tiny_tokenizer

    bert = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(bert)
    tiny_tokenizer().save_pretrained(bert)
    (tmp_path / "text.txt").write_text("the cat sat on the mat\nthe dog ran\n")
    recipe = peftdsl.loads(f"peftdsl: 1\nbase: {bert}\neval:\n  - name: ppl\n    models: [base]\n"
                           "    metric: perplexity\n    data: text.txt\n", root=tmp_path)
    recipe.raise_for_errors()
    with pytest.raises(peftdsl.RecipeError) as caught:
        recipe.run(report=tmp_path / "report")
    [error] = [d for d in caught.value.diagnostics if d.severity is peftdsl.Severity.ERROR]
    assert error.code == "E501" and "BertLMHeadModel" in error.message
    assert "`cls.predictions." in error.message and "newly initialised" in error.message
    assert not (tmp_path / "report" / "report.json").exists()
