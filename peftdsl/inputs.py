"""Stage 4: read input metadata — configs and safetensors headers, never tensor data.

Everything `lint` knows about adapters and the base model comes from here:
`adapter_config.json`, the JSON header of `adapter_model.safetensors` (names,
dtypes, shapes), and the base's `config.json` and weight headers. No torch, no
peft: this runs in a pre-commit hook.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from peftdsl import ir, safetensors_header
from peftdsl.safetensors_header import Entry as TensorInfo

if TYPE_CHECKING:
    from peftdsl.experts import ExpertSlot

ADAPTER_PREFIX = "base_model.model."
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}

# Variants whose update is not linear in their parameters (or not a delta at all).
_NONLINEAR_FLAGS = {
    "use_dora": "DoRA rescales the weight by a learned magnitude, so its update is not linear in its factors",
    "use_qalora": "QALoRA's pooled inputs are not a plain low-rank delta",
    "use_bdlora": "block-diagonal LoRA variants are not supported",
    "alora_invocation_tokens": "activated LoRA applies its delta to some tokens only",
    "layer_replication": "layer replication changes the model's structure",
}
SUPPORTED_TYPES = {"LORA": ir.Kind.LORA, "IA3": ir.Kind.IA3}
# Names transformers gives input embeddings, which a tied output layer shares.
INPUT_EMBEDDINGS = _INPUT_EMBEDDINGS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                     "shared.weight")
# Checkpoint keys that transformers renames when it loads a model, by the model class in the
# base's `architectures` or its `model_type` (the keys of transformers' own conversion
# mapping, `transformers.conversion_mapping`): (a pattern of the name in memory, which PEFT
# uses; what it is on disk). These are the plain renamings of that mapping that reach a
# tensor an adapter can change; fused experts are peftdsl.experts' business. A test checks
# every parameter of the models the coverage matrix builds against what `save_pretrained`
# stores, so that this table cannot drift from transformers unseen.
CHECKPOINT_RENAMES: dict[str, tuple[tuple[str, str], ...]] = {
    "GPTNeoXForCausalLM": ((r"^lm_head\.", "embed_out."),),
    "mixtral": ((r"\.mlp\.", ".block_sparse_moe."),),
}
# Input embeddings that a seq2seq model's encoder and decoder share with `shared` (T5).
_SHARED_EMBEDDINGS = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")

# `init_lora_weights` values whose initialisation rewrites the base weight when PEFT loads
# the adapter (PiSSA and its `pissa_niter_*` variants, CorDA, OLoRA: W − B₀A₀; LoftQ: a
# quantised residual; LoRA-GA: gradient-based). An adapter saved without conversion holds
# factors relative to that rewritten base, so its ΔW against the real base is not s·B·A.
# PEFT's `save_pretrained(..., path_initial_model_for_weight_conversion=...)` converts
# one into a plain LoRA (and records `init_lora_weights: true`). The others (gaussian,
# eva, orthogonal, mica, true/false) leave the base untouched.
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


@dataclass(frozen=True, slots=True)
class ModuleInfo:
    """One adapted module, in the factor frame (see docs/conventions.md)."""

    name: str
    out_features: int
    in_features: int
    rank: int = 0  # lora
    alpha: float = 0.0  # lora
    scaling: float = 0.0  # lora: α/r, or α/√r with rsLoRA
    layout: str = "linear"  # linear | conv1d | embedding
    feedforward: bool = False  # ia3
    keys: tuple[str, ...] = ()  # the safetensors keys holding this module's tensors
    dtype: str = "F32"
    expert: ExpertSlot | None = None  # one expert of a fused parameter (`target_parameters`)


@dataclass(frozen=True, slots=True)
class PartInfo:
    """A tensor an adapter carries beside its factors (DESIGN §2 "Beyond factors").

    `tensor` is the model's tensor it sets, in the base's naming (`classifier.out_proj.weight`,
    `model.embed_tokens.weight`). Roles: `module` — a weight of a saved module
    (`modules_to_save`), its new value; `bias` — a bias trained with `bias: all/lora_only`,
    its new value; `tokens` — new values of some rows of an embedding
    (`trainable_token_indices`); `lora_bias` — `lora_B.bias`, a *delta* s·b on the module's
    bias. The values are composed as task vectors against the base (their value minus the
    base's), the delta as it is.
    """

    tensor: str
    role: str  # module | bias | tokens | lora_bias | full
    key: str  # the safetensors key holding it
    shape: tuple[int, ...]  # as stored: tokens are rows × hidden
    dtype: str
    rows: tuple[int, ...] = ()  # tokens: the embedding rows it replaces, in the stored order
    scaling: float = 1.0  # lora_bias: the delta is scaling · lora_B.bias
    saved_module: str = ""  # module: the saved module it belongs to (`classifier`)

    @property
    def is_delta(self) -> bool:
        return self.role == "lora_bias"


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    name: str
    kind: ir.Kind
    path: Path | None  # the adapter's folder; None for a source given in memory
    weights: Path | None  # its weights file; None for a source given in memory
    config: dict
    modules: Mapping[str, ModuleInfo]
    base_model: str | None
    task_type: str | None
    state: Mapping | None = None  # the tensors of a source given in memory (the Python API)
    parts: Mapping[str, PartInfo] = field(default_factory=dict)  # by the tensor they set
    files: tuple[Path, ...] = ()  # a full fine-tune: its weight shards (what its pin covers)
    tensor_files: Mapping[str, Path] = field(default_factory=dict)  # a full fine-tune: tensor -> shard

    @property
    def rank(self) -> int | None:
        return self.config.get("r") if self.kind is ir.Kind.LORA else None


@dataclass(frozen=True, slots=True)
class BaseInfo:
    path: Path
    config: dict
    weights: dict[str, TensorInfo]  # weight name -> header entry
    files: dict[str, Path] = field(default_factory=dict)  # weight name -> shard

    def module_weight(self, module: str) -> TensorInfo | None:
        """The base weight of `module` (a name as the model in memory has it)."""
        stored = self.stored_as(f"{module}.weight")
        return self.weights.get(stored) if stored is not None else None

    def stored_as(self, tensor: str, shape: tuple[int, ...] | None = None) -> str | None:
        """The stored tensor that holds `tensor`'s base value (`tensor` named as the model in
        memory names it): itself; its key on disk where transformers renames it at load
        (GPT-NeoX's `lm_head` is stored as `embed_out`); or, for the output layer of a model
        that ties it to its input embeddings (stored once, as the embedding), that embedding,
        when exactly one input embedding (of `shape`, when given) is stored. None when the
        base has no such tensor."""
        if tensor in self.weights:
            return tensor
        for key in (*(self.config.get("architectures") or ()), self.config.get("model_type")):
            for in_memory, on_disk in CHECKPOINT_RENAMES.get(str(key), ()):
                renamed = re.sub(in_memory, on_disk, tensor, count=1)
                if renamed in self.weights:
                    return renamed
        if tensor.endswith(_SHARED_EMBEDDINGS) and "shared.weight" in self.weights:
            return "shared.weight"
        config = self.config.get("text_config") or self.config
        if not tensor.endswith("lm_head.weight") or not config.get("tie_word_embeddings", True):
            return None
        tied = [name for name, info in self.weights.items()
                if name.endswith(_INPUT_EMBEDDINGS) and (shape is None or tuple(info.shape) == tuple(shape))]
        return tied[0] if len(tied) == 1 else None


class InputError(Exception):
    """A problem with an input's files, turned into a diagnostic by the caller."""

    def __init__(self, code: str, message: str, help: str = ""):
        super().__init__(message)
        self.code, self.message, self.help = code, message, help


# ---------------------------------------------------------------- safetensors


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict]:
    """A safetensors file's tensors and metadata, validated as the safetensors library does
    (peftdsl.safetensors_header); I304 naming the file and what is wrong otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        raise InputError("I304", f"cannot read `{path}`: {err.strerror or err}") from err
    try:
        header = safetensors_header.read_header(fd)
    except safetensors_header.HeaderError as err:
        raise InputError("I304", f"`{path.name}` {err}") from err
    except OSError as err:
        raise InputError("I304", f"cannot read `{path}`: {err.strerror or err}") from err
    finally:
        os.close(fd)
    return header.tensors, header.metadata


# ---------------------------------------------------------------- adapters


def path_kind(path: Path) -> str | None:
    """`dir`, `file`, `other` (a FIFO, a device…), or None when no such file can be found.

    A name too long for the OS or holding a NUL character is as absent as a missing
    one (`Path.exists` raises on the former); a file we may not read says so.
    """
    try:
        mode = path.stat().st_mode
    except ValueError:
        return None
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EINVAL):
            return None
        raise InputError("I301", f"cannot access `{path}`: {err.strerror or err}") from err
    if stat.S_ISDIR(mode):
        return "dir"
    return "file" if stat.S_ISREG(mode) else "other"


def _confined(folder: Path, path: Path) -> Path:
    """``path`` (a file of the adapter in ``folder``), refused unless it stays inside.

    The security policy for adapter folders (docs/reliability.md): an adapter's files
    may be symlinks only to files inside the adapter's folder, so that a shared or
    downloaded adapter cannot make peftdsl read (and hash, and copy into provenance)
    a file elsewhere on the machine. A Hugging Face cache snapshot
    (`models--org--name/snapshots/<rev>/`) links its files into the repo's `blobs/`;
    there the repo's cache folder is the boundary. Anything that is not a regular
    file (a FIFO, a device) is refused too: reading it could block or never end.
    """
    boundary = folder.resolve()
    if boundary.parent.name == "snapshots" and boundary.parent.parent.name.startswith("models--"):
        boundary = boundary.parent.parent
    try:
        target = path.resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise InputError("I304", f"`{path.name}` cannot be resolved ({err})") from err
    if not target.is_relative_to(boundary):
        raise InputError("I312", f"`{path.name}` is a link to `{target}`, outside the adapter's folder",
                         "copy the file into the adapter's folder; peftdsl follows links only inside it")
    if path_kind(target) == "other":
        raise InputError("I304", f"`{path.name}` is not a regular file")
    return path


def locate_adapter(adapter: ir.Adapter) -> Path:
    """The adapter's folder: a local path, or an `hf:` source found in the Hugging Face cache."""
    if adapter.path is not None:
        kind = path_kind(adapter.path)
        if kind is None:
            raise InputError("I301", f"adapter folder `{adapter.location}` does not exist",
                             "paths are relative to the recipe's folder")
        if kind != "dir":
            raise InputError("I301", f"`{adapter.location}` is not a folder")
        return adapter.path
    return resolve_hf(adapter.location)


def resolve_hf(location: str) -> Path:
    """`hf:org/name[@rev]` through the local Hugging Face cache only (works offline)."""
    repo, _, revision = location[3:].partition("@")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as err:  # pragma: no cover - huggingface_hub comes with transformers
        raise InputError("I301", "huggingface_hub is needed for `hf:` sources") from err
    try:
        # The cache folder is read at call time (huggingface_hub reads its env once, at import).
        cache = os.environ.get("HF_HUB_CACHE") or None
        return Path(snapshot_download(repo, revision=revision or None, local_files_only=True, cache_dir=cache))
    except (LocalEntryNotFoundError, OSError, ValueError) as err:
        raise InputError("I301", f"`{location}` is not in the Hugging Face cache",
                         f"download it once with `huggingface-cli download {repo}`") from err


def is_full_model(folder: Path) -> bool:
    """A model folder (a full fine-tune): `config.json` and weights, no `adapter_config.json`."""
    return (path_kind(folder / "adapter_config.json") is None and path_kind(folder / "config.json") == "file"
            and any(path_kind(folder / name) is not None for name in _MODEL_WEIGHT_FILES))


_MODEL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                       "pytorch_model.bin.index.json")


def source_files(name: str, folder: Path, *, allow_pickle: bool = False) -> list[Path]:
    """The files a source's pin covers: an adapter's weights file, or a model's weight shards."""
    if is_full_model(folder):
        files = base_weight_files(folder)
        if files[0].suffix == ".bin" and not allow_pickle:
            raise InputError("I310", f"full fine-tune `{name}` stores its weights as a pickle (`{files[0].name}`)",
                             "convert it to safetensors, or pass --allow-pickle to load it with weights_only=True")
        return [_confined(folder, f) for f in files]
    return [adapter_weights(name, folder, allow_pickle=allow_pickle)]


def read_source(name: str, folder: Path, *, allow_pickle: bool = False, base: BaseInfo | None = None,
                declared: ir.Kind | None = None) -> AdapterInfo:
    """A source's metadata: a PEFT adapter, or a full fine-tune of `base` (declared `kind: full`,
    or a model folder without `adapter_config.json`)."""
    if declared is ir.Kind.DENSE or (declared is None and is_full_model(folder)):
        return read_full(name, folder, base, allow_pickle=allow_pickle)
    return read_adapter(name, folder, allow_pickle=allow_pickle)


def read_full(name: str, folder: Path, base: BaseInfo | None, *, allow_pickle: bool = False) -> AdapterInfo:
    """A full fine-tune of `base` as a dense source (DESIGN §2 "Full fine-tunes as task vectors").

    Its value is τ = θ − θ_base for every tensor. Matrices whose base tensor is a module's
    2-D weight (not an input embedding) are *modules*: dense deltas that `svd` can turn into
    LoRA factors. Every other tensor (norms, biases, embeddings, …) is a *part* composed as a
    task vector against the base, like a saved module's weights. Shapes and dtypes are
    checked against the base from the headers alone; a resized vocabulary names the tensor.
    """
    if path_kind(folder / "config.json") != "file":
        raise InputError("I302", f"full fine-tune `{name}` has no `config.json`",
                         "a full source is a model folder as `save_pretrained` writes it")
    if base is None:
        raise InputError("I301", f"full fine-tune `{name}` needs the recipe's `base`: its value is θ − θ_base",
                         "add `base: path/to/the/model/it/was/fine-tuned/from`")
    files = source_files(name, folder, allow_pickle=allow_pickle)
    if not base.weights:
        raise InputError("I304", f"full fine-tune `{name}` needs a safetensors base to be checked against")
    if files[0].suffix == ".bin":  # `--allow-pickle`: each shard loaded (memory-mapped) for its shapes
        tensors, where = {}, {}
        for shard in files:
            for key, info in read_pickled_shapes(shard).items():
                tensors.setdefault(key, info)
                where.setdefault(key, shard)
    else:
        tensors, where = read_shard_headers(folder, files)
    conv1d = base.config.get("model_type") in _CONV1D_MODEL_TYPES
    modules, parts = {}, {}
    for key in sorted(tensors):
        info, stored = tensors[key], base.weights.get(key)
        if stored is None:
            raise InputError("I307", f"full fine-tune `{name}` has `{key}`, which the base model does not have",
                             "a fine-tune of another base model?")
        if tuple(info.shape) != tuple(stored.shape):
            raise InputError("I307", f"full fine-tune `{name}`: `{key}` is {_shape_text(info.shape)} but "
                             f"{_shape_text(stored.shape)} in the base" + (
                                 " (a resized vocabulary?)" if key.endswith((*_INPUT_EMBEDDINGS, "lm_head.weight"))
                                 else ""),
                             "a fine-tune of another base model, or one with added tokens")
        if info.dtype not in FLOAT_DTYPES:
            if info.dtype != stored.dtype:
                raise InputError("I307", f"full fine-tune `{name}`: `{key}` is {info.dtype}, {stored.dtype} in the base")
            continue  # integer buffers (position ids…): not trained
        if len(info.shape) == 2 and key.endswith(".weight") and not key.endswith(_INPUT_EMBEDDINGS):
            module = key[: -len(".weight")]
            out_features, in_features = info.shape[::-1] if conv1d else info.shape
            modules[module] = ModuleInfo(name=module, out_features=out_features, in_features=in_features,
                                         layout="conv1d" if conv1d else "linear", keys=(key,), dtype=info.dtype)
        else:
            parts[key] = PartInfo(key, "full", key, tuple(info.shape), info.dtype)
    missing = sorted(set(k for k, t in base.weights.items() if t.dtype in FLOAT_DTYPES) - set(tensors))
    if missing:
        raise InputError("I307", f"full fine-tune `{name}` lacks `{missing[0]}`, which the base model has"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                         "a fine-tune of another base model, or a partial checkpoint")
    config = _read_json(folder / "config.json", "I302")
    return AdapterInfo(name=name, kind=ir.Kind.DENSE, path=folder, weights=files[0], config=config,
                       modules=modules, base_model=config.get("_name_or_path") or None, task_type=None,
                       parts=parts, files=tuple(files), tensor_files=where)


def _shape_text(shape) -> str:
    return "×".join(map(str, shape)) or "scalar"


# transformers models whose projections are `Conv1D` (weights stored in×out).
_CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})


def read_adapter(name: str, folder: Path, *, allow_pickle: bool = False) -> AdapterInfo:
    config_file = folder / "adapter_config.json"
    if config_file.is_symlink():
        _confined(folder, config_file)
    config = _read_json(config_file, "I302")
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise InputError("I302", f"adapter `{name}`: `adapter_config.json` has no `peft_type`",
                         "PEFT's save_pretrained writes it; is this a PEFT adapter folder?")
    if peft_type not in SUPPORTED_TYPES:
        raise InputError("I303", f"adapter `{name}` is a `{peft_type}` adapter; peftdsl composes LoRA and (IA)³",
                         "only LORA and IA3 adapters are linear in their parameters")
    weights = adapter_weights(name, folder, allow_pickle=allow_pickle)
    if weights.suffix == ".bin":
        tensors = read_pickled_shapes(weights)
    else:
        tensors, _ = read_safetensors_header(weights)
    return describe_adapter(name, config, tensors, path=folder, weights=weights)


def describe_adapter(name: str, config: dict, tensors: Mapping[str, TensorInfo], *, path: Path | None,
                     weights: Path | None, state: Mapping | None = None) -> AdapterInfo:
    """An adapter's metadata from its config and its tensors' names, dtypes and shapes: the one
    description that files and in-memory sources share, so the checker sees both alike."""
    peft_type = config.get("peft_type")
    if peft_type not in SUPPORTED_TYPES:
        raise InputError("I303", f"adapter `{name}` is a `{peft_type}` adapter; peftdsl composes LoRA and (IA)³",
                         "only LORA and IA3 adapters are linear in their parameters")
    for flag, reason in _NONLINEAR_FLAGS.items():
        if config.get(flag):
            raise InputError("I303", f"adapter `{name}` uses `{flag}`: {reason}",
                             "composing it would silently give a wrong result")
    kind = SUPPORTED_TYPES[peft_type]
    if kind is ir.Kind.LORA:
        _check_init(name, config.get("init_lora_weights"))
    modules = _lora_modules(name, config, tensors) if kind is ir.Kind.LORA else _ia3_modules(name, config, tensors)
    parts = adapter_parts(name, config, tensors, modules)
    return AdapterInfo(name=name, kind=kind, path=path, weights=weights, config=config, modules=modules,
                       base_model=config.get("base_model_name_or_path"), task_type=config.get("task_type"),
                       state=state, parts=parts)


def adapter_weights(name: str, folder: Path, *, allow_pickle: bool = False) -> Path:
    """The adapter's weights file: `adapter_model.safetensors`, else (when allowed) the pickle."""
    weights = folder / "adapter_model.safetensors"
    if weights.exists() or weights.is_symlink():
        return _confined(folder, weights)
    pickled = folder / "adapter_model.bin"
    if not (pickled.exists() or pickled.is_symlink()):
        raise InputError("I304", f"adapter `{name}` has no `adapter_model.safetensors`")
    if not allow_pickle:
        raise InputError("I310", f"adapter `{name}` stores its weights as a pickle (`adapter_model.bin`)",
                         "convert it to safetensors, or pass --allow-pickle to load it with weights_only=True")
    return _confined(folder, pickled)


def load_pickled(path: Path) -> dict:
    """A pickled state dict, loaded with `weights_only=True` (tensors only, never code).

    Only reached with `--allow-pickle`; torch is imported here, so `lint` stays torch-free.
    Whatever the file holds besides a flat mapping of names to tensors is refused (I304).
    """
    import pickle

    import torch

    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (pre-zip) checkpoints cannot be mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, TypeError,
            AttributeError, ImportError, IndexError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError("I304", f"`{path.name}` cannot be loaded with weights_only=True: {first}",
                         "a pickle that needs more than tensors to load is refused") from err
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise InputError("I304", f"`{path.name}` is not a mapping of tensor names to tensors")
    return state


_TORCH_DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
                 "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "int64": "I64", "int32": "I32",
                 "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def _check_init(name: str, init: object) -> None:
    if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
        raise InputError(
            "I303", f"adapter `{name}` was initialised with `init_lora_weights: {init}`, which rewrites the base "
            "weights when PEFT loads it: its factors are not a delta on the base",
            "LoftQ factors belong to their quantised base: merge the adapter there, outside peftdsl"
            if init.lower().startswith("loftq") else
            "save it converted to a plain LoRA: `model.save_pretrained(out, "
            "path_initial_model_for_weight_conversion=<the adapter saved before training>)`")


def read_pickled_shapes(path: Path) -> dict[str, TensorInfo]:
    """The `TensorInfo`s of a pickled state dict (a pickle has no header: it is loaded)."""
    return state_tensor_infos(load_pickled(path))


def state_tensor_infos(state: Mapping) -> dict[str, TensorInfo]:
    """The `TensorInfo`s of a state dict in memory, as a safetensors header would give them."""
    return {key: TensorInfo(_TORCH_DTYPES.get(str(t.dtype).removeprefix("torch."), str(t.dtype)),
                            tuple(t.shape), (0, 0))
            for key, t in state.items()}


def _is_factor(key: str) -> bool:
    return key.endswith((".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B", ".ia3_l"))


# ---------------------------------------------------------------- parts beside the factors

_TOKENS_SUFFIX = ".token_adapter.trainable_tokens_delta"


def adapter_parts(name: str, config: dict, tensors: Mapping[str, TensorInfo],
                  modules: Mapping[str, ModuleInfo]) -> dict[str, PartInfo]:
    """Every tensor of the adapter that is not a factor, as the part it is; a tensor that is
    none of PEFT's parts is refused (I304), never dropped."""
    parts: dict[str, PartInfo] = {}
    saved = _saved_modules(config)
    for key in sorted(tensors):
        if _is_factor(key) or key.endswith(".base_layer.weight"):
            continue
        part = _part(name, config, key, tensors[key], saved, modules)
        if part.tensor in parts:
            raise InputError("I303", f"adapter `{name}` sets `{part.tensor}` twice (`{parts[part.tensor].key}` and "
                             f"`{key}`)", "train with either `lora_bias` or `bias`, not both")
        parts[part.tensor] = part
    return parts


def _saved_modules(config: dict) -> list[str]:
    saved = config.get("modules_to_save") or []
    return [saved] if isinstance(saved, str) else [m for m in saved if isinstance(m, str)]


def _part(name: str, config: dict, key: str, info: TensorInfo, saved: list[str],
          modules: Mapping[str, ModuleInfo]) -> PartInfo:
    tensor = _strip(key, "")
    if info.dtype not in FLOAT_DTYPES:
        raise InputError("I304", f"adapter `{name}`: `{key}` has dtype {info.dtype}, not a float type")
    if key.endswith(".lora_B.bias"):
        module = _strip(key, ".lora_B.bias")
        if module not in modules or len(info.shape) != 1 or info.shape[0] != modules[module].out_features:
            raise InputError("I304", f"adapter `{name}`: `{key}` is no bias of a LoRA module's output")
        return PartInfo(f"{module}.bias", "lora_bias", key, info.shape, info.dtype, scaling=modules[module].scaling)
    if key.endswith(_TOKENS_SUFFIX):
        module = _strip(key, _TOKENS_SUFFIX)
        rows = _token_rows(name, config, module)
        if len(info.shape) != 2 or info.shape[0] != len(rows):
            raise InputError("I304", f"adapter `{name}`: `{key}` holds {list(info.shape)} values for "
                             f"{len(rows)} trained token rows", "the weights and adapter_config.json disagree")
        return PartInfo(f"{module}.weight", "tokens", key, info.shape, info.dtype, rows=rows)
    owner = next((m for m in _ancestors(tensor) if any(_matches(m, entry) for entry in saved)), None)
    if owner is not None:
        return PartInfo(tensor, "module", key, info.shape, info.dtype, saved_module=owner)
    if key.endswith(".bias") and config.get("bias") in ("all", "lora_only"):
        return PartInfo(tensor.replace(".base_layer.bias", ".bias"), "bias", key, info.shape, info.dtype)
    raise InputError("I304", f"adapter `{name}`: `{key}` is neither a factor nor a part PEFT saves "
                     "(saved modules, biases, trained token rows)", "the weights and adapter_config.json disagree")


def _ancestors(tensor: str) -> list[str]:
    """The modules a tensor lies in, innermost first: `a.b.weight` → `a.b`, `a`."""
    names = tensor.split(".")[:-1]
    return [".".join(names[:i]) for i in range(len(names), 0, -1)]


def _matches(module: str, entry: str) -> bool:
    """PEFT's match of a `modules_to_save` entry: the module's name or a dotted suffix of it."""
    return module == entry or module.endswith("." + entry)


def _token_rows(name: str, config: dict, module: str) -> tuple[int, ...]:
    indices = config.get("trainable_token_indices")
    if isinstance(indices, dict):
        indices = next((rows for entry, rows in indices.items() if _matches(module, entry)), None)
    if not isinstance(indices, list) or not all(isinstance(i, int) and i >= 0 for i in indices):
        raise InputError("I302", f"adapter `{name}`: `trainable_token_indices` gives no row list for `{module}`")
    if len(set(indices)) != len(indices):
        raise InputError("I302", f"adapter `{name}`: `trainable_token_indices` repeats a row for `{module}`")
    return tuple(indices)


def _read_json(path: Path, code: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise InputError(code, f"`{path.parent.name}` has no `{path.name}`", "is this a PEFT adapter folder?") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(code, f"`{path}` is not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise InputError(code, f"`{path}` is not a JSON object")
    return data


def pattern_key(patterns: dict, module: str) -> str | None:
    """PEFT's `get_pattern_key`: the first pattern matching the end of the module name."""
    for key in patterns:
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return key
        except re.error:
            continue
    return None


def _strip(key: str, suffix: str) -> str:
    module = key[: len(key) - len(suffix)]  # not key[:-len(suffix)]: an empty suffix would give ""
    return module[len(ADAPTER_PREFIX):] if module.startswith(ADAPTER_PREFIX) else module


def _lora_modules(name: str, config: dict, tensors: dict[str, TensorInfo]) -> dict[str, ModuleInfo]:
    r, alpha = config.get("r"), config.get("lora_alpha", 8)  # PEFT's LoraConfig default
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
        raise InputError("I302", f"adapter `{name}`: `r` and `lora_alpha` must be positive numbers")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora"))
    conv1d = bool(config.get("fan_in_fan_out"))
    modules, wrapped = _expert_modules(name, config, tensors, rslora)
    for suffix_a, suffix_b, layout in ((".lora_A.weight", ".lora_B.weight", "conv1d" if conv1d else "linear"),
                                       (".lora_embedding_A", ".lora_embedding_B", "embedding")):
        for key in sorted(k for k in tensors if k.endswith(suffix_a) and k not in wrapped):
            module = _strip(key, suffix_a)
            key_b = key[: -len(suffix_a)] + suffix_b
            modules[module] = _lora_module(name, module, tensors, key, key_b, layout,
                                           rank_pattern, alpha_pattern, r, alpha, rslora)
        for key_b in sorted(k for k in tensors if k.endswith(suffix_b) and k not in wrapped):  # a B without A
            key_a = key_b[: -len(suffix_b)] + suffix_a
            if key_a not in tensors:
                raise InputError("I304", f"adapter `{name}`: `{key_b}` has no matching `{key_a}`",
                                 "half of a LoRA pair cannot be composed; re-save the adapter")
    if not modules:
        raise InputError("I304", f"adapter `{name}` has no LoRA tensors in `adapter_model.safetensors`")
    return modules


def _expert_error(message: str, help: str = "", code: str = "I304") -> InputError:
    return InputError(code, message, help)


def _expert_modules(name: str, config: dict, tensors: dict[str, TensorInfo],
                    rslora: bool) -> tuple[dict[str, ModuleInfo], set[str]]:
    """The experts of every `target_parameters` wrapper (peftdsl.experts), and the keys they use."""
    from peftdsl import experts

    modules, keys = {}, set()
    for param in experts.parameter_factors(name, config, tensors, pattern_key, _expert_error):
        keys.update((param.key_a, param.key_b))
        a, b = tensors[param.key_a], tensors[param.key_b]
        for t, k in ((a, param.key_a), (b, param.key_b)):
            if t.dtype not in FLOAT_DTYPES:
                raise InputError("I304", f"adapter `{name}`: `{k}` has dtype {t.dtype}, not a float type")
        for index in range(param.count):
            module = experts.expert_name(param.parameter, index)
            modules[module] = ModuleInfo(
                name=module, out_features=b.shape[0], in_features=a.shape[1], rank=param.rank, alpha=param.alpha,
                scaling=experts.scaling(param.alpha, param.rank, rslora), keys=(param.key_a, param.key_b),
                dtype=a.dtype, expert=experts.ExpertSlot(param.parameter, index, param.count))
    return modules, keys


def _lora_module(name, module, tensors, key_a, key_b, layout, rank_pattern, alpha_pattern, r, alpha, rslora):
    a, b = tensors[key_a], tensors.get(key_b)
    if b is None:
        raise InputError("I304", f"adapter `{name}`: `{key_a}` has no matching `{key_b}`")
    for t, k in ((a, key_a), (b, key_b)):
        if t.dtype not in FLOAT_DTYPES:
            raise InputError("I304", f"adapter `{name}`: `{k}` has dtype {t.dtype}, not a float type")
        if len(t.shape) != 2:
            raise InputError("I304", f"adapter `{name}`: `{k}` has shape {list(t.shape)}, expected a matrix")
    rank, in_features = a.shape
    out_features, rank_b = b.shape
    module_r = rank_pattern.get(pattern_key(rank_pattern, module), r)
    module_alpha = alpha_pattern.get(pattern_key(alpha_pattern, module), alpha)
    if rank != rank_b or rank != module_r:
        raise InputError("I304", f"adapter `{name}`: module `{module}` has factors of rank {rank}×{rank_b} but "
                         f"its config says r={module_r}", "the weights and adapter_config.json disagree")
    scaling = module_alpha / math.sqrt(rank) if rslora else module_alpha / rank
    return ModuleInfo(name=module, out_features=out_features, in_features=in_features, rank=rank,
                      alpha=float(module_alpha), scaling=scaling, layout=layout, keys=(key_a, key_b),
                      dtype=a.dtype)


def _is_feedforward(module: str, feedforward) -> bool:
    """PEFT's rule: a string is a full-match regex, a list matches by suffix."""
    if not feedforward:
        return False
    if isinstance(feedforward, str):
        return re.fullmatch(feedforward, module) is not None
    return any(module.endswith(target) for target in feedforward)


def _ia3_modules(name: str, config: dict, tensors: dict[str, TensorInfo]) -> dict[str, ModuleInfo]:
    feedforward = config.get("feedforward_modules")
    modules = {}
    for key in sorted(k for k in tensors if k.endswith(".ia3_l")):
        module = _strip(key, ".ia3_l")
        info = tensors[key]
        if info.dtype not in FLOAT_DTYPES or len(info.shape) != 2:
            raise InputError("I304", f"adapter `{name}`: `{key}` must be a float matrix, got "
                             f"{info.dtype} {list(info.shape)}")
        is_ff = _is_feedforward(module, feedforward)
        rows, cols = info.shape
        if (is_ff and rows != 1) or (not is_ff and cols != 1):
            raise InputError("I304", f"adapter `{name}`: `{key}` has shape {list(info.shape)}, which disagrees "
                             f"with `feedforward_modules` ({'feed-forward' if is_ff else 'not feed-forward'})")
        modules[module] = ModuleInfo(name=module, out_features=rows if not is_ff else 0,
                                     in_features=cols if is_ff else 0, feedforward=is_ff, keys=(key,),
                                     layout="conv1d" if config.get("fan_in_fan_out") else "linear",
                                     dtype=info.dtype)
    if not modules:
        raise InputError("I304", f"adapter `{name}` has no (IA)³ vectors in `adapter_model.safetensors`")
    return modules


# ---------------------------------------------------------------- base model


def base_weight_files(folder: Path) -> list[Path]:
    """The base's weight files in a fixed order: the one list that `lint`, `run` and merging read.

    Safetensors is preferred (`model.safetensors.index.json`, else `model.safetensors`),
    then a pickled checkpoint (`pytorch_model.bin.index.json`, else `pytorch_model.bin`);
    an index's shards are its `weight_map`'s files, sorted. Whether a pickle may be
    loaded is the caller's to decide (the files then end in `.bin`). Raises InputError:
    I301 for a missing folder, I304 for no weights or a malformed index.
    """
    if path_kind(folder) != "dir":
        raise InputError("I301", f"base model folder `{folder}` does not exist")
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if path_kind(folder / index) is not None:
            return sorted(set(_weight_map(folder, index).values()))
        if path_kind(folder / single) is not None:
            return [folder / single]
    raise InputError("I304", f"base model `{folder}` has no weight files",
                     "expected model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _weight_map(folder: Path, index: str) -> dict[str, Path]:
    """An index's `weight_map`: tensor name -> the shard that holds it."""
    weight_map = _read_json(folder / index, "I304").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map \
            or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise InputError("I304", f"`{index}` of model `{folder}` has no `weight_map` of tensor names to files")
    return {name: folder / shard for name, shard in weight_map.items()}


def read_shard_headers(folder: Path, shards: list[Path]) -> tuple[dict[str, TensorInfo], dict[str, Path]]:
    """The tensors of a model's safetensors shards and the shard each is read from.

    A sharded checkpoint's index decides, as in transformers: a tensor the index maps to
    one shard is that shard's copy, never a stale duplicate another shard still holds.
    A tensor the index does not list is taken from the first shard (in `shards`' order)
    that holds it. A listed tensor its shard lacks is refused (I304).
    """
    index = "model.safetensors.index.json"
    owners = _weight_map(folder, index) if path_kind(folder / index) is not None else {}
    tensors: dict[str, TensorInfo] = {}
    where: dict[str, Path] = {}
    for shard in shards:
        for key, info in read_safetensors_header(shard)[0].items():
            if owners.get(key, shard) == shard and key not in where:
                tensors[key], where[key] = info, shard
    missing = sorted(key for key, shard in owners.items() if key not in where)
    if missing:
        raise InputError("I304", f"`{index}` of model `{folder}` maps `{missing[0]}` to "
                         f"`{owners[missing[0]].name}`, which does not hold it")
    return tensors, where


def read_base(folder: Path) -> BaseInfo:
    if path_kind(folder) != "dir":
        raise InputError("I301", f"base model folder `{folder}` does not exist")
    config = _read_json(folder / "config.json", "I304")
    shards = base_weight_files(folder)
    if shards[0].suffix == ".bin":
        return BaseInfo(folder, config, {}, {})  # pickled: shapes unknown until run --allow-pickle
    weights, files = read_shard_headers(folder, shards)
    return BaseInfo(folder, config, weights, files)
