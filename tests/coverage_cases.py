"""The coverage matrix as data: which architectures × which adapter features, and what to expect.

`tests/test_coverage.py` runs one test per cell; `scripts/coverage_table.py` turns the same
cells (and a run's results) into the README's support table. Nothing here imports torch,
so the script can check the table in a fraction of a second.

A cell is one of

- `Supported`: peftdsl composes `0.7 * a - 0.3 * b` of two random adapters and the test checks
  the merged model's every tensor against PEFT's own merge, the adapter output's logits in
  PEFT against the merged model's, and that the merged model loads in its Auto class;
- `Refused(code, message)`: peftdsl refuses the cell on purpose, and the test asserts
  that diagnostic (its code, and its message as a regex over the whole text);
- `KnownWrong(reason)`: peftdsl gives a wrong result or fails; the test is a strict xfail;
- `NotApplicable(reason)`: the pair makes no sense (no Conv1D layers, no LM head…); skipped.

Adding a feature is one `Feature(...)` line in `FEATURES` (with a function that builds its
PEFT config for an architecture); adding an architecture is one `Arch(...)` in `ARCHS`.
A feature's `expect` says what every architecture does with it; `REFUSED` and `KNOWN_WRONG`
name the cells that differ. When peftdsl starts supporting a refused feature, drop its
`expect`; when a known-wrong cell is fixed, its strict xfail fails until its entry is gone.
After any change, `python scripts/coverage_table.py` regenerates the README's table.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS = "CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS"

# ----------------------------------------------------------------------- outcomes


@dataclass(frozen=True, slots=True)
class Supported:
    pass


@dataclass(frozen=True, slots=True)
class Refused:
    code: str
    message: str  # a regex that each error's whole message matches (the adapters are named `a` and `b`)


@dataclass(frozen=True, slots=True)
class KnownWrong:
    reason: str


@dataclass(frozen=True, slots=True)
class NotApplicable:
    reason: str


Outcome = Supported | Refused | KnownWrong | NotApplicable
SUPPORTED = Supported()

# ----------------------------------------------------------------------- architectures


@dataclass(frozen=True, slots=True, kw_only=True)
class Arch:
    """A tiny random model of one architecture, and the names PEFT targets in it.

    Module names are suffixes, as in a PEFT `target_modules` list.
    """

    id: str
    title: str
    model: str  # the transformers class, e.g. `LlamaForCausalLM`
    config: str  # its config class
    settings: Mapping[str, object]  # config keywords: 2 layers, width 32, vocabulary 96
    task: str = CAUSAL_LM
    attention: tuple[str, ...]
    mlp: tuple[str, ...]  # the dense MLP's linear layers (none in Mixtral: its experts are fused)
    ia3: tuple[str, ...]  # (IA)³ targets, as PEFT's default mapping has them
    feedforward: tuple[str, ...]  # of which feed-forward (input-scaled)
    embedding: str  # the input embedding
    lm_head: str | None = "lm_head"  # the output layer; None: the model has none
    ties: bool = False  # whether the default config ties the embedding to the output layer
    conv1d: bool = False  # GPT-2's Conv1D layers (weights stored in×out)
    biases: str = "none"  # which attention/MLP layers carry a bias: "all", "qkv" or "none"
    experts: tuple[str, ...] = ()  # fused MoE expert parameters
    router: str | None = None  # the MoE router's weight (not an nn.Linear in transformers 5)

    @property
    def linear(self) -> tuple[str, ...]:
        return self.attention + self.mlp

    @property
    def biased(self) -> tuple[str, ...]:
        return {"all": self.linear, "qkv": ("q_proj", "k_proj", "v_proj"), "none": ()}[self.biases]


VOCAB = 96
_DECODER = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2,
            "pad_token_id": 0}
_GQA = dict(_DECODER, num_key_value_heads=2)
_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
_GATED = ("gate_proj", "up_proj", "down_proj")
_ENCODER = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 64, "max_position_embeddings": 72, "num_labels": 3}
_BERT_LIKE = {"attention": ("query", "key", "value", "attention.output.dense"),
              "mlp": ("intermediate.dense", "output.dense"), "ia3": ("key", "value", "output.dense"),
              "feedforward": ("output.dense",), "embedding": "word_embeddings", "lm_head": None, "ties": True,
              "biases": "all", "task": SEQ_CLS}

ARCHS: tuple[Arch, ...] = (
    Arch(id="gpt2", title="GPT-2", model="GPT2LMHeadModel", config="GPT2Config",
         settings={"vocab_size": VOCAB, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 4,
                   "bos_token_id": 1, "eos_token_id": 2},
         attention=("c_attn", "attn.c_proj"), mlp=("c_fc", "mlp.c_proj"), ia3=("c_attn", "mlp.c_proj"),
         feedforward=("mlp.c_proj",), embedding="wte", ties=True, conv1d=True, biases="all"),
    Arch(id="llama", title="Llama (GQA)", model="LlamaForCausalLM", config="LlamaConfig", settings=_GQA,
         attention=_QKVO, mlp=_GATED, ia3=("k_proj", "v_proj", "down_proj"), feedforward=("down_proj",),
         embedding="embed_tokens"),
    Arch(id="qwen2", title="Qwen2", model="Qwen2ForCausalLM", config="Qwen2Config", settings=_GQA,
         attention=_QKVO, mlp=_GATED, ia3=("q_proj", "v_proj", "down_proj"), feedforward=("down_proj",),
         embedding="embed_tokens", biases="qkv"),
    Arch(id="gemma", title="Gemma", model="GemmaForCausalLM", config="GemmaConfig",
         settings=dict(_DECODER, num_key_value_heads=1, head_dim=8),
         attention=_QKVO, mlp=_GATED, ia3=("q_proj", "v_proj", "down_proj"), feedforward=("down_proj",),
         embedding="embed_tokens", ties=True),
    Arch(id="phi3", title="Phi-3 (fused qkv, gate_up)", model="Phi3ForCausalLM", config="Phi3Config",
         settings=_GQA, attention=("qkv_proj", "o_proj"), mlp=("gate_up_proj", "down_proj"),
         ia3=("qkv_proj", "down_proj"), feedforward=("down_proj",), embedding="embed_tokens"),
    Arch(id="gpt_neox", title="GPT-NeoX (fused qkv)", model="GPTNeoXForCausalLM", config="GPTNeoXConfig",
         settings=_DECODER, attention=("query_key_value", "attention.dense"), mlp=("dense_h_to_4h", "dense_4h_to_h"),
         ia3=("query_key_value", "dense_4h_to_h"), feedforward=("dense_4h_to_h",), embedding="embed_in",
         biases="all"),
    Arch(id="mistral", title="Mistral", model="MistralForCausalLM", config="MistralConfig", settings=_GQA,
         attention=_QKVO, mlp=_GATED, ia3=("k_proj", "v_proj", "down_proj"), feedforward=("down_proj",),
         embedding="embed_tokens"),
    Arch(id="opt", title="OPT", model="OPTForCausalLM", config="OPTConfig",
         settings=dict(_DECODER, ffn_dim=64, word_embed_proj_dim=32),
         attention=("q_proj", "k_proj", "v_proj", "out_proj"), mlp=("fc1", "fc2"), ia3=("q_proj", "k_proj", "fc2"),
         feedforward=("fc2",), embedding="embed_tokens", ties=True, biases="all"),
    Arch(id="bloom", title="Bloom (fused qkv)", model="BloomForCausalLM", config="BloomConfig",
         settings={"vocab_size": VOCAB, "hidden_size": 32, "n_layer": 2, "n_head": 4, "bos_token_id": 1,
                   "eos_token_id": 2, "pad_token_id": 0},
         attention=("query_key_value", "self_attention.dense"), mlp=("dense_h_to_4h", "dense_4h_to_h"),
         ia3=("query_key_value", "mlp.dense_4h_to_h"), feedforward=("mlp.dense_4h_to_h",),
         embedding="word_embeddings", ties=True, biases="all"),
    Arch(id="falcon", title="Falcon (fused qkv)", model="FalconForCausalLM", config="FalconConfig",
         settings={"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                   "bos_token_id": 1, "eos_token_id": 2},
         attention=("query_key_value", "self_attention.dense"), mlp=("dense_h_to_4h", "dense_4h_to_h"),
         ia3=("query_key_value", "dense_4h_to_h"), feedforward=("dense_4h_to_h",), embedding="word_embeddings",
         ties=True),
    Arch(id="mixtral", title="Mixtral (MoE)", model="MixtralForCausalLM", config="MixtralConfig",
         settings=dict(_GQA, num_local_experts=4, num_experts_per_tok=2),
         # no dense MLP: (IA)³'s feed-forward module is the attention output projection here
         attention=_QKVO, mlp=(), ia3=("k_proj", "v_proj", "o_proj"), feedforward=("o_proj",),
         embedding="embed_tokens", experts=("experts.gate_up_proj", "experts.down_proj"), router="mlp.gate.weight"),
    Arch(id="qwen2_moe", title="Qwen2-MoE", model="Qwen2MoeForCausalLM", config="Qwen2MoeConfig",
         settings=dict(_GQA, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
                       num_experts_per_tok=2),
         attention=_QKVO, mlp=("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj",
                               "shared_expert_gate"),
         ia3=("k_proj", "v_proj", "shared_expert.down_proj"), feedforward=("shared_expert.down_proj",),
         embedding="embed_tokens", biases="qkv", experts=("experts.gate_up_proj", "experts.down_proj"),
         router="mlp.gate.weight"),
    Arch(id="t5", title="T5 (seq2seq)", model="T5ForConditionalGeneration", config="T5Config", task=SEQ_2_SEQ_LM,
         settings={"vocab_size": VOCAB, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2,
                   "num_decoder_layers": 2, "num_heads": 4, "decoder_start_token_id": 0, "pad_token_id": 0,
                   "eos_token_id": 2},
         attention=("q", "k", "v", "o"), mlp=("wi", "wo"), ia3=("k", "v", "wo"), feedforward=("wo",),
         embedding="shared", ties=True),
    Arch(id="roberta", title="RoBERTa (classifier)", model="RobertaForSequenceClassification",
         config="RobertaConfig", settings=_ENCODER, **_BERT_LIKE),
    Arch(id="bert", title="BERT (classifier)", model="BertForSequenceClassification", config="BertConfig",
         settings=_ENCODER, **_BERT_LIKE),
)

# ----------------------------------------------------------------------- features


@dataclass(frozen=True, slots=True, kw_only=True)
class Adapter:
    """How to build each of the two adapters of a cell: a PEFT config and how to save it."""

    peft_type: str = "LORA"  # LORA | IA3 | FULL (a fine-tuned checkpoint: a model folder, no PEFT)
    config: Mapping[str, object] = field(default_factory=dict)  # LoraConfig / IA3Config keywords
    tie: bool = False  # build the base with tie_word_embeddings=True
    convert: bool = False  # save with PEFT's `path_initial_model_for_weight_conversion`


Build = Callable[[Arch], "Adapter | NotApplicable"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Feature:
    id: str
    title: str  # the table's column heading
    doc: str  # what the column means, for the table's legend
    build: Build
    expect: Supported | Refused = SUPPORTED
    weights: tuple[float, float] = (0.7, -0.3)  # the composition is weights[0]·a + weights[1]·b

    @property
    def expression(self) -> str:
        first, second = self.weights
        return f"{first} * a {'-' if second < 0 else '+'} {abs(second)} * b"


def _lora(**config) -> Adapter:
    return Adapter(config=config)


def _regex(arch: Arch) -> str:
    """PEFT full-matches a string `target_modules` against module names: here, two kinds of layer in block 1."""
    first, last = arch.attention[0], (arch.mlp or arch.attention)[-1]
    return rf".*\.1\.(?:.*\.)?(?:{re.escape(first)}|{re.escape(last)})"


def _needs(condition: bool, reason: str, build: Callable[[], Adapter]) -> Adapter | NotApplicable:
    return build() if condition else NotApplicable(reason)


_NO_HEAD = "a sequence classifier has no LM head"


def _flag_refused(flag: str, reason: str) -> Refused:
    return Refused("I303", rf"adapter `[ab]` uses `{flag}`: {reason}")


_TARGET_PARAMETERS = _flag_refused("target_parameters", r"LoRA on raw parameters \(`target_parameters`\) is not "
                                   "supported")

FEATURES: tuple[Feature, ...] = (
    Feature(id="all_linear", title="`all-linear`", doc="`target_modules=\"all-linear\"`",
            build=lambda a: _lora(target_modules="all-linear")),
    Feature(id="regex", title="regex targets", doc="a regex string as `target_modules` (two layers of block 1)",
            build=lambda a: _lora(target_modules=_regex(a))),
    Feature(id="exclude", title="`exclude_modules`", doc="`all-linear` minus `exclude_modules`",
            build=lambda a: _lora(target_modules="all-linear", exclude_modules=[*a.attention[1:2], *a.mlp[:1]])),
    Feature(id="layers", title="`layers_to_transform`", doc="`layers_to_transform=[1]`",
            build=lambda a: _lora(target_modules=list(a.linear), layers_to_transform=[1])),
    Feature(id="patterns", title="rank/alpha patterns", doc="`rank_pattern` and `alpha_pattern`",
            build=lambda a: _lora(target_modules=list(a.linear),
                                  rank_pattern={a.attention[0]: 2, a.linear[-1]: 6},
                                  alpha_pattern={a.attention[0]: 3, a.attention[-1]: 12})),
    Feature(id="rslora", title="rsLoRA", doc="`use_rslora=True` (scaling α/√r)",
            build=lambda a: _lora(target_modules=list(a.linear), use_rslora=True)),
    Feature(id="embedding", title="embedding", doc="LoRA on the input embedding (`embed_tokens`, `wte`, …)",
            build=lambda a: _lora(target_modules=[a.embedding, a.attention[0]])),
    Feature(id="lm_head", title="`lm_head`", doc="LoRA on the output layer (tied to the embedding where the "
            "architecture ties them by default)",
            build=lambda a: _needs(a.lm_head is not None, _NO_HEAD,
                                   lambda: _lora(target_modules=[a.lm_head, a.attention[0]]))),
    Feature(id="tied", title="tied embeddings", doc="LoRA on both the embedding and the output layer of a base "
            "built with `tie_word_embeddings=True`: both deltas land on the one shared tensor",
            build=lambda a: _needs(a.lm_head is not None, _NO_HEAD,
                                   lambda: Adapter(config={"target_modules": [a.embedding, a.lm_head]}, tie=True))),
    Feature(id="fan_in_fan_out", title="`fan_in_fan_out`", doc="`fan_in_fan_out=True` on Conv1D layers "
            "(other GPT-2 cells leave it unset: PEFT then sets it itself)",
            build=lambda a: _needs(a.conv1d, "no Conv1D layers",
                                   lambda: _lora(target_modules=list(a.linear), fan_in_fan_out=True))),
    Feature(id="ia3", title="(IA)³", doc="(IA)³ with `feedforward_modules`",
            build=lambda a: Adapter(peft_type="IA3", config={"target_modules": list(a.ia3),
                                                             "feedforward_modules": list(a.feedforward)})),
    Feature(id="pissa_converted", title="PiSSA, converted", doc="`init_lora_weights=\"pissa\"`, saved with "
            "`path_initial_model_for_weight_conversion`",
            build=lambda a: Adapter(config={"target_modules": list(a.attention), "init_lora_weights": "pissa"},
                                    convert=True)),
    Feature(id="pissa", title="PiSSA, as trained", doc="`init_lora_weights=\"pissa\"`, saved without conversion",
            build=lambda a: _lora(target_modules=list(a.attention), init_lora_weights="pissa"),
            expect=Refused("I303", r"adapter `[ab]` was initialised with `init_lora_weights: pissa`, which rewrites "
                           r"the base weights when PEFT loads it: its factors are not a delta on the base")),
    Feature(id="dora", title="DoRA", doc="`use_dora=True`",
            build=lambda a: _lora(target_modules=list(a.attention), use_dora=True),
            expect=_flag_refused("use_dora", "DoRA rescales the weight by a learned magnitude, so its update is "
                                 "not linear in its factors")),
    Feature(id="modules_to_save", title="saved heads", doc="`modules_to_save` (the output layer; a classifier's "
            "head, which PEFT's `SEQ_CLS` saves itself)",
            build=lambda a: _lora(target_modules=list(a.attention), task_type=SEQ_CLS) if a.task == SEQ_CLS
            else _lora(target_modules=list(a.attention), modules_to_save=[a.lm_head])),
    Feature(id="trainable_tokens", title="trained tokens", doc="`trainable_token_indices` (rows of the embedding)",
            build=lambda a: _lora(target_modules=list(a.attention), trainable_token_indices=[3, 5, 7])),
    Feature(id="bias", title="`bias`", doc="`bias=\"lora_only\"` (the adapted layers' biases are trained)",
            build=lambda a: _needs(bool(a.biased), "its layers have no biases",
                                   lambda: _lora(target_modules=list(a.linear), bias="lora_only"))),
    Feature(id="lora_bias", title="`lora_bias`", doc="`lora_bias=True` (a bias on lora_B)",
            build=lambda a: _lora(target_modules=list(a.attention), lora_bias=True)),
    Feature(id="full", title="full fine-tune", doc="a fully fine-tuned checkpoint (`kind: full`, every tensor "
            "trained): task arithmetic, checked as for the other columns except that a dense delta has no adapter "
            "output",
            build=lambda a: Adapter(peft_type="FULL")),
    Feature(id="experts", title="MoE experts", doc="`target_parameters` on the fused experts "
            "(`experts.gate_up_proj`, `experts.down_proj`)",
            build=lambda a: _needs(bool(a.experts), "not a mixture of experts",
                                   lambda: _lora(target_modules=[], target_parameters=list(a.experts)))),
    Feature(id="router", title="MoE router", doc="`target_parameters` on the router's weight (`mlp.gate.weight`, "
            "not an `nn.Linear` in transformers 5)",
            build=lambda a: _needs(a.router is not None, "not a mixture of experts",
                                   lambda: _lora(target_modules=[], target_parameters=[a.router]))),
)

_LORA_BIAS_MERGE = Refused("T414", r"output `merged` cannot be merged: `.+\.bias` gets a `lora_bias` delta, but the "
                                   r"base has no such bias")

# Cells refused although their feature is not: a `lora_bias` on a layer without a bias has
# nothing to merge into (PEFT cannot merge it either), so only the merged output is refused there.
REFUSED: Mapping[tuple[str, str], Refused] = {
    **{(arch.id, "lora_bias"): _LORA_BIAS_MERGE for arch in ARCHS if not set(arch.attention) <= set(arch.biased)},
}

# Cells where peftdsl gives a wrong result or fails: strict xfails, each with what goes wrong.
KNOWN_WRONG: Mapping[tuple[str, str], str] = {}

# ----------------------------------------------------------------------- cells


@dataclass(frozen=True, slots=True)
class Cell:
    arch: Arch
    feature: Feature
    outcome: Outcome
    adapter: Adapter | None  # None where not applicable

    @property
    def id(self) -> str:
        return f"{self.arch.id}-{self.feature.id}"


def cell(arch: Arch, feature: Feature) -> Cell:
    adapter = feature.build(arch)
    if isinstance(adapter, NotApplicable):
        return Cell(arch, feature, adapter, None)
    known = KNOWN_WRONG.get((arch.id, feature.id))
    if known:
        return Cell(arch, feature, KnownWrong(known), adapter)
    return Cell(arch, feature, REFUSED.get((arch.id, feature.id), feature.expect), adapter)


def cells() -> list[Cell]:
    """Every (architecture, feature) pair, architectures in `ARCHS` order, features in `FEATURES` order."""
    return [cell(arch, feature) for arch in ARCHS for feature in FEATURES]
