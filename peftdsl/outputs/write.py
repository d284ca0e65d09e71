"""Write PEFT adapter directories (docs/recipes.md), atomically and reproducibly.

An adapter directory is what ``PeftModel.from_pretrained(base, path)`` loads as it
is: ``adapter_config.json``, ``adapter_model.safetensors`` with PEFT's key names, and
``peftdsl.json`` (provenance). LoRA outputs have scaling 1 on every module. Module
deltas are in the factor frame of ``docs/conventions.md``; the module objects may be
:mod:`peftdsl.evaluation.apply`'s ``LoraDelta``/``IA3Delta`` or anything with the same attributes
(``A``, ``B``, ``layout``; ``l``, ``feedforward``, ``layout``), or plain tuples in that
order. Merged models are :mod:`peftdsl.outputs.merge`'s.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from peftdsl.errors import OutputError
from peftdsl.outputs.atomic import atomic_output, json_bytes, save_file
from peftdsl.outputs.card import CARD
from peftdsl.runtime.experts import AdapterFusion
from peftdsl.runtime.fold import PartDelta
from peftdsl.runtime.tensorio import StreamingSafetensors, as_dtype, stored

# An output's provenance and model card made when its weights are complete (`run` hashes
# unpinned inputs beside the computation: their sha256 is known only then).
Stamp = Callable[[], tuple[Mapping[str, Any], bytes | None]]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROVENANCE = "peftdsl.json"
SAFETENSORS_METADATA = {"format": "pt"}


# =========================================================================== adapter files


def _fields(module: Any, names: tuple[str, ...]) -> tuple[Any, ...]:
    """Read ``names`` from an object's attributes, or positionally from a tuple."""
    if isinstance(module, tuple) and not hasattr(module, names[0]):
        return tuple(module[: len(names)])
    return tuple(getattr(module, name) for name in names)


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
    parts = {name: m for name, m in modules.items() if isinstance(m, PartDelta)}
    modules = {name: m for name, m in modules.items() if not isinstance(m, PartDelta)}
    if not modules:
        raise ValueError("an adapter needs at least one module")
    torch_dtype = as_dtype(dtype)
    ranks: dict[str, int] = {}
    layouts: set[str] = set()
    tensors: dict[str, torch.Tensor] = {}
    widths: dict[str, int] = {}
    fusion = AdapterFusion()  # experts (`…gate_up_proj[3]`) go back into their parameter's fused factors
    for name in sorted(modules):
        A, B, layout = _fields(modules[name], ("A", "B", "layout"))
        _check_lora_shapes(name, A, B)
        widths[name] = int(B.shape[0])
        if fusion.claims(name):
            fusion.plan(name, int(A.shape[0]), int(B.shape[0]), int(A.shape[1]))
            continue
        ranks[name] = int(A.shape[0])
        layouts.add(layout)
        tensors.update(_lora_tensor_entries(name, A, B, layout, torch_dtype))
    for name in sorted(m for m in modules if fusion.claims(m)):
        fused = fusion.add(name, modules[name])
        tensors.update({key: stored(t, torch_dtype, key) for key, t in fused.items()})
    fields, part_tensors = part_files(parts, widths, torch_dtype)
    config = {**lora_adapter_config(ranks, layouts, template, parameters=fusion.ranks()), **fields}
    check_loadable(config)
    return config, {**tensors, **part_tensors}


def check_loadable(config: Mapping[str, Any]) -> None:
    """Refuse a LoRA config PEFT could not load: its ParamWrapper (``target_parameters``)
    refuses ``lora_bias`` and ``fan_in_fan_out``."""
    clash = [flag for flag in ("lora_bias", "fan_in_fan_out") if config.get(flag)]
    if config.get("target_parameters") and clash:
        raise OutputError(f"PEFT cannot load an adapter with `target_parameters` and `{clash[0]}`: write this "
                          "composition with `merge: true`, or compose the experts separately")


def lora_adapter_config(ranks: Mapping[str, int], layouts: Collection[str], template: Mapping[str, Any],
                        parameters: Mapping[str, int] | None = None) -> dict:
    """The adapter_config.json of a LoRA adapter with these ranks and scaling 1 everywhere.

    ``parameters`` maps fused expert parameters (``target_parameters``) to their rank per
    expert; PEFT looks their patterns up by the parameter's full path.
    """
    parameters = dict(parameters or {})
    r = most_common_rank([*ranks.values(), *parameters.values()])
    pattern = {exact_pattern_key(name): rank for name, rank in {**ranks, **parameters}.items() if rank != r}
    extra = {"target_parameters": sorted(parameters)} if parameters else {}
    return {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        **extra,
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
    return {key_a: stored(A, dtype, key_a), key_b: stored(B, dtype, key_b)}


def lora_keys(name: str, layout: str) -> tuple[str, str]:
    """PEFT's saved key names of a module's A and B: embeddings keep bare parameters."""
    if name.endswith("]"):  # an expert (`…gate_up_proj[3]`): its keys are its parameter's, fused
        raise ValueError(f"module `{name}` is an expert: peftdsl.runtime.experts.AdapterFusion writes its keys")
    prefix = f"base_model.model.{name}"
    if layout == "embedding":
        return f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B"
    if layout not in ("linear", "conv1d"):
        raise ValueError(f"module `{name}`: unknown layout {layout!r}")
    # A and B are in the factor frame for conv1d too: PEFT transposes B·A when merging.
    return f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"


def part_files(
    parts: Mapping[str, PartDelta], lora_modules: Mapping[str, int], dtype: torch.dtype | str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config fields and tensors that store composed parts as PEFT saves them.

    ``lora_modules`` maps the output's LoRA modules to their output width. Saved modules go
    under their own names with ``modules_to_save``; biases as ``base_layer.bias`` of a LoRA
    module (``bias: lora_only``) or plain ``bias`` elsewhere (``bias: all``); token rows as
    ``token_adapter.trainable_tokens_delta`` with ``trainable_token_indices``; a
    ``lora_bias`` combination as ``lora_B.bias`` (scaling is 1 in every output), with zeros
    for the LoRA modules it does not touch, which PEFT would otherwise leave unset.
    """
    torch_dtype = as_dtype(dtype)
    tensors: dict[str, torch.Tensor] = {}
    fields: dict[str, Any] = {}
    saved, tokens, lora_bias, plain_bias = set(), {}, False, False
    for tensor in sorted(parts):
        part = parts[tensor]
        module = tensor.rpartition(".")[0]
        if part.add:  # a lora_bias combination
            if module not in lora_modules:
                raise OutputError(f"`{tensor}` gets a lora_bias delta but `{module}` is no LoRA module of the output")
            key, lora_bias = f"base_model.model.{module}.lora_B.bias", True
        elif part.rows:
            key = f"base_model.model.{module}.token_adapter.trainable_tokens_delta"
            tokens[module] = list(part.rows)
        elif part.role == "module" or (part.role == "full" and not tensor.endswith(".bias")):
            key = f"base_model.model.{tensor}"  # a full fine-tune's norm or embedding: its module saved
            saved.add(part.saved_module or module)
        else:
            inside = module in lora_modules
            plain_bias |= not inside
            key = f"base_model.model.{module}.base_layer.bias" if inside else f"base_model.model.{tensor}"
            fields["bias"] = "lora_only"
        tensors[key] = stored(part.value, torch_dtype, key)
    if lora_bias:
        fields["lora_bias"] = True
        for module, out_features in lora_modules.items():
            tensors.setdefault(f"base_model.model.{module}.lora_B.bias", torch.zeros(out_features, dtype=torch_dtype))
    if plain_bias:
        fields["bias"] = "all"
    if saved:
        fields["modules_to_save"] = sorted(saved)
    if tokens:
        fields["trainable_token_indices"] = tokens
    return fields, tensors


def ia3_adapter_files(
    modules: Mapping[str, Any], *, template: Mapping[str, Any], dtype: torch.dtype | str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The config and tensors of an (IA)³ adapter.

    ``modules`` maps a module name to ``l`` ((out, 1), or (1, in) when
    ``feedforward``), ``feedforward`` and ``layout``.
    """
    parts = {name: m for name, m in modules.items() if isinstance(m, PartDelta)}
    modules = {name: m for name, m in modules.items() if not isinstance(m, PartDelta)}
    if not modules:
        raise ValueError("an adapter needs at least one module")
    torch_dtype = as_dtype(dtype)
    fields, tensors = part_files(parts, {}, torch_dtype)
    feedforward: list[str] = []
    layouts: set[str] = set()
    for name in sorted(modules):
        vector, is_feedforward, layout = _fields(modules[name], ("l", "feedforward", "layout"))
        if layout not in ("linear", "conv1d"):
            raise ValueError(f"module `{name}`: (IA)³ does not apply to layout {layout!r}")
        layouts.add(layout)
        if is_feedforward:
            feedforward.append(name)
        key = f"base_model.model.{name}.ia3_l"
        tensors[key] = stored(vector, torch_dtype, key)
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
        **fields,
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
            raise OutputError(f"module `{name}` would be taken for a feed-forward module by PEFT's suffix match")


def write_adapter(
    target: Path,
    *,
    config: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    provenance: Mapping[str, Any] | Stamp,
    force: bool,
    card: bytes | None = None,
) -> Path:
    """Write an adapter directory atomically; the same arguments give the same bytes.

    ``card`` is the model card (:mod:`peftdsl.outputs.card`), written as README.md.
    """
    target = Path(target)
    with atomic_output(target, force=force) as tmp:
        (tmp / ADAPTER_CONFIG).write_bytes(json_bytes(dict(config)))
        ordered = {key: tensors[key].contiguous() for key in sorted(tensors)}
        save_file(ordered, str(tmp / ADAPTER_WEIGHTS), metadata=dict(SAFETENSORS_METADATA))
        write_provenance(tmp, provenance, card)
    return target


def write_adapter_streaming(
    target: Path,
    *,
    config: Mapping[str, Any],
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    chunks: Iterable[Mapping[str, torch.Tensor]],
    provenance: Mapping[str, Any] | Stamp,
    force: bool,
    card: bytes | None = None,
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
        write_provenance(tmp, provenance, card)
    return target


def write_provenance(folder: Path, provenance: Mapping[str, Any] | Stamp, card: bytes | None) -> None:
    """``peftdsl.json`` and, when given, the model card ``README.md``, into an output's
    temporary folder (so both arrive with the same rename as the weights). A ``Stamp`` for
    ``provenance`` gives both, called here."""
    if callable(provenance):
        provenance, card = provenance()
    (folder / PROVENANCE).write_bytes(json_bytes(dict(provenance)))
    if card is not None:
        (folder / CARD).write_bytes(card)
