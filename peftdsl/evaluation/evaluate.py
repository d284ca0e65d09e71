"""Evaluation: the metrics of docs/recipes.md on a base model patched in memory.

The base model is loaded once; every model of a recipe (``base``, an adapter, a
composition, a grid point of a sweep) is evaluated by entering
:func:`peftdsl.evaluation.apply.applied` around its evaluation. The metrics:

- ``perplexity``: exp(Σ token NLL / Σ predicted tokens) over all sequences,
  each tokenised as ``tokenizer(text)`` (special tokens as the tokenizer adds
  them, e.g. BOS) and truncated to ``max_length`` from the right. A token is
  predicted when it has a token before it, so a sequence of n tokens predicts
  n − 1 of them and a one-token sequence contributes nothing.
- ``accuracy``: the candidate continuation (a label's verbalizer, or a choice)
  with the highest summed log-likelihood after the row's text wins; ties go to
  the first candidate in order.
- ``generate``: one continuation per prompt, greedy unless ``do_sample``.

Data decisions where the reference (docs/recipes.md) is silent:

- ``.txt``: every line is one sequence, without its line terminator; lines that
  are empty or only whitespace are skipped (they carry no text to score, and a
  trailing newline must not add a sequence). Other whitespace is kept as is.
- ``.jsonl``: one JSON object per line; blank lines are skipped; ``limit``
  keeps the first N rows (or lines) after skipping.
- Continuations are tokenised on their own,
  ``tokenizer(continuation, add_special_tokens=False)``, and their ids appended
  to the text's ids. The continuation is used **verbatim**: no space is
  inserted. Tokenizers that mark word starts (GPT-2's BPE) need the space in
  the recipe, e.g. ``labels: {pos: " positive"}``; this keeps the metric a
  plain function of the strings the user wrote.
- ``answer`` is a 0-based index when it is a JSON integer, and the text of one
  of the choices when it is a string (a string is never read as a number).
  Labels are compared as strings, so a JSON ``1`` matches a ``labels`` key ``1``.
- When text + continuation exceed ``max_length``, the text loses tokens from
  its *left* so that the continuation (what is scored) is kept whole.
- Generation runs one prompt at a time: with a batch, a prompt's continuation
  would depend on the padding its neighbours force on it. A prompt longer than
  ``max_length − max_new_tokens`` keeps its last tokens.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ConfigDict

from peftdsl import tasks
from peftdsl.errors import EvalDataError, UntrainedWeights
from peftdsl.evaluation.apply import Delta, applied
from peftdsl.progress import progress
from peftdsl.schema import METRICS, EvalOptions, Metric  # noqa: F401 - METRICS is re-exported

if TYPE_CHECKING:
    import torch

    from peftdsl.evaluation.report import Result



class EvalSpec(EvalOptions):
    """One ``eval`` entry of a recipe, resolved: its options are the recipe schema's own
    (`peftdsl.schema.EvalOptions`), so a field and its default are declared once."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, arbitrary_types_allowed=True)

    name: str
    metric: Metric
    data: Path | None = None  # None for lm_eval: its tasks read their own data
    models: tuple[str, ...] = ("base",)
    seed: int = 0  # the recipe's: seeds sampling
    task: str = tasks.CAUSAL_LM  # the model's kind (peftdsl.tasks): which metric implementation runs


@dataclass(frozen=True, slots=True)
class EvalOutcome:
    """A metric's value and what it was computed from (counts, predictions, prompts)."""

    value: float | list[str]
    details: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- data


def load_data(spec: EvalSpec) -> list[Any]:
    """The rows an evaluation needs: texts for perplexity/generate, dicts for accuracy; none for
    lm_eval, whose tasks read their own data when they run."""
    if spec.metric == "lm_eval":
        return []
    if spec.data is None:
        raise EvalDataError(f"eval `{spec.name}` has no `data` to read")
    path = Path(spec.data)
    if spec.metric in tasks.ROW_METRICS:
        if path.suffix != ".jsonl":
            raise EvalDataError(f"{path}: {spec.metric} needs a .jsonl file")
        return _read_jsonl(path, spec.limit)
    seq2seq = spec.task == tasks.SEQ_2_SEQ_LM
    if seq2seq and spec.metric == "perplexity":
        if path.suffix != ".jsonl":
            raise EvalDataError(f"{path}: seq2seq perplexity needs a .jsonl file of `{spec.input_field}` and "
                                f"`{spec.target_field}` rows")
        return [(_field(row, spec.input_field, path, i, str), _field(row, spec.target_field, path, i, str))
                for i, row in _read_jsonl(path, spec.limit)]
    if path.suffix == ".txt":
        return _read_txt(path, spec.limit)
    if path.suffix == ".jsonl":
        rows = _read_jsonl(path, spec.limit)
        field = spec.input_field if seq2seq else spec.text_field
        return [_field(row, field, path, i, str) for i, row in rows]
    raise EvalDataError(f"{path}: expected a .txt or .jsonl file")


def _read_txt(path: Path, limit: int | None) -> list[str]:
    """Non-blank lines, each without its line terminator."""
    texts = [line for line in _text(path).splitlines() if line.strip()]
    return texts[:limit] if limit is not None else texts


def _text(path: Path) -> str:
    """A data file's text; bytes that are not UTF-8 are an error naming the line they are on."""
    try:
        data = path.read_bytes()
    except OSError as err:  # not the base model's fault: say which file
        raise EvalDataError(f"{path}: cannot read: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise EvalDataError(f"{path}:{line}: not valid UTF-8 (byte {data[err.start]:#04x})") from None


def _read_jsonl(path: Path, limit: int | None) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line, so errors can point at the line."""
    rows: list[tuple[int, dict]] = []
    # Rows end at "\n" only: U+2028 or a form feed inside a JSON string is text, not a line break.
    for number, line in enumerate(_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        if limit is not None and len(rows) >= limit:
            break
        try:
            row = json.loads(line)
            # `"\ud800"` is valid JSON but no text: tokenizers refuse a lone surrogate with a TypeError
            json.dumps(row, ensure_ascii=False).encode("utf-8")
        except json.JSONDecodeError as error:
            raise EvalDataError(f"{path}:{number}: invalid JSON: {error.msg}") from None
        except RecursionError:
            raise EvalDataError(f"{path}:{number}: the JSON nests too deeply to read") from None
        except UnicodeEncodeError:
            raise EvalDataError(f"{path}:{number}: a string holds a lone UTF-16 surrogate (`\\ud800`…), "
                                "which is not text") from None
        if not isinstance(row, dict):
            raise EvalDataError(f"{path}:{number}: expected a JSON object")
        rows.append((number, row))
    return rows


def _field(row: dict, name: str, path: Path, line: int, kind: type | tuple[type, ...]) -> Any:
    if name not in row:
        raise EvalDataError(f"{path}:{line}: missing field `{name}`")
    value = row[name]
    if not isinstance(value, kind):
        raise EvalDataError(f"{path}:{line}: field `{name}` has the wrong type ({type(value).__name__})")
    return value


# ----------------------------------------------------------------------- scoring


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer: Any) -> int:
    """Any id will do for padding (it is masked and never scored); prefer the tokenizer's."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _context_length(model: torch.nn.Module, max_length: int | None) -> int | None:
    """The eval's max_length, clamped to the model's positions (lint warns when it is larger)."""
    from peftdsl.check import context_length

    positions = context_length(model.config.to_dict())
    if max_length is None or positions is None:
        return max_length if max_length is not None else positions
    return min(max_length, positions)


def score_continuations(
    model: torch.nn.Module,
    items: Sequence[tuple[Sequence[int], int]],
    *,
    batch_size: int,
    pad_id: int,
    device: torch.device | str | None = None,
    description: str = "scoring",
    quiet: bool = True,
) -> list[tuple[float, int]]:
    """Σ log p(ids[t] | ids[:t]) over t ≥ start, and the number of such t, per item.

    Items are batched longest first (less padding; the order does not change any
    value) with right padding and an attention mask, so a real token never sees
    a pad and keeps its position. Sums are taken in float64.
    """
    import torch

    device = torch.device(device) if device is not None else _model_device(model)
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    scores: list[tuple[float, int]] = [(0.0, 0)] * len(items)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with progress(description, len(items), quiet=quiet) as advance, torch.inference_mode():
        for batch in batches:
            for index, score in zip(batch, _score_batch(model, [items[i] for i in batch], pad_id, device)):
                scores[index] = score
            advance(len(batch))
    return scores


def _score_batch(
    model: torch.nn.Module, items: Sequence[tuple[Sequence[int], int]], pad_id: int, device: torch.device
) -> list[tuple[float, int]]:
    """One forward pass; log-softmax row by row so peak memory is one sequence × vocab."""
    import torch

    width = max(len(ids) for ids, _ in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, (ids, _) in enumerate(items):
        input_ids[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
        mask[row, : len(ids)] = 1
    logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
    results = []
    for row, (ids, start) in enumerate(items):
        start = max(start, 1)  # the first token has nothing to be predicted from
        if start >= len(ids):
            results.append((0.0, 0))
            continue
        logprobs = torch.log_softmax(logits[row, start - 1 : len(ids) - 1].float(), dim=-1)
        targets = input_ids[row, start : len(ids)].to(logprobs.device)
        picked = logprobs.gather(-1, targets[:, None]).squeeze(-1)
        results.append((float(picked.double().sum()), len(ids) - start))
    return results


# ----------------------------------------------------------------------- metrics


def perplexity(
    model: torch.nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    device: torch.device | str | None = None,
    quiet: bool = True,
) -> float:
    """exp(Σ token NLL / Σ predicted tokens) over ``texts`` (docs/recipes.md)."""
    return _perplexity(model, tokenizer, texts, batch_size=batch_size, max_length=max_length, device=device, quiet=quiet).value


def _perplexity(model, tokenizer, texts, *, batch_size, max_length, device, quiet) -> EvalOutcome:
    limit = _context_length(model, max_length)
    items = []
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        items.append((ids[:limit] if limit is not None else ids, 1))
    scores = score_continuations(
        model, items, batch_size=batch_size, pad_id=_pad_id(tokenizer), device=device, description="perplexity", quiet=quiet
    )
    tokens = sum(count for _, count in scores)
    if tokens == 0:
        raise EvalDataError("perplexity needs at least one sequence of two or more tokens")
    nll = -sum(logprob for logprob, _ in scores)
    details = {"nll": nll, "tokens": tokens, "sequences": len(texts)}
    return EvalOutcome(_safe_exp(nll / tokens), details)


def _safe_exp(x: float) -> float:
    """exp that gives inf instead of raising when a model is hopeless on the data."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


@dataclass(frozen=True, slots=True)
class _Question:
    """One accuracy row: its text, its candidate continuations, the right candidate's index."""

    text: str
    candidates: tuple[str, ...]
    answer: int


def accuracy(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    labels: Mapping[Any, str] | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    device: torch.device | str | None = None,
    text_field: str = "text",
    label_field: str = "label",
    choices_field: str = "choices",
    answer_field: str = "answer",
    quiet: bool = True,
) -> float:
    """Fraction of rows whose right candidate has the highest summed log-likelihood.

    With ``labels`` the rows have ``text`` and ``label``; without, ``choices``
    and ``answer``. Field names are configurable.
    """
    fields = (text_field, label_field, choices_field, answer_field)
    questions = _questions(list(enumerate(rows, start=1)), labels, fields, Path("<rows>"))
    return _accuracy(model, tokenizer, questions, batch_size=batch_size, max_length=max_length, device=device, quiet=quiet).value


def _questions(
    rows: Sequence[tuple[int, Mapping[str, Any]]],
    labels: Mapping[Any, str] | None,
    fields: tuple[str, str, str, str],
    path: Path,
) -> list[_Question]:
    """Rows turned into candidates and answers, checking every field on the way."""
    text_field, label_field, choices_field, answer_field = fields
    questions = []
    for line, row in rows:
        text = _field(row, text_field, path, line, str)
        if labels is not None:
            verbalizers = {str(key): value for key, value in labels.items()}
            label = str(_field(row, label_field, path, line, (str, int)))
            if label not in verbalizers:
                raise EvalDataError(f"{path}:{line}: label `{label}` is not in `labels`")
            questions.append(_Question(text, tuple(verbalizers.values()), list(verbalizers).index(label)))
            continue
        choices = _field(row, choices_field, path, line, list)
        if not choices or not all(isinstance(choice, str) for choice in choices):
            raise EvalDataError(f"{path}:{line}: `{choices_field}` must be a non-empty list of strings")
        answer = _answer_index(_field(row, answer_field, path, line, (int, str)), choices, path, line)
        questions.append(_Question(text, tuple(choices), answer))
    return questions


def _answer_index(answer: int | str, choices: list[str], path: Path, line: int) -> int:
    """An integer is a 0-based index; a string is the text of a choice (first match)."""
    if isinstance(answer, bool):
        raise EvalDataError(f"{path}:{line}: answer must be an index or a choice's text")
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise EvalDataError(f"{path}:{line}: answer index {answer} is out of range for {len(choices)} choices")
        return answer
    if answer not in choices:
        raise EvalDataError(f"{path}:{line}: answer `{answer}` is not one of the choices")
    return choices.index(answer)


def _accuracy(model, tokenizer, questions, *, batch_size, max_length, device, quiet) -> EvalOutcome:
    if not questions:
        raise EvalDataError("accuracy needs at least one row")
    limit = _context_length(model, max_length)
    items, owners = [], []
    for number, question in enumerate(questions):
        context = tokenizer(question.text)["input_ids"]
        for candidate in question.candidates:
            items.append(_joined(context, tokenizer(candidate, add_special_tokens=False)["input_ids"], limit, candidate))
            owners.append(number)
    scores = score_continuations(
        model, items, batch_size=batch_size, pad_id=_pad_id(tokenizer), device=device, description="accuracy", quiet=quiet
    )
    predictions = _argmax_per_question(scores, owners, len(questions))
    correct = sum(int(p == q.answer) for p, q in zip(predictions, questions))
    details = {"correct": correct, "total": len(questions), "predictions": predictions}
    return EvalOutcome(correct / len(questions), details)


def _joined(context: list[int], continuation: list[int], limit: int | None, text: str) -> tuple[list[int], int]:
    """context + continuation, the context cut from the left to fit ``limit``."""
    if not continuation:
        raise EvalDataError(f"continuation `{text}` tokenises to nothing")
    if limit is not None and len(context) + len(continuation) > limit:
        if len(continuation) >= limit:
            raise EvalDataError(f"continuation `{text}` does not fit max_length {limit}")
        context = context[len(context) + len(continuation) - limit :]
    if not context:
        raise EvalDataError("a continuation needs at least one context token before it")
    return context + continuation, len(context)


def _argmax_per_question(scores: list[tuple[float, int]], owners: list[int], count: int) -> list[int]:
    """Index of the best candidate per question; strict '>' keeps the first of ties."""
    best: list[tuple[float, int]] = [(-math.inf, -1)] * count
    position = [0] * count
    for (logprob, _), owner in zip(scores, owners):
        if best[owner][1] < 0 or logprob > best[owner][0]:
            best[owner] = (logprob, position[owner])
        position[owner] += 1
    return [index for _, index in best]


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    max_length: int | None = None,
    device: torch.device | str | None = None,
    quiet: bool = True,
) -> list[str]:
    """One continuation per prompt (the new text only, special tokens dropped).

    Greedy unless ``do_sample``; sampling draws from a generator seeded by
    ``seed`` and the prompt's index, inside a forked RNG state, so a prompt's
    text does not depend on the others or disturb the caller's randomness.
    """
    import torch

    device = torch.device(device) if device is not None else _model_device(model)
    limit = _context_length(model, max_length)
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "num_beams": 1}
    if do_sample:
        options.update(temperature=temperature, top_p=top_p)
    pad_id = _pad_id(tokenizer)
    forked = [device.index or 0] if device.type == "cuda" else []
    outputs = []
    with progress("generate", len(prompts), quiet=quiet) as advance, torch.inference_mode():
        for index, prompt in enumerate(prompts):
            ids = tokenizer(prompt)["input_ids"]
            if limit is not None:
                ids = ids[-max(1, limit - max_new_tokens) :]
            input_ids = torch.tensor([ids], dtype=torch.long, device=device)
            with torch.random.fork_rng(devices=forked):
                torch.manual_seed(seed + index)
                out = model.generate(
                    input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pad_token_id=pad_id, **options
                )
            outputs.append(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True))
            advance(1)
    return outputs


# ----------------------------------------------------------------------- driving


def run_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    spec: EvalSpec,
    device: torch.device | str | None = None,
    *,
    data: list[Any] | None = None,
    quiet: bool = True,
) -> EvalOutcome:
    """Evaluate ``model`` as it is now (patch it with ``applied`` first) on ``spec``.

    ``data`` is :func:`load_data`'s result, passed in so that a sweep reads its
    files once; it is read here when omitted.
    """
    if spec.metric not in tasks.metrics(spec.task):  # lint says so first (E501)
        raise EvalDataError(f"a {spec.task} model has no `{spec.metric}` evaluation")
    data = load_data(spec) if data is None else data
    if spec.metric == "lm_eval":
        from peftdsl.evaluation import lm_eval

        return lm_eval.evaluate(model, tokenizer, spec, quiet=quiet)
    if spec.task != tasks.CAUSAL_LM:
        from peftdsl.evaluation.task_metrics import IMPLEMENTATIONS

        return IMPLEMENTATIONS[spec.task, spec.metric](model, tokenizer, spec, data, quiet)
    common = {"max_length": spec.max_length, "device": device, "quiet": quiet}
    if spec.metric == "perplexity":
        return _perplexity(model, tokenizer, data, batch_size=spec.batch_size, **common)
    if spec.metric == "accuracy":
        fields = (spec.text_field, spec.label_field, spec.choices_field, spec.answer_field)
        questions = _questions(data, spec.labels, fields, Path(spec.data))
        return _accuracy(model, tokenizer, questions, batch_size=spec.batch_size, **common)
    texts = generate(
        model,
        tokenizer,
        data,
        max_new_tokens=spec.max_new_tokens,
        do_sample=spec.do_sample,
        temperature=spec.temperature,
        top_p=spec.top_p,
        seed=spec.seed,
        **common,
    )
    return EvalOutcome(texts, {"prompts": list(data)})


def evaluate_models(
    model: torch.nn.Module,
    tokenizer: Any,
    specs: Sequence[EvalSpec],
    deltas: Mapping[str, Mapping[str, Delta] | None],
    *,
    params: Mapping[str, float] | None = None,
    device: torch.device | str | None = None,
    quiet: bool = True,
) -> list[Result]:
    """Every (eval, model) pair of ``specs`` on one loaded base, as report rows.

    ``deltas`` maps each model name a spec lists to its deltas (``base`` may be
    omitted: it means no delta). Each model is patched once for all the evals
    that name it; rows come back in recipe order (eval, then the eval's models).
    """
    from peftdsl.evaluation.report import Result

    data = {spec.name: load_data(spec) for spec in specs}
    models = list(dict.fromkeys(name for spec in specs for name in spec.models))
    missing = [name for name in models if name != "base" and name not in deltas]
    if missing:
        raise KeyError(f"no deltas for model(s) {', '.join(missing)}")
    values: dict[tuple[str, str], EvalOutcome] = {}
    for name in models:
        _check_trained(model, name, deltas.get(name))
        with applied(model, deltas.get(name)):
            for spec in specs:
                if name in spec.models:
                    values[spec.name, name] = run_eval(model, tokenizer, spec, device, data=data[spec.name], quiet=quiet)
    return [
        Result(eval=spec.name, model=name, metric=spec.metric, value=values[spec.name, name].value, params=dict(params or {}))
        for spec in specs
        for name in spec.models
    ]


# The weights each loaded base got at random (its checkpoint lacks them): a model evaluated on
# it must set every one (a composition with heads averaged does), or its metric is noise.
_UNTRAINED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _check_trained(model: torch.nn.Module, name: str, deltas: Mapping[str, Delta] | None) -> None:
    untrained = _UNTRAINED.get(model, ())
    unset = [tensor for tensor in untrained if tensor not in (deltas or {})]
    if unset:
        raise UntrainedWeights(type(model).__name__, unset, model=name)


def load_base(path: str | Path, *, device: str = "cpu", dtype: str | None = None,
              task: str = tasks.CAUSAL_LM) -> tuple[torch.nn.Module, Any]:
    """The base model as its task's Auto class (in eval mode, on ``device``, optionally
    bfloat16) and its tokenizer."""
    import torch
    import transformers
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # peftdsl draws its own progress; one bar per load is noise
    torch_dtype = getattr(torch, dtype) if dtype else None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report is ours to give, as a diagnostic
    try:
        model_class = getattr(transformers, tasks.auto_class(task))
        model, info = model_class.from_pretrained(path, dtype=torch_dtype, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    # Weights the checkpoint lacks are drawn at random: a metric of them is noise, not a result,
    # unless the evaluated model sets them all (`evaluate_models` checks each model).
    model = model.to(device).eval()
    _UNTRAINED[model] = tuple(sorted(info.get("missing_keys") or ()))
    # Token classification reads pre-split words: byte-level BPE (RoBERTa, GPT-2) must mark each
    # as a word start, as HF's token-classification examples load it; other tokenizers ignore it.
    extra = {"add_prefix_space": True} if task == tasks.TOKEN_CLS else {}
    return model, AutoTokenizer.from_pretrained(path, **extra)
