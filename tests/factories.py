"""Tiny, seeded models and PEFT adapters built offline for tests.

Every numerical test needs a base model and adapters whose factors are not
zero: PEFT initialises LoRA's B to zero and (IA)³'s l to one, which would make
every comparison vacuous (0 == 0). These helpers build 2-layer width-64 models
in about a second, fill every adapter parameter from a seeded
``torch.Generator`` and save with ``save_pretrained`` (safetensors), so the
same seed always gives the same bytes and no test ever downloads anything.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

VOCAB = 128


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_llama(
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    intermediate: int = 128,
    vocab: int = VOCAB,
    heads: int = 4,
    kv_heads: int = 2,
) -> LlamaForCausalLM:
    """A randomly initialised Llama small enough to build in about a second.

    ``kv_heads < heads`` (grouped-query attention) so that k_proj/v_proj have a
    different output width than q_proj: shape mismatches between modules are
    then visible to the code under test.
    """
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)  # transformers initialises from the global generator
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(
    seed: int = 0,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    vocab: int = VOCAB,
    positions: int = 64,
) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2: its ``Conv1D`` layers exercise ``fan_in_fan_out``."""
    config = GPT2Config(
        vocab_size=vocab,
        n_positions=positions,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        bos_token_id=vocab - 1,
        eos_token_id=vocab - 1,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def save_tiny_llama(directory: str | Path, seed: int = 0, **kw) -> Path:
    """Build :func:`tiny_llama` and save it as a Hugging Face model directory."""
    return _save_model(tiny_llama(seed, **kw), directory)


def save_tiny_gpt2(directory: str | Path, seed: int = 0, **kw) -> Path:
    """Build :func:`tiny_gpt2` and save it as a Hugging Face model directory."""
    return _save_model(tiny_gpt2(seed, **kw), directory)


def _save_model(model: PreTrainedModel, directory: str | Path) -> Path:
    path = Path(directory)
    model.save_pretrained(path, safe_serialization=True)
    return path


def build_base(base: str | Path | PreTrainedModel, seed: int = 0) -> PreTrainedModel:
    """A base model from a name (``"llama"``/``"gpt2"``), a saved directory or a model.

    A model passed in is returned as is; PEFT wraps it in place, so callers that
    reuse a model should pass a fresh one each time.
    """
    if isinstance(base, PreTrainedModel):
        return base
    if base == "llama":
        return tiny_llama(seed)
    if base == "gpt2":
        return tiny_gpt2(seed)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base).eval()


def _fill_lora_factors(model: torch.nn.Module, adapter: str, seed: int, init_scale: float) -> None:
    """Overwrite every LoRA factor with seeded noise so that B·A is not zero.

    Parameters are visited in name order so that the draw does not depend on
    module registration order.
    """
    generator = _seeded(seed)
    wanted = (f"lora_A.{adapter}.", f"lora_B.{adapter}.", f"lora_embedding_A.{adapter}", f"lora_embedding_B.{adapter}")
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if any(key in name for key in wanted):
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.copy_(noise * init_scale)


def make_lora(
    directory: str | Path,
    *,
    base: str | Path | PreTrainedModel = "llama",
    seed: int = 0,
    base_seed: int = 0,
    r: int = 4,
    alpha: float = 8,
    targets: Iterable[str] = ("q_proj", "v_proj"),
    use_rslora: bool = False,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    fan_in_fan_out: bool = False,
    use_dora: bool = False,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    init_scale: float = 0.1,
    **extra,
) -> Path:
    """Save a LoRA adapter with seeded, non-zero factors and return its directory.

    ``extra`` goes to ``LoraConfig`` (``modules_to_save``, ``bias``, ``lora_bias``,
    ``trainable_token_indices``…); the parts it trains get seeded noise too.

    ``base="gpt2"`` needs ``targets=("c_attn",)`` or similar and sets
    ``fan_in_fan_out`` itself (GPT-2's ``Conv1D`` stores weights in×out).
    Embedding LoRA: include ``"embed_tokens"`` (llama) or ``"wte"`` (gpt2).
    """
    model = build_base(base, base_seed)
    if base == "gpt2":
        fan_in_fan_out = True
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(targets),
        use_rslora=use_rslora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        fan_in_fan_out=fan_in_fan_out,
        use_dora=use_dora,
        lora_dropout=0.0,
        task_type=task_type,
        **extra,
    )
    peft_model = get_peft_model(model, config)
    _fill_lora_factors(peft_model, "default", seed, init_scale)
    fill_parts(peft_model, seed + 1000)
    return _save_adapter(peft_model, directory, base_model_name_or_path)


def fill_parts(model: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Move every trainable tensor beside the factors (saved modules, biases, token rows) by
    seeded noise, so that its task vector against the base is not zero."""
    generator = _seeded(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.requires_grad and "lora_" not in name:
                param.add_(torch.randn(param.shape, generator=generator, dtype=torch.float32) * scale)


def make_ia3(
    directory: str | Path,
    *,
    base: str | Path | PreTrainedModel = "llama",
    seed: int = 0,
    base_seed: int = 0,
    targets: Iterable[str] = ("k_proj", "v_proj", "down_proj"),
    feedforward: Iterable[str] = ("down_proj",),
    spread: float = 0.2,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Save an (IA)³ adapter whose vectors are ``1 + spread·N(0, 1)`` (seeded).

    PEFT initialises l to exactly one, which is the identity; values around one
    make the adapter's effect, l − 1, non-zero and of either sign.
    """
    model = build_base(base, base_seed)
    config = IA3Config(
        target_modules=list(targets),
        feedforward_modules=list(feedforward),
        fan_in_fan_out=base == "gpt2",
        task_type=task_type,
    )
    peft_model = get_peft_model(model, config)
    generator = _seeded(seed)
    with torch.no_grad():
        for name, param in sorted(peft_model.named_parameters()):
            if "ia3_l.default" in name:
                noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
                param.copy_(1.0 + spread * noise)
    return _save_adapter(peft_model, directory, base_model_name_or_path)


def _save_adapter(peft_model: PeftModel, directory: str | Path, base_name: str | None) -> Path:
    """Save with safetensors; ``base_name`` overrides the recorded base model."""
    path = Path(directory)
    if base_name is not None:
        peft_model.peft_config["default"].base_model_name_or_path = base_name
    peft_model.save_pretrained(path, safe_serialization=True)
    return path


def load_peft(
    base: str | Path | PreTrainedModel,
    adapters: Mapping[str, str | Path],
    *,
    base_seed: int = 0,
) -> PeftModel:
    """A fresh PeftModel with each adapter of ``adapters`` loaded under its name.

    The first adapter is the active one. Use it for reference computations
    (``get_delta_weight``, ``add_weighted_adapter``, forward passes).
    """
    if not adapters:
        raise ValueError("load_peft needs at least one adapter")
    model = build_base(base, base_seed)
    items = list(adapters.items())
    first_name, first_dir = items[0]
    peft_model = PeftModel.from_pretrained(model, first_dir, adapter_name=first_name)
    for name, directory in items[1:]:
        peft_model.load_adapter(directory, adapter_name=name)
    peft_model.eval()
    return peft_model


# Words of the tiny tokenizer: enough for short English-like test sentences.
TOKENIZER_WORDS = (
    "the a cat dog bird sat ran flew on under over mat log tree is was good bad great awful "
    "movie film game food it this that and very not i you we like love hate yes no positive negative"
).split()


def tiny_tokenizer(vocab_size: int = 128, words: Iterable[str] = TOKENIZER_WORDS):
    """A word-level tokenizer (ids 0–3 special, BOS added) that fits the tiny models' vocab."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({word: i + 4 for i, word in enumerate(dict.fromkeys(words))})
    assert len(vocab) <= vocab_size
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def save_tiny_llama_with_tokenizer(directory: str | Path, seed: int = 0, **kw) -> Path:
    """A tiny Llama with a tokenizer saved beside it: a base that `eval` entries can run on."""
    path = save_tiny_llama(directory, seed, **kw)
    tiny_tokenizer().save_pretrained(path)
    return path
