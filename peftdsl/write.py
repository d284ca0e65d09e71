"""Write outputs: PEFT adapter directories and merged models, atomically and reproducibly.

Two kinds of output (DESIGN.md §3):

- an **adapter directory** that ``PeftModel.from_pretrained(base, path)`` loads as
  it is: ``adapter_config.json``, ``adapter_model.safetensors`` with PEFT's key
  names, and ``peftdsl.json`` (provenance);
- a **merged model**: the base model's weights with the composed delta folded in,
  streamed one base shard at a time, written as sharded safetensors with an
  index, plus config and tokenizer files copied from the base.

Every output is built in a temporary folder beside the target and renamed into
place only when complete (:func:`atomic_output`), so a failed or interrupted run
never leaves a half-written output, and an existing output survives a failure.

Determinism: keys are sorted, JSON is written with sorted keys, safetensors
files carry fixed metadata, shard boundaries depend only on tensor sizes, and
nothing records a time: identical inputs give byte-identical files.

Module deltas are in the factor frame of ``docs/conventions.md``; the module
objects passed in may be :mod:`peftdsl.apply`'s ``LoraDelta``/``DenseDelta``/
``IA3Delta`` or anything with the same attributes (``A``, ``B``, ``layout``;
``delta``, ``layout``; ``l``, ``feedforward``, ``layout``), or plain tuples in
that order.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import math
import os
import re
import secrets
import shutil
import struct
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file as _save_file

from peftdsl.tensorio import SafetensorsReader, StreamingSafetensors

Transform = Callable[[str, torch.Tensor], "torch.Tensor | None"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROVENANCE = "peftdsl.json"
SAFETENSORS_METADATA = {"format": "pt"}
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # transformers' historical default, "5GB"

_TMP_TAG = "peftdsl-tmp"
_OLD_TAG = "peftdsl-old"


class OutputExists(FileExistsError):
    """The output path exists and ``--force`` was not given: a user error, raised before any work."""

    def __init__(self, target: Path) -> None:
        super().__init__(errno.EEXIST, "output exists (pass --force to replace it)", str(target))
        self.target = target


class PickledWeights(RuntimeError):
    """The base model stores pickled weights and the user did not allow loading them."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"{path} is a pickled checkpoint; loading one can run arbitrary code. "
            "Convert it to safetensors, or allow pickle explicitly (it is then loaded with weights_only=True)."
        )
        self.path = path


# =========================================================================== atomic directories


def check_output_free(target: Path, force: bool) -> None:
    """Raise :class:`OutputExists` when ``target`` exists and may not be replaced.

    The runner calls this before computing anything, so a refused run costs nothing.
    """
    target = Path(target)
    if not force and (target.exists() or target.is_symlink()):
        raise OutputExists(target)


@contextlib.contextmanager
def atomic_output(target: Path, *, force: bool) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; rename it into place on success.

    Beside the target (not in /tmp) so that the final rename stays on one file
    system and is atomic. On any exception, KeyboardInterrupt included, the
    temporary folder is removed and an existing target is left untouched.
    With ``force`` an existing target is swapped out in one step where the OS
    allows it (``renameat2(RENAME_EXCHANGE)``), otherwise moved aside first; a
    reader sees the old output or the new one, never a mix.
    """
    target = Path(target).absolute()
    clean_leftovers(target)  # first: it may put back an output a killed run had moved aside
    check_output_free(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, _TMP_TAG)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        check_output_free(target, force)  # another process may have written it meanwhile
        _put_in_place(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_leftovers(target: Path) -> None:
    """Remove temporary folders that killed runs left beside ``target``.

    A folder whose owning process is still alive (its pid is in the name) is
    another run writing the same target right now and is left alone. If a run
    died between moving the old output aside and renaming the new one in, the
    old output is put back: the user never asked to lose it.
    """
    target = Path(target).absolute()
    if not target.parent.is_dir():
        return
    for kind in (_OLD_TAG, _TMP_TAG):
        for path in sorted(target.parent.glob(f".{target.name}.{kind}-*")):
            if _owner_alive(path):
                continue
            if kind == _OLD_TAG and not (target.exists() or target.is_symlink()):
                os.rename(path, target)
            else:
                _remove(path)


def _sibling(target: Path, tag: str) -> Path:
    """``.<name>.<tag>-<pid>-<random>`` in the target's folder."""
    return target.parent / f".{target.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}"


def _owner_alive(path: Path) -> bool:
    match = re.search(r"-(\d+)-[0-9a-f]+$", path.name)
    if match is None:
        return False
    pid = int(match.group(1))
    if pid == os.getpid():
        return False  # ours from an earlier, failed attempt in this process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _put_in_place(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``, replacing an existing target without a mixed state."""
    if not (target.exists() or target.is_symlink()):
        os.rename(tmp, target)
        return
    if _exchange(tmp, target):
        _remove(tmp)  # now holds the old output
        return
    old = _sibling(target, _OLD_TAG)
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    _remove(old)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2``; False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` so the rename publishes durable data."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(folder))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories
    finally:
        os.close(fd)


def save_file(tensors: Mapping[str, torch.Tensor], filename: str, metadata: dict[str, str]) -> None:
    """safetensors' ``save_file``, with its I/O failures as the ``OSError`` they are.

    The Rust writer reports a full disk as ``SafetensorError("… No space left on
    device (os error 28)")``; callers handle ``OSError`` (the runner's R601).
    """
    try:
        _save_file(tensors, filename, metadata=metadata)
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), filename) from err


# =========================================================================== adapter files


def _fields(module: Any, names: tuple[str, ...]) -> tuple[Any, ...]:
    """Read ``names`` from an object's attributes, or positionally from a tuple."""
    if isinstance(module, tuple) and not hasattr(module, names[0]):
        return tuple(module[: len(names)])
    return tuple(getattr(module, name) for name in names)


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved


def _stored(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=dtype).contiguous()


def exact_pattern_key(module: str) -> str:
    """A ``rank_pattern``/``alpha_pattern`` key that PEFT matches to ``module`` and nothing else.

    PEFT 0.21 looks keys up with ``re.match(rf"(.*\\.)?({key})$", name)``
    (``peft.utils.other.get_pattern_key``): a key is a regex (``.`` matches any
    character) and may match at any dotted suffix, so ``layers.1.mlp.up_proj``
    also matches ``model.vision.layers.1.mlp.up_proj``. Escaping makes the dots
    literal; the leading ``^`` can only match when the optional prefix group
    matched nothing, so the key matches the full name exactly.
    """
    return "^" + re.escape(module)


def most_common_rank(ranks: Collection[int]) -> int:
    """The rank most modules have (ties go to the largest): the smallest ``rank_pattern``."""
    counts = Counter(ranks)
    return max(counts, key=lambda rank: (counts[rank], rank))


def _template_fields(template: Mapping[str, Any]) -> dict[str, Any]:
    """What an output adapter inherits from the first input adapter's config."""
    return {
        "task_type": template.get("task_type"),
        "base_model_name_or_path": template.get("base_model_name_or_path"),
    }


def lora_adapter_files(
    modules: Mapping[str, Any], *, template: Mapping[str, Any], dtype: torch.dtype | str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and tensors of a LoRA adapter with scaling 1 on every module.

    ``modules`` maps a module name to factors ``A`` (r×in), ``B`` (out×r) and a
    ``layout``; the scaling is already folded into B. Scaling 1 means
    ``lora_alpha == r`` everywhere: modules whose rank differs from the most
    common one get equal ``rank_pattern`` and ``alpha_pattern`` entries.
    """
    if not modules:
        raise ValueError("an adapter needs at least one module")
    torch_dtype = _as_dtype(dtype)
    ranks: dict[str, int] = {}
    layouts: set[str] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name in sorted(modules):
        A, B, layout = _fields(modules[name], ("A", "B", "layout"))
        _check_lora_shapes(name, A, B)
        ranks[name] = int(A.shape[0])
        layouts.add(layout)
        tensors.update(_lora_tensor_entries(name, A, B, layout, torch_dtype))
    return lora_adapter_config(ranks, layouts, template), tensors


def lora_adapter_config(ranks: Mapping[str, int], layouts: Collection[str], template: Mapping[str, Any]) -> dict:
    """The adapter_config.json of a LoRA adapter with these ranks and scaling 1 everywhere."""
    r = most_common_rank(ranks.values())
    pattern = {exact_pattern_key(name): rank for name, rank in ranks.items() if rank != r}
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "use_rslora": False,
        "use_dora": False,
        # PEFT picks each module's layout from its type (Conv1D, Linear, Embedding);
        # the flag only has to be right for the Conv1D modules.
        "fan_in_fan_out": "conv1d" in layouts,
        "lora_dropout": 0.0,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        **_template_fields(template),
    }


def _check_lora_shapes(name: str, A: torch.Tensor, B: torch.Tensor) -> None:
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise ValueError(f"module `{name}`: factors A{tuple(A.shape)} and B{tuple(B.shape)} do not chain")


def _lora_tensor_entries(
    name: str, A: torch.Tensor, B: torch.Tensor, layout: str, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """PEFT's saved key names: embeddings keep their factors as bare parameters."""
    key_a, key_b = lora_keys(name, layout)
    return {key_a: _stored(A, dtype), key_b: _stored(B, dtype)}


def lora_keys(name: str, layout: str) -> tuple[str, str]:
    """PEFT's saved key names of a module's A and B: embeddings keep bare parameters."""
    prefix = f"base_model.model.{name}"
    if layout == "embedding":
        return f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B"
    if layout not in ("linear", "conv1d"):
        raise ValueError(f"module `{name}`: unknown layout {layout!r}")
    # A and B are in the factor frame for conv1d too: PEFT transposes B·A when merging.
    return f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"


def ia3_adapter_files(
    modules: Mapping[str, Any], *, template: Mapping[str, Any], dtype: torch.dtype | str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and tensors of an (IA)³ adapter.

    ``modules`` maps a module name to ``l`` ((out, 1), or (1, in) when
    ``feedforward``), ``feedforward`` and ``layout``.
    """
    if not modules:
        raise ValueError("an adapter needs at least one module")
    torch_dtype = _as_dtype(dtype)
    tensors: dict[str, torch.Tensor] = {}
    feedforward: list[str] = []
    layouts: set[str] = set()
    for name in sorted(modules):
        vector, is_feedforward, layout = _fields(modules[name], ("l", "feedforward", "layout"))
        if layout not in ("linear", "conv1d"):
            raise ValueError(f"module `{name}`: (IA)³ does not apply to layout {layout!r}")
        layouts.add(layout)
        if is_feedforward:
            feedforward.append(name)
        tensors[f"base_model.model.{name}.ia3_l"] = _stored(vector, torch_dtype)
    _check_feedforward_exact(sorted(modules), feedforward)
    config = {
        "peft_type": "IA3",
        "target_modules": sorted(modules),
        "feedforward_modules": feedforward,
        "fan_in_fan_out": "conv1d" in layouts,
        "modules_to_save": None,
        "init_ia3_weights": True,
        "inference_mode": True,
        **_template_fields(template),
    }
    return config, tensors


def _check_feedforward_exact(targets: list[str], feedforward: list[str]) -> None:
    """Refuse names PEFT would misread: it tests ``name.endswith(ff)``, without a dot.

    With full module names that only happens when one name is a suffix of
    another target's name; then a module would silently change its kind.
    """
    for name in targets:
        matched = any(name.endswith(ff) for ff in feedforward)
        if matched != (name in feedforward):
            raise ValueError(f"module `{name}` would be taken for a feed-forward module by PEFT's suffix match")


def json_bytes(value: Any) -> bytes:
    """JSON as every output writes it: sorted keys, indent 2, a trailing newline (stable diffs)."""
    return (json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


_json_bytes = json_bytes  # the name runner.py used first


def write_adapter(
    target: Path,
    *,
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    provenance: Mapping[str, Any],
    force: bool,
) -> Path:
    """Write an adapter directory atomically; the same arguments give the same bytes."""
    target = Path(target)
    with atomic_output(target, force=force) as tmp:
        (tmp / ADAPTER_CONFIG).write_bytes(json_bytes(dict(config)))
        ordered = {key: tensors[key].contiguous() for key in sorted(tensors)}
        save_file(ordered, str(tmp / ADAPTER_WEIGHTS), metadata=dict(SAFETENSORS_METADATA))
        (tmp / PROVENANCE).write_bytes(json_bytes(dict(provenance)))
    return target


def write_adapter_streaming(
    target: Path,
    *,
    config: Mapping[str, Any],
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    chunks: Iterable[Mapping[str, torch.Tensor]],
    provenance: Mapping[str, Any],
    force: bool,
) -> Path:
    """Write an adapter directory atomically from tensors that arrive chunk by chunk.

    Gives the same bytes as :func:`write_adapter` on the same tensors.
    """
    target = Path(target)
    with atomic_output(target, force=force) as tmp:
        (tmp / ADAPTER_CONFIG).write_bytes(json_bytes(dict(config)))
        writer = StreamingSafetensors(tmp / ADAPTER_WEIGHTS, specs, SAFETENSORS_METADATA)
        try:
            for chunk in chunks:
                for key, tensor in chunk.items():
                    writer.write(key, tensor)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        (tmp / PROVENANCE).write_bytes(json_bytes(dict(provenance)))
    return target


# =========================================================================== merge transforms


def _factor_frame_to_weight(delta: torch.Tensor, layout: str) -> torch.Tensor:
    """Map an out×in delta onto the weight: conv1d and embedding store it transposed."""
    if layout == "linear":
        return delta
    if layout in ("conv1d", "embedding"):
        return delta.T
    raise ValueError(f"unknown layout {layout!r}")


def add_dense_delta(W: torch.Tensor, delta: torch.Tensor, layout: str) -> torch.Tensor:
    """``W + ΔW`` with ΔW given in the factor frame (out×in), in float32."""
    weight_delta = _factor_frame_to_weight(delta.to(torch.float32), layout)
    if weight_delta.shape != W.shape:
        raise ValueError(f"delta of shape {tuple(weight_delta.shape)} does not fit weight {tuple(W.shape)}")
    return W.to(torch.float32) + weight_delta


def add_lora_delta(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, layout: str) -> torch.Tensor:
    """``W + B·A`` (scaling folded into B), as PEFT's LoRA merge does, in one ``addmm``.

    conv1d and embedding weights hold the delta transposed: ``W + Aᵀ·Bᵀ``.
    """
    W, A, B = W.to(torch.float32), A.to(torch.float32), B.to(torch.float32)
    left, right = (B, A) if layout == "linear" else (A.T, B.T)
    if (left.shape[0], right.shape[1]) != tuple(W.shape):
        raise ValueError(f"delta of shape {(left.shape[0], right.shape[1])} does not fit weight {tuple(W.shape)}")
    return torch.addmm(W, left, right)


def scale_ia3(
    W: torch.Tensor, l: torch.Tensor, feedforward: bool, layout: str = "linear"  # noqa: E741
) -> torch.Tensor:
    """PEFT's (IA)³ merge of a weight: ``W * l``, with l transposed for conv1d (``fan_in_fan_out``).

    l is (out, 1) for an ordinary module and (1, in) for a feed-forward one, in
    the linear frame; in a Conv1D weight (in×out) the same vector is transposed.
    """
    if layout not in ("linear", "conv1d"):
        raise ValueError(f"(IA)³ does not apply to layout {layout!r}")
    out_features, in_features = W.shape if layout == "linear" else W.shape[::-1]
    expected = (1, in_features) if feedforward else (out_features, 1)
    if tuple(l.shape) != expected:
        kind = "feed-forward" if feedforward else "output"
        raise ValueError(
            f"(IA)³ vector of shape {tuple(l.shape)} does not fit weight {tuple(W.shape)} ({kind} scaling)"
        )
    vector = l.to(torch.float32)
    return W.to(torch.float32) * (vector.T if layout == "conv1d" else vector)


def scale_ia3_bias(bias: torch.Tensor, l: torch.Tensor, feedforward: bool) -> torch.Tensor | None:  # noqa: E741
    """PEFT scales an ordinary module's bias by l too (its output scaling); None when feed-forward."""
    if feedforward:
        return None
    return bias.to(torch.float32) * l.to(torch.float32).reshape(bias.shape)


@dataclass(frozen=True, slots=True)
class MergeTransform:
    """A ``transform`` for :func:`write_merged` built from per-module deltas.

    ``weight_names`` lists the tensors it must change, so that ``write_merged``
    can refuse to finish when one of them is not in the base (rather than
    silently dropping a delta). Biases are optional: a module without one has
    nothing to scale.
    """

    functions: Mapping[str, Callable[[torch.Tensor], torch.Tensor]]

    @property
    def weight_names(self) -> frozenset[str]:
        return frozenset(name for name in self.functions if name.endswith(".weight"))

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        function = self.functions.get(name)
        return None if function is None else function(tensor)


def merge_transform(deltas: Mapping[str, Any]) -> MergeTransform:
    """One transform for a whole mapping module → LoRA, dense or (IA)³ delta.

    The kind is read from the object's attributes: ``B`` (LoRA), ``delta``
    (dense) or ``l`` ((IA)³). (IA)³ also maps the module's bias, as PEFT does.
    """
    functions: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for name in sorted(deltas):
        functions.update(_module_functions(name, deltas[name]))
    return MergeTransform(functions)


def _module_functions(name: str, delta: Any) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    weight = f"{name}.weight"
    if hasattr(delta, "B"):
        return {weight: lambda W, d=delta: add_lora_delta(W, d.A, d.B, d.layout)}
    if hasattr(delta, "delta"):
        return {weight: lambda W, d=delta: add_dense_delta(W, d.delta, d.layout)}
    if hasattr(delta, "l"):
        functions = {weight: lambda W, d=delta: scale_ia3(W, d.l, d.feedforward, d.layout)}
        if not delta.feedforward:
            functions[f"{name}.bias"] = lambda b, d=delta: scale_ia3_bias(b, d.l, False)
        return functions
    raise TypeError(f"module `{name}`: not a LoRA, dense or (IA)³ delta: {type(delta).__name__}")


# =========================================================================== merged models

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}

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
    """The base's weight files in a fixed order; pickled ones only when allowed.

    Safetensors is preferred when both exist. Raises :class:`PickledWeights` for a
    ``pytorch_model.bin`` checkpoint unless ``allow_pickle``.
    """
    base_dir = Path(base_dir)
    for single, index in (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        files = _listed_files(base_dir, single, index)
        if not files:
            continue
        if single.endswith(".bin") and not allow_pickle:
            raise PickledWeights(files[0])
        return files
    raise FileNotFoundError(f"{base_dir}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def _listed_files(base_dir: Path, single: str, index: str) -> list[Path]:
    if (base_dir / index).is_file():
        weight_map = json.loads((base_dir / index).read_text())["weight_map"]
        return [base_dir / name for name in sorted(set(weight_map.values()))]
    if (base_dir / single).is_file():
        return [base_dir / single]
    return []


def _read_entries(source: Path) -> list[TensorEntry]:
    """The tensors of one file, from its header only (safetensors) or a lazy mmap (pickle)."""
    if source.suffix == ".safetensors":
        header = _safetensors_header(source)
        return [
            TensorEntry(name, source, tuple(info["shape"]), _SAFETENSORS_DTYPES[info["dtype"]])
            for name, info in sorted(header.items())
            if name != "__metadata__"
        ]
    state = _load_pickle(source)
    return [TensorEntry(name, source, tuple(t.shape), t.dtype) for name, t in sorted(state.items())]


def _safetensors_header(source: Path) -> dict[str, Any]:
    with open(source, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return json.loads(handle.read(length))


def _load_pickle(source: Path) -> dict[str, torch.Tensor]:
    """Only called once the user allowed pickle; ``weights_only`` still refuses code objects.

    ``mmap`` keeps a shard's data on disk until a tensor is touched; checkpoints
    in the legacy (pre-zip) format cannot be mapped and are read whole.
    """
    try:
        return torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        return torch.load(source, map_location="cpu", weights_only=True)


@contextlib.contextmanager
def _tensor_reader(source: Path) -> Iterator[Callable[[str], torch.Tensor]]:
    """Open one weight file; tensors are read lazily, one at a time, by offset (no memory map)."""
    if source.suffix == ".safetensors":
        with SafetensorsReader(source) as reader:
            yield reader.read
    else:
        state = _load_pickle(source)
        yield state.__getitem__
        del state


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


def tied_groups(base_dir: Path, stored: Collection[str]) -> dict[str, tuple[str, ...]]:
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
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(base_dir)
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 — no model, no known ties
        return {}
    by_parameter: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_parameter.setdefault(id(param), []).append(name)
    groups: dict[str, tuple[str, ...]] = {}
    for names in by_parameter.values():
        if len(names) > 1:
            groups.update({name: tuple(names) for name in names if name in stored})
    return groups


def _merged_tensor(
    entry: TensorEntry, tensor: torch.Tensor, transform: Transform, names: tuple[str, ...], dtype: torch.dtype | None
) -> torch.Tensor:
    """Apply the transform under every name of the tensor's tie group, then cast once.

    A delta on a tied parameter (``lm_head`` of a tied model) lands on the one
    shared tensor, as in PEFT's merge, which assigns to the shared Parameter:
    ``merge_and_unload`` + ``save_pretrained`` keeps one tensor with both deltas
    and the config stays tied. (The merged model then differs from the unmerged
    PeftModel, where each delta acts on one side only; PEFT warns about it.)
    """
    if not tensor.is_floating_point():
        return tensor.contiguous()
    current = tensor.to(torch.float32)
    for name in names:
        changed = transform(name, current)
        if changed is not None:
            if tuple(changed.shape) != entry.shape:
                raise ValueError(f"transform changed the shape of `{name}`: {entry.shape} -> {tuple(changed.shape)}")
            current = changed.to(torch.float32)
    return current.to(dtype or entry.dtype).contiguous()


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
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write the base model with ``transform`` applied to its weights, streaming shard by shard.

    ``transform(name, tensor_float32)`` returns the new tensor or None (unchanged).
    ``dtype`` casts every floating tensor (default: each keeps the base's dtype).
    ``expect`` (default: ``transform.weight_names`` when it has one) names the
    tensors the transform changes; a name that is neither stored nor tied to a
    stored tensor is an error, so no delta is ever dropped silently.
    ``provenance`` is written as ``peftdsl.json`` inside the same atomic rename.
    Peak memory is about one output shard.
    """
    base_dir = Path(base_dir)
    check_output_free(Path(target), force)
    out_dtype = _as_dtype(dtype)
    sources = base_weight_files(base_dir, allow_pickle=allow_pickle)
    entries = [entry for source in sources for entry in _read_entries(source)]
    stored = {entry.name for entry in entries}
    expected = set(expect if expect is not None else getattr(transform, "weight_names", ()))
    groups = tied_groups(base_dir, stored) if _may_touch_tied(base_dir, expected, entries) else {}
    _check_expected(expected, stored, groups)
    shards = plan_shards(entries, lambda e: _output_dtype(e, out_dtype), max_shard_bytes)
    with atomic_output(Path(target), force=force) as tmp:
        weight_map = _write_shards(tmp, shards, transform, groups, out_dtype)
        total = sum(entry.nbytes(_output_dtype(entry, out_dtype)) for entry in entries)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_bytes(json_bytes(index))
        _write_config(base_dir, tmp, out_dtype)
        _copy_side_files(base_dir, tmp)
        if provenance is not None:
            (tmp / PROVENANCE).write_bytes(json_bytes(dict(provenance)))
    return Path(target)


def _may_touch_tied(base_dir: Path, expected: set[str], entries: list[TensorEntry]) -> bool:
    """Whether the deltas could land on tied parameters, so that ties must be looked up.

    Looking them up builds the architecture with transformers (2–3 s of imports).
    A causal LM ties its word embeddings to its output layer, both vocab×hidden: when
    every changed tensor is stored and none has the vocabulary's size, none is tied.
    """
    stored = {entry.name: entry for entry in entries}
    if not expected <= stored.keys():
        return True
    try:
        config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
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
        raise KeyError(f"the base model has no tensor named {', '.join(f'`{name}`' for name in missing)}")


def _write_shards(
    tmp: Path,
    shards: list[list[TensorEntry]],
    transform: Transform,
    groups: Mapping[str, tuple[str, ...]],
    dtype: torch.dtype | None,
) -> dict[str, str]:
    """Stream tensors in plan order, one input file open at a time, flushing each output shard."""
    weight_map: dict[str, str] = {}
    with contextlib.closing(_stream(entry for shard in shards for entry in shard)) as tensors:
        for number, shard in enumerate(shards, start=1):
            filename = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
            # Every shape and dtype is in the base's headers: the shard's header goes
            # first and each tensor is written as soon as it is merged (one in memory).
            specs = {entry.name: (_output_dtype(entry, dtype), entry.shape) for entry in shard}
            writer = StreamingSafetensors(tmp / filename, specs, SAFETENSORS_METADATA)
            try:
                for entry in shard:
                    streamed_entry, tensor = next(tensors)
                    assert streamed_entry is entry
                    names = groups.get(entry.name, (entry.name,))
                    writer.write(entry.name, _merged_tensor(entry, tensor, transform, names, dtype))
                    weight_map[entry.name] = filename
            except BaseException:
                writer.abort()
                raise
            writer.close()
    return weight_map


def _stream(entries: Iterator[TensorEntry]) -> Iterator[tuple[TensorEntry, torch.Tensor]]:
    """Yield each entry with its tensor, keeping only the current input file open."""
    reader_source: Path | None = None
    stack = contextlib.ExitStack()
    with stack:
        for entry in entries:
            if entry.source != reader_source:
                stack.close()
                read = stack.enter_context(_tensor_reader(entry.source))
                reader_source = entry.source
            yield entry, read(entry.name)


def _write_config(base_dir: Path, tmp: Path, dtype: torch.dtype | None) -> None:
    """Copy config.json, recording a new dtype where one was asked for.

    transformers 5 names the field ``dtype``; releases before 4.56 wrote
    ``torch_dtype``. Every field present is updated; with neither, ``dtype``
    is added (what the installed transformers reads).
    """
    source = base_dir / "config.json"
    if not source.is_file():
        return
    if dtype is None:
        shutil.copyfile(source, tmp / "config.json")
        return
    config = json.loads(source.read_text())
    name = str(dtype).removeprefix("torch.")
    fields = [key for key in ("dtype", "torch_dtype") if key in config] or ["dtype"]
    for key in fields:
        config[key] = name
    (tmp / "config.json").write_bytes(json_bytes(config))


def _copy_side_files(base_dir: Path, tmp: Path) -> None:
    names = sorted({path.name for pattern in _COPIED_PATTERNS for path in base_dir.glob(pattern) if path.is_file()})
    for name in names:
        shutil.copyfile(base_dir / name, tmp / name)
