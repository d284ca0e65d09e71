"""Extractive question answering (QUESTION_ANS): SQuAD's exact match and F1 (docs/recipes.md).

Each row has a question, a context and its answer text(s). The model reads
``tokenizer(question, context)`` (the context cut to fit ``max_length``); the predicted
answer is the context span whose start and end logits sum highest, over spans inside the
context with end ≥ start and at most ``max_answer_length`` tokens (ties to the earliest
start, then the shortest span), read back from the context by the tokens' character
offsets. This is SQuAD's decoding without its n-best lists and document strides.

Answers are compared as SQuAD's evaluation script does: lowercased, punctuation removed,
the articles a/an/the removed, whitespace collapsed. A row scores the best over its
answers; `accuracy` is the mean exact match, `f1` the mean token-overlap F1.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftdsl.errors import EvalDataError
from peftdsl.progress import progress

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    return float(any(normalize_answer(prediction) == normalize_answer(a) for a in answers))


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """The best token-overlap F1 of the prediction against any answer (SQuAD's; two empty
    normalised texts agree)."""
    return max(_f1(normalize_answer(prediction).split(), normalize_answer(a).split()) for a in answers)


def _f1(predicted: list[str], gold: list[str]) -> float:
    if not predicted or not gold:
        return float(predicted == gold)
    same = sum((Counter(predicted) & Counter(gold)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(gold)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True, slots=True)
class _Example:
    """One row, tokenised: the model's inputs, where its context tokens are, and its answers."""

    features: dict[str, list[int]]
    context: str
    positions: list[int]  # token positions of the context, in order
    offsets: list[tuple[int, int]]  # character span of each token in its own text
    answers: tuple[str, ...]
    truncated: bool


def _answers(value: Any, field: str, path: Path, line: int) -> tuple[str, ...]:
    """A string, a list of strings, or SQuAD's `{"text": [...], "answer_start": [...]}`."""
    if isinstance(value, Mapping):
        value = value.get("text")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        raise EvalDataError(f"{path}:{line}: `{field}` must be an answer's text, a list of them, or "
                            "{\"text\": [...]}")
    if not value:
        raise EvalDataError(f"{path}:{line}: `{field}` lists no answer (questions without one are not supported)")
    return tuple(value)


def _example(tokenizer, question: str, context: str, answers: tuple[str, ...], limit: int | None, path: Path,
             line: int) -> _Example:
    if limit is not None:
        # `only_second` truncation cannot cut the question; say so instead of letting tokenizers raise.
        fixed = len(tokenizer(question, add_special_tokens=False)["input_ids"]) + tokenizer.num_special_tokens_to_add(
            pair=True)
        if fixed >= limit:
            raise EvalDataError(f"{path}:{line}: the question takes {fixed} of max_length {limit} tokens, leaving "
                                "none for the context")
    try:
        encoding = tokenizer(question, context, truncation="only_second" if limit is not None else False,
                             max_length=limit, return_offsets_mapping=True)
    except NotImplementedError:  # python tokenizers have no offsets
        raise EvalDataError(f"{path}:{line}: question answering needs a fast tokenizer, one that gives character "
                            "offsets") from None
    sequence_ids = encoding.sequence_ids(0)
    positions = [i for i, sequence in enumerate(sequence_ids) if sequence == 1]
    if not positions:
        raise EvalDataError(f"{path}:{line}: the context tokenises to nothing")
    offsets = [tuple(span) for span in encoding["offset_mapping"]]
    features = {k: list(encoding[k]) for k in ("input_ids", "token_type_ids") if k in encoding}
    truncated = bool(encoding.encodings and encoding.encodings[0].overflowing)
    return _Example(features, context, positions, offsets, answers, truncated)


def _best_span(start_logits, end_logits, positions: list[int], max_answer_length: int) -> tuple[int, int]:
    """(start, end) token positions of the best-scoring context span; the first on ties."""
    import torch

    index = torch.tensor(positions)
    scores = start_logits[index][:, None] + end_logits[index][None, :]
    n = len(positions)
    offset = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # end − start, in tokens
    scores = scores.masked_fill((offset < 0) | (offset >= max_answer_length), -torch.inf)
    flat = int(scores.flatten().argmax())  # torch returns the first maximum: earliest start, shortest span
    return positions[flat // n], positions[flat % n]


def answer_spans(model, tokenizer, rows: Sequence[tuple[int, Mapping]], *, metric: str, question_field: str,
                 context_field: str, answer_field: str, path: Path, batch_size: int, max_length: int | None,
                 max_answer_length: int, quiet: bool):
    """Mean exact match (`metric: accuracy`) or mean F1 (`f1`) of the predicted spans."""
    import torch

    from peftdsl.evaluation.evaluate import EvalOutcome, _field, _pad_id
    from peftdsl.evaluation.task_metrics import padded_features

    examples = []
    for line, row in rows:
        question = _field(row, question_field, path, line, str)
        context = _field(row, context_field, path, line, str)
        answers = _answers(_field(row, answer_field, path, line, (str, list, dict)), answer_field, path, line)
        examples.append(_example(tokenizer, question, context, answers, max_length, path, line))
    if not examples:
        raise EvalDataError(f"{path}: {metric} needs at least one row")
    device = next(model.parameters()).device
    predictions: list[str] = []
    with progress(metric, len(examples), quiet=quiet) as advance, torch.inference_mode():
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            features = padded_features([e.features for e in batch], _pad_id(tokenizer))
            out = model(**{k: v.to(device) for k, v in features.items()})
            starts, ends = out.start_logits.float().cpu(), out.end_logits.float().cpu()
            for row, example in enumerate(batch):
                first, last = _best_span(starts[row], ends[row], example.positions, max_answer_length)
                predictions.append(example.context[example.offsets[first][0] : example.offsets[last][1]])
            advance(len(batch))
    exact = sum(exact_match(p, e.answers) for p, e in zip(predictions, examples)) / len(examples)
    f1 = sum(f1_score(p, e.answers) for p, e in zip(predictions, examples)) / len(examples)
    details = {"exact": exact, "f1": f1, "total": len(examples), "truncated": sum(e.truncated for e in examples),
               "predictions": predictions}
    return EvalOutcome(exact if metric == "accuracy" else f1, details)
