"""LoRA on raw parameters (`target_parameters`): MoE experts as modules, from metadata only.

PEFT 0.21 wraps a targeted parameter in a `ParamWrapper`. For a fused expert parameter
of shape [E, …] (transformers 5 keeps `experts.gate_up_proj` and `experts.down_proj` as
3-D tensors) it trains one pair of factors for all experts: `lora_A` (r·E × in) and
`lora_B` (out × r·E), with, per expert e,

    A_e = A.reshape(E, r, in)[e]          (rows e·r … e·r + r − 1)
    B_e = B.reshape(out, r, E)[:, :, e]   (columns e, e + E, e + 2E, …)
    ΔW_e = s · B_e · A_e                   (out × in)

peftdsl treats every expert as a LoRA module of its own, named
`<parameter path>[<e>]` (`model.layers.0.mlp.experts.gate_up_proj[3]`), so that every
operator (exact sums, `svd`, `pem`, `ties`, …) acts per expert and the planner batches
the experts of all layers together. This module reads which parameter each saved pair
belongs to, its expert count and its layout, with no torch: `lint` runs it.

Saved keys do not name the parameter. Two parameters of one module are two nested
wrappers, `experts.base_layer.lora_A.weight` (inner) and `experts.lora_A.weight`
(outer); PEFT wraps a module's parameters in the order the module registers them, so
the last one registered is outermost. transformers registers the gate/up projection
before the down projection in every expert class (`gate_up_proj`, `down_proj`;
`gate_proj`, `up_proj`, `down_proj`; weights before their biases), which is the order
:data:`REGISTRATION_ORDER` encodes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

# Expert parameter names in the order transformers' expert classes register them.
REGISTRATION_ORDER = ("gate_up_proj", "gate_proj", "w1", "up_proj", "w3", "down_proj", "w2")

# transformers model types whose experts store a parameter as (E, in, out): the classes
# decorated `use_experts_implementation(is_transposed=True)`. For other types it is
# (E, out, in). Needed only where the shape cannot tell (a square expert matrix).
TRANSPOSED_EXPERT_MODEL_TYPES = frozenset({"gpt_oss", "aria", "aria_text", "openai_privacy_filter"})

# config.json keys that give the number of routed experts, for a base whose checkpoint
# stores experts one tensor each (so that its headers have no fused parameter to read).
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")

_EXPERT_NAME = re.compile(r"^(?P<parameter>.+)\[(?P<index>\d+)\]$")
_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"
_NESTING = ".base_layer"


@dataclass(frozen=True, slots=True)
class ExpertSlot:
    """Where an expert module's factors live: expert `index` of `count` in a fused parameter."""

    parameter: str  # the parameter's full path, e.g. `model.layers.0.mlp.experts.gate_up_proj`
    index: int
    count: int


def expert_name(parameter: str, index: int) -> str:
    """The module name of one expert: `model.layers.0.mlp.experts.gate_up_proj[3]`."""
    return f"{parameter}[{index}]"


def parse_expert_name(name: str) -> tuple[str, int] | None:
    """(parameter path, expert index) of an expert module's name; None for any other module."""
    match = _EXPERT_NAME.match(name)
    return (match["parameter"], int(match["index"])) if match else None


def registration_rank(parameter_name: str) -> tuple[int, int]:
    """Sort key of a parameter among its module's: gate/up before down, a weight before its bias."""
    name = parameter_name.removesuffix("_bias")
    known = REGISTRATION_ORDER.index(name) if name in REGISTRATION_ORDER else len(REGISTRATION_ORDER)
    return known, parameter_name.endswith("_bias")


def nesting_order(parameter_names) -> list[str]:
    """A module's targeted parameters, innermost wrapper first (PEFT's wrapping order)."""
    return sorted(parameter_names, key=lambda n: (registration_rank(n), n))


def factor_keys(module: str, depth: int) -> tuple[str, str]:
    """PEFT's saved keys for the wrapper `depth` levels inside the outermost one on `module`."""
    prefix = f"base_model.model.{module}" + _NESTING * depth
    return prefix + _LORA_A, prefix + _LORA_B


# ---------------------------------------------------------------- reading an adapter


def uses_parameters(config: Mapping) -> bool:
    return bool(config.get("target_parameters"))


def wrapper_keys(config: Mapping, tensors: Mapping) -> dict[str, tuple[str, int]]:
    """The `lora_A` keys that belong to ParamWrappers: key -> (unwrapped module path, depth).

    A key is a wrapper's when its path nests (`.base_layer.`), or when its module is a
    `target_parameters` candidate and not one of `target_modules` (PEFT refuses a module
    targeted both ways).
    """
    if not uses_parameters(config):
        return {}
    out = {}
    for key in tensors:
        if not key.endswith(_LORA_A):
            continue
        path = _strip_prefix(key[: -len(_LORA_A)])
        module, depth = _unwrapped(path)
        if depth or (candidate_parameters(config, module) and not _targeted_module(config, module)):
            out[key] = (module, depth)
    return out


def candidate_parameters(config: Mapping, module: str) -> list[str]:
    """Parameter names of `module` that `target_parameters` selects, as PEFT matches them
    (`f"{module}.{name}"` equal to an entry or ending with `.<entry>`).

    PEFT matches against the parameters the module has, which metadata does not list. An
    undotted entry (`gate_up_proj`, as PEFT's `all-linear` writes for Mixtral) would match
    any module here; expert parameter names are taken to belong to fused expert modules
    only, which transformers 5 always names `experts`, so the router `mlp.gate` (whose one
    parameter is `weight`) is not taken to hold `gate_up_proj` too.
    """
    names = []
    for entry in config.get("target_parameters") or ():
        name = entry.rpartition(".")[2]
        key = f"{module}.{name}"
        if not (key == entry or key.endswith("." + entry)) or name in names:
            continue
        if is_expert_parameter(name) and module.rpartition(".")[2] != "experts":
            continue
        names.append(name)
    return names


def is_expert_parameter(name: str) -> bool:
    """Whether `name` is one of the fused expert parameters transformers' expert classes register."""
    return name.removesuffix("_bias") in REGISTRATION_ORDER


def _targeted_module(config: Mapping, module: str) -> bool:
    targets = config.get("target_modules")
    if not targets:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _strip_prefix(path: str) -> str:
    return path.removeprefix("base_model.model.")


def _unwrapped(path: str) -> tuple[str, int]:
    return path.replace(_NESTING, ""), path.count(_NESTING)


@dataclass(frozen=True, slots=True)
class ParameterFactors:
    """One targeted parameter in an adapter: its saved pair and what the config says of it."""

    parameter: str  # full path
    key_a: str
    key_b: str
    rank: int
    alpha: float
    count: int  # experts


def parameter_factors(adapter: str, config: Mapping, tensors: Mapping, pattern_key, error) -> list[ParameterFactors]:
    """Every targeted parameter of an adapter, resolved from its keys, config and shapes.

    ``pattern_key`` is PEFT's rank/alpha pattern lookup, ``error(message, help="", code="I304")``
    builds the exception to raise (the caller's `InputError`).
    """
    by_module: dict[str, dict[int, str]] = {}
    for key, (module, depth) in wrapper_keys(config, tensors).items():
        by_module.setdefault(module, {})[depth] = key
    r, alpha = config.get("r"), config.get("lora_alpha", 8)
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    found = []
    for module in sorted(by_module):
        depths = by_module[module]
        names = nesting_order(candidate_parameters(config, module))
        if sorted(depths) != list(range(len(depths))) or len(names) != len(depths):
            raise error(f"adapter `{adapter}`: module `{module}` has {len(depths)} nested LoRA pair(s) but "
                        f"`target_parameters` selects {len(names)} of its parameters "
                        f"({', '.join(f'`{n}`' for n in names) or 'none'}), so which pair adapts which cannot "
                        "be told", "save the adapter again with PEFT, targeting each parameter once")
        unknown = [n for n in names if registration_rank(n)[0] == len(REGISTRATION_ORDER)]
        if len(names) > 1 and unknown:
            raise error(f"adapter `{adapter}`: module `{module}` has {len(names)} targeted parameters, and in which "
                        f"order PEFT nested their wrappers is not known for `{unknown[0]}`",
                        "peftdsl knows the order of " + ", ".join(f"`{n}`" for n in REGISTRATION_ORDER)
                        + " (and their `_bias`); target one parameter per module", code="I303")
        for position, name in enumerate(names):
            depth = len(names) - 1 - position  # the last registered is the outermost wrapper
            key_a = depths[depth]
            key_b = key_a[: -len(_LORA_A)] + _LORA_B
            parameter = f"{module}.{name}"
            module_r = rank_pattern.get(pattern_key(rank_pattern, parameter), r)
            module_alpha = alpha_pattern.get(pattern_key(alpha_pattern, parameter), alpha)
            found.append(_checked(adapter, tensors, parameter, key_a, key_b, module_r, module_alpha, error))
    return found


def _checked(adapter, tensors, parameter, key_a, key_b, r, alpha, error) -> ParameterFactors:
    a, b = tensors[key_a], tensors.get(key_b)
    if b is None:
        raise error(f"adapter `{adapter}`: `{key_a}` has no matching `{key_b}`",
                    "half of a LoRA pair cannot be composed; re-save the adapter")
    for t, k in ((a, key_a), (b, key_b)):
        if len(t.shape) != 2:
            raise error(f"adapter `{adapter}`: `{k}` has shape {list(t.shape)}, expected a matrix")
    rows, cols = a.shape[0], b.shape[1]
    if not isinstance(r, int) or r <= 0 or rows != cols or rows % r:
        raise error(f"adapter `{adapter}`: parameter `{parameter}` has factors {list(a.shape)} and "
                    f"{list(b.shape)}, which are not r·E rows and columns for r={r}",
                    "the weights and adapter_config.json disagree")
    return ParameterFactors(parameter, key_a, key_b, r, float(alpha), rows // r)


def scaling(alpha: float, rank: int, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


# ---------------------------------------------------------------- against the base


def expert_count(config: Mapping) -> int | None:
    """The number of routed experts config.json gives (None when it names none)."""
    for source in (config, config.get("text_config") or {}):
        for key in _EXPERT_COUNT_KEYS:
            value = source.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def layout_for(shape: tuple[int, ...] | None, out_in: tuple[int, int], model_type: str | None) -> str | None:
    """`linear` for a parameter stored (E, out, in), `conv1d` for (E, in, out), None when
    `shape` fits neither. Square experts are decided by the model type, as PEFT decides
    them by the experts module's `is_transposed`."""
    transposed = model_type in TRANSPOSED_EXPERT_MODEL_TYPES
    if shape is None:
        return "conv1d" if transposed else "linear"
    matrix = tuple(shape[-2:])
    linear, conv1d = matrix == out_in, matrix == out_in[::-1]
    if linear and conv1d:
        return "conv1d" if transposed else "linear"
    return "linear" if linear else "conv1d" if conv1d else None


def settle_experts(recipe, adapters: Mapping, base, sink) -> dict:
    """Expert counts agree between adapters and with the base (I307); each expert's layout
    comes from the base's parameter, as PEFT reads it at load time.

    A base whose checkpoint stores the parameter fused (`…experts.gate_up_proj` in its
    headers) is checked in full here; one that stores experts one tensor each
    (Mixtral's `block_sparse_moe.experts.3.w1.weight`) has only its expert count checked,
    against config.json: `run` checks the rest against the model transformers builds
    (`peftdsl.runtime.experts.check_base`), before anything is written.
    """
    import dataclasses

    counts: dict[str, tuple[str, int]] = {}
    settled = {}
    for name, info in adapters.items():
        modules, problem = {}, None
        for module_name, module in info.modules.items():
            slot = module.expert
            if slot is not None:
                first = counts.setdefault(slot.parameter, (name, slot.count))
                layout, found = module.layout, None
                if first[1] != slot.count:
                    found = ((f"parameter `{slot.parameter}` has {slot.count} experts in `{name}` but "
                              f"{first[1]} in `{first[0]}`"), "adapters must be trained on the same base model")
                elif base is not None:
                    layout, message = _against_base(base, module, name)
                    found = (message, "the adapter was trained on another base model") if message else None
                problem = problem or found
                module = module if layout == module.layout else dataclasses.replace(module, layout=layout)
            modules[module_name] = module
        if problem is not None:
            sink.emit("I307", problem[0], recipe.adapter(name).span, help=problem[1])
        changed = any(modules[n] is not m for n, m in info.modules.items())
        settled[name] = dataclasses.replace(info, modules=modules) if changed else info
    return settled


def _against_base(base, module, adapter: str) -> tuple[str, str | None]:
    """The expert's layout in the base, and what does not fit there (or None)."""
    slot = module.expert
    model_type = base.config.get("model_type")
    header = base.weights.get(slot.parameter)
    out_in = (module.out_features, module.in_features)
    if header is None:
        count = expert_count(base.config)  # of routed experts; a matrix parameter (count 1) is not one
        if base.weights and count is not None and slot.count > 1 and count != slot.count:
            return module.layout, (f"parameter `{slot.parameter}` has {slot.count} experts in `{adapter}` "
                                   f"but the base model has {count}")
        return layout_for(None, out_in, model_type), None
    shape = tuple(header.shape)
    if len(shape) == 3 and shape[0] != slot.count:
        return module.layout, (f"parameter `{slot.parameter}` has {slot.count} experts in `{adapter}` but "
                               f"{shape[0]} in the base model")
    if len(shape) == 2:  # a plain matrix: PEFT adapts it as a Linear weight, out×in, one "expert"
        layout = "linear" if slot.count == 1 and shape == out_in else None
    else:
        layout = layout_for(shape, out_in, model_type) if len(shape) == 3 else None
    if layout is None:
        return module.layout, (f"parameter `{slot.parameter}`: each expert is {out_in[0]}×{out_in[1]} in "
                               f"`{adapter}` but the base's parameter is {'×'.join(map(str, shape))}")
    return layout, None
