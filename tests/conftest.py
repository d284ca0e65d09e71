"""Shared fixtures: a folder of tiny adapters and a base model that the recipe corpus lints against.

`corpus_root` is a session-scoped temporary folder holding `fixtures/` (adapters, a
base model, data files). Corpus recipes are copied beside it and linted there, so a
recipe can write `fixtures/lora_r4` as a relative path and a rendering shows the same
paths on every machine.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import warnings
from pathlib import Path

import pytest

BASE_NAME = "tiny-llama"

# Every canonical form any test makes — in process, in a subprocess, on a Ray worker — is
# checked against the canonical-form invariants as it is made: a violation fails the test.
os.environ["PEFTDSL_CHECK_INVARIANTS"] = "1"
import peftdsl.canonical  # noqa: E402

peftdsl.canonical.CHECK_INVARIANTS = True  # in case peftdsl was imported before this file


def build_fixtures(folder: Path) -> None:
    """Tiny adapters (good and broken) and a base model, built offline in a few seconds."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from factories import make_ia3, make_lora, save_tiny_gpt2, save_tiny_llama, tiny_llama

    folder.mkdir(parents=True, exist_ok=True)
    save_tiny_llama(folder / "base")
    # Good adapters of one base.
    make_lora(folder / "lora_r4", r=4, seed=1, base_model_name_or_path=BASE_NAME)
    make_lora(folder / "lora_r4b", r=4, seed=2, base_model_name_or_path=BASE_NAME)
    make_lora(folder / "lora_r8", r=8, seed=3, base_model_name_or_path=BASE_NAME)
    make_ia3(folder / "ia3", seed=4, base_model_name_or_path=BASE_NAME)
    make_ia3(folder / "ia3_b", seed=5, base_model_name_or_path=BASE_NAME)
    # (IA)³ whose `down_proj` is not feed-forward: T405 against `ia3`.
    make_ia3(folder / "ia3_ff_other", seed=6, feedforward=(), base_model_name_or_path=BASE_NAME)
    # Other bases: GPT-2 module names, a wider Llama, another recorded base name.
    make_lora(folder / "gpt2_lora", base="gpt2", targets=("c_attn",), seed=7, base_model_name_or_path=BASE_NAME)
    # A GPT-2 base (its `wte` is tied to `lm_head`) and a LoRA on that embedding: I313.
    save_tiny_gpt2(folder / "gpt2_base")
    make_lora(folder / "gpt2_wte", base="gpt2", targets=("c_attn", "wte"), seed=11, base_model_name_or_path=BASE_NAME)
    make_lora(folder / "lora_wide", base=tiny_llama(hidden=96, intermediate=192), seed=8,
              base_model_name_or_path=BASE_NAME)
    make_lora(folder / "lora_other_base", r=4, seed=9, base_model_name_or_path="other-org/other-model")
    # Adapters that save `lm_head` (modules_to_save): composed as task vectors against the base.
    make_lora(folder / "head_a", r=4, seed=12, modules_to_save=["lm_head"], base_model_name_or_path=BASE_NAME)
    make_lora(folder / "head_b", r=4, seed=13, modules_to_save=["lm_head"], base_model_name_or_path=BASE_NAME)
    # A full fine-tune of the base: its task vector is dense.
    tuned = tiny_llama()
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(0.01)
    tuned.save_pretrained(folder / "full_ft")
    # Unsupported or broken adapters.
    make_lora(folder / "dora", use_dora=True, seed=10, base_model_name_or_path=BASE_NAME)
    _copy_with(folder / "lora_r4", folder / "loha", config={"peft_type": "LOHA"})
    _copy_with(folder / "lora_r4", folder / "broken_config", config_text="{\"peft_type\": \"LORA\", ")
    _copy_with(folder / "lora_r4", folder / "no_config", config_text=None)
    _copy_with(folder / "lora_r4", folder / "truncated")
    weights = folder / "truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _copy_with(folder / "lora_r4", folder / "rank_lie", config={"r": 6})
    # A `.bin`-only adapter: a tiny pickle, written here and never committed.
    pickled = folder / "pickled"
    pickled.mkdir()
    shutil.copy(folder / "lora_r4" / "adapter_config.json", pickled)
    torch.save({"x": torch.zeros(1)}, pickled / "adapter_model.bin")
    (folder / "not_a_folder.txt").write_text("a file, not an adapter folder\n")
    # Weights that are a symlink out of the adapter's folder (I312), to a sibling's file.
    linked = folder / "link_outside"
    linked.mkdir()
    shutil.copy(folder / "lora_r4" / "adapter_config.json", linked)
    (linked / "adapter_model.safetensors").symlink_to(Path("..") / "lora_r4" / "adapter_model.safetensors")
    data = folder / "data"
    data.mkdir()
    (data / "toxic.txt").write_text("a line of text\nanother line\n")
    (data / "sst2.jsonl").write_text(json.dumps({"text": "good", "label": "positive"}) + "\n")
    (data / "table.csv").write_text("text,label\n")
    _check_header(weights)


def _copy_with(src: Path, dst: Path, *, config: dict | None = None, config_text: str | None = "") -> None:
    shutil.copytree(src, dst)
    path = dst / "adapter_config.json"
    if config is not None:
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}, indent=2))
    elif config_text is None:
        path.unlink()
    elif config_text:
        path.write_text(config_text)


def _check_header(weights: Path) -> None:
    """The truncated file must still have a readable header, so the error is about the data."""
    raw = weights.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    assert 8 + length < len(raw)


@pytest.fixture(scope="session")
def corpus_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    with warnings.catch_warnings():  # PEFT's remarks about the made-up base model names
        warnings.simplefilter("ignore")
        build_fixtures(root / "fixtures")
    return root
