"""Metrics for encoder-decoder (seq2seq), classification and question-answering models (docs/recipes.md).

- seq2seq ``perplexity``: exp(Σ NLL of the target's tokens given the input / Σ target
  tokens), rows with ``input`` and ``target`` (field names configurable); the target is
  tokenised as ``tokenizer(text_target=target)`` and scored as the decoder's labels.
- seq2seq ``accuracy``: the candidate (verbalizer or choice) with the highest summed
  decoder log-likelihood given the row's text as the encoder's input; ties to the first.
- seq2seq ``generate``: the decoder's continuation of each input (greedy unless sampling).
- classification ``accuracy``: the argmax of the head's logits against the row's class
  index: ``labels`` maps each data label to an index, by default the config's ``label2id``.
- token classification ``accuracy``: the same argmax on the first sub-token of each word
  (rows of ``tokens`` and ``tags``, the words tokenised with ``is_split_into_words=True``);
  correct words / scored words.
- question answering ``accuracy`` / ``f1``: peftdsl.evaluation.question_answering.

``IMPLEMENTATIONS`` maps each (task, metric) of `peftdsl.tasks.TASKS` beyond the causal
LM's to the function that computes it; evaluate's driver looks metrics up there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftdsl import tasks
from peftdsl.errors import EvalDataError
from peftdsl.progress import progress

if TYPE_CHECKING:
    import torch


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _padded(rows: Sequence[Sequence[int]], pad: int):
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(list(row), dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids, mask


def score_targets(model, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, batch_size: int, pad_id: int,
                  description: str, quiet: bool) -> list[tuple[float, int]]:
    """Σ log p(target | input) over the target's tokens, and their count, per (input, target) pair.

    The target ids are the decoder's labels (the model shifts them right itself); padding is
    masked in the encoder and excluded from the labels (-100). Sums in float64.
    """
    import torch

    device = _device(model)
    scores: list[tuple[float, int]] = [(0.0, 0)] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]))
    with progress(description, len(pairs), quiet=quiet) as advance, torch.inference_mode():
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            inputs, mask = _padded([pairs[i][0] for i in batch], pad_id)
            labels, label_mask = _padded([pairs[i][1] for i in batch], pad_id)
            labels = labels.masked_fill(label_mask == 0, -100)
            logits = model(input_ids=inputs.to(device), attention_mask=mask.to(device), labels=labels.to(device)).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            picked = logprobs.gather(-1, labels.clamp(min=0).to(device)[..., None]).squeeze(-1)
            picked = picked.double().masked_fill(label_mask.to(device) == 0, 0.0)
            for row, index in enumerate(batch):
                scores[index] = (float(picked[row].sum()), int(label_mask[row].sum()))
            advance(len(batch))
    return scores


def seq2seq_perplexity(model, tokenizer, pairs: Sequence[tuple[str, str]], *, batch_size: int, quiet: bool):
    from peftdsl.evaluation.evaluate import EvalOutcome, _pad_id, _safe_exp

    ids = [(tokenizer(source)["input_ids"], tokenizer(text_target=target)["input_ids"]) for source, target in pairs]
    scores = score_targets(model, ids, batch_size=batch_size, pad_id=_pad_id(tokenizer), description="perplexity",
                           quiet=quiet)
    tokens = sum(count for _, count in scores)
    if tokens == 0:
        raise EvalDataError("perplexity needs at least one target of one or more tokens")
    nll = -sum(logprob for logprob, _ in scores)
    return EvalOutcome(_safe_exp(nll / tokens), {"nll": nll, "tokens": tokens, "sequences": len(pairs)})


def seq2seq_accuracy(model, tokenizer, questions, *, batch_size: int, quiet: bool):
    from peftdsl.evaluation.evaluate import EvalOutcome, _argmax_per_question, _pad_id

    if not questions:
        raise EvalDataError("accuracy needs at least one row")
    pairs, owners = [], []
    for number, question in enumerate(questions):
        source = tokenizer(question.text)["input_ids"]
        for candidate in question.candidates:
            target = tokenizer(text_target=candidate)["input_ids"]
            if not target:
                raise EvalDataError(f"continuation `{candidate}` tokenises to nothing")
            pairs.append((source, target))
            owners.append(number)
    scores = score_targets(model, pairs, batch_size=batch_size, pad_id=_pad_id(tokenizer), description="accuracy",
                           quiet=quiet)
    predictions = _argmax_per_question(scores, owners, len(questions))
    correct = sum(int(p == q.answer) for p, q in zip(predictions, questions))
    return EvalOutcome(correct / len(questions), {"correct": correct, "total": len(questions),
                                                  "predictions": predictions})


def seq2seq_generate(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int, do_sample: bool,
                     temperature: float, top_p: float, seed: int, quiet: bool) -> list[str]:
    import torch

    device = _device(model)
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "num_beams": 1}
    if do_sample:
        options.update(temperature=temperature, top_p=top_p)
    forked = [device.index or 0] if device.type == "cuda" else []
    outputs = []
    with progress("generate", len(prompts), quiet=quiet) as advance, torch.inference_mode():
        for index, prompt in enumerate(prompts):
            input_ids = torch.tensor([tokenizer(prompt)["input_ids"]], dtype=torch.long, device=device)
            with torch.random.fork_rng(devices=forked):
                torch.manual_seed(seed + index)
                out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **options)
            outputs.append(tokenizer.decode(out[0], skip_special_tokens=True))
            advance(1)
    return outputs


def encoder_limit(model, tokenizer, max_length: int | None) -> int | None:
    """Tokens per sequence: the eval's max_length clamped to the model's positions and to the
    tokenizer's `model_max_length` when it sets one (RoBERTa's 514 positions hold 512 tokens)."""
    from peftdsl.evaluation.evaluate import _context_length

    limit = _context_length(model, max_length)
    known = getattr(tokenizer, "model_max_length", None)
    if isinstance(known, int) and 0 < known < 1_000_000:  # unset is a huge sentinel (1e30)
        limit = known if limit is None else min(limit, known)
    return limit


def padded_features(encodings: Sequence[Mapping[str, Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """The model inputs of tokenizer outputs, right-padded: `input_ids` with `pad_id`, the
    attention mask and `token_type_ids` (when the tokenizer gives them, as BERT's does for
    pairs) with 0."""
    ids, mask = _padded([e["input_ids"] for e in encodings], pad_id)
    features = {"input_ids": ids, "attention_mask": mask}
    if all("token_type_ids" in e for e in encodings):
        features["token_type_ids"] = _padded([e["token_type_ids"] for e in encodings], 0)[0]
    return features


def class_indices(labels: Mapping[str, Any] | None, config) -> dict[str, int]:
    """Data label -> class index: the eval's `labels`, else the model config's `label2id`."""
    mapping = labels if labels is not None else dict(getattr(config, "label2id", None) or {})
    out = {}
    for label, index in mapping.items():
        if isinstance(index, bool) or not isinstance(index, int):
            raise EvalDataError(f"classification `labels` map each label to a class index, not `{index!r}`")
        out[str(label)] = index
    return out


class ClassIndex:
    """A data label's class index, for a model with `classes` outputs.

    A label is looked up by its text in the eval's `labels`, or without them in the config's
    `label2id`; without `labels`, an integer the config does not name is the index itself
    (HF datasets store classes as integers).
    """

    def __init__(self, labels: Mapping[str, Any] | None, config):
        self.indices = class_indices(labels, config)
        self.integers_are_indices = labels is None
        self.classes = int(config.num_labels)

    def __call__(self, label: Any, path: Path, line: int) -> int:
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise EvalDataError(f"{path}:{line}: a label is a string or an integer, not `{json.dumps(label)}`")
        if str(label) in self.indices:
            index = self.indices[str(label)]
        elif isinstance(label, int) and self.integers_are_indices:
            index = label
        else:
            raise EvalDataError(f"{path}:{line}: label `{label}` has no class index (known: "
                                f"{', '.join(sorted(self.indices)) or 'none'}; give `labels: {{label: index}}`)")
        if not 0 <= index < self.classes:
            raise EvalDataError(f"{path}:{line}: label `{label}` maps to class {index}, but the model has "
                                f"{self.classes} classes")
        return index


def classification_accuracy(model, tokenizer, rows: Sequence[tuple[int, Mapping]], *, labels, text_field: str,
                            label_field: str, path: Path, batch_size: int, max_length: int | None, quiet: bool):
    """Fraction of rows whose label's class index is the argmax of the head's logits."""
    import torch

    from peftdsl.evaluation.evaluate import EvalOutcome, _field, _pad_id

    class_index = ClassIndex(labels, model.config)
    limit = encoder_limit(model, tokenizer, max_length)
    texts, answers = [], []
    for line, row in rows:
        texts.append(_field(row, text_field, path, line, str))
        answers.append(class_index(_field(row, label_field, path, line, (str, int)), path, line))
    if not texts:
        raise EvalDataError("accuracy needs at least one row")
    device, predictions = _device(model), []
    with progress("accuracy", len(texts), quiet=quiet) as advance, torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = [tokenizer(t, truncation=limit is not None, max_length=limit)
                     for t in texts[start : start + batch_size]]
            features = padded_features(batch, _pad_id(tokenizer))
            logits = model(**{k: v.to(device) for k, v in features.items()}).logits
            predictions += [int(i) for i in logits.float().argmax(dim=-1)]
            advance(len(batch))
    correct = sum(int(p == a) for p, a in zip(predictions, answers))
    return EvalOutcome(correct / len(texts), {"correct": correct, "total": len(texts), "predictions": predictions})


def _first_subtokens(encoding, words: int, path: Path, line: int) -> list[int | None]:
    """Per word, the position of its first sub-token (None: it has none, or truncation cut it)."""
    try:
        word_ids = encoding.word_ids()
    except ValueError:  # only fast (Rust) tokenizers know which word a token came from
        raise EvalDataError(f"{path}:{line}: token classification needs a fast tokenizer, one that maps "
                            "tokens to words (`word_ids`)") from None
    first: list[int | None] = [None] * words
    for position, word in enumerate(word_ids):
        if word is not None and first[word] is None:
            first[word] = position
    return first


def token_classification_accuracy(model, tokenizer, rows: Sequence[tuple[int, Mapping]], *, labels,
                                  tokens_field: str, tags_field: str, path: Path, batch_size: int,
                                  max_length: int | None, quiet: bool):
    """Correct words / scored words: a word's prediction is the argmax of the head's logits on
    its first sub-token. Words that get no token (cut by max_length, or tokenised to nothing)
    are not scored, as in HF's token-classification examples; `unscored` counts them."""
    import torch

    from peftdsl.evaluation.evaluate import EvalOutcome, _field, _pad_id

    class_index = ClassIndex(labels, model.config)
    limit = encoder_limit(model, tokenizer, max_length)
    encodings, targets = [], []  # per row: tokenizer output; [(position, class index)] of its scored words
    words_seen = 0
    for line, row in rows:
        words = _field(row, tokens_field, path, line, list)
        tags = _field(row, tags_field, path, line, list)
        if not all(isinstance(word, str) for word in words):
            raise EvalDataError(f"{path}:{line}: `{tokens_field}` must be a list of strings (the words)")
        if len(tags) != len(words):
            raise EvalDataError(f"{path}:{line}: {len(words)} words in `{tokens_field}` but {len(tags)} labels in "
                                f"`{tags_field}`; give one label per word")
        indices = [class_index(tag, path, line) for tag in tags]
        if not words:
            continue  # nothing to score
        encoding = tokenizer(words, is_split_into_words=True, truncation=limit is not None, max_length=limit)
        first = _first_subtokens(encoding, len(words), path, line)
        encodings.append(encoding)
        targets.append([(p, i) for p, i in zip(first, indices) if p is not None])
        words_seen += len(words)
    scored = sum(len(t) for t in targets)
    if scored == 0:
        raise EvalDataError(f"{path}: accuracy needs at least one word that tokenises to a token")
    device, predictions = _device(model), []
    with progress("accuracy", len(encodings), quiet=quiet) as advance, torch.inference_mode():
        for start in range(0, len(encodings), batch_size):
            features = padded_features(encodings[start : start + batch_size], _pad_id(tokenizer))
            argmax = model(**{k: v.to(device) for k, v in features.items()}).logits.float().argmax(dim=-1).cpu()
            for row, words in enumerate(targets[start : start + batch_size]):
                predictions.append([int(argmax[row, position]) for position, _ in words])
            advance(len(features["input_ids"]))
    correct = sum(int(p == i) for row, words in zip(predictions, targets) for p, (_, i) in zip(row, words))
    return EvalOutcome(correct / scored, {"correct": correct, "total": scored, "unscored": words_seen - scored,
                                          "predictions": predictions})


# ------------------------------------------------------------- the (task, metric) registry


def _seq_cls_accuracy(model, tokenizer, spec, data, quiet):
    return classification_accuracy(model, tokenizer, data, labels=spec.labels, text_field=spec.text_field,
                                   label_field=spec.label_field, path=Path(spec.data), batch_size=spec.batch_size,
                                   max_length=spec.max_length, quiet=quiet)


def _token_cls_accuracy(model, tokenizer, spec, data, quiet):
    return token_classification_accuracy(model, tokenizer, data, labels=spec.labels, tokens_field=spec.tokens_field,
                                         tags_field=spec.tags_field, path=Path(spec.data),
                                         batch_size=spec.batch_size, max_length=spec.max_length, quiet=quiet)


def _qa(metric: str):
    def run(model, tokenizer, spec, data, quiet):
        from peftdsl.evaluation.question_answering import answer_spans

        return answer_spans(model, tokenizer, data, metric=metric, question_field=spec.question_field,
                            context_field=spec.context_field, answer_field=spec.answer_field, path=Path(spec.data),
                            batch_size=spec.batch_size, max_length=encoder_limit(model, tokenizer, spec.max_length),
                            max_answer_length=spec.max_answer_length, quiet=quiet)
    return run


def _seq2seq_perplexity(model, tokenizer, spec, data, quiet):
    return seq2seq_perplexity(model, tokenizer, data, batch_size=spec.batch_size, quiet=quiet)


def _seq2seq_accuracy(model, tokenizer, spec, data, quiet):
    from peftdsl.evaluation.evaluate import _questions

    fields = (spec.text_field, spec.label_field, spec.choices_field, spec.answer_field)
    questions = _questions(data, spec.labels, fields, Path(spec.data))
    return seq2seq_accuracy(model, tokenizer, questions, batch_size=spec.batch_size, quiet=quiet)


def _seq2seq_generate(model, tokenizer, spec, data, quiet):
    from peftdsl.evaluation.evaluate import EvalOutcome

    texts = seq2seq_generate(model, tokenizer, data, max_new_tokens=spec.max_new_tokens, do_sample=spec.do_sample,
                             temperature=spec.temperature, top_p=spec.top_p, seed=spec.seed, quiet=quiet)
    return EvalOutcome(texts, {"prompts": list(data)})


# (task, metric) -> f(model, tokenizer, spec, rows loaded by evaluate.load_data, quiet) -> EvalOutcome.
# Every pair of tasks.TASKS but the causal LM's has a row (tests/test_task_types.py walks them).
IMPLEMENTATIONS: dict[tuple[str, str], Callable[..., Any]] = {
    (tasks.SEQ_2_SEQ_LM, "perplexity"): _seq2seq_perplexity,
    (tasks.SEQ_2_SEQ_LM, "accuracy"): _seq2seq_accuracy,
    (tasks.SEQ_2_SEQ_LM, "generate"): _seq2seq_generate,
    (tasks.SEQ_CLS, "accuracy"): _seq_cls_accuracy,
    (tasks.TOKEN_CLS, "accuracy"): _token_cls_accuracy,
    (tasks.QUESTION_ANS, "accuracy"): _qa("accuracy"),
    (tasks.QUESTION_ANS, "f1"): _qa("f1"),
}
