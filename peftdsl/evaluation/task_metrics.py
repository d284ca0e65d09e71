"""Metrics for encoder-decoder (seq2seq) and classification models (docs/recipes.md).

- seq2seq ``perplexity``: exp(Σ NLL of the target's tokens given the input / Σ target
  tokens), rows with ``input`` and ``target`` (field names configurable); the target is
  tokenised as ``tokenizer(text_target=target)`` and scored as the decoder's labels.
- seq2seq ``accuracy``: the candidate (verbalizer or choice) with the highest summed
  decoder log-likelihood given the row's text as the encoder's input; ties to the first.
- seq2seq ``generate``: the decoder's continuation of each input (greedy unless sampling).
- classification ``accuracy``: the argmax of the head's logits against the row's class
  index: ``labels`` maps each data label to an index, by default the config's ``label2id``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


def class_indices(labels: Mapping[str, Any] | None, config) -> dict[str, int]:
    """Data label -> class index: the eval's `labels`, else the model config's `label2id`."""
    mapping = labels if labels is not None else dict(getattr(config, "label2id", None) or {})
    out = {}
    for label, index in mapping.items():
        if isinstance(index, bool) or not isinstance(index, int):
            raise EvalDataError(f"classification `labels` map each label to a class index, not `{index!r}`")
        out[str(label)] = index
    return out


def classification_accuracy(model, tokenizer, rows: Sequence[tuple[int, Mapping]], *, labels, text_field: str,
                            label_field: str, path: Path, batch_size: int, max_length: int | None, quiet: bool):
    """Fraction of rows whose label's class index is the argmax of the head's logits."""
    import torch

    from peftdsl.evaluation.evaluate import EvalOutcome, _field, _pad_id

    indices = class_indices(labels, model.config)
    classes = model.config.num_labels
    texts, answers = [], []
    for line, row in rows:
        texts.append(_field(row, text_field, path, line, str))
        label = str(_field(row, label_field, path, line, (str, int)))
        if label not in indices:
            raise EvalDataError(f"{path}:{line}: label `{label}` has no class index (known: "
                                f"{', '.join(sorted(indices)) or 'none'}; give `labels: {{label: index}}`)")
        if not 0 <= indices[label] < classes:
            raise EvalDataError(f"{path}:{line}: label `{label}` maps to class {indices[label]}, but the model "
                                f"has {classes} classes")
        answers.append(indices[label])
    if not texts:
        raise EvalDataError("accuracy needs at least one row")
    device, predictions = _device(model), []
    with progress("accuracy", len(texts), quiet=quiet) as advance, torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = [tokenizer(t)["input_ids"][:max_length] if max_length else tokenizer(t)["input_ids"]
                     for t in texts[start : start + batch_size]]
            ids, mask = _padded(batch, _pad_id(tokenizer))
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            predictions += [int(i) for i in logits.float().argmax(dim=-1)]
            advance(len(batch))
    correct = sum(int(p == a) for p, a in zip(predictions, answers))
    return EvalOutcome(correct / len(texts), {"correct": correct, "total": len(texts), "predictions": predictions})
