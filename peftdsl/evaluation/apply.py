"""Apply a composed delta to a loaded base model in memory, and undo it exactly.

Evaluation loads the base model once and scores every model of a recipe (base,
adapters, compositions, every grid point of a sweep) by patching the touched
weights for the duration of one ``with applied(model, deltas):`` block. Nothing
is written to disk and the base is never reloaded.

Why the original tensors are *kept* rather than the delta subtracted on exit:
``(W + ΔW) − ΔW`` is not ``W`` in floating point (and not at all after a
rounding to bfloat16), so a long sweep would drift. Each touched parameter gets
a freshly computed tensor, and on exit the original tensor object is put back:
the restoration is bit-exact and costs no arithmetic.

The patched values come from ``peftdsl.runtime.fold``, the arithmetic that merged
checkpoints use too (PEFT's merge, in float32, rounded once to the weight's
dtype). The delta types live there and are re-exported here.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING

from peftdsl.runtime.fold import (
    LAYOUTS,
    Delta,
    DenseDelta,
    IA3Delta,
    Layout,
    LoraDelta,
    PartDelta,
    fold_bias,
    fold_part,
    fold_weight,
)

if TYPE_CHECKING:  # torch is only needed when a delta is actually applied
    import torch

__all__ = ["LAYOUTS", "Delta", "DenseDelta", "IA3Delta", "Layout", "LoraDelta", "TiedWeightWarning", "applied"]


class TiedWeightWarning(UserWarning):
    """A patched weight is shared (tied embeddings); `peftdsl run` reports this as I313 instead."""


@contextmanager
def applied(model: torch.nn.Module, deltas: Mapping[str, Delta] | None) -> Iterator[torch.nn.Module]:
    """Patch ``model``'s weights with ``deltas`` inside the block, restore them after.

    ``deltas`` maps module names (paths in ``model``, e.g.
    ``model.layers.0.self_attn.q_proj``) to a delta, and tensor names
    (``classifier.out_proj.weight``) to a ``PartDelta``; ``None`` or ``{}`` is the
    base model. The patched values are computed before any parameter is touched,
    so an error (unknown module, shape mismatch) leaves the model unchanged. The
    originals come back even when the block raises.
    """
    from peftdsl.runtime.experts import parameter_patch, split_names

    deltas = deltas or {}
    shared = _shared_parameters(model) if deltas else set()
    modules = {name: d for name, d in deltas.items() if not isinstance(d, PartDelta)}
    plain, fused = split_names(modules)  # experts of a fused parameter patch it together
    patches = [_patch_for(model, name, modules[name], shared) for name in sorted(plain)]
    patches += [parameter_patch(model, parameter, names, modules) for parameter, names in fused.items()]
    parts = [_part_patch(model, name, d) for name, d in sorted(deltas.items()) if isinstance(d, PartDelta)]
    patches += [p for p in parts if isinstance(p, list)]
    swaps = [p for p in parts if isinstance(p, tuple)]
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    swapped: list[tuple[torch.nn.Module, str, object]] = []
    try:
        for patch in patches:
            for param, new in patch:
                saved.append((param, param.data))
                param.data = new
        for owner, attr, new in swaps:
            swapped.append((owner, attr, owner._parameters.get(attr)))
            owner._parameters[attr] = new
        yield model
    finally:
        for owner, attr, original in reversed(swapped):
            owner._parameters[attr] = original
        for param, original in reversed(saved):
            param.data = original


def _patch_for(
    model: torch.nn.Module, name: str, delta: Delta, shared: set[int]
) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """The (parameter, new value) pairs that applying ``delta`` to module ``name`` needs."""
    try:
        module = model.get_submodule(name)
    except AttributeError as error:
        raise KeyError(f"the model has no module `{name}`") from error
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ValueError(f"module `{name}` has no 2-D weight to patch")
    if id(weight) in shared:
        warnings.warn(
            f"the weight of `{name}` is shared with another module (tied weights); "
            "patching it changes both, as PEFT's merge would",
            TiedWeightWarning,
            stacklevel=4,
        )
    patches = [(weight, fold_weight(weight, delta, name=name))]
    bias = getattr(module, "bias", None)
    if bias is not None and (new_bias := fold_bias(bias, delta, name=name)) is not None:
        patches.append((bias, new_bias))
    return patches


def _part_patch(model: torch.nn.Module, name: str, part: PartDelta):
    """How to set the tensor ``name`` as ``part`` says: ``(module, parameter name, new Parameter)``
    to swap in, or for token rows ``[(parameter, new data)]``.

    A saved module's or bias's Parameter is replaced, not written into, so a weight the base
    ties to another (`lm_head` to the embeddings) gets its new value on this side only, as
    PEFT's saved copy has it; a `lora_bias` delta on a module without a bias gets one, as
    PEFT's unmerged forward adds it. Token rows are the exception: PEFT trains them on both
    sides of a tie, so they replace the shared tensor's data and the tie stays.
    """
    import torch

    owner_name, _, attr = name.rpartition(".")
    try:
        owner = model.get_submodule(owner_name)
    except AttributeError as error:
        raise KeyError(f"the model has no module `{owner_name}`") from error
    if attr not in owner._parameters and part.role != "lora_bias":
        raise KeyError(f"the model has no parameter `{name}`")
    current = owner._parameters.get(attr)
    if current is None:  # a `lora_bias` delta where the module has no bias: the bias is the delta
        weight = owner.weight
        value = part.value.to(device=weight.device, dtype=weight.dtype)
    else:
        value = fold_part(current.detach(), part, name=name)
    if part.rows:
        return [(current, value)]
    return owner, attr, torch.nn.Parameter(value, requires_grad=False)


def _shared_parameters(model: torch.nn.Module) -> set[int]:
    """Ids of parameters registered under more than one name (tied embeddings)."""
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}
