"""Which kind of model a recipe's base is (docs/recipes.md), and what it can be evaluated on.

The task follows the adapters' `task_type`, else the base's `architectures` (or
`is_encoder_decoder`): it picks the transformers Auto class that evaluation loads and
the metrics that make sense for it. Torch-free: `lint` checks an eval's metric against
the task before any weight is read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

CAUSAL_LM, SEQ_2_SEQ_LM, SEQ_CLS, TOKEN_CLS, QUESTION_ANS = (
    "CAUSAL_LM", "SEQ_2_SEQ_LM", "SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")

# task -> (transformers Auto class, the metrics evaluation computes for it)
TASKS: dict[str, tuple[str, tuple[str, ...]]] = {
    CAUSAL_LM: ("AutoModelForCausalLM", ("perplexity", "accuracy", "generate", "lm_eval")),
    SEQ_2_SEQ_LM: ("AutoModelForSeq2SeqLM", ("perplexity", "accuracy", "generate", "lm_eval")),
    SEQ_CLS: ("AutoModelForSequenceClassification", ("accuracy",)),
    TOKEN_CLS: ("AutoModelForTokenClassification", ("accuracy",)),
    QUESTION_ANS: ("AutoModelForQuestionAnswering", ("accuracy", "f1")),
}

# what an eval's `labels` map each data label to: a class index of the head (classifiers) or a
# verbalizer whose likelihood is scored (language models); question answering reads no labels
LABEL_VALUES: dict[str, type] = {CAUSAL_LM: str, SEQ_2_SEQ_LM: str, SEQ_CLS: int, TOKEN_CLS: int}

# metrics that read `.jsonl` rows (the others also read the lines of a `.txt`)
ROW_METRICS = ("accuracy", "f1")

_ARCHITECTURE_SUFFIXES = (
    ("ForSequenceClassification", SEQ_CLS),
    ("ForTokenClassification", TOKEN_CLS),
    ("ForQuestionAnswering", QUESTION_ANS),
    ("ForCausalLM", CAUSAL_LM),
)


def model_task(task_types: Iterable[str | None], base_config: Mapping | None) -> str:
    """The task of the models a recipe evaluates: the adapters' `task_type` when they give
    one PEFT knows, else what the base's config says, else a causal LM."""
    return declared_task(task_types, base_config) or CAUSAL_LM


def declared_task(task_types: Iterable[str | None], base_config: Mapping | None) -> str | None:
    """The task the adapters' `task_type` or the base's config says; None when neither says one
    (a model card then claims no pipeline)."""
    declared = sorted({t for t in task_types if t in TASKS})
    if declared:
        return declared[0]
    config = base_config or {}
    for architecture in config.get("architectures") or ():
        for suffix, task in _ARCHITECTURE_SUFFIXES:
            if str(architecture).endswith(suffix):
                return task
    return SEQ_2_SEQ_LM if config.get("is_encoder_decoder") else None


def auto_class(task: str) -> str:
    return TASKS[task][0]


def metrics(task: str) -> tuple[str, ...]:
    return TASKS[task][1]
