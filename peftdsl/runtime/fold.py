"""Fold a module's delta into its weight (and bias): the one implementation of the merge.

The executor produces one delta per module, in the factor frame of
``docs/conventions.md``; two places fold it into the base as PEFT's merge does:
``peftdsl.evaluation.apply`` patches a loaded model in memory, and
``peftdsl.outputs.merge`` streams a merged checkpoint. Both call
:func:`fold_weight` and :func:`fold_bias`, so a merged model and an evaluated
one have the same bits.

- LoRA: ``W + B·A`` (scaling folded into B), in one ``addmm``; conv1d and
  embedding weights store the delta transposed: ``W + Aᵀ·Bᵀ``.
- dense: ``W + ΔW``, ΔW transposed for conv1d and embedding.
- (IA)³: ``W·l`` (l transposed for conv1d), and an ordinary (non-feed-forward)
  module's bias scaled by ``l`` too; no embeddings.

The arithmetic runs in float32 (float64 stays float64) on the weight's device,
and the result is rounded once to the weight's dtype. What to do with the result
is the caller's: ``apply`` keeps the original tensors and puts them back (never
subtracts a delta), ``merge`` casts to the output dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # torch is imported when a delta is folded, not when this module is
    import torch

Layout = Literal["linear", "conv1d", "embedding"]
LAYOUTS: tuple[str, ...] = ("linear", "conv1d", "embedding")


@dataclass(frozen=True, slots=True, kw_only=True)
class LoraDelta:
    """Low-rank factors with the scaling already folded in: ΔW = B·A (out×in)."""

    A: torch.Tensor  # r × in
    B: torch.Tensor  # out × r
    layout: Layout = "linear"
    kept: float | None = None  # rank selection: the share of ‖ΔW‖_F this rank keeps


@dataclass(frozen=True, slots=True, kw_only=True)
class DenseDelta:
    """A full delta in the factor frame (out×in), as ``ties``/``dare`` produce."""

    delta: torch.Tensor
    layout: Layout = "linear"


@dataclass(frozen=True, slots=True, kw_only=True)
class IA3Delta:
    """An (IA)³ vector: (out, 1) scales outputs, (1, in) scales inputs (feed-forward)."""

    l: torch.Tensor  # the paper's and PEFT's name
    feedforward: bool
    layout: Layout = "linear"


@dataclass(frozen=True, slots=True, kw_only=True)
class PartDelta:
    """A tensor beside the factors (a saved module's weight, a bias, trained token rows), composed.

    Keyed by the tensor's name (`classifier.out_proj.weight`), not a module's. ``value`` is
    the tensor's new value, or with ``rows`` the new values of those rows only (token rows);
    with ``add`` it is a delta added to the base's tensor (a `lora_bias` combination).
    ``role`` and ``saved_module`` say how an adapter output stores it (peftdsl.parts).
    """

    value: torch.Tensor
    rows: tuple[int, ...] = ()
    add: bool = False
    role: str = "module"  # module | bias | tokens | lora_bias
    saved_module: str = ""


Delta = LoraDelta | DenseDelta | IA3Delta


def fold_weight(weight: torch.Tensor, delta: Delta, *, name: str = "", inplace: bool = False) -> torch.Tensor:
    """A new tensor: ``weight`` with ``delta`` folded in, in ``weight``'s dtype and on its device.

    ``name`` (the module's) prefixes error messages. With ``inplace`` (a float32 or float64
    weight the caller owns) the result is written into ``weight`` and returned: the same
    bits, without a second buffer. Raises ValueError when the delta does not fit the
    weight, TypeError when it is not a delta.
    """
    import torch

    check_fold(weight.shape, delta, name=name)
    where = f"module `{name}`: " if name else ""
    linear = delta.layout == "linear"
    dtype = torch.promote_types(weight.dtype, torch.float32)
    if inplace and weight.dtype != dtype:
        raise TypeError(f"{where}an in-place fold needs a float32 or float64 weight, not {weight.dtype}")
    if isinstance(delta, IA3Delta):
        vector = delta.l.to(device=weight.device, dtype=dtype)
        vector = vector if linear else vector.T
        return weight.mul_(vector) if inplace else (weight.detach().to(dtype) * vector).to(weight.dtype)
    if isinstance(delta, LoraDelta):
        A, B = (t.to(device=weight.device, dtype=dtype) for t in (delta.A, delta.B))
        left, right = (B, A) if linear else (A.T, B.T)
        if inplace:  # beta = 1 into the weight itself: what addmm does after copying the weight out
            return weight.addmm_(left, right)
        return torch.addmm(weight.detach().to(dtype), left, right).to(weight.dtype)
    frame = delta.delta.to(device=weight.device, dtype=dtype)
    frame = frame if linear else frame.T
    return weight.add_(frame) if inplace else (weight.detach().to(dtype) + frame).to(weight.dtype)


def check_fold(shape: tuple[int, ...], delta: Delta, *, name: str = "") -> None:
    """Raise what :func:`fold_weight` raises for a weight of ``shape`` and ``delta``, computing
    nothing (so that a weight folded a block of rows at a time gets the errors of a whole one)."""
    where = f"module `{name}`: " if name else ""
    if not isinstance(delta, (LoraDelta, DenseDelta, IA3Delta)):
        raise TypeError(f"{where}not a LoRA, dense or (IA)³ delta: {type(delta).__name__}")
    if delta.layout not in LAYOUTS:
        raise ValueError(f"{where}unknown layout `{delta.layout}`")
    shape = tuple(shape)
    if len(shape) != 2:
        raise ValueError(f"{where}a weight of shape {shape} is not a matrix")
    out_in = shape if delta.layout == "linear" else shape[::-1]  # the weight in the factor frame
    if isinstance(delta, IA3Delta):
        _check_ia3(delta, shape, out_in, where)
    elif isinstance(delta, LoraDelta):
        A, B = delta.A, delta.B
        if A.dim() != 2 or B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"{where}LoRA factors of shapes {tuple(A.shape)} and {tuple(B.shape)} do not chain")
        _check_fits(where, delta.layout, (B.shape[0], A.shape[1]), out_in, shape)
    else:
        _check_fits(where, delta.layout, tuple(delta.delta.shape), out_in, shape)


def fold_bias(bias: torch.Tensor, delta: Delta, *, name: str = "") -> torch.Tensor | None:
    """A new bias for ``delta``'s module, or None when the delta leaves the bias alone.

    Only an ordinary (IA)³ module scales its bias (its output scaling, as PEFT's
    merge does); LoRA, dense and feed-forward (IA)³ deltas touch the weight only.
    """
    import torch

    if not changes_bias(delta):
        return None
    dtype = torch.promote_types(bias.dtype, torch.float32)
    vector = delta.l.to(device=bias.device, dtype=dtype)
    if vector.numel() != bias.numel():
        where = f"module `{name}`: " if name else ""
        raise ValueError(f"{where}(IA)³ vector of shape {tuple(vector.shape)} does not fit bias {tuple(bias.shape)}")
    return (bias.detach().to(dtype) * vector.reshape(bias.shape)).to(bias.dtype)


def fold_part(tensor: torch.Tensor | None, part: PartDelta, *, name: str = "") -> torch.Tensor:
    """The tensor a part sets: its value, the base's with some rows replaced, or the base's plus
    a delta; in the base tensor's dtype (float32 for a tensor the base lacks)."""
    import torch

    where = f"`{name}`: " if name else ""
    if tensor is None:
        if part.add or part.rows:
            raise ValueError(f"{where}the base has no such tensor to {'add to' if part.add else 'set rows of'}")
        return part.value.to(torch.float32).clone()
    check_part(tensor.shape, part, name=name)
    dtype = torch.promote_types(tensor.dtype, torch.float32)
    value = part.value.to(device=tensor.device, dtype=dtype)
    if part.rows:
        index = torch.tensor(part.rows, device=tensor.device)
        return tensor.detach().to(dtype).index_copy(0, index, value).to(tensor.dtype)
    return (tensor.detach().to(dtype) + value if part.add else value).to(tensor.dtype)


def check_part(shape: tuple[int, ...], part: PartDelta, *, name: str = "") -> None:
    """Raise what :func:`fold_part` raises for a stored tensor of ``shape``, computing nothing."""
    where = f"`{name}`: " if name else ""
    shape, value = tuple(shape), part.value
    if part.rows:
        if value.dim() != 2 or len(shape) != 2 or tuple(value.shape) != (len(part.rows), shape[1]):
            raise ValueError(f"{where}{len(part.rows)} rows of shape {tuple(value.shape)} do not fit {shape}")
    elif tuple(value.shape) != shape:
        raise ValueError(f"{where}a value of shape {tuple(value.shape)} does not fit {shape}")


def changes_bias(delta: Delta) -> bool:
    """Whether :func:`fold_bias` changes a bias for this delta (ordinary (IA)³ only)."""
    return isinstance(delta, IA3Delta) and not delta.feedforward


def _check_ia3(delta: IA3Delta, shape: tuple, out_in: tuple, where: str) -> None:
    """``l``'s shape against the weight's."""
    if delta.layout == "embedding":
        raise ValueError(f"{where}(IA)³ does not apply to embeddings")
    out_features, in_features = out_in
    expected = (1, in_features) if delta.feedforward else (out_features, 1)
    if tuple(delta.l.shape) != expected:
        kind = "feed-forward" if delta.feedforward else "output"
        raise ValueError(f"{where}(IA)³ vector of shape {tuple(delta.l.shape)} does not fit weight "
                         f"{shape}: expected {expected} ({kind} scaling)")


def _check_fits(where: str, layout: str, frame: tuple, out_in: tuple, shape: tuple) -> None:
    """A delta of ``frame`` shape (out×in) fits a weight of ``shape`` whose factor-frame shape is ``out_in``."""
    if tuple(frame) != out_in:
        raise ValueError(f"{where}a {layout} delta of shape {tuple(frame)} does not fit its weight of shape "
                         f"{tuple(shape)}")


# --------------------------------------------------------------------------- row blocks
#
# A large stored tensor is merged a block of rows at a time (peftdsl.outputs.pipeline), so
# that no whole float32 copy of it is ever held. These give the share of a delta that lands
# on rows ``start:stop`` of the stored weight; folding a block with it gives the same values
# as folding the whole weight and slicing: elementwise for dense, (IA)³ and parts, and for
# LoRA an ``addmm`` over the block's rows, which is bit-identical to the whole product for
# blocks of at least 256 rows (tests/test_pipeline.py checks it on this BLAS).


def delta_rows(delta: Delta, start: int, stop: int) -> Delta:
    """The part of ``delta`` acting on rows ``start:stop`` of the stored weight.

    ``fold_weight(W[start:stop], delta_rows(d, start, stop))`` is
    ``fold_weight(W, d)[start:stop]``. A linear weight's rows are output features (rows of
    B, of ΔW, of an output scaling); a conv1d or embedding weight is stored transposed, so
    its rows are input features (columns of A, of ΔW, of a feed-forward scaling).
    """
    rows = slice(start, stop)
    linear = delta.layout == "linear"
    if isinstance(delta, LoraDelta):
        if linear:
            return LoraDelta(A=delta.A, B=delta.B[rows], layout=delta.layout)
        return LoraDelta(A=delta.A[:, rows], B=delta.B, layout=delta.layout)
    if isinstance(delta, DenseDelta):
        return DenseDelta(delta=delta.delta[rows] if linear else delta.delta[:, rows], layout=delta.layout)
    if isinstance(delta, IA3Delta):
        along_rows = delta.feedforward != linear  # linear: output scaling; transposed: feed-forward
        l = (delta.l[rows] if linear else delta.l[:, rows]) if along_rows else delta.l  # noqa: E741
        return IA3Delta(l=l, feedforward=delta.feedforward, layout=delta.layout)
    raise TypeError(f"not a LoRA, dense or (IA)³ delta: {type(delta).__name__}")


def part_rows(part: PartDelta, start: int, stop: int) -> PartDelta | None:
    """The part of ``part`` acting on rows ``start:stop`` of its tensor; None when it sets none of them.

    ``fold_part(T[start:stop], part_rows(p, start, stop))`` is ``fold_part(T, p)[start:stop]``.
    """
    if not part.rows:
        return PartDelta(value=part.value[start:stop], add=part.add, role=part.role, saved_module=part.saved_module)
    inside = [(i, row - start) for i, row in enumerate(part.rows) if start <= row < stop]
    if not inside:
        return None
    import torch

    index = torch.tensor([i for i, _ in inside])
    return PartDelta(value=part.value.index_select(0, index), rows=tuple(r for _, r in inside), add=part.add,
                     role=part.role, saved_module=part.saved_module)
