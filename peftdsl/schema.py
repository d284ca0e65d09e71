"""The recipe's outward schema (format version 1), as pydantic models.

It validates the shape of a loaded recipe (types, unknown keys, required keys) and
generates the JSON Schema that `peftdsl schema` prints for editors. Positions are
not pydantic's business: `build` maps each error's `loc` back to a YAML span.
Semantics (names, expressions, kinds) are checked by later stages, not here.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

FORMAT_VERSIONS = (1,)
NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"

PositiveInt = Annotated[int, Field(gt=0)]
Dtype = Literal["float32", "float16", "bfloat16"]


class _Strict(BaseModel):
    # Strict: YAML `rank: "16"` is a string and says so; extra keys are errors.
    model_config = ConfigDict(extra="forbid", strict=True)


class AdapterSpec(_Strict):
    """A PEFT adapter directory, or `hf:org/name[@revision]` (long form)."""

    path: str = Field(description="adapter directory, relative to the recipe's folder, or hf:org/name[@rev]")
    sha256: Annotated[str, Field(pattern=SHA256_PATTERN)] | None = Field(
        None, description="pin of adapter_model.safetensors (lowercase hex)")
    kind: Literal["lora", "ia3", "full"] | None = Field(
        None, description="declared kind, checked against the files; `full`: a full fine-tune of `base`")
    rank: PositiveInt | None = Field(None, description="declared LoRA rank, checked against the files")


class OutputSpec(_Strict):
    """Where a composition is written: a PEFT adapter directory or a merged model."""

    path: str
    merge: bool = Field(False, description="write a whole model with the delta folded into `base`")
    dtype: Dtype | None = Field(None, description="dtype of the written tensors (default: the inputs')")


class EvalOptions(_Strict):
    """An eval entry's options: declared once, here, for the recipe's schema and for the
    evaluator (`peftdsl.evaluation.evaluate.EvalSpec` extends this model)."""

    batch_size: PositiveInt = 8
    max_length: PositiveInt | None = None
    limit: PositiveInt | None = None
    text_field: str = "text"
    label_field: str = "label"
    choices_field: str = "choices"
    answer_field: str = Field("answer", description="multiple choice: the right choice; question answering: the "
                              "answer text(s)")
    labels: dict[str, str | int] | None = Field(
        None, description="accuracy: label -> verbalizer (language models) or class index (classifiers)")
    input_field: str = Field("input", description="seq2seq: the encoder's input (perplexity, generate)")
    target_field: str = Field("target", description="seq2seq: the text to score given the input (perplexity)")
    tokens_field: str = Field("tokens", description="token classification: the row's words (a list of strings)")
    tags_field: str = Field("tags", description="token classification: one label per word")
    question_field: str = Field("question", description="question answering: the question")
    context_field: str = Field("context", description="question answering: the text the answer is a span of")
    max_answer_length: PositiveInt = Field(30, description="question answering: the longest span predicted, in tokens")
    max_new_tokens: PositiveInt = 32
    do_sample: bool = False
    temperature: Annotated[float, Field(gt=0)] = Field(1.0, description="sampling temperature (with do_sample)")
    top_p: Annotated[float, Field(gt=0, le=1)] = Field(1.0, description="nucleus sampling mass (with do_sample)")
    tasks: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] | None = Field(
        None, description="lm_eval: lm-evaluation-harness task (or group) names")
    include_path: str | None = Field(
        None, description="lm_eval: a folder of task YAMLs, relative to the recipe's folder")
    num_fewshot: Annotated[int, Field(ge=0)] | None = Field(
        None, description="lm_eval: few-shot examples per prompt (default: each task's own)")
    measure: str | None = Field(
        None, description="lm_eval: the task's metric that is the value (default: its first), e.g. `acc`")


METRICS = ("perplexity", "accuracy", "f1", "generate", "lm_eval")
Metric = Literal["perplexity", "accuracy", "f1", "generate", "lm_eval"]


class EvalSpec(EvalOptions):
    """One evaluation target (docs/recipes.md)."""

    # Eval names are labels, not expression names: `toxic-ppl` (docs/recipes.md) is fine.
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")]
    models: list[str] = Field(min_length=1, description="adapters, compositions, or `base`")
    metric: Metric
    data: str | None = Field(None, description=".txt (a sequence per line) or .jsonl; not for lm_eval")
    dtype: Dtype | None = Field(None, description="dtype the base model is loaded in for evaluation")


class SelectSpec(_Strict):
    eval: str
    model: str
    goal: Literal["max", "min"]


class SweepSpec(BaseModel):
    """A grid over params: `param: [values…]`, and how to pick the best point."""

    model_config = ConfigDict(extra="allow", strict=True)
    __pydantic_extra__: dict[str, Annotated[list[float], Field(min_length=1)]]
    select: SelectSpec | None = None


class PenaltySpec(_Strict):
    l1: Annotated[float, Field(ge=0)] = Field(description="adds l1 · mean |w| over the searched params")


SEARCH_OPTIMIZERS = ("ngopt", "cma", "random")
Bounds = Annotated[list[float], Field(min_length=2, max_length=2)]


class SearchSpec(_Strict):
    """Learned weights: params optimised without gradients on an eval's value (docs/recipes.md)."""

    params: dict[str, Bounds] = Field(description="param -> [lower, upper]; its value under `params:` is the start")
    objective: SelectSpec = Field(description="the eval's value for one model, and whether to minimise or maximise it")
    penalty: PenaltySpec | None = None
    optimizer: Literal["ngopt", "cma", "random"] = Field("ngopt", description="nevergrad's NGOpt, CMA-ES, or "
                                                         "random search")
    budget: PositiveInt = Field(description="candidates evaluated in all")
    seed: int = Field(0, description="seeds the optimiser: the same seed gives the same candidates")
    batch: PositiveInt = Field(4, description="candidates asked for at a time (evaluated in parallel with "
                               "--executor ray); part of what the candidates are")


class RecipeSpec(_Strict):
    """A peftdsl recipe, format version 1."""

    peftdsl: Literal[1] = Field(description="format version")
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")] | None = None
    base: str | None = Field(None, description="a Hugging Face model directory (or hf:org/name[@rev])")
    seed: int = Field(0, description="seeds randomised methods (dare)")
    adapters: dict[str, AdapterSpec] = Field(default_factory=dict)
    params: dict[str, float] = Field(default_factory=dict)
    compose: dict[str, str] = Field(default_factory=dict)
    outputs: dict[str, OutputSpec] = Field(default_factory=dict)
    eval: list[EvalSpec] = Field(default_factory=list)
    sweep: SweepSpec | None = None
    search: SearchSpec | None = None


# Sections whose values may be written in a short form (a bare path).
SHORT_FORMS = {"adapters": "path", "outputs": "path"}


def json_schema() -> dict:
    """The JSON Schema of the recipe format, with the short forms editors should accept."""
    schema = RecipeSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "peftdsl recipe"
    props = schema["properties"]
    for section in SHORT_FORMS:
        ref = props[section]["additionalProperties"]
        props[section]["additionalProperties"] = {"anyOf": [{"type": "string"}, ref]}
        props[section]["propertyNames"] = {"pattern": NAME_PATTERN}
    props["params"]["propertyNames"] = {"pattern": NAME_PATTERN}
    props["compose"]["propertyNames"] = {"pattern": NAME_PATTERN}
    return schema
