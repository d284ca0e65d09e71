"""The numerical core: pure torch functions over groups of stacked modules.

Every function here works on a *group*: all target modules of one shape, stacked
along a leading dimension ``g`` (for example the 32 ``q_proj`` of a 7B model), so
that a group is one batched ``torch.linalg`` call instead of a Python loop. The
only exception is DARE, which needs one random generator per module so that a
module's mask does not depend on which other modules share its group.

Shapes follow the factor frame of ``docs/conventions.md``:

- a LoRA module is ``A[g, r, in]``, ``B[g, out, r]`` and a scaling ``s`` (a float,
  or a ``Tensor[g]`` when ``alpha_pattern`` gives layers different scalings); its
  delta is ``s·B·A`` of shape ``[g, out, in]``;
- dense task tensors are ``[n, g, out, in]`` for ``n`` terms with weights ``[n]``;
- (IA)³ vectors are any shape ``[g, ...]``.

All compute is float32 (inputs are promoted); the writers cast results to their
storage dtype. Nothing here reads files or knows about recipes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

COMPUTE_DTYPE = torch.float32

Scale = float | Tensor
Majority = Literal["total", "frequency"]


class LoraTerm(NamedTuple):
    """One term ``coef·s·B·A`` of a canonical linear combination, for one group."""

    coef: float
    A: Tensor  # [g, r, in]
    B: Tensor  # [g, out, r]
    scale: Scale = 1.0  # float, or Tensor[g]: per-module scaling α/r or α/√r


class Ia3Term(NamedTuple):
    """One term ``coef·(l − 1)`` of an (IA)³ combination, for one group."""

    coef: float
    l: Tensor  # noqa: E741  [g, ...]


# --------------------------------------------------------------------------- helpers


def _f32(x: Tensor) -> Tensor:
    return x.to(COMPUTE_DTYPE)


def _per_module(scale: Scale, group: int, like: Tensor) -> Tensor:
    """A scaling as a ``[g, 1, 1]`` tensor, so it broadcasts over each module's matrix."""
    scale_tensor = torch.as_tensor(scale, dtype=COMPUTE_DTYPE, device=like.device)
    if scale_tensor.dim() == 0:
        scale_tensor = scale_tensor.expand(group)
    if scale_tensor.shape != (group,):
        raise ValueError(f"scale must be a float or a Tensor[{group}], got shape {tuple(scale_tensor.shape)}")
    return scale_tensor.view(group, 1, 1)


def _as_terms(terms: Sequence[tuple]) -> list[LoraTerm]:
    if not terms:
        raise ValueError("a combination needs at least one term")
    return [LoraTerm(*term) for term in terms]


def _check_density(density: float) -> None:
    if density < 0:
        raise ValueError(f"density must be >= 0, got {density}")


def lora_delta(A: Tensor, B: Tensor, scale: Scale = 1.0) -> Tensor:
    """The dense delta ``s·B·A`` of each module, ``[g, out, in]``.

    Only for dense operators (ties, DARE, …) and for merging into a base weight:
    the low-rank operators never call it.
    """
    A, B = _f32(A), _f32(B)
    return _per_module(scale, B.shape[0], B) * (B @ A)


def stack_task_tensors(terms: Sequence[tuple]) -> tuple[Tensor, Tensor]:
    """Task tensors ``[n, g, out, in]`` (each ``sᵢ·Bᵢ·Aᵢ``) and weights ``[n]`` (the cᵢ).

    This is how a canonical form Σ cᵢ·xᵢ is handed to the dense operators: the
    coefficients stay separate because TIES elects signs before weighting.
    """
    lora_terms = _as_terms(terms)
    tasks = torch.stack([lora_delta(term.A, term.B, term.scale) for term in lora_terms])
    weights = torch.tensor([float(term.coef) for term in lora_terms], dtype=COMPUTE_DTYPE, device=tasks.device)
    return tasks, weights


# ---------------------------------------------------------------- low-rank operators


def exact_sum(terms: Sequence[tuple]) -> tuple[Tensor, Tensor]:
    """Σ cᵢ·sᵢ·Bᵢ·Aᵢ exactly, kept low-rank: ``A = [A₁; …]``, ``B = [c₁s₁B₁ | …]``.

    The result has rank Σ rᵢ and scaling 1. Coefficients and scalings go into B
    only, so negation is (A, −B), the paper's negation operator. Terms may have
    different ranks; every term must cover every module of the group.
    """
    lora_terms = _as_terms(terms)
    first = lora_terms[0]
    group, inn, out = first.A.shape[0], first.A.shape[2], first.B.shape[1]
    rank = sum(term.A.shape[1] for term in lora_terms)
    # Each block is written once into the result (no scaled copies, then a cat):
    # this is a memory-bound kernel, so every pass over the factors counts.
    A_out = torch.empty((group, rank, inn), dtype=COMPUTE_DTYPE, device=first.A.device)
    B_out = torch.empty((group, out, rank), dtype=COMPUTE_DTYPE, device=first.B.device)
    start = 0
    for term in lora_terms:
        stop = start + term.A.shape[1]
        A_out[:, start:stop].copy_(term.A)
        torch.mul(term.B, float(term.coef) * _per_module(term.scale, group, B_out), out=B_out[:, :, start:stop])
        start = stop
    return A_out, B_out


def pem(terms: Sequence[tuple]) -> tuple[Tensor, Tensor]:
    """The paper's parameter-space arithmetic: ``A = Σ|cᵢ|·Aᵢ``, ``B = Σ cᵢ·sᵢ·Bᵢ``.

    For convex weights this is λθ₁ + (1−λ)θ₂ of Zhang et al. (2023); for c = −1
    it is their negation (A, −B). It is *not* ΔW addition: cross terms Bⱼ·Aᵢ
    appear. Ranks must be equal (the compiler reports that earlier, with a span).
    """
    lora_terms = _as_terms(terms)
    _require_equal_ranks(lora_terms, "pem")
    group = lora_terms[0].A.shape[0]
    A = sum(abs(float(term.coef)) * _f32(term.A) for term in lora_terms)
    B = sum(float(term.coef) * _per_module(term.scale, group, term.B) * _f32(term.B) for term in lora_terms)
    return A, B


def peft_linear(terms: Sequence[tuple]) -> tuple[Tensor, Tensor]:
    """PEFT's ``add_weighted_adapter(combination_type="linear")``, for users migrating.

    With wᵢ = cᵢ·sᵢ: ``A = Σ sign(wᵢ)·√|wᵢ|·Aᵢ``, ``B = Σ √|wᵢ|·Bᵢ``, scaling 1
    (PEFT counts sign(0) as +1). Like :func:`pem`, not ΔW addition.
    """
    lora_terms = _as_terms(terms)
    _require_equal_ranks(lora_terms, "peft_linear")
    group = lora_terms[0].A.shape[0]
    A = torch.zeros_like(_f32(lora_terms[0].A))
    B = torch.zeros_like(_f32(lora_terms[0].B))
    for term in lora_terms:
        weight = float(term.coef) * _per_module(term.scale, group, A)
        sign = torch.where(weight >= 0, 1.0, -1.0)
        root = weight.abs().sqrt()
        A = A + sign * root * _f32(term.A)
        B = B + root * _f32(term.B)
    return A, B


def _require_equal_ranks(terms: Sequence[LoraTerm], operator: str) -> None:
    ranks = sorted({term.A.shape[1] for term in terms})
    if len(ranks) != 1:
        raise ValueError(f"{operator} needs equal ranks on every module, got ranks {ranks}")


# ---------------------------------------------------------------------- SVD


def svd_from_factors(A: Tensor, B: Tensor, rank: int, clamp: float | None = None) -> tuple[Tensor, Tensor]:
    """:func:`svd_from_factors_spectrum` without the spectrum."""
    A, B, _ = svd_from_factors_spectrum(A, B, rank, clamp)
    return A, B


def svd_from_factors_spectrum(A: Tensor, B: Tensor, rank: int,
                              clamp: float | None = None) -> tuple[Tensor, Tensor, Spectrum]:
    """Best rank-k approximation of ``B·A`` per module, without forming ``B·A``.

    ``B = Qb·Rb`` and ``Aᵀ = Qa·Ra`` (reduced QR), so ``B·A = Qb·(Rb·Raᵀ)·Qaᵀ``;
    the SVD of the small R×R core ``Uc·Σ·Vcᵀ`` gives ``U = Qb·Uc``, ``V = Qa·Vc``.
    Cost O((out + in)·R²) instead of O(out·in·min(out, in)) for a dense SVD.

    Returns ``(A' = Vᵀ[g, k, in], B' = U·Σ[g, out, k])``, scaling 1 (PEFT's
    convention), with ``k = min(rank, R, out, in)``: directions beyond the rank
    of B·A carry zero singular values and are dropped rather than padded with
    arbitrary null-space vectors. ``clamp`` is PEFT's ``svd_clamp`` (see
    :func:`clamp_factors`); it matches PEFT exactly when ``rank ≤ R``.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    A, B = _f32(A), _f32(B)
    q_b, r_b = torch.linalg.qr(B, mode="reduced")  # [g, out, m_b], [g, m_b, R]
    q_a, r_a = torch.linalg.qr(A.transpose(1, 2), mode="reduced")  # [g, in, m_a], [g, m_a, R]
    # The core is only R×R: its SVD in float64 costs nothing and sidesteps
    # cuSOLVER's batched Jacobi SVD, which is ~1e-4 off in float32 on clustered spectra.
    core = r_b.double() @ r_a.double().transpose(1, 2)  # [g, m_b, m_a]
    u_core, sigma, vh_core = (x.to(COMPUTE_DTYPE) for x in torch.linalg.svd(core, full_matrices=False))
    k = min(rank, sigma.shape[-1])
    U = q_b @ u_core[..., :k]
    Vh = vh_core[:, :k, :] @ q_a.transpose(1, 2)
    A, B = _finish_svd(U, sigma[:, :k], Vh, clamp)
    return A, B, Spectrum(sigma, sigma.double().pow(2).sum(dim=1))  # every nonzero value of B·A is here


def svd_dense(delta: Tensor, rank: int, clamp: float | None = None,
              generators: Sequence[torch.Generator] | None = None) -> tuple[Tensor, Tensor]:
    """Best rank-k approximation of dense deltas ``[g, out, in]`` (Eckart–Young).

    For the outputs of dense operators (ties, DARE, …) and full fine-tunes' task vectors
    (LoRA extraction). Same split, sign convention and clamp as :func:`svd_from_factors`;
    ``k = min(rank, out, in)``. Matrices too large for a dense SVD to be cheap use
    :func:`randomized_svd` (``generators``: one seeded generator per module).
    """
    A, B, _ = _svd_dense(_f32(delta), rank, clamp, generators)
    return A, B


def svd_dense_spectrum(delta: Tensor, rank: int, clamp: float | None = None,
                       generators: Sequence[torch.Generator] | None = None) -> tuple[Tensor, Tensor, Spectrum]:
    """:func:`svd_dense` and the spectrum it saw, for rank selection (with each module's exact
    ‖ΔW‖², which a plain `svd` does not need)."""
    delta = _f32(delta)
    A, B, sigma = _svd_dense(delta, rank, clamp, generators)
    return A, B, Spectrum(sigma, squared_norms(delta))


def _svd_dense(delta: Tensor, rank: int, clamp: float | None,
               generators: Sequence[torch.Generator] | None) -> tuple[Tensor, Tensor, Tensor]:
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if uses_randomized_svd(delta.shape[1], delta.shape[2], rank):
        U, sigma, Vh = randomized_svd(delta, rank, generators)
    elif uses_gram_svd(delta):
        U, sigma, Vh = gram_svd(delta, rank)
    else:
        U, sigma, Vh = _accurate_svd(delta)
    k = min(rank, sigma.shape[-1])
    A, B = _finish_svd(U[..., :k], sigma[:, :k], Vh[:, :k, :], clamp)
    return A, B, sigma


def float32_alpha(coef: float) -> float:
    """``coef`` as the ``alpha=`` of a float32 ``add_``, which refuses (RuntimeError) a value past
    float32's range where a product merely overflows: ±inf instead, so the sum is not finite and
    the executor's finite check reports an overflow (R601) as it does for products."""
    return coef if abs(coef) <= torch.finfo(torch.float32).max else math.copysign(math.inf, coef)


_NORM_PIECE = 1 << 16  # elements widened to float64 at a time: 512 KiB, in cache


def squared_norms(stack: Tensor) -> Tensor:
    """‖Xᵢ‖²_F of each matrix of ``[g, out, in]`` (or of one tensor, as ``[1, …]``), summed in
    float64: a piece at a time widened into one cached buffer and dotted with itself, which
    is exact to float64 rounding and an order of magnitude faster than squaring a float64
    copy (a float64 copy of a 128k-vocab ``lm_head`` delta would be 2 GiB)."""
    flat = stack.reshape(stack.shape[0], -1)
    total = torch.zeros(flat.shape[0], dtype=torch.float64, device=stack.device)
    if flat.shape[1] == 0:
        return total
    buffer = torch.empty(min(flat.shape[1], _NORM_PIECE), dtype=torch.float64, device=stack.device)
    for i, row in enumerate(flat):
        for start in range(0, row.numel(), _NORM_PIECE):
            part = row[start:start + _NORM_PIECE]
            piece = buffer[:part.numel()].copy_(part)
            total[i] += torch.dot(piece, piece)
    return total


# A dense SVD of an n×n matrix costs O(n³); past this side (and for ranks well below it) a
# randomized block Krylov method finds the top-k subspace in O(n²·k). Its constants were chosen
# on bench/extract.py's flat noise tails (the hard case): blocks of k columns and 11 iterations
# are within 3e-7 of the optimum's error there, below the bfloat16 rounding of the saved
# factors, for 3 % fewer flops than 8 oversamples and 10 iterations (4e-7): block Krylov needs
# no oversampling (Musco & Musco), and more iterations buy more than wider blocks. Blocks are
# at least 16 wide, so that a small rank still has a block to span a cluster of values.
RANDOMIZED_MIN_SIDE = 1024
RANDOMIZED_OVERSAMPLE = 0
RANDOMIZED_MIN_WIDTH = 16
RANDOMIZED_POWER_ITERATIONS = 11
RANDOMIZED_MIN_BLOCKS = 6  # fewer blocks fit in half the short side: a dense SVD is as cheap


def randomized_width(rank: int, oversample: int = RANDOMIZED_OVERSAMPLE) -> int:
    """Columns of each Krylov block."""
    return max(rank + oversample, RANDOMIZED_MIN_WIDTH)


def uses_randomized_svd(out_features: int, in_features: int, rank: int) -> bool:
    side = min(out_features, in_features)
    return side > RANDOMIZED_MIN_SIDE and 2 * RANDOMIZED_MIN_BLOCKS * randomized_width(rank) <= side


def randomized_svd(delta: Tensor, rank: int, generators: Sequence[torch.Generator] | None = None,
                   oversample: int = RANDOMIZED_OVERSAMPLE,
                   iterations: int = RANDOMIZED_POWER_ITERATIONS) -> tuple[Tensor, Tensor, Tensor]:
    """Top singular triplets of ``[g, out, in]`` by randomized block Krylov iteration (Musco &
    Musco 2015, alg. 2), run as a block Golub–Kahan–Lanczos bidiagonalization.

    The basis lives on the smaller side: for M, X oriented short × long (X or Xᵀ, never
    copied), a Gaussian test block of :func:`randomized_width` columns, drawn from each module's
    seeded generator (the same bytes on every run), spans the first block Q₀ of the Krylov
    space ``span{MΩ, (MMᵀ)MΩ, …}``; each further block is ``M·orth(MᵀQᵢ)`` orthogonalized
    against all earlier ones (twice: classical Gram–Schmidt's loss of orthogonality is fixed by
    a second pass), so the blocks together are an orthonormal basis Q of the whole space (as
    many blocks as fit in half the smaller side). The products ``QᵢᵀM`` that drive the
    iteration are also the rows of ``QᵀM``, so the best rank-k approximation within the span
    (:func:`_projected_svd`) costs no further product with X. Keeping every block matters
    because fine-tunes' spectra have flat noise tails, where the last block alone converges
    slowly (1.0023× the optimum's error at rank 64 over a rank-32 signal; the span gets within
    3e-7 of it). Where the space runs out before the iterations do (X of low rank), the new
    blocks are rounding noise and the basis is not orthonormal: that is checked, and the
    projection is then taken by an explicit QR and product. Returns a block's width of
    triplets (fewer when the matrix is smaller); callers keep the first k.
    """
    g, out_features, in_features = delta.shape
    wide = out_features <= in_features  # M = X (else Xᵀ)
    short, long = (out_features, in_features) if wide else (in_features, out_features)
    width = min(randomized_width(rank, oversample), short)
    blocks = max(1, min(iterations + 1, short // (2 * width)))
    tests = [torch.randn(long, width, generator=gen, dtype=torch.float32) for gen in
             (generators or [torch.Generator().manual_seed(0) for _ in range(g)])]
    span = torch.empty(g, short, blocks * width, dtype=delta.dtype, device=delta.device)  # Q
    # Qᵀ·M, stored as the products leave BLAS: [g, m, long] when M = X, [g, long, m] when M = Xᵀ
    shape = (g, blocks * width, long) if wide else (g, long, blocks * width)
    rows = torch.empty(shape, dtype=delta.dtype, device=delta.device)

    def projected(i: int, block: Tensor) -> Tensor:  # Qᵢᵀ·M into `rows`, returned as [g, w, long]
        if wide:
            return _transposed_product(block, delta, out=rows[:, i * width:(i + 1) * width])
        part = rows[..., i * width:(i + 1) * width]
        part.copy_(torch.bmm(delta, block))
        return part.transpose(1, 2)

    span[..., :width] = _orthonormal_columns(_times(delta, wide, torch.stack(tests).to(delta.device)))
    last = projected(0, span[..., :width])
    for i in range(1, blocks):
        y = _times(delta, wide, _orthonormal_rows(last).transpose(1, 2))
        done = span[..., :i * width]
        for _ in range(2):
            y -= done @ (done.transpose(1, 2) @ y)
        block = span[..., i * width:(i + 1) * width]
        block[...] = _orthonormal_columns(y)
        last = projected(i, block)
    if _orthonormality_error(span) > _ORTHONORMAL_TOLERANCE:
        span, _ = torch.linalg.qr(span)
        for i in range(blocks):
            projected(i, span[..., i * width:(i + 1) * width])
    u_small, right = _projected_svd(rows if wide else rows.transpose(1, 2), width)
    last = rows = None  # the largest buffer (for a 128k-row `lm_head`, 400 MiB; `last` is a view of it): gone
    sigma, u_small, Vh = _ritz_triplets(u_small, right, delta.dtype)
    basis = span @ u_small
    if wide:
        return basis, sigma, Vh
    return Vh.transpose(1, 2), sigma, basis.transpose(1, 2)


def _times(delta: Tensor, wide: bool, tall: Tensor) -> Tensor:
    """M·tall for M = X (``wide``) or Xᵀ, ``tall`` of M's long side: ``[g, short, w]``."""
    if wide:
        return torch.bmm(delta, tall)
    return _transposed_product(tall, delta).transpose(1, 2)


def _transposed_product(left: Tensor, right: Tensor, out: Tensor | None = None) -> Tensor:
    """``leftᵀ·right`` per matrix of the stacks. A batched product with a transposed operand
    runs at half the speed of one matrix at a time here (MKL through ``bmm``: 130 against
    250 GFLOP/s for a 2048×8192 X and 72 columns), and Xᵀ·Q is the product a Krylov
    iteration needs most, so it is taken as (Qᵀ·X) one matrix at a time."""
    if out is None:
        out = torch.empty(left.shape[0], left.shape[2], right.shape[2], dtype=right.dtype, device=right.device)
    for j in range(left.shape[0]):
        torch.mm(left[j].transpose(0, 1), right[j], out=out[j])
    return out


# Below the randomized SVD's sizes, a dense SVD's cost is mostly its bidiagonalization of the
# whole matrix (O(m²·n)); the float64 Gram of the short side and its eigenvectors cost a fifth
# of that at m = 512 (8 k/v projections of 512×2048: 0.9 s -> 0.3 s) and are as exact for
# the values that matter: float64 sums of float32 products lose nothing above ~1e-8·σ₁.
GRAM_SVD_MIN_SIDE = 256


def uses_gram_svd(delta: Tensor) -> bool:
    return delta.device.type == "cpu" and min(delta.shape[1], delta.shape[2]) >= GRAM_SVD_MIN_SIDE


def gram_svd(delta: Tensor, count: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``count`` singular triplets of ``[g, out, in]`` from the eigenvectors of each
    matrix's float64 Gram on its short side (:func:`_projected_svd` with the identity as the
    basis), σᵢ and vᵢ from the matrix itself (:func:`_ritz_triplets`), so that σᵢ·uᵢ·vᵢᵀ is
    exactly X's part along uᵢ, however small σᵢ is."""
    wide = delta.shape[1] <= delta.shape[2]
    short = delta if wide else delta.transpose(1, 2)
    u, right = _projected_svd(short, min(count, short.shape[1]), float64_gram=True)
    sigma, u, Vh = _ritz_triplets(u, right, delta.dtype)
    if wide:
        return u, sigma, Vh
    return Vh.transpose(1, 2), sigma, u.transpose(1, 2)


def _orthonormal_columns(tall: Tensor) -> Tensor:
    """An orthonormal basis of the columns of ``[g, n, w]`` by Cholesky QR twice (CholQR2: the
    second pass takes the first's float32 rounding, ~ε·κ, down to ε): 3× faster than a
    Householder QR of a 2048×72 block, which is a sweep of matrix-vector products."""
    return _orthonormal_rows(_orthonormal_rows(tall.transpose(1, 2))).transpose(1, 2)


def _orthonormal_rows(wide: Tensor) -> Tensor:
    """An orthonormal basis of the rows of ``[g, w, n]`` (n ≫ w, any strides) by Cholesky QR:
    the float64 Gram matrix's Cholesky factor L, then ``L⁻¹·wide``, a w×w solve where
    Householder QR is a slow column-by-column sweep (for a 32k-long block, 4× slower). It only
    has to span the rows (the Krylov blocks are orthogonalized again on the other side), so
    where the Gram is singular to float64 precision the QR takes over."""
    gram = torch.zeros(wide.shape[0], wide.shape[1], wide.shape[1], dtype=torch.float64, device=wide.device)
    for part in _widened_pieces(wide):
        gram.baddbmm_(part, part.transpose(1, 2))
    factor, info = torch.linalg.cholesky_ex(gram)
    if bool(info.any()):
        return torch.linalg.qr(wide.transpose(1, 2))[0].transpose(1, 2)
    return torch.linalg.solve_triangular(factor.to(wide.dtype), wide, upper=False)


_ORTHONORMAL_TOLERANCE = 1e-4  # float32 Gram–Schmidt twice is ~1e-6 off; rounding-noise blocks are O(1)


def _orthonormality_error(basis: Tensor) -> float:
    """max |QᵀQ − I| over the stack (from QᵀQ's lower triangle: it is symmetric)."""
    gram = _lower_gram(basis.transpose(1, 2))
    return float((gram - torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)).abs().max())


_PROJECTION_PIECE = 4096  # columns widened to float64 at a time (25 MiB of a 792-row projection)


def _widened_pieces(wide: Tensor) -> Iterator[Tensor]:
    """``[g, m, n]`` in float64, ``_PROJECTION_PIECE`` columns at a time, each piece laid out
    as the source is (a transposed source gives transposed pieces: no transposing copy), in
    one buffer reused for every piece (valid until the next one)."""
    g, m, n = wide.shape
    piece = min(n, _PROJECTION_PIECE)
    if wide.stride(1) == 1:  # a transposed [g, n, m]
        buffer = torch.empty(g, piece, m, dtype=torch.float64, device=wide.device).transpose(1, 2)
    else:
        buffer = torch.empty(g, m, piece, dtype=torch.float64, device=wide.device)
    for start in range(0, n, piece):
        part = wide[..., start:start + piece]
        yield buffer[..., :part.shape[2]].copy_(part)


def _projected_svd(projection: Tensor, width: int, float64_gram: bool = False) -> tuple[Tensor, Tensor]:
    """The top ``width`` left singular vectors ``u`` of short, wide matrices ``P`` (``[g, m, n]``,
    any strides), from the float64 eigenvectors of their Gram matrices ``P·Pᵀ`` (m³ work
    instead of a dense SVD's m²·n), and ``Pᵀ·u`` (``[g, n, width]``, returned in float64), from
    which :func:`_ritz_triplets` takes σ and v.

    The Gram is a float32 product: its rounding is relative to each entry's rows (here ~0.1·ε
    of the trace in norm), which the Krylov blocks' graded norms keep far below the eigenvalues
    that matter (the flat tails of bench/extract.py: 1e-5 of the width-th; steep spectra lose
    nothing either). Where the width-th eigenvalue comes within 1000·ε/2 of the trace (or is not
    finite: a float32 Gram past float32's range), or with
    ``float64_gram`` (an exact SVD's, whose rows are not graded), the Gram is summed in float64
    (P widened a piece at a time: a float64 copy of a 128k-column projection would be as large
    as X itself)."""
    vectors = None if float64_gram else _float32_gram_vectors(projection, width)
    if vectors is None:
        _, vectors = torch.linalg.eigh(_lower_gram_float64(projection), UPLO="L")  # ascending
    u = vectors.flip(2)[..., :width].contiguous()  # [g, m, width], descending
    # Pᵀ·u in P's own precision (a float32 product is 1e-7 off, like any other here), widened
    # after: the norms in _ritz_triplets then neither underflow nor round
    right = torch.bmm(projection.transpose(1, 2), u.to(projection.dtype)).double()
    return u, right


_GRAM_RESOLUTION = 1000 * torch.finfo(torch.float32).eps / 2  # of the trace: 6e-5


def _float32_gram_vectors(projection: Tensor, width: int) -> Tensor | None:
    """The eigenvectors (ascending) of P·Pᵀ formed in float32, or None where float32 cannot
    resolve the width-th eigenvalue (or the Gram is past float32's range)."""
    gram = _lower_gram(projection).double()
    if not bool(torch.isfinite(gram).all()):
        return None
    values, vectors = torch.linalg.eigh(gram, UPLO="L")
    trace = gram.diagonal(dim1=1, dim2=2).sum(dim=1)
    resolved = values[:, -min(width, values.shape[1])] >= _GRAM_RESOLUTION * trace
    return vectors if bool(resolved.all()) else None
_GRAM_ROWS = 256  # rows of the lower triangle taken in one product


def _lower_gram(projection: Tensor) -> Tensor:
    """The lower triangle of ``P·Pᵀ`` in P's dtype (all eigh reads: two thirds of the products)."""
    g, m, _ = projection.shape
    gram = torch.zeros(g, m, m, dtype=projection.dtype, device=projection.device)
    for i in range(0, m, _GRAM_ROWS):
        below = slice(i, min(m, i + _GRAM_ROWS))
        torch.bmm(projection[:, below], projection[:, :below.stop].transpose(1, 2), out=gram[:, below, :below.stop])
    return gram


def _lower_gram_float64(projection: Tensor) -> Tensor:
    """:func:`_lower_gram` summed in float64, P widened a piece at a time."""
    g, m, _ = projection.shape
    gram = torch.zeros(g, m, m, dtype=torch.float64, device=projection.device)
    for part in _widened_pieces(projection):
        for i in range(0, m, _GRAM_ROWS):
            below = slice(i, min(m, i + _GRAM_ROWS))
            gram[:, below, :below.stop].baddbmm_(part[:, below], part[:, :below.stop].transpose(1, 2))
    return gram


def _ritz_triplets(u: Tensor, right: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """σ, u and Vᵀ (in ``dtype``, descending) from ``right = Pᵀ·u`` (float64, consumed): each σᵢ and vᵢ
    come from the projection wᵢ = uᵢᵀ·P itself (σᵢ = ‖wᵢ‖, vᵢ = wᵢ/σᵢ), so σᵢ·uᵢ·vᵢᵀ is exactly
    P's part along uᵢ, however small (a zero matrix gives zeros). The norms may order values
    differently from the eigenvalues at rounding level, so both are sorted by them."""
    sigma = torch.linalg.vector_norm(right, dim=1)  # [g, width]
    right.div_(sigma.clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1))
    sigma, order = sigma.sort(dim=1, descending=True)
    u = u.gather(2, order.unsqueeze(1).expand_as(u))
    right = right.to(dtype)  # the float64 copy goes: it is the tail's largest buffer
    Vh = right.transpose(1, 2).gather(1, order.unsqueeze(2).expand(-1, -1, right.shape[1]))
    return sigma.to(dtype), u.to(dtype), Vh


@dataclass(frozen=True)
class Spectrum:
    """The singular values an SVD saw (``[g, m]``, descending) and each module's ‖ΔW‖²_F,
    which for a randomized SVD covers the values it did not see."""

    sigma: Tensor
    total: Tensor  # float64 [g]


def select_ranks(spectrum: Spectrum, rank: int, keep: float | None = None,
                 tol: float | None = None) -> tuple[list[int], list[float]]:
    """Each module's rank under `keep` or `tol` (DESIGN §2 "Rank selection"), at most `rank`,
    and the share of ‖ΔW‖_F the kept values hold, √(Σᵢ≤r σᵢ² / ‖ΔW‖²_F).

    `keep=q`: the smallest r ≤ k with that share ≥ q over the whole spectrum (k when none is).
    `tol=t`: the σᵢ ≥ t·σ₁. Both compare in float64 with a relative slack of 1e-9, so a
    threshold set exactly at a boundary (`keep=√0.8` where the first two values hold 80 %)
    picks that boundary's rank, not one more. A zero module keeps rank 1 (its factors are 0).
    """
    sigma = spectrum.sigma.double().cpu()
    total = spectrum.total.double().cpu()
    k = min(rank, sigma.shape[-1])
    cumulative = (sigma[:, :k] ** 2).cumsum(dim=1)
    ranks, kept = [], []
    for i in range(sigma.shape[0]):
        whole = float(total[i])
        if whole <= 0:
            ranks.append(1)
            kept.append(1.0)
            continue
        if keep is not None:
            reached = (cumulative[i] >= keep * keep * whole * (1 - 1e-9)).nonzero()
            r = int(reached[0]) + 1 if len(reached) else k
        elif tol is not None:
            r = int((sigma[i, :k] >= tol * float(sigma[i, 0]) * (1 - 1e-9)).sum())
        else:
            r = k
        r = max(1, min(r, k))
        ranks.append(r)
        kept.append(min(1.0, (float(cumulative[i, r - 1]) / whole) ** 0.5))
    return ranks, kept


def _accurate_svd(delta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reduced SVD, in float64 on CUDA: cuSOLVER's default float32 SVD was seen ~1e-2 off
    (relative, rank-16 truncation of a 4096×11008 delta) where CPU LAPACK is ~1e-7."""
    if delta.device.type != "cuda":
        return torch.linalg.svd(delta, full_matrices=False)
    U, sigma, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return U.to(COMPUTE_DTYPE), sigma.to(COMPUTE_DTYPE), Vh.to(COMPUTE_DTYPE)


def _finish_svd(U: Tensor, sigma: Tensor, Vh: Tensor, clamp: float | None) -> tuple[Tensor, Tensor]:
    """Fix signs, split as B = U·Σ, A = Vᵀ, then clamp: the shared tail of both SVDs."""
    U, Vh = canonical_signs(U, Vh)
    B = U * sigma.unsqueeze(1)
    A = Vh
    if clamp is not None:
        B, A = clamp_factors(B, A, clamp)
    return A, B


def canonical_signs(U: Tensor, Vh: Tensor) -> tuple[Tensor, Tensor]:
    """Flip each singular pair so that the largest-magnitude entry of its U column is positive.

    An SVD is unique only up to the sign of each pair (uᵢ, vᵢ), and LAPACK,
    cuSOLVER and our QR path each pick differently. B·A does not care, but
    PEFT's clamp does (its quantile is not symmetric) and so do output bytes;
    fixing the sign makes results the same on every backend.
    """
    pivot = U.abs().argmax(dim=1, keepdim=True)  # [g, 1, k]
    signs = torch.sign(torch.gather(U, 1, pivot))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, Vh * signs.transpose(1, 2)


# torch.quantile refuses rows longer than this.
_QUANTILE_MAX_ROW = 2**24


def clamp_factors(B: Tensor, A: Tensor, quantile: float) -> tuple[Tensor, Tensor]:
    """PEFT's ``svd_clamp``: clamp ``U·Σ`` and ``Vᵀ`` to ``[−hi, hi]`` per module.

    ``hi`` is the ``quantile`` of all values of ``U·Σ`` and ``Vᵀ`` flattened and
    concatenated, exactly as ``LoraModel._svd_generalized_task_arithmetic_weighted_adapter``
    (a *signed* quantile: for small q, hi < 0 and every value becomes hi, as in PEFT).
    """
    group = B.shape[0]
    values = torch.cat([B.reshape(group, -1), A.reshape(group, -1)], dim=1)
    hi = _rowwise_quantile(values, quantile).view(group, 1, 1)
    return B.clamp(-hi, hi), A.clamp(-hi, hi)


def _rowwise_quantile(values: Tensor, quantile: float) -> Tensor:
    """``torch.quantile`` along dim 1, or the same formula by sorting for rows too long for it."""
    if values.shape[1] <= _QUANTILE_MAX_ROW:
        return torch.quantile(values, quantile, dim=1)
    return _sorted_quantile(values, quantile)


def _sorted_quantile(values: Tensor, quantile: float) -> Tensor:
    """Linear-interpolation quantile (torch's default) for rows too long for ``torch.quantile``."""
    ordered = values.sort(dim=1).values
    position = quantile * (values.shape[1] - 1)
    below = int(position)
    above = min(below + 1, values.shape[1] - 1)
    return torch.lerp(ordered[:, below], ordered[:, above], position - below)


# ------------------------------------------------------------- dense operators


def magnitude_mask(tasks: Tensor, density: float) -> Tensor:
    """Keep the top ``int(density·numel)`` magnitudes of each task tensor of each module.

    ``tasks`` is ``[..., out, in]``; each trailing matrix is pruned on its own,
    as ``peft.utils.merge_utils.magnitude_based_pruning`` prunes one tensor.
    Returns a boolean mask; density ≥ 1 keeps everything (PEFT warns, we don't).
    """
    _check_density(density)
    if density >= 1:
        return torch.ones_like(tasks, dtype=torch.bool)
    flat = tasks.abs().flatten(start_dim=-2)
    keep = int(density * flat.shape[-1])
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if keep > 0:
        mask.scatter_(-1, flat.topk(keep, dim=-1).indices, True)
    return mask.view_as(tasks)


def module_generator(seed: int, module_name: str, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator for one module, seeded from sha256 of ``f"{seed}:{module_name}"`` (63 bits).

    Seeding per module makes DARE's masks independent of grouping, batching and
    execution order: the same recipe gives the same bytes.
    """
    digest = hashlib.sha256(f"{seed}:{module_name}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def random_mask(
    tasks: Tensor, density: float, generators: Sequence[torch.Generator], draw_transposed: bool = False
) -> Tensor:
    """DARE's Bernoulli(density) keep-mask for ``tasks[n, g, out, in]``, one generator per module.

    Module j draws task 0's mask, then task 1's, … from ``generators[j]``, the
    same calls in the same order as ``peft.utils.merge_utils.random_pruning``
    on that module's task tensors: with a generator seeded like torch's global
    one, the masks are identical. Masks are drawn on each generator's device.

    A mask is filled in memory order, so its layout matters: PEFT draws over
    ``get_delta_weight``, which is in×out for ``conv1d`` and ``embedding``
    layouts. ``draw_transposed=True`` draws in that layout (then transposes
    back to the factor frame), which is what reproduces PEFT's masks there.
    """
    count, group = tasks.shape[0], tasks.shape[1]
    if len(generators) != group:
        raise ValueError(f"need one generator per module: {group} modules, {len(generators)} generators")
    matrix_shape = tasks.shape[2:][::-1] if draw_transposed else tasks.shape[2:]
    mask = torch.empty(tasks.shape, dtype=torch.bool, device=tasks.device)
    for module, generator in enumerate(generators):
        probability = torch.full(matrix_shape, density, dtype=COMPUTE_DTYPE, device=generator.device)
        for task in range(count):
            drawn = torch.bernoulli(probability, generator=generator).bool()
            mask[task, module] = (drawn.T if draw_transposed else drawn).to(tasks.device)
    return mask


def majority_sign_mask(tasks: Tensor, majority: Majority = "total") -> Tensor:
    """TIES' sign election over the task dimension 0 (``calculate_majority_sign_mask``).

    ``"total"`` elects the sign of Σ values, ``"frequency"`` the sign held by
    more entries; zero elects +. Pruned (zero) entries never agree with the
    elected sign, so they are not counted in the mean.
    """
    signs = tasks.sign()
    if majority == "total":
        magnitude = tasks.sum(dim=0)
    elif majority == "frequency":
        magnitude = signs.sum(dim=0)
    else:
        raise ValueError(f"majority must be 'total' or 'frequency', got {majority!r}")
    elected = torch.where(magnitude >= 0, 1.0, -1.0)
    return signs == elected


def _weighted(tasks: Tensor, weights: Tensor | Sequence[float]) -> Tensor:
    weights = torch.as_tensor(weights, dtype=COMPUTE_DTYPE, device=tasks.device)
    return tasks * weights.view(-1, *([1] * (tasks.dim() - 1)))


def _disjoint_mean(weighted: Tensor, agree: Tensor) -> Tensor:
    """Mean over the terms that agree with the elected sign (``disjoint_merge``)."""
    kept = agree.sum(dim=0).to(COMPUTE_DTYPE)
    return (weighted * agree).sum(dim=0) / kept.clamp(min=1.0)


def magnitude_prune(tasks: Tensor, weights: Tensor | Sequence[float], density: float) -> Tensor:
    """``merge_utils.magnitude_prune``: Σ cᵢ·prune(ΔWᵢ); ``tasks[n, g, out, in]`` → ``[g, out, in]``."""
    tasks = _f32(tasks)
    return _weighted(tasks * magnitude_mask(tasks, density), weights).sum(dim=0)


def ties(
    tasks: Tensor, weights: Tensor | Sequence[float], density: float, majority: Majority = "total"
) -> Tensor:
    """``merge_utils.ties``: prune by magnitude, elect signs, mean of the agreeing weighted values.

    As in PEFT, signs are elected on the *unweighted* pruned tensors, and the
    result is a mean, not a sum, over agreeing terms.
    """
    tasks = _f32(tasks)
    pruned = tasks * magnitude_mask(tasks, density)
    return _disjoint_mean(_weighted(pruned, weights), majority_sign_mask(pruned, majority))


def _dare_prune(
    tasks: Tensor, density: float, generators: Sequence[torch.Generator], draw_transposed: bool
) -> Tensor:
    """Random drop with rescale by 1/density (``random_pruning(rescale=True)``)."""
    _check_density(density)
    if density >= 1:
        return tasks
    if density == 0:
        raise ValueError("DARE density must be > 0: it rescales by 1/density")
    return tasks * random_mask(tasks, density, generators, draw_transposed) / density


def dare_linear(
    tasks: Tensor,
    weights: Tensor | Sequence[float],
    density: float,
    generators: Sequence[torch.Generator],
    draw_transposed: bool = False,
) -> Tensor:
    """``merge_utils.dare_linear``: Σ cᵢ·drop(ΔWᵢ)/density, one generator per module.

    ``draw_transposed``: see :func:`random_mask` (True for conv1d/embedding layouts).
    """
    tasks = _f32(tasks)
    return _weighted(_dare_prune(tasks, density, generators, draw_transposed), weights).sum(dim=0)


def dare_ties(
    tasks: Tensor,
    weights: Tensor | Sequence[float],
    density: float,
    generators: Sequence[torch.Generator],
    majority: Majority = "total",
    draw_transposed: bool = False,
) -> Tensor:
    """``merge_utils.dare_ties``: DARE's random drop, then TIES' sign election and disjoint mean.

    ``draw_transposed``: see :func:`random_mask` (True for conv1d/embedding layouts).
    """
    tasks = _f32(tasks)
    pruned = _dare_prune(tasks, density, generators, draw_transposed)
    return _disjoint_mean(_weighted(pruned, weights), majority_sign_mask(pruned, majority))


# --------------------------------------------------------------------- (IA)³


def ia3_combine(terms: Sequence[tuple]) -> Tensor:
    """``l = 1 + Σ cᵢ·(lᵢ − 1)``: arithmetic on the module's effect, l − 1.

    For convex weights this equals PEFT's weighted sum Σ cᵢ·lᵢ (and the paper's
    addition); for c = −1 it is the negation 2 − l.
    """
    if not terms:
        raise ValueError("a combination needs at least one term")
    ia3_terms = [Ia3Term(*term) for term in terms]
    effect = sum(float(term.coef) * (_f32(term.l) - 1.0) for term in ia3_terms)
    return 1.0 + effect
