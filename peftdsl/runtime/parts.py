"""Execute the plan of the tensors beside the factors (`peftdsl.parts`): one tensor at a time.

Each planned tensor is computed from the canonical form as its mode says, in float32 on
the executor's device:

- `affine`: Σ cᵢ·Wᵢ, from the adapters' values alone;
- `task`: W_base + Σ cᵢ·τᵢ with τᵢ = Wᵢ − W_base (a `lora_bias` term's τ is its delta sᵢ·bᵢ);
- `delta`: Σ cᵢ·sᵢ·bᵢ, added to the base's bias when folded.

Token rows live in a frame of the union of the terms' rows: a term that does not train a
row contributes 0 there. Operators carry parts as their registry row says: linearly
(`svd`, `pem`, `peft_linear`), or as task tensors handed to the operator's own kernel
(`ties`, `dare_*`, `magnitude_prune`), with the tensor's name seeding DARE's draws.
"""

from __future__ import annotations

import math

import torch

from peftdsl import ir
from peftdsl.errors import InputDataError, InternalError
from peftdsl.operators import OPERATORS, Parts
from peftdsl.parts import (
    AFFINE,
    DELTA,
    NOTHING_OMITTED,
    TASK,
    Omitting,
    PartPlan,
    drops_full_parts,
    extracts_embeddings,
    linear_coefficients,
    omitted_tensors,
)
from peftdsl.runtime import kernels, ops
from peftdsl.runtime.fold import LoraDelta, PartDelta
from peftdsl.runtime.tensorio import CACHED_BLOCK_ELEMENTS, SafetensorsReader, all_finite
from peftdsl.runtime.values import Dense, folded_B


def dropped_tensors(adapters, leaf: ir.OpLeaf) -> tuple[str, ...]:
    """The full fine-tunes' tensors beside their modules that `leaf` (an `svd` without
    `rest="save"`) drops: neither saved nor extracted; sorted."""
    return omitted_tensors(adapters, leaf) if drops_full_parts(leaf) else ()


def extract_embeddings(executor, form: ir.Combination) -> dict[str, LoraDelta]:
    """The embedding LoRA factors of each `svd(…, embed=true)` of `form` (the front end makes
    it the whole form): per full-fine-tune input embedding τ_E = Σ cᵢ·(Eᵢ − E_base)
    (vocab × hidden), the best rank-k factors of PEFT's embedding frame, ΔE = (B·A)ᵀ with A
    r × vocab and B hidden × r, exactly as `svd` computes them for a linear module."""
    out = {}
    for term in form.terms:
        leaf = term.leaf
        if not isinstance(leaf, ir.OpLeaf) or not extracts_embeddings(leaf):
            continue
        for tensor in omitted_tensors(executor.adapters, leaf, extracted=True):
            tau = _task_vector(executor, leaf.arg, tensor)
            if tau is None:
                continue
            executor.kept_norms.setdefault(leaf, {})[(tensor,)] = float(kernels.squared_norms(tau[None]).sum())
            module = tensor.removesuffix(".weight")
            context = ops.Context(seed=executor.seed, modules=(module,), layout="embedding")
            value = ops.svd(Dense(tau.T.unsqueeze(0).contiguous()), dict(leaf.options), context)
            r = value.ranks[0] if value.ranks is not None else value.A.shape[1]
            B = folded_B(value)
            out[module] = LoraDelta(A=value.A[0, :r].cpu(), B=B[0, :, :r].cpu(), layout="embedding",
                                    kept=value.kept[0] if value.kept is not None else None)
    return out


def _task_vector(executor, comb: ir.Combination, tensor: str) -> torch.Tensor | None:
    """Σ cᵢ·τᵢ of one full-fine-tune tensor over `comb` (operators applied as for any part)."""
    shape = next(executor.adapters[name].parts[tensor].shape for name in ir.adapter_leaves(comb)
                 if tensor in executor.adapters[name].parts)
    plan = PartPlan(tensor=tensor, mode=TASK, role="full", shape=tuple(shape))
    return _PartEvaluation(executor, plan).combination(comb)


def task_vector_norm2(executor, comb: ir.Combination, tensor: str) -> float:
    """‖Σ cᵢ·τᵢ‖² of one full-fine-tune tensor over `comb`. Where `comb` is linear in its
    sources (no `ties`/`dare` inside), a block of rows at a time, so that a 128k-row embedding
    is never held whole; otherwise from the whole task vector."""
    coefs = linear_coefficients(comb)
    readers = _row_readers(executor, tensor, coefs) if coefs is not None else None
    if readers is None:
        value = _task_vector(executor, comb, tensor)
        return float(kernels.squared_norms(value.reshape(1, -1)).sum()) if value is not None else 0.0
    base, terms = readers
    shape = base.tensors[tensor].shape
    rows, width = (shape[0] if shape else 1), max(1, math.prod(shape[1:]))
    step = max(1, CACHED_BLOCK_ELEMENTS // width)  # a block in cache, its buffers reused
    raw = torch.empty(step * width * 8, dtype=torch.uint8)  # any stored dtype fits
    origin, tau, block = (torch.empty(step, width) for _ in range(3))
    wide = torch.empty(step * width, dtype=torch.float64)
    total = 0.0
    for start in range(0, rows, step):
        n = min(rows, start + step) - start
        o = origin[:n].copy_(base.read_rows(tensor, start, start + n, out=raw).reshape(n, width))
        b = block[:n].zero_()
        for coef, reader in terms:
            t = tau[:n].copy_(reader.read_rows(tensor, start, start + n, out=raw).reshape(n, width)).sub_(o)
            b.add_(t, alpha=kernels.float32_alpha(coef))
        w = wide[:n * width].copy_(b.reshape(-1))
        total += float(torch.dot(w, w))
    return total


def _row_readers(executor, tensor: str, coefs: dict[str, float]):
    """The base's and each carrying source's safetensors readers of `tensor`, for reading it in
    blocks of rows; None where one is not a safetensors file (a pickle) or the tensor is a scalar."""
    from peftdsl.runtime.tensorio import SafetensorsReader

    base_file = executor.base.files.get(tensor) if executor.base is not None else None
    if base_file is None:
        return None
    base = executor.reader(base_file)
    terms = []
    for name, coef in coefs.items():
        info = executor.adapters[name]
        part = info.parts.get(tensor)
        if part is None or part.role != "full" or tensor not in info.tensor_files:
            continue
        terms.append((coef, executor.reader(info.tensor_files[tensor])))
    if not isinstance(base, SafetensorsReader) or not all(isinstance(r, SafetensorsReader) for _, r in terms):
        return None
    return (base, terms) if base.tensors[tensor].shape else None


def compute_parts(executor, form: ir.Combination, plans: tuple[PartPlan, ...]) -> dict[str, PartDelta]:
    """Every planned tensor's composed value, keyed by tensor name, on the CPU."""
    return {plan.tensor: _PartEvaluation(executor, plan).result(form) for plan in plans}


class _PartEvaluation:
    def __init__(self, executor, plan: PartPlan):
        self.executor, self.plan = executor, plan
        self.base = _read_base(executor, plan) if plan.mode == TASK else None

    def result(self, form: ir.Combination) -> PartDelta:
        value = self.combination(form)
        if value is None:
            raise InternalError(f"no term of the form carries `{self.plan.tensor}`")
        if self.base is not None:
            value = value.add_(self.base) if value.dtype == torch.float32 else self.base + value  # value is fresh
        if not all_finite(value):
            raise InputDataError(f"the result for `{self.plan.tensor}` is not finite (float32 overflow): "
                                 "scale the coefficients down")
        plan = self.plan
        return PartDelta(value=value.cpu(), rows=plan.rows, add=plan.mode == DELTA, role=plan.role,
                         saved_module=plan.saved_module)

    def combination(self, comb: ir.Combination, omitting: Omitting = NOTHING_OMITTED) -> torch.Tensor | None:
        """Σ cᵢ·vᵢ, accumulated in place: every vᵢ is a fresh tensor (a read, or an operator's
        result), so a 128k-row embedding's task vector costs one float32 copy, not three."""
        total = None
        for term in comb.terms:
            value = self.leaf(term.leaf, omitting)
            if value is None:
                continue
            if total is None:
                total = value.mul_(term.coef) if value.is_floating_point() else value * term.coef
            else:
                total.add_(value, alpha=kernels.float32_alpha(term.coef))
        return total

    def leaf(self, leaf: ir.Leaf, omitting: Omitting = NOTHING_OMITTED) -> torch.Tensor | None:
        if isinstance(leaf, ir.AdapterLeaf):
            return self.term(leaf.name, omitting)
        operator = OPERATORS[leaf.func]
        omitting = omitting.below(leaf)
        if operator.parts is Parts.LINEAR:
            return self.combination(leaf.arg, omitting)
        values = [(t.coef, v) for t in leaf.arg.terms if (v := self.leaf(t.leaf, omitting)) is not None]
        if not values:
            return None
        shape = values[0][1].shape
        stacked = torch.stack([v.reshape(1, *_matrix(shape)) for _, v in values])
        weights = torch.tensor([c for c, _ in values], dtype=torch.float32, device=stacked.device)
        kernel = getattr(ops, operator.kernel)
        context = ops.Context(seed=self.executor.seed, modules=(self.plan.tensor,), layout="linear")
        return kernel((stacked, weights), dict(leaf.options), context).delta.reshape(shape)

    def term(self, adapter: str, omitting: Omitting = NOTHING_OMITTED) -> torch.Tensor | None:
        """One adapter's contribution: its value (affine), its task vector (task) or its delta."""
        part = self.executor.adapters[adapter].parts.get(self.plan.tensor)
        if part is None or omitting.omits(self.plan.tensor, part):
            return None
        stored = self.executor._read_stack(adapter, [part.key])[0]
        if part.is_delta:
            return stored * part.scaling
        if part.role == "tokens":
            return self._rows(part.rows, stored)
        return stored if self.plan.mode == AFFINE else stored.sub_(self.base)  # `stored` is a fresh read

    def _rows(self, rows: tuple[int, ...], stored: torch.Tensor) -> torch.Tensor:
        """Token rows placed in the frame of the union of rows; 0 (no change) on rows not trained."""
        at = {row: i for i, row in enumerate(self.plan.rows)}
        index = torch.tensor([at[row] for row in rows], device=stored.device)
        if self.plan.mode == AFFINE:  # every term trains these very rows
            return torch.zeros_like(stored).index_copy(0, index, stored)
        frame = torch.zeros((len(self.plan.rows), stored.shape[1]), device=stored.device)
        return frame.index_copy(0, index, stored - self.base.index_select(0, index))


def _matrix(shape: torch.Size) -> tuple[int, int]:
    """A tensor's shape as the matrix the task-tensor kernels take: a vector is one row."""
    return (1, shape[0]) if len(shape) == 1 else (shape[0], int(torch.Size(shape[1:]).numel()))


def _read_base(executor, plan: PartPlan) -> torch.Tensor:
    """The base's value of the tensor in the plan's frame (its rows, for token rows), float32."""
    base = executor.base
    name = base.stored_as(plan.tensor, plan.shape) if base is not None and not plan.rows else plan.tensor
    shard = base.files.get(name) if base is not None and name is not None else None
    if shard is None:
        raise InputDataError(f"the base model has no tensor `{plan.tensor}` to compose a task vector against")
    try:
        with SafetensorsReader(shard) as reader:
            tensor = reader.read(name)
    except OSError as err:
        raise InputDataError(f"cannot read `{plan.tensor}` from the base ({err})") from err
    if not all_finite(tensor):
        raise InputDataError(f"the base's `{plan.tensor}` holds NaN or infinite values")
    tensor = tensor.to(executor.device)  # its stored dtype: subtracted from float32 reads, element by element
    if plan.rows:
        tensor = tensor.index_select(0, torch.tensor(plan.rows, device=tensor.device))
    return tensor
