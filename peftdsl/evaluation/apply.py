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

Deltas are in the factor frame of ``docs/conventions.md``; the layout maps them
onto the weight as PEFT's merge does (``W += s·B·A``, transposed for ``conv1d``
and ``embedding``; (IA)³ multiplies the weight, and the bias of a
non-feed-forward module, by ``l``). The arithmetic runs in float32 (float64
weights stay float64) and the result is rounded once to the weight's dtype.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Union

if TYPE_CHECKING:  # torch is only needed when a delta is actually applied
    import torch

Layout = Literal["linear", "conv1d", "embedding"]
LAYOUTS: tuple[str, ...] = ("linear", "conv1d", "embedding")


class TiedWeightWarning(UserWarning):
    """A patched weight is shared (tied embeddings); `peftdsl run` reports this as I313 instead."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LoraDelta:
    """Low-rank factors with the scaling already folded in: ΔW = B·A (out×in)."""

    A: torch.Tensor  # r × in
    B: torch.Tensor  # out × r
    layout: Layout = "linear"


@dataclass(frozen=True, slots=True, kw_only=True)
class DenseDelta:
    """A full delta in the factor frame (out×in), as ``ties``/``dare`` produce."""

    delta: torch.Tensor
    layout: Layout = "linear"


@dataclass(frozen=True, slots=True, kw_only=True)
class IA3Delta:
    """An (IA)³ vector: (out, 1) scales outputs, (1, in) scales inputs (feed-forward)."""

    l: torch.Tensor  # noqa: E741 — the paper's and PEFT's name
    feedforward: bool
    layout: Layout = "linear"


Delta = Union[LoraDelta, DenseDelta, IA3Delta]


@contextmanager
def applied(model: torch.nn.Module, deltas: Mapping[str, Delta] | None) -> Iterator[torch.nn.Module]:
    """Patch ``model``'s weights with ``deltas`` inside the block, restore them after.

    ``deltas`` maps module names (paths in ``model``, e.g.
    ``model.layers.0.self_attn.q_proj``) to a delta; ``None`` or ``{}`` is the
    base model. The patched values are computed before any parameter is touched,
    so an error (unknown module, shape mismatch) leaves the model unchanged. The
    originals come back even when the block raises.
    """
    deltas = deltas or {}
    shared = _shared_parameters(model) if deltas else set()
    patches = [_patch_for(model, name, deltas[name], shared) for name in sorted(deltas)]
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        for patch in patches:
            for param, new in patch:
                saved.append((param, param.data))
                param.data = new
        yield model
    finally:
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
    if delta.layout not in LAYOUTS:
        raise ValueError(f"module `{name}`: unknown layout `{delta.layout}`")
    if id(weight) in shared:
        warnings.warn(
            f"the weight of `{name}` is shared with another module (tied weights); "
            "patching it changes both, as PEFT's merge would",
            TiedWeightWarning,
            stacklevel=4,
        )
    if isinstance(delta, IA3Delta):
        return _ia3_patch(module, name, delta)
    return [(weight, _added(weight, _weight_frame_delta(name, delta, weight)))]


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 at least, so bfloat16/float16 weights are patched with one rounding."""
    import torch

    return torch.promote_types(tensor.dtype, torch.float32)


def _weight_frame_delta(name: str, delta: LoraDelta | DenseDelta, weight: torch.Tensor) -> torch.Tensor:
    """ΔW in the weight's own layout (transposed for conv1d and embedding), on its device."""
    dtype, device = _compute_dtype(weight), weight.device
    if isinstance(delta, LoraDelta):
        A = delta.A.to(device=device, dtype=dtype)
        B = delta.B.to(device=device, dtype=dtype)
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"module `{name}`: LoRA factors of shapes {tuple(A.shape)} and {tuple(B.shape)} do not chain")
        frame = B @ A
    else:
        frame = delta.delta.to(device=device, dtype=dtype)
    oriented = frame if delta.layout == "linear" else frame.T
    if oriented.shape != weight.shape:
        raise ValueError(
            f"module `{name}`: a {delta.layout} delta of shape {tuple(frame.shape)} "
            f"does not fit its weight of shape {tuple(weight.shape)}"
        )
    return oriented


def _added(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """A new tensor W + ΔW, summed in float32 and rounded once to W's dtype."""
    return (weight.detach().to(delta.dtype) + delta).to(weight.dtype)


def _ia3_patch(module: torch.nn.Module, name: str, delta: IA3Delta) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """PEFT's (IA)³ merge: W·l (l transposed for conv1d), and bias·l unless feed-forward."""
    weight = module.weight
    if delta.layout == "embedding":
        raise ValueError(f"module `{name}`: (IA)³ does not apply to embeddings")
    dtype = _compute_dtype(weight)
    vector = delta.l.to(device=weight.device, dtype=dtype)
    expected = (1, _in_features(weight, delta.layout)) if delta.feedforward else (_out_features(weight, delta.layout), 1)
    if tuple(vector.shape) != expected:
        raise ValueError(
            f"module `{name}`: (IA)³ vector of shape {tuple(vector.shape)}, expected {expected} "
            f"({'feed-forward' if delta.feedforward else 'output'} scaling)"
        )
    oriented = vector if delta.layout == "linear" else vector.T
    patches = [(weight, (weight.detach().to(dtype) * oriented).to(weight.dtype))]
    bias = getattr(module, "bias", None)
    if bias is not None and not delta.feedforward:
        scale = vector.reshape(bias.shape)
        patches.append((bias, (bias.detach().to(dtype) * scale).to(bias.dtype)))
    return patches


def _out_features(weight: torch.Tensor, layout: str) -> int:
    return weight.shape[0] if layout == "linear" else weight.shape[1]


def _in_features(weight: torch.Tensor, layout: str) -> int:
    return weight.shape[1] if layout == "linear" else weight.shape[0]


def _shared_parameters(model: torch.nn.Module) -> set[int]:
    """Ids of parameters registered under more than one name (tied embeddings)."""
    seen: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}
