"""The shipped demo (recipes/demo): assets load offline, stay small, hold no pickles,
and every recipe is valid YAML that names adapter folders which exist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "demo"
ASSETS = DEMO / "assets"
DATA = DEMO / "data"
ADAPTERS = sorted(p for p in (ASSETS / "adapters").iterdir() if p.is_dir()) if (ASSETS / "adapters").is_dir() else []
ARCH = ASSETS / "arch"
ARCH_ADAPTERS = sorted(p for p in ARCH.glob("*/adapters/*") if p.is_dir()) if ARCH.is_dir() else []
RECIPES = sorted(DEMO.glob("*.yaml"))
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}

pytestmark = pytest.mark.skipif(not ASSETS.is_dir(), reason="demo assets not built")


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _files(*roots):
    return [p for r in roots for p in r.rglob("*") if p.is_file()]


def test_size_within_budget():
    total = sum(p.stat().st_size for p in _files(ASSETS, DATA))
    assert total <= 5 * 2**20, f"demo assets and data are {total / 2**20:.2f} MiB (limit 5 MiB)"


def test_no_pickles_shipped():
    bad = [p for p in _files(DEMO) if p.suffix in PICKLE_SUFFIXES]
    assert not bad, bad
    for d in ADAPTERS:
        assert (d / "adapter_model.safetensors").is_file(), d
    assert (ASSETS / "base" / "model.safetensors").is_file()


def test_base_and_tokenizer_load_offline():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSETS / "base")
    assert len(tok) <= 512
    assert tok.pad_token is not None and tok.eos_token is not None and tok.bos_token is not None
    ids = tok("the film was great .")["input_ids"]
    assert tok.unk_token_id not in ids
    model = AutoModelForCausalLM.from_pretrained(ASSETS / "base").eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("adapter", ADAPTERS, ids=lambda p: p.name)
def test_adapter_loads_with_peft(adapter):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] in ("LORA", "IA3")
    base = AutoModelForCausalLM.from_pretrained(ASSETS / "base").eval()
    model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("adapter", ARCH_ADAPTERS, ids=lambda p: f"{p.parts[-3]}/{p.name}")
def test_arch_adapter_loads_with_peft_on_its_base(adapter):
    """RoBERTa / T5 / GPT-2 adapters load on their own base, offline, with the class of their task."""
    import torch
    from peft import PeftModel
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
    )

    config = json.loads((adapter / "adapter_config.json").read_text())
    base_dir = adapter.parents[1] / "base"
    assert (adapter / config["base_model_name_or_path"]).resolve() == base_dir.resolve()
    auto = {"SEQ_CLS": AutoModelForSequenceClassification, "SEQ_2_SEQ_LM": AutoModelForSeq2SeqLM,
            "CAUSAL_LM": AutoModelForCausalLM}[config["task_type"]]
    kwargs = {"num_labels": 2} if config["task_type"] == "SEQ_CLS" else {}
    model = PeftModel.from_pretrained(auto.from_pretrained(base_dir, **kwargs), adapter).eval()
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    extra = {"decoder_input_ids": torch.tensor([[0, 5]])} if config["task_type"] == "SEQ_2_SEQ_LM" else {}
    with torch.no_grad():
        out = model(input_ids=ids, **extra).logits
    assert torch.isfinite(out).all()
    if config["task_type"] == "SEQ_CLS":   # the head is the adapter's (modules_to_save), not the base's
        assert config["modules_to_save"] and "classifier" in config["modules_to_save"]
        assert out.shape == (1, 2)


def test_data_files_are_well_formed():
    for p in sorted(DATA.glob("*.jsonl")):
        for line in p.read_text().splitlines():
            row = json.loads(line)
            if "input" in row:   # seq2seq perplexity: the target given the input
                assert isinstance(row["input"], str) and row["input"] and row["target"], p
                continue
            assert "text" in row, p
            assert "label" in row or ("choices" in row and 0 <= row["answer"] < len(row["choices"])), p
    for p in sorted(DATA.glob("*.txt")):
        assert all(line.strip() for line in p.read_text().splitlines()), p


def _paths(recipe_dir, recipe):
    adapters = recipe.get("adapters") or {}
    for name, src in adapters.items():
        yield name, recipe_dir / (src if isinstance(src, str) else src["path"]), src


@pytest.mark.parametrize("recipe_path", RECIPES, ids=lambda p: p.name)
def test_recipe_is_valid_and_names_existing_adapters(recipe_path):
    text = recipe_path.read_text()
    assert text.startswith("# yaml-language-server: $schema=../../peftdsl.schema.json\n")
    recipe = yaml.safe_load(text)
    assert recipe["peftdsl"] == 1
    assert (recipe_path.parent / recipe["base"] / "config.json").is_file()
    for name, path, src in _paths(recipe_path.parent, recipe):
        assert (path / "adapter_config.json").is_file(), f"{recipe_path.name}: {name} -> {path}"
        assert isinstance(src, dict) and "kind" in src, f"{recipe_path.name}: declare kind for {name}"
        config = json.loads((path / "adapter_config.json").read_text())
        assert src["kind"] == config["peft_type"].lower()
        if src["kind"] == "lora":
            assert src["rank"] == config["r"]
    for entry in recipe.get("eval") or []:
        assert entry["metric"] in ("perplexity", "accuracy", "generate")
        assert (recipe_path.parent / entry["data"]).is_file(), entry["data"]
    for out in (recipe.get("outputs") or {}).values():
        path = out if isinstance(out, str) else out["path"]
        assert path.startswith("../../out/"), path
