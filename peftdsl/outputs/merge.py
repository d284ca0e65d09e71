"""Merged models: the base's weights with the composed delta folded in (docs/recipes.md).

The base is streamed one weight file and one tensor at a time and written as
sharded safetensors with an index, plus config and tokenizer files copied from the
base; the result equals PEFT's ``merge_and_unload``. Shard boundaries depend only on
tensor sizes, so identical inputs give byte-identical files.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from peftdsl import inputs
from peftdsl.errors import InputDataError
from peftdsl.outputs import pipeline
from peftdsl.outputs.atomic import atomic_output, check_output_free, json_bytes
from peftdsl.outputs.write import SAFETENSORS_METADATA, Stamp, write_provenance
from peftdsl.runtime import experts
from peftdsl.runtime.fold import (
    Delta,
    DenseDelta,
    PartDelta,
    changes_bias,
    check_fold,
    delta_rows,
    fold_bias,
    fold_part,
    fold_weight,
)
from peftdsl.runtime.tensorio import (
    TORCH_DTYPES,
    SafetensorsReader,
    StreamingSafetensors,
    as_dtype,
    stored,
)

Transform = Callable[[str, torch.Tensor], "torch.Tensor | None"]

DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # transformers' historical default, "5GB"


class PickledWeights(RuntimeError):
    """The base model stores pickled weights and the user did not allow loading them."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"{path} is a pickled checkpoint; loading one can run arbitrary code. "
            "Convert it to safetensors, or allow pickle explicitly (it is then loaded with weights_only=True)."
        )
        self.path = path


# =========================================================================== merge transforms


def add_dense_delta(W: torch.Tensor, delta: torch.Tensor, layout: str) -> torch.Tensor:
    """``W + ΔW`` with ΔW given in the factor frame (out×in), in float32 (:func:`fold_weight`)."""
    return fold_weight(W.to(torch.float32), DenseDelta(delta=delta, layout=layout))


@dataclass(frozen=True, slots=True)
class MergeTransform:
    """A ``transform`` for :func:`write_merged` built from per-module deltas.

    ``weight_names`` lists the tensors it must change, so that ``write_merged``
    can refuse to finish when one of them is not in the base (rather than
    silently dropping a delta). Biases are optional: a module without one has
    nothing to scale.
    """

    functions: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]
    parts: Mapping[str, PartDelta] = field(default_factory=dict)  # by tensor name; set on that name only
    required: frozenset[str] = frozenset()  # more names that must be stored (fused expert parameters)

    @property
    def weight_names(self) -> frozenset[str]:
        return frozenset(name for name in self.functions if name.endswith(".weight")) | self.required

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        function = self.functions.get(name)
        return None if function is None else function(tensor)

    # What the streaming writer asks to merge large tensors a block of rows at a time
    # (peftdsl.outputs.pipeline); parts it reads from ``parts`` itself.

    def changes(self, name: str) -> bool:
        """Whether ``self(name, ·)`` changes the tensor (parts aside)."""
        return name in self.functions

    def rows(self, name: str, shape: tuple[int, ...]) -> Callable | None:
        """``fold(block, start, stop)`` merging rows of ``name``, or None when it goes whole."""
        function = self.functions.get(name)
        return function.rows(shape) if isinstance(function, WeightFold) else None


@dataclass(frozen=True, slots=True)
class WeightFold:
    """:func:`fold_weight` of one module's delta, looked up in ``deltas`` when the writer
    reaches the weight (a lazy mapping computes it then), whole or by blocks of rows."""

    module: str
    deltas: Mapping[str, Delta]

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        return fold_weight(weight, self.deltas[self.module], name=self.module)

    def rows(self, shape: tuple[int, ...]) -> Callable[[torch.Tensor, int, int], torch.Tensor]:
        delta, name = self.deltas[self.module], self.module
        check_fold(shape, delta, name=name)  # against the whole weight: the errors of an unsplit merge
        return lambda block, start, stop: fold_weight(block, delta_rows(delta, start, stop), name=name, inplace=True)


def merge_transform(deltas: Mapping[str, Delta], *, dense: bool = False,
                    parts: Mapping[str, PartDelta] | None = None, base_dir: Path | None = None,
                    allow_pickle: bool = False) -> MergeTransform:
    """One transform for a whole mapping module → LoRA, dense or (IA)³ delta (``peftdsl.runtime.fold``),
    and tensor → ``PartDelta`` (saved modules, biases, token rows; also taken from ``deltas``).

    (IA)³ also maps the module's bias, as PEFT does. With ``dense=True`` every
    delta is dense and is looked up only when the writer reaches its weight, so a
    lazy mapping can compute each just in time. Expert modules (``…gate_up_proj[3]``)
    change the base's tensors that hold their fused parameter, found in ``base_dir``
    (``peftdsl.runtime.experts``).
    """
    plain, fused = experts.split_names(deltas)
    functions: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    if dense:
        functions = {f"{name}.weight": WeightFold(name, deltas) for name in sorted(plain)}
        parts = dict(parts or {})
    else:
        parts = dict(parts or {}) | {name: d for name, d in deltas.items() if isinstance(d, PartDelta)}
        for name in sorted(plain):
            delta = deltas[name]
            if isinstance(delta, PartDelta):
                continue
            functions[f"{name}.weight"] = WeightFold(name, deltas)
            if changes_bias(delta):
                functions[f"{name}.bias"] = lambda b, n=name, d=delta: fold_bias(b, d, name=n)
    if not fused:
        return MergeTransform(functions, parts)
    if base_dir is None:
        raise ValueError("expert deltas need the base's folder to find where their parameters are stored")
    stored = {entry.name: entry.shape for source in base_weight_files(base_dir, allow_pickle=allow_pickle)
              for entry in _read_entries(source)}
    expert_functions = experts.merge_functions(deltas, fused, base_dir, stored)
    return MergeTransform({**functions, **expert_functions}, parts, required=frozenset(expert_functions))


# =========================================================================== merged models


# Files copied from the base as they are: tokenizer and processor files, generation
# defaults, and the code of remote-code models (config.json's auto_map may name it).
_COPIED_PATTERNS = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.*",
    "merges.txt",
    "chat_template.*",
    "preprocessor_config.json",
    "processor_config.json",
    "*.py",
)


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One stored tensor of the base: where it is, and its shape and dtype (from the header)."""

    name: str
    source: Path
    shape: tuple[int, ...]
    dtype: torch.dtype

    def nbytes(self, dtype: torch.dtype) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * dtype.itemsize


def base_weight_files(base_dir: Path, *, allow_pickle: bool = False) -> list[Path]:
    """The base's weight files (:func:`peftdsl.inputs.base_weight_files`); pickled ones only when allowed.

    Raises :class:`PickledWeights` for a ``pytorch_model.bin`` checkpoint unless
    ``allow_pickle``, and OSError for a base whose weights cannot be listed.
    """
    try:
        files = inputs.base_weight_files(Path(base_dir))
    except inputs.InputError as err:
        raise (FileNotFoundError if err.code == "I301" else OSError)(err.message) from err
    if files[0].suffix == ".bin" and not allow_pickle:
        raise PickledWeights(files[0])
    return files


def _read_entries(source: Path) -> list[TensorEntry]:
    """The tensors of one file, from its header only (safetensors) or a lazy mmap (pickle)."""
    if source.suffix == ".safetensors":
        tensors, _ = inputs.read_safetensors_header(source)  # validated: offsets and sizes fit the file
        return [TensorEntry(name, source, info.shape, TORCH_DTYPES[info.dtype]) for name, info in sorted(tensors.items())]
    state = _load_pickle(source)
    return [TensorEntry(name, source, tuple(t.shape), t.dtype) for name, t in sorted(state.items())]


def _indexed(base_dir: Path, sources: list[Path], entries: list[TensorEntry]) -> list[TensorEntry]:
    """Each tensor once, from the shard the base's index maps it to (inputs.read_shard_headers)."""
    if sources[0].suffix != ".safetensors":
        return entries
    _, where = inputs.read_shard_headers(base_dir, sources)
    return [entry for entry in entries if where.get(entry.name) == entry.source]


def _load_pickle(source: Path) -> dict[str, torch.Tensor]:
    """Only called once the user allowed pickle: :func:`peftdsl.inputs.load_pickled` (weights_only, mmap).

    Its refusal (InputError) becomes an InputDataError, which the merge's callers report.
    """
    try:
        return inputs.load_pickled(source)
    except inputs.InputError as err:
        raise InputDataError(err.message) from err


@contextlib.contextmanager
def _tensor_reader(source: Path) -> Iterator[SafetensorsReader | _StateReader]:
    """Open one weight file; tensors, or blocks of their rows, are read lazily by offset (no memory map)."""
    if source.suffix == ".safetensors":
        with SafetensorsReader(source) as reader:
            yield reader
    else:
        state = _load_pickle(source)
        yield _StateReader(state)
        del state


class _StateReader:
    """A loaded (pickled) state dict, read like a safetensors file."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self.state = state

    def read(self, key: str) -> torch.Tensor:
        return self.state[key]

    def read_rows(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.state[key][start:stop]
        if out is None:
            return rows
        view = out[:rows.numel() * rows.element_size()].view(rows.dtype).reshape(rows.shape)
        return view.copy_(rows)


def plan_shards(
    entries: list[TensorEntry], out_dtype: Callable[[TensorEntry], torch.dtype], max_shard_bytes: int
) -> list[list[TensorEntry]]:
    """Split entries, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets its own).

    Planned from headers before any data is read, so the shard count in the file
    names is known while streaming.
    """
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for entry in entries:
        nbytes = entry.nbytes(out_dtype(entry))
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


def tied_groups(base_dir: Path, stored: Collection[str], task: str | None = None) -> dict[str, tuple[str, ...]]:
    """Map each stored tensor that is tied to other parameters to its whole group.

    With ``tie_word_embeddings`` the base usually stores the shared tensor once
    (``model.embed_tokens.weight``) and ``lm_head.weight`` is the same Parameter.
    The architecture is instantiated on the meta device (no memory, no weights)
    and parameters sharing one object are grouped, which is exactly how
    ``save_pretrained`` deduplicates them. Groups are in parameter order, so
    every stored copy of a group (some checkpoints keep both) gets the same
    deltas in the same order. An architecture transformers cannot build gives
    no groups; :func:`write_merged`'s ``expect`` check then catches any delta
    aimed at a tensor that is not stored.
    """
    model = _meta_model(base_dir, task)
    if model is None:  # no model, no known ties
        return {}
    by_parameter: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_parameter.setdefault(id(param), []).append(name)
    groups: dict[str, tuple[str, ...]] = {}
    for names in by_parameter.values():
        if len(names) > 1:
            groups.update({name: tuple(names) for name in names if name in stored})
    for name, key in _renamed_on_disk(model, stored).items():  # GPT-NeoX: `lm_head` is stored as `embed_out`
        groups[key] = tuple(dict.fromkeys((*groups.get(key, (key,)), name)))
    return groups


def _meta_model(base_dir: Path, task: str | None) -> torch.nn.Module | None:
    """The base's architecture for ``task`` on the meta device (no memory, no weights); None
    when transformers cannot build it."""
    try:
        import transformers
        from transformers import AutoConfig

        from peftdsl import tasks

        config = AutoConfig.from_pretrained(base_dir)
        auto = getattr(transformers, tasks.auto_class(task or tasks.CAUSAL_LM))  # T5 ties as a Seq2SeqLM
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            return auto.from_config(config)
    except Exception:  # noqa: BLE001
        return None


def _stored_parts(base_dir: Path, transform: Transform, stored: Collection[str], task: str | None) -> None:
    """Key the transform's parts by the stored tensor they set, where the base stores it under
    another name than the model's (a saved `lm_head` of GPT-NeoX sets `embed_out.weight`)."""
    parts = getattr(transform, "parts", None)
    if not parts or set(parts) <= set(stored):
        return
    model = _meta_model(base_dir, task)
    for name, key in (_renamed_on_disk(model, stored) if model is not None else {}).items():
        if name in parts and key not in parts:
            parts[key] = parts.pop(name)


def _renamed_on_disk(model: torch.nn.Module, stored: Collection[str]) -> dict[str, str]:
    """Parameters stored under another key, by transformers' own reverse conversion (what
    `save_pretrained` writes): name in memory -> stored key. Only plain renamings (one
    tensor to one) count; fused experts are peftdsl.runtime.experts' business."""
    from transformers.core_model_loading import revert_weight_conversion

    renamed = {}
    for name, param in model.named_parameters():
        if name in stored:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                keys = list(revert_weight_conversion(model, {name: param}))
        except Exception:  # noqa: BLE001 — a conversion that needs more than one tensor
            continue
        if len(keys) == 1 and keys[0] in stored:
            renamed[name] = keys[0]
    return renamed


def write_merged(
    target: Path,
    *,
    base_dir: Path,
    transform: Transform,
    dtype: torch.dtype | str | None = None,
    force: bool,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    allow_pickle: bool = False,
    expect: Collection[str] | None = None,
    provenance: Mapping[str, Any] | Stamp | None = None,
    task: str | None = None,
    card: bytes | None = None,
) -> Path:
    """Write the base model with ``transform`` applied to its weights, streaming shard by shard.

    ``transform(name, tensor_float32)`` returns the new tensor or None (unchanged).
    ``dtype`` casts every floating tensor (default: each keeps the base's dtype).
    ``expect`` (default: ``transform.weight_names`` when it has one) names the
    tensors the transform changes; a name that is neither stored nor tied to a
    stored tensor is an error, so no delta is ever dropped silently.
    ``provenance`` is written as ``peftdsl.json`` inside the same atomic rename, and ``card``
    (:mod:`peftdsl.outputs.card`) as ``README.md``.
    Parts the base does not store (a head created at fine-tuning) are added as a last shard,
    and the config becomes ``task``'s model class (peftdsl.tasks). Reading, merging and
    writing overlap, and peak memory is a few blocks of rows in flight, not a shard or a
    whole tensor (peftdsl.outputs.pipeline).
    """
    base_dir = Path(base_dir)
    check_output_free(Path(target), force)
    out_dtype = as_dtype(dtype)
    sources = base_weight_files(base_dir, allow_pickle=allow_pickle)
    entries = _indexed(base_dir, sources, [entry for source in sources for entry in _read_entries(source)])
    stored = {entry.name for entry in entries}
    expected = set(expect if expect is not None else getattr(transform, "weight_names", ()))
    groups = tied_groups(base_dir, stored, task) if _may_touch_tied(base_dir, expected, entries) else {}
    _check_expected(expected, stored, groups)
    _stored_parts(base_dir, transform, stored, task)
    added = _added_parts(getattr(transform, "parts", {}), stored)
    changes, kept = _new_model_class(base_dir, added, task) if added else ({}, None)
    if kept is not None:  # a new model class (a classifier): what it has no parameter for is left out
        entries = [entry for entry in entries if entry.name in kept]
    shards = plan_shards(entries, lambda e: _output_dtype(e, out_dtype), max_shard_bytes)
    count = len(shards) + (1 if added else 0)
    with atomic_output(Path(target), force=force) as tmp:
        weight_map = _write_shards(tmp, shards, transform, groups, out_dtype, count)
        total = sum(entry.nbytes(_output_dtype(entry, out_dtype)) for entry in entries)
        if added:
            weight_map.update(_write_added(tmp, added, out_dtype, count))
            total += sum(t.numel() * (out_dtype or torch.float32).itemsize for t in added.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_bytes(json_bytes(index))
        _write_config(base_dir, tmp, out_dtype, changes)
        _copy_side_files(base_dir, tmp)
        if provenance is not None:
            write_provenance(tmp, provenance, card)
    return Path(target)


def _added_parts(parts: Mapping[str, PartDelta], stored: Collection[str]) -> dict[str, torch.Tensor]:
    """The tensors the base does not store that parts set (a head created at fine-tuning, the
    `lm_head` of a tied model saved on its own), as float32 values."""
    added = {}
    for name in sorted(set(parts) - set(stored)):
        try:
            added[name] = fold_part(None, parts[name], name=name)
        except ValueError as err:
            raise InputDataError(str(err)) from err
    return added


def _new_model_class(base_dir: Path, added: Mapping[str, torch.Tensor],
                     task: str | None) -> tuple[dict[str, Any], set[str] | None]:
    """Config changes for a merged model that gains tensors, and the names its class keeps.

    An untied `lm_head` unties the config. A head the base lacked makes the model its task's
    class (`RobertaForMaskedLM` → `RobertaForSequenceClassification`): the class is built on
    the meta device from the base's config, twice with different label counts, so that the
    head tensors whose size is the number of labels tell it (no guess from names).
    """
    from transformers import AutoConfig

    from peftdsl import tasks

    config = AutoConfig.from_pretrained(base_dir)
    changes: dict[str, Any] = {}
    if any(name.endswith("lm_head.weight") for name in added):
        changes["tie_word_embeddings"] = False
    if task is None or task == tasks.CAUSAL_LM:
        return changes, None
    shapes = {labels: _meta_shapes(config, task, labels) for labels in (2, 3)}
    names = set(shapes[2])
    missing = sorted(set(added) - names)
    if missing:
        raise InputDataError(f"the merged {task} model has no parameter `{missing[0]}` to hold the composed value")
    by_labels = [name for name in added if shapes[2][name] != shapes[3][name]]
    if by_labels:
        name = by_labels[0]
        axis = next(i for i, (a, b) in enumerate(zip(shapes[2][name], shapes[3][name])) if a != b)
        labels = added[name].shape[axis]
        changes.update(num_labels=labels, id2label={str(i): f"LABEL_{i}" for i in range(labels)},
                       label2id={f"LABEL_{i}": i for i in range(labels)})
    changes["architectures"] = [_meta_class(config, task)]
    return changes, names


def _meta_shapes(config, task: str, labels: int) -> dict[str, tuple[int, ...]]:
    import copy

    import transformers

    from peftdsl import tasks

    config = copy.deepcopy(config)
    config.num_labels = labels
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = getattr(transformers, tasks.auto_class(task)).from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.named_parameters(remove_duplicate=False)}
    shapes.update({name: tuple(t.shape) for name, t in model.named_buffers()})
    return shapes


def _meta_class(config, task: str) -> str:
    import transformers

    from peftdsl import tasks

    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return type(getattr(transformers, tasks.auto_class(task)).from_config(config)).__name__


def _write_added(tmp: Path, added: Mapping[str, torch.Tensor], dtype: torch.dtype | None, count: int) -> dict[str, str]:
    """The added tensors as the last shard."""
    filename = f"model-{count:05d}-of-{count:05d}.safetensors"
    out = {name: stored(t, dtype or torch.float32, name) for name, t in sorted(added.items())}
    specs = {name: (t.dtype, tuple(t.shape)) for name, t in out.items()}
    writer = StreamingSafetensors(tmp / filename, specs, SAFETENSORS_METADATA)
    try:
        for name, tensor in out.items():
            writer.write(name, tensor)
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return dict.fromkeys(out, filename)


def _may_touch_tied(base_dir: Path, expected: set[str], entries: list[TensorEntry]) -> bool:
    """Whether the deltas could land on tied parameters, so that ties must be looked up.

    Looking them up builds the architecture with transformers (2–3 s of imports on an idle
    machine, far more on a busy one). A causal LM ties its word embeddings to its output
    layer, both vocab×hidden: when every changed tensor is stored and either none has the
    vocabulary's size or the config unties them (and no encoder-decoder shares its
    embeddings), none is tied. A full fine-tune changes every tensor, embeddings included.
    """
    stored = {entry.name: entry for entry in entries}
    if not expected <= stored.keys():
        return True
    try:
        config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    configs = [config, *([config["text_config"]] if isinstance(config.get("text_config"), dict) else [])]
    if all(c.get("tie_word_embeddings") is False and not c.get("is_encoder_decoder") for c in configs):
        return False
    vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if not isinstance(vocab, int):
        return True
    return any(vocab in stored[name].shape for name in expected)


def _output_dtype(entry: TensorEntry, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if (dtype is not None and entry.dtype.is_floating_point) else entry.dtype


def _check_expected(expect: Collection[str], stored: set[str], groups: Mapping[str, tuple[str, ...]]) -> None:
    reachable = stored | {name for names in groups.values() for name in names}
    missing = sorted(set(expect) - reachable)
    if missing:
        raise InputDataError(f"the base model has no tensor named {', '.join(f'`{name}`' for name in missing)}")


def _write_shards(
    tmp: Path,
    shards: list[list[TensorEntry]],
    transform: Transform,
    groups: Mapping[str, tuple[str, ...]],
    dtype: torch.dtype | None,
    count: int,
) -> dict[str, str]:
    """Stream tensors in plan order through reading, merging and writing at once (peftdsl.outputs.pipeline)."""
    return pipeline.write_shards(tmp, shards, transform, groups, dtype, count, open_source=_tensor_reader)


def _write_config(base_dir: Path, tmp: Path, dtype: torch.dtype | None, changes: Mapping[str, Any] | None = None) -> None:
    """Copy config.json, recording a new dtype where one was asked for.

    transformers 5 names the field ``dtype``; releases before 4.56 wrote
    ``torch_dtype``. Every field present is updated; with neither, ``dtype``
    is added (what the installed transformers reads).
    """
    source = base_dir / "config.json"
    if not source.is_file():
        return
    if dtype is None and not changes:
        shutil.copyfile(source, tmp / "config.json")
        return
    config = json.loads(source.read_text())
    config.update(changes or {})
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        fields = [key for key in ("dtype", "torch_dtype") if key in config] or ["dtype"]
        for key in fields:
            config[key] = name
    (tmp / "config.json").write_bytes(json_bytes(config))


def _copy_side_files(base_dir: Path, tmp: Path) -> None:
    names = sorted({path.name for pattern in _COPIED_PATTERNS for path in base_dir.glob(pattern) if path.is_file()})
    for name in names:
        shutil.copyfile(base_dir / name, tmp / name)
