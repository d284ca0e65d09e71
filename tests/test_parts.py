"""Adapters that carry more than factors (DESIGN §2 "Beyond factors"), judged against PEFT.

Saved modules (`modules_to_save`: classification heads, `lm_head`), trained token rows
(`trainable_token_indices`), trained biases (`bias: all / lora_only`) and `lora_bias`.

The reference is independent of peftdsl: each adapter is merged by PEFT's own
`merge_and_unload`, and the composition Σ cᵢ·xᵢ is task arithmetic over those merged
models, W = W_base + Σ cᵢ·(Wᵢ − W_base), for every tensor, factors' deltas and parts
alike (a head the base lacks: Σ cᵢ·Wᵢ with Σ cᵢ = 1). peftdsl's merged output must equal
it tensor for tensor, and its adapter output, loaded by `PeftModel.from_pretrained`, must
give the merged model's logits.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from factories import make_lora, tiny_gpt2, tiny_llama
from peft import PeftModel
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
)

import peftdsl
from peftdsl.cli import main

ATOL = 2e-5


def tiny_roberta(seed: int = 0, cls: type = RobertaForSequenceClassification, labels: int = 3):
    config = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=40, num_labels=labels,
                           pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1)
    torch.manual_seed(seed)
    return cls(config).eval()


def biased_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                         tie_word_embeddings=False, pad_token_id=0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def peft_merged(base_dir: Path, adapter: Path, auto=AutoModelForCausalLM) -> dict[str, torch.Tensor]:
    """PEFT's own merge of one adapter: the reference each term comes from."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(auto.from_pretrained(base_dir), adapter).merge_and_unload()
    return {k: v.detach().float().clone() for k, v in model.state_dict().items()}


def task_arithmetic(base: dict, merged: list[dict], coefs: list[float]) -> dict[str, torch.Tensor]:
    """W_base + Σ cᵢ·(Wᵢ − W_base) per tensor; a tensor the base lacks counts as 0 there."""
    out = {}
    for name in merged[0]:
        w0 = base.get(name, torch.zeros_like(merged[0][name]))
        out[name] = w0 + sum(c * (m[name] - w0) for c, m in zip(coefs, merged))
    return out


def base_state(base_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(base_dir.glob("*.safetensors"))
    state = {}
    for f in files:
        state.update({k: v.float() for k, v in load_file(f).items()})
    return state


def output_state(folder: Path) -> dict[str, torch.Tensor]:
    return base_state(folder)


def write_recipe(folder: Path, expr: str, adapters: dict[str, str], extra: str = "") -> Path:
    lines = ["peftdsl: 1", "name: parts", "base: base", "adapters:"]
    lines += [f"  {name}: {path}" for name, path in adapters.items()]
    lines += ["compose:", f"  mix: {expr}", "  merged: mix", "outputs:", "  mix: out/mix",
              "  merged: {path: out/merged, merge: true}", extra]
    path = folder / "recipe.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_matches(reference: dict, got: dict, names=None) -> None:
    for name in names or reference:
        assert name in got, f"merged output lacks `{name}`"
        assert torch.allclose(got[name], reference[name], atol=ATOL), \
            f"`{name}` differs by {(got[name] - reference[name]).abs().max():.2e}"


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------- causal LMs


@pytest.fixture(scope="module")
def llama_parts(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama_parts")
    tiny_llama().save_pretrained(root / "base")
    make_lora(root / "a", seed=1, modules_to_save=["lm_head"], trainable_token_indices=[1, 5, 7])
    make_lora(root / "b", seed=2, modules_to_save=["lm_head"], trainable_token_indices=[5, 9])
    make_lora(root / "plain", seed=3)
    return root


@pytest.mark.parametrize("expr, coefs", [("0.5*a + 0.8*b", [0.5, 0.8]), ("0.5*a + 0.5*b", [0.5, 0.5]),
                                         ("a - 0.4*b", [1.0, -0.4])])
def test_saved_lm_head_and_token_rows_match_peft(llama_parts, tmp_path, expr, coefs):
    root = llama_parts
    for name in ("base", "a", "b"):
        (tmp_path / name).symlink_to(root / name)
    recipe = write_recipe(tmp_path, expr, {"a": "a", "b": "b"})
    peftdsl.load(recipe).run()
    reference = task_arithmetic(base_state(root / "base"),
                                [peft_merged(root / "base", root / n) for n in ("a", "b")], coefs)
    got = output_state(tmp_path / "out" / "merged")
    assert_matches(reference, got)
    # Rows neither adapter trains stay the base's, bit for bit.
    untouched = [i for i in range(128) if i not in (1, 5, 7, 9)]
    assert torch.equal(got["model.embed_tokens.weight"][untouched],
                       base_state(root / "base")["model.embed_tokens.weight"][untouched])
    config = json.loads((tmp_path / "out" / "mix" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"]
    assert config["trainable_token_indices"] == {"model.embed_tokens": [1, 5, 7, 9]}
    ids = torch.tensor([[1, 5, 7, 9, 3, 4]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"),
                                           tmp_path / "out" / "mix").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged").eval()
    assert torch.allclose(logits(loaded, ids), logits(merged, ids), atol=1e-4)


def test_a_term_without_parts_contributes_nothing_there(llama_parts, tmp_path):
    root = llama_parts
    for name in ("base", "a", "plain"):
        (tmp_path / name).symlink_to(root / name)
    recipe = write_recipe(tmp_path, "0.5*a + 0.5*plain", {"a": "a", "plain": "plain"})
    peftdsl.load(recipe).run()
    reference = task_arithmetic(base_state(root / "base"),
                                [peft_merged(root / "base", root / n) for n in ("a", "plain")], [0.5, 0.5])
    assert_matches(reference, output_state(tmp_path / "out" / "merged"))


def test_parts_without_a_base_need_an_affine_combination(llama_parts, tmp_path, capsys):
    root = llama_parts
    for name in ("a", "b"):
        (tmp_path / name).symlink_to(root / name)
    (tmp_path / "r.yaml").write_text("peftdsl: 1\nadapters: {a: a, b: b}\ncompose:\n  avg: 0.5*a + 0.5*b\n"
                                     "  sum: a + b\noutputs:\n  avg: out/avg\n")
    assert main(["lint", "--format", "concise", str(tmp_path / "r.yaml")]) == 1
    err = capsys.readouterr().out
    # The average sets lm_head (both carry it), but not the token rows: they differ.
    assert ("r.yaml:4:8: error[T414] cannot compose `model.embed_tokens.weight`: the recipe names no `base`, "
            "and the terms train different rows of it") in err
    assert ("r.yaml:5:8: error[T414] cannot compose `lm_head.weight`: the recipe names no `base`, and the "
            "weights sum to 2, not 1 (and 1 more tensors)") in err
    assert err.count("T414") == 2


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    root = tmp_path_factory.mktemp("biased")
    biased_llama().save_pretrained(root / "base")
    tiny_llama().save_pretrained(root / "nobias")
    for i, name in enumerate(("a", "b"), start=1):
        make_lora(root / name, base=biased_llama(), seed=i, lora_bias=True, init_lora_weights=False)
    make_lora(root / "c", base=biased_llama(), seed=5, bias="lora_only")
    make_lora(root / "nb", seed=6, lora_bias=True)
    return root


@pytest.mark.parametrize("names, expr, coefs", [
    (("a", "b"), "0.7*a - 0.3*b", [0.7, -0.3]),
    (("a", "c"), "0.6*a + 0.6*c", [0.6, 0.6]),
])
def test_lora_bias_and_trained_biases_match_peft(biased, tmp_path, names, expr, coefs):
    for name in ("base", *names):
        (tmp_path / name).symlink_to(biased / name)
    recipe = write_recipe(tmp_path, expr, {n: n for n in names})
    peftdsl.load(recipe).run()
    reference = task_arithmetic(base_state(biased / "base"),
                                [peft_merged(biased / "base", biased / n) for n in names], coefs)
    assert_matches(reference, output_state(tmp_path / "out" / "merged"))
    ids = torch.tensor([[3, 4, 5, 6]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(biased / "base"),
                                           tmp_path / "out" / "mix").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged").eval()
    assert torch.allclose(logits(loaded, ids), logits(merged, ids), atol=1e-4)


def test_lora_bias_on_a_base_without_biases_cannot_merge(biased, tmp_path, capsys):
    (tmp_path / "base").symlink_to(biased / "nobias")
    (tmp_path / "nb").symlink_to(biased / "nb")
    recipe = write_recipe(tmp_path, "0.5*nb", {"nb": "nb"})
    assert main(["run", "--quiet", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert "error[T414]: output `merged` cannot be merged" in err and "has no such bias" in err
    assert not (tmp_path / "out").exists()


def test_gpt2_biases_all(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "base")
    make_lora(tmp_path / "a", base="gpt2", targets=("c_attn",), seed=1, bias="all")
    make_lora(tmp_path / "b", base="gpt2", targets=("c_attn", "c_fc"), seed=2, bias="lora_only")
    recipe = write_recipe(tmp_path, "0.5*a + 0.3*b", {"a": "a", "b": "b"})
    peftdsl.load(recipe).run()
    base = base_state(tmp_path / "base")
    reference = task_arithmetic(base, [peft_merged(tmp_path / "base", tmp_path / n) for n in ("a", "b")], [0.5, 0.3])
    assert_matches(reference, output_state(tmp_path / "out" / "merged"), list(base))  # lm_head: tied to wte
    config = json.loads((tmp_path / "out" / "mix" / "adapter_config.json").read_text())
    assert config["bias"] == "all"
    ids = torch.tensor([[3, 4, 5, 6]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                           tmp_path / "out" / "mix").eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "merged").eval()
    assert torch.allclose(logits(loaded, ids), logits(merged, ids), atol=1e-4)


# ---------------------------------------------------------------- classification heads


@pytest.fixture(scope="module")
def roberta(tmp_path_factory):
    """A RoBERTa classifier base (with a head), a masked-LM base of the same encoder (no
    head), and SEQ_CLS adapters whose heads PEFT saves in `modules_to_save`."""
    root = tmp_path_factory.mktemp("roberta")
    tiny_roberta().save_pretrained(root / "cls_base")
    masked = tiny_roberta(cls=RobertaForMaskedLM)
    masked.roberta.load_state_dict(tiny_roberta().roberta.state_dict())
    masked.save_pretrained(root / "mlm_base")
    for i, name in enumerate(("a", "b", "c"), start=1):
        make_lora(root / name, base=tiny_roberta(), seed=i, targets=("query", "value"), task_type="SEQ_CLS")
    return root


@pytest.mark.parametrize("expr, coefs", [("0.7*a + 0.7*b", [0.7, 0.7]), ("a - 0.5*b", [1.0, -0.5])])
def test_heads_in_the_base_compose_as_task_vectors(roberta, tmp_path, expr, coefs):
    (tmp_path / "base").symlink_to(roberta / "cls_base")
    for name in ("a", "b"):
        (tmp_path / name).symlink_to(roberta / name)
    recipe = write_recipe(tmp_path, expr, {"a": "a", "b": "b"})
    peftdsl.load(recipe).run()
    auto = AutoModelForSequenceClassification
    reference = task_arithmetic(base_state(roberta / "cls_base"),
                                [peft_merged(roberta / "cls_base", roberta / n, auto) for n in ("a", "b")], coefs)
    got = output_state(tmp_path / "out" / "merged")
    assert_matches(reference, got, [n for n in reference if n in base_state(roberta / "cls_base")])


@pytest.mark.parametrize("expr, coefs", [("0.5*a + 0.5*b", [0.5, 0.5]), ("0.2*a + 0.3*b + 0.5*c", [0.2, 0.3, 0.5]),
                                         ("pem(0.5*a + 0.5*b)", None), ("svd(0.5*a + 0.5*b, rank=2)", None),
                                         ("peft_linear(0.5*a + 0.5*b)", None)])
def test_heads_the_base_lacks_are_averaged(roberta, tmp_path, expr, coefs):
    """The paper's RoBERTa setting: the base (a masked LM) has no head; heads are averaged."""
    (tmp_path / "base").symlink_to(roberta / "mlm_base")
    names = ("a", "b", "c") if "c" in expr else ("a", "b")
    for name in names:
        (tmp_path / name).symlink_to(roberta / name)
    recipe = write_recipe(tmp_path, expr, {n: n for n in names})
    peftdsl.load(recipe).run()
    out = tmp_path / "out" / "merged"
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["RobertaForSequenceClassification"]
    assert config["num_labels"] == 3 or len(config["id2label"]) == 3
    model, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    got = output_state(out)
    heads = [peft_merged(roberta / "mlm_base", roberta / n, AutoModelForSequenceClassification) for n in names]
    head_names = [n for n in heads[0] if n.startswith("classifier.")]
    assert len(head_names) == 4
    average = {n: sum(0.5 * h[n] for h in heads) if coefs is None else sum(c * h[n] for c, h in zip(coefs, heads))
               for n in head_names}
    assert_matches(average, got)
    if coefs is not None:
        reference = task_arithmetic(base_state(roberta / "mlm_base"), heads, coefs)
        assert_matches(reference, got)
    ids = torch.tensor([[0, 5, 6, 7, 2]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(
            roberta / "mlm_base", num_labels=3), tmp_path / "out" / "mix").eval()
    assert torch.allclose(logits(loaded, ids), logits(model.eval(), ids), atol=1e-4)


@pytest.mark.parametrize("expr, why", [
    ("a + b", "the weights sum to 2, not 1"),
    ("0.5*a + 0.3*b", "the weights sum to 0.8, not 1"),
    ("ties(0.5*a + 0.5*b, density=0.5)", "`ties`/`dare`/`magnitude_prune` need its task vectors"),
])
def test_heads_the_base_lacks_refuse_other_combinations(roberta, tmp_path, capsys, expr, why):
    (tmp_path / "base").symlink_to(roberta / "mlm_base")
    for name in ("a", "b"):
        (tmp_path / name).symlink_to(roberta / name)
    recipe = write_recipe(tmp_path, expr, {"a": "a", "b": "b"})
    assert main(["run", "--quiet", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert err.count("error[T414]: cannot compose `classifier.") == 1 and why in err
    assert "the base has no `classifier." in err and "help: average it" in err
    assert not (tmp_path / "out").exists()


def test_a_swept_weight_that_breaks_the_average_is_found_at_lint(roberta, tmp_path, capsys):
    (tmp_path / "base").symlink_to(roberta / "mlm_base")
    for name in ("a", "b"):
        (tmp_path / name).symlink_to(roberta / name)
    recipe = write_recipe(tmp_path, "lam*a + 0.5*b", {"a": "a", "b": "b"},
                          "params:\n  lam: 0.5\nsweep:\n  lam: [0.5, 0.7]\n")
    assert main(["lint", "--format", "concise", str(recipe)]) == 1
    out = capsys.readouterr().out
    assert "error[T414]" in out and "at sweep point lam=0.7" in out


def test_ties_treats_heads_in_the_base_as_task_tensors(roberta, tmp_path):
    from peft.utils.merge_utils import ties

    (tmp_path / "base").symlink_to(roberta / "cls_base")
    for name in ("a", "b"):
        (tmp_path / name).symlink_to(roberta / name)
    (tmp_path / "recipe.yaml").write_text(
        "peftdsl: 1\nbase: base\nadapters: {a: a, b: b}\ncompose:\n  t: ties(0.6*a + 0.4*b, density=0.5)\n"
        "outputs:\n  t: {path: out/t, merge: true}\n")
    peftdsl.load(tmp_path / "recipe.yaml").run()
    base = base_state(roberta / "cls_base")
    merged = [peft_merged(roberta / "cls_base", roberta / n, AutoModelForSequenceClassification) for n in ("a", "b")]
    got = output_state(tmp_path / "out" / "t")
    for name in ("classifier.dense.weight", "classifier.out_proj.bias"):
        tasks = torch.stack([m[name] - base[name] for m in merged])
        expected = base[name] + ties(tasks, torch.tensor([0.6, 0.4]), 0.5)
        assert torch.allclose(got[name], expected, atol=ATOL)


def test_sequence_classification_accuracy_with_averaged_heads(roberta, tmp_path, capsys):
    """Evaluation patches the averaged head into the loaded classifier; the base alone,
    whose head would be random, is refused (E501)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(100)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w3", pad_token="w1")
    base = tmp_path / "base"
    base.mkdir()
    for f in (roberta / "mlm_base").iterdir():
        (base / f.name).symlink_to(f)
    fast.save_pretrained(base)
    rows = [{"text": f"w{5 + i} w{9 + 2 * i} w{20 + i}", "label": i % 3} for i in range(12)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("a", "b"):
        (tmp_path / name).symlink_to(roberta / name)
    recipe = write_recipe(tmp_path, "0.5*a + 0.5*b", {"a": "a", "b": "b"},
                          "eval:\n  - name: acc\n    models: [mix]\n    metric: accuracy\n    data: data.jsonl\n"
                          "    labels: {0: 0, 1: 1, 2: 2}\n")
    result = peftdsl.load(recipe).run(report=tmp_path / "report")
    value = result.results[0].value
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "merged").eval()
    batch = fast([r["text"] for r in rows], return_tensors="pt", padding=True)
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(-1)
    expected = sum(int(p) == r["label"] for p, r in zip(predicted, rows)) / len(rows)
    assert value == pytest.approx(expected)
    text = recipe.read_text().replace("models: [mix]", "models: [base, mix]")
    recipe.write_text(text)
    assert main(["run", "--quiet", "--force", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert "error[E501]" in err and "newly initialised" in err and "classifier." in err


def test_part_shapes_must_agree(roberta, tmp_path, capsys):
    other = tmp_path / "wide"
    make_lora(other, base=tiny_roberta(labels=5), seed=7, targets=("query", "value"), task_type="SEQ_CLS")
    (tmp_path / "base").symlink_to(roberta / "mlm_base")
    (tmp_path / "a").symlink_to(roberta / "a")
    recipe = write_recipe(tmp_path, "0.5*a + 0.5*wide", {"a": "a", "wide": "wide"})
    assert main(["lint", "--format", "concise", str(recipe)]) == 1
    out = capsys.readouterr().out
    assert "error[I307] `classifier.out_proj.bias` has shape 5 in `wide` but 3 in `a`" in out


def model_state(base_dir: Path, auto=AutoModelForCausalLM) -> dict[str, torch.Tensor]:
    """The base's tensors as the model sees them: a tied `lm_head.weight` is the embedding."""
    return {k: v.detach().float().clone() for k, v in auto.from_pretrained(base_dir).state_dict().items()}


def test_saved_lm_head_of_a_tied_model_is_untied(tmp_path):
    """GPT-2 stores `lm_head` only as `wte` (tied). A saved `lm_head` composes against that
    shared tensor, and the merged model gets an `lm_head` of its own, untied."""
    tiny_gpt2().save_pretrained(tmp_path / "base")
    for i, name in enumerate(("a", "b"), start=1):
        make_lora(tmp_path / name, base="gpt2", targets=("c_attn",), seed=i, modules_to_save=["lm_head"])
    recipe = write_recipe(tmp_path, "0.7*a + 0.7*b", {"a": "a", "b": "b"})
    peftdsl.load(recipe).run()
    reference = task_arithmetic(model_state(tmp_path / "base"),
                                [peft_merged(tmp_path / "base", tmp_path / n) for n in ("a", "b")], [0.7, 0.7])
    out = tmp_path / "out" / "merged"
    got = output_state(out)
    assert_matches(reference, got)
    assert not torch.equal(got["lm_head.weight"], got["transformer.wte.weight"])
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    ids = torch.tensor([[3, 4, 5, 6]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                           tmp_path / "out" / "mix").eval()
    assert torch.allclose(logits(loaded, ids), logits(AutoModelForCausalLM.from_pretrained(out).eval(), ids),
                          atol=1e-4)


def test_ia3_with_a_saved_module(tmp_path):
    from factories import make_ia3

    tiny_llama().save_pretrained(tmp_path / "base")
    for i, name in enumerate(("a", "b"), start=1):
        make_ia3(tmp_path / name, seed=i)
        # PEFT's IA3Config takes modules_to_save too; give the saved head a trained value.
        config = json.loads((tmp_path / name / "adapter_config.json").read_text())
        config["modules_to_save"] = ["lm_head"]
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(config))
        weights = tmp_path / name / "adapter_model.safetensors"
        from safetensors.torch import save_file

        tensors = load_file(weights)
        head = base_state(tmp_path / "base")["lm_head.weight"]
        tensors["base_model.model.lm_head.weight"] = head + 0.05 * torch.randn(head.shape,
                                                                             generator=torch.Generator().manual_seed(i))
        save_file(tensors, weights, metadata={"format": "pt"})
    recipe = write_recipe(tmp_path, "0.6*a + 0.6*b", {"a": "a", "b": "b"})
    peftdsl.load(recipe).run()
    reference = task_arithmetic(base_state(tmp_path / "base"),
                                [peft_merged(tmp_path / "base", tmp_path / n) for n in ("a", "b")], [0.6, 0.6])
    got = output_state(tmp_path / "out" / "merged")
    assert_matches({"lm_head.weight": reference["lm_head.weight"]}, got)
    config = json.loads((tmp_path / "out" / "mix" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3" and config["modules_to_save"] == ["lm_head"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                           tmp_path / "out" / "mix").eval()
    head = loaded.base_model.model.lm_head.modules_to_save["default"].weight
    assert torch.allclose(head, reference["lm_head.weight"], atol=ATOL)
