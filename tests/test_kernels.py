"""Every kernel against an independent reference.

References are PEFT itself (``get_delta_weight``, ``add_weighted_adapter``,
``peft.utils.merge_utils``) on tiny random models from ``tests/factories.py``,
and plain dense torch (a full ``torch.linalg.svd``, Eckart–Young's error).
Factors are read from PEFT's live layers and stacked into groups the way the
executor stacks them (same shape across layers), so batching is exercised too.
"""

from __future__ import annotations

import math
from collections import defaultdict

import peft.tuners.lora.model as peft_lora_model
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft.tuners.lora import LoraLayer
from peft.utils import merge_utils

from peftdsl.runtime import kernels
from tests.factories import load_peft, make_ia3, make_lora

ATOL = 1e-5
RTOL = 1e-4
FAST = settings(max_examples=40, deadline=None)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def llama_adapters(tmp_path_factory):
    """Adapters on one tiny Llama covering every scaling rule peftdsl must honour."""
    root = tmp_path_factory.mktemp("llama")
    return {
        # plain, with embedding LoRA (lora_embedding_A/B, transposed layout)
        "a": make_lora(root / "a", seed=1, r=4, alpha=8, targets=("q_proj", "v_proj", "embed_tokens")),
        # other rank and alpha, per-layer rank_pattern and alpha_pattern
        "b": make_lora(
            root / "b",
            seed=2,
            r=8,
            alpha=4,
            targets=("q_proj", "v_proj", "down_proj"),
            rank_pattern={"layers.1.self_attn.q_proj": 2},
            alpha_pattern={"layers.0.self_attn.v_proj": 32},
        ),
        # rsLoRA: s = α/√r
        "c": make_lora(root / "c", seed=3, r=4, alpha=6, use_rslora=True),
        # same rank as `a` (for linear / pem), other alpha
        "d": make_lora(root / "d", seed=4, r=4, alpha=16, targets=("q_proj", "v_proj", "embed_tokens")),
    }


@pytest.fixture(scope="module")
def gpt2_adapters(tmp_path_factory):
    """GPT-2 adapters: Conv1D (fan_in_fan_out) and embedding (wte) layouts."""
    root = tmp_path_factory.mktemp("gpt2")
    return {
        "g1": make_lora(root / "g1", base="gpt2", seed=5, r=4, alpha=8, targets=("c_attn", "wte")),
        "g2": make_lora(root / "g2", base="gpt2", seed=6, r=6, alpha=3, targets=("c_attn",)),
    }


# ------------------------------------------------------- reading PEFT layers


def lora_layers(peft_model) -> dict[str, LoraLayer]:
    """Every LoRA layer by module name, in PEFT's own iteration order."""
    return {
        name: module
        for name, module in peft_model.base_model.model.named_modules()
        if isinstance(module, LoraLayer)
    }


def factors(layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B) of one adapter on one layer in the factor frame, or None if not targeted."""
    if adapter in layer.lora_A:
        return layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach()
    if adapter in layer.lora_embedding_A:
        return layer.lora_embedding_A[adapter].detach(), layer.lora_embedding_B[adapter].detach()
    return None


def is_transposed(layer: LoraLayer, adapter: str) -> bool:
    """Whether PEFT's weight-layout delta is the transpose of the factor-frame delta."""
    return bool(getattr(layer, "fan_in_fan_out", False)) or adapter in layer.lora_embedding_A


def peft_delta(layer: LoraLayer, adapter: str) -> torch.Tensor:
    """PEFT's own ``get_delta_weight``, brought to the factor frame (out×in)."""
    delta = layer.get_delta_weight(adapter).detach()
    return delta.T if is_transposed(layer, adapter) else delta


def groups(peft_model, coefs: dict[str, float]):
    """Stack modules into groups as the executor does: same factor shapes for the same adapters.

    Yields ``(module_names, layers, terms)`` with one :class:`kernels.LoraTerm`
    per adapter that targets the group, its A/B stacked along dim 0 and its
    per-module scaling as a ``Tensor[g]``.
    """
    by_key = defaultdict(list)
    for name, layer in lora_layers(peft_model).items():
        present = [a for a in coefs if factors(layer, a) is not None]
        if not present:
            continue
        key = tuple((a, tuple(factors(layer, a)[0].shape), tuple(factors(layer, a)[1].shape)) for a in present)
        by_key[key].append((name, layer))
    for key, members in by_key.items():
        names = [name for name, _ in members]
        layers = [layer for _, layer in members]
        terms = []
        for adapter, _, _ in key:
            A = torch.stack([factors(layer, adapter)[0] for layer in layers])
            B = torch.stack([factors(layer, adapter)[1] for layer in layers])
            scale = torch.tensor([float(layer.scaling[adapter]) for layer in layers])
            terms.append(kernels.LoraTerm(coefs[adapter], A, B, scale))
        yield names, layers, terms


def merged_factors(layer: LoraLayer, adapter: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A, B and scaling of an adapter that ``add_weighted_adapter`` wrote."""
    A, B = factors(layer, adapter)
    return A, B, float(layer.scaling[adapter])


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL, rtol: float = RTOL) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def align_signs(B: torch.Tensor, A: torch.Tensor, reference_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip our singular pairs to PEFT's signs (an SVD fixes each pair only up to sign)."""
    signs = torch.sign((B * reference_B).sum(dim=0, keepdim=True))
    signs[signs == 0] = 1
    return B * signs, A * signs.T


# ---------------------------------------------------------------- exact sum


COEFS = {"a": 0.7, "b": -1.3, "c": 0.5}
GPT2_COEFS = {"g1": -0.6, "g2": 1.1}
BOTH_MODELS = pytest.mark.parametrize("fixture, coefs", [("llama_adapters", COEFS), ("gpt2_adapters", GPT2_COEFS)])


def load_for(request, fixture: str, coefs: dict[str, float]):
    """A fresh PeftModel on the fixture's base with the adapters of ``coefs`` loaded."""
    adapters = request.getfixturevalue(fixture)
    return load_peft("gpt2" if fixture.startswith("gpt2") else "llama", {a: adapters[a] for a in coefs})


@BOTH_MODELS
def test_exact_sum_equals_weighted_sum_of_peft_delta_weights(request, fixture, coefs):
    """Mixed ranks, alphas, rank/alpha patterns, rsLoRA, Conv1D and embedding layouts."""
    model = load_for(request, fixture, coefs)
    seen = 0
    for names, layers, terms in groups(model, coefs):
        A, B = kernels.exact_sum(terms)
        assert A.shape[1] == sum(term.A.shape[1] for term in terms)
        ours = kernels.lora_delta(A, B)
        for index, layer in enumerate(layers):
            expected = sum(coefs[a] * peft_delta(layer, a) for a in coefs if factors(layer, a) is not None)
            close(ours[index], expected)
            seen += 1
    assert seen >= 3  # gpt2: two c_attn and wte


def test_exact_sum_negation_is_a_minus_b():
    """Negation is (A, −B): the paper's negation operator, with A untouched."""
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(2, 3, 5, generator=gen), torch.randn(2, 4, 3, generator=gen)
    neg_A, neg_B = kernels.exact_sum([(-1.0, A, B, 2.0)])
    assert torch.equal(neg_A, A)
    close(neg_B, -2.0 * B)


def test_peft_cat_matches_exact_sum(llama_adapters):
    """``combination_type="cat"``: same delta. `a` first, so PEFT's scaling is 1 (see next test)."""
    model = load_peft("llama", {a: llama_adapters[a] for a in COEFS})
    model.add_weighted_adapter(list(COEFS), list(COEFS.values()), "cat", combination_type="cat")
    for names, layers, terms in groups(model, COEFS):
        A, B = kernels.exact_sum(terms)
        ours = kernels.lora_delta(A, B)
        for index, layer in enumerate(layers):
            close(ours[index], peft_delta(layer, "cat"))


def test_peft_cat_with_rslora_first_is_off_by_sqrt_rank(llama_adapters):
    """Documents a PEFT bug peftdsl does not share.

    ``add_weighted_adapter`` copies the first adapter's config, so with an
    rsLoRA adapter first the merged adapter keeps ``use_rslora`` with
    ``lora_alpha = r``: scaling √r instead of 1. The factors are right.
    """
    order = {"c": COEFS["c"], "a": COEFS["a"]}
    model = load_peft("llama", {a: llama_adapters[a] for a in order})
    model.add_weighted_adapter(list(order), list(order.values()), "cat", combination_type="cat")
    layer = lora_layers(model)["model.layers.0.self_attn.q_proj"]
    A_p, B_p, scaling = merged_factors(layer, "cat")
    if scaling == 1.0:
        pytest.skip("PEFT now gives merged rsLoRA adapters scaling 1")
    assert scaling == pytest.approx(math.sqrt(A_p.shape[0]))
    names, layers, terms = next(g for g in groups(model, order) if "model.layers.0.self_attn.q_proj" in g[0])
    A, B = kernels.exact_sum(terms)
    index = names.index("model.layers.0.self_attn.q_proj")
    close(B_p @ A_p, kernels.lora_delta(A, B)[index])  # PEFT's factors, without its scaling


# ---------------------------------------------------------------------- SVD


@BOTH_MODELS
def test_peft_svd_matches_svd_from_factors(request, fixture, coefs):
    """``combination_type="svd"``: same rank-k delta and same split B = U·Σ, A = Vᵀ."""
    rank = 3
    model = load_for(request, fixture, coefs)
    model.add_weighted_adapter(list(coefs), list(coefs.values()), "svd", combination_type="svd", svd_rank=rank)
    for names, layers, terms in groups(model, coefs):
        A, B = kernels.svd_from_factors(*kernels.exact_sum(terms), rank=rank)
        for index, layer in enumerate(layers):
            A_p, B_p, scaling = merged_factors(layer, "svd")
            assert scaling == 1.0
            close(B[index] @ A[index], B_p @ A_p)
            ours_B, ours_A = align_signs(B[index], A[index], B_p)
            close(ours_B, B_p, atol=1e-4)
            close(ours_A, A_p, atol=1e-4)


@pytest.mark.parametrize("quantile", [0.9, 0.5, 0.05])
def test_peft_svd_clamp_matches_clamp_factors(llama_adapters, quantile):
    """``svd_clamp``: with PEFT's own singular-vector signs, clamping gives PEFT's factors.

    PEFT's quantile depends on each pair's sign, which LAPACK picks; we read
    PEFT's signs off an unclamped merge of the same inputs (same SVD call),
    align ours to them and clamp. Small q makes hi negative: PEFT then sets
    everything to hi, and so do we.
    """
    rank = 4
    model = load_peft("llama", {a: llama_adapters[a] for a in COEFS})
    weights = list(COEFS.values())
    model.add_weighted_adapter(list(COEFS), weights, "plain", combination_type="svd", svd_rank=rank)
    model.add_weighted_adapter(
        list(COEFS), weights, "clamped", combination_type="svd", svd_rank=rank, svd_clamp=quantile
    )
    for names, layers, terms in groups(model, COEFS):
        A, B = kernels.svd_from_factors(*kernels.exact_sum(terms), rank=rank)
        for index, layer in enumerate(layers):
            _, plain_B, _ = merged_factors(layer, "plain")
            A_p, B_p, _ = merged_factors(layer, "clamped")
            aligned_B, aligned_A = align_signs(B[index], A[index], plain_B)
            clamped_B, clamped_A = kernels.clamp_factors(aligned_B[None], aligned_A[None], quantile)
            close(clamped_B[0], B_p, atol=1e-4)
            close(clamped_A[0], A_p, atol=1e-4)


def test_svd_clamp_is_clamp_of_canonical_factors():
    """``svd_*(clamp=q)`` is :func:`kernels.clamp_factors` applied to the unclamped, sign-fixed split."""
    gen = torch.Generator().manual_seed(1)
    A, B = torch.randn(3, 6, 20, generator=gen), torch.randn(3, 15, 6, generator=gen)
    for svd, args in ((kernels.svd_from_factors, (A, B)), (kernels.svd_dense, (B @ A,))):
        plain_A, plain_B = svd(*args, rank=4)
        clamped_A, clamped_B = svd(*args, rank=4, clamp=0.8)
        expected_B, expected_A = kernels.clamp_factors(plain_B, plain_A, 0.8)
        assert torch.equal(clamped_A, expected_A) and torch.equal(clamped_B, expected_B)
        assert not torch.equal(clamped_B, plain_B)


def truncated_dense(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: full float64 SVD of the dense delta, truncated; also the singular values."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (U[..., :rank] * S[..., None, :rank]) @ Vh[..., :rank, :], S


@FAST
@given(
    group=st.integers(1, 3),
    out=st.integers(1, 12),
    inp=st.integers(1, 12),
    inner=st.integers(1, 10),
    rank=st.integers(1, 14),
    seed=st.integers(0, 2**16),
)
def test_svd_from_factors_is_eckart_young_optimal(group, out, inp, inner, rank, seed):
    """Against a dense SVD, including R > min(out, in) and rank > R.

    The error must be the tail of singular values (optimality, robust to near-ties),
    A must have orthonormal rows (it is Vᵀ), and the product must equal the
    dense truncation wherever the k-th singular value is separated from the next.
    """
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(group, inner, inp, generator=gen)
    B = torch.randn(group, out, inner, generator=gen)
    new_A, new_B = kernels.svd_from_factors(A, B, rank)
    k = min(rank, inner, out, inp)
    assert new_A.shape == (group, k, inp) and new_B.shape == (group, out, k)

    delta = (B.double() @ A.double())
    expected, S = truncated_dense(delta, k)
    ours = (new_B @ new_A).double()
    scale = S[:, :1].clamp(min=1.0)[..., None]
    tail = (S[:, k:] ** 2).sum(dim=1).sqrt()
    error = torch.linalg.matrix_norm(delta - ours)
    torch.testing.assert_close(error, tail, atol=1e-4 * float(scale.max()), rtol=1e-3)
    eye = torch.eye(k, dtype=torch.float64).expand(group, k, k)
    torch.testing.assert_close(new_A.double() @ new_A.double().transpose(1, 2), eye, atol=1e-4, rtol=0)
    gaps = S[:, k - 1] - (S[:, k] if S.shape[1] > k else torch.zeros(group, dtype=S.dtype))
    for index in torch.nonzero(gaps > 1e-2 * S[:, 0]).flatten().tolist():
        close(ours[index], expected[index], atol=1e-4 * float(S[index, 0]), rtol=1e-3)


@FAST
@given(group=st.integers(1, 3), out=st.integers(1, 10), inp=st.integers(1, 10), rank=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_svd_dense_matches_truncated_svd_and_factor_path(group, out, inp, rank, seed):
    gen = torch.Generator().manual_seed(seed)
    delta = torch.randn(group, out, inp, generator=gen)
    A, B = kernels.svd_dense(delta, rank)
    k = min(rank, out, inp)
    expected, S = truncated_dense(delta, k)
    error = torch.linalg.matrix_norm(delta.double() - (B @ A).double())
    torch.testing.assert_close(error, (S[:, k:] ** 2).sum(dim=1).sqrt(), atol=1e-4, rtol=1e-3)
    # Full-rank input: the factor path (B = delta, A = I) must agree factor by factor.
    eye = torch.eye(inp).expand(group, inp, inp)
    factor_A, factor_B = kernels.svd_from_factors(eye, delta, rank)
    gaps = S[:, k - 1] - (S[:, k] if S.shape[1] > k else torch.zeros(group, dtype=S.dtype))
    for index in torch.nonzero(gaps > 1e-2 * S[:, 0].clamp(min=1e-6)).flatten().tolist():
        close(B[index] @ A[index], expected[index].float(), atol=1e-4, rtol=1e-3)
        close(factor_B[index], B[index], atol=1e-3, rtol=1e-3)
        close(factor_A[index], A[index], atol=1e-3, rtol=1e-3)


def test_svd_signs_are_canonical():
    """Largest-magnitude entry of each column of B is positive: the same bytes on every backend."""
    gen = torch.Generator().manual_seed(2)
    A, B = kernels.svd_from_factors(torch.randn(2, 5, 9, generator=gen), torch.randn(2, 7, 5, generator=gen), 3)
    pivots = torch.gather(B, 1, B.abs().argmax(dim=1, keepdim=True))
    assert bool((pivots > 0).all())


def test_clamp_beyond_torch_quantile_limit_uses_same_formula(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(2, 1001, generator=gen)
    expected = torch.quantile(values, 0.93, dim=1)
    monkeypatch.setattr(kernels, "_QUANTILE_MAX_ROW", 100)
    close(kernels._rowwise_quantile(values, 0.93), expected, atol=1e-6, rtol=0)


# ---------------------------------------------------------- linear and pem


def test_peft_linear_matches_add_weighted_adapter_linear(llama_adapters):
    """Equal ranks (a, c, d; c is rsLoRA), a negative weight, embedding included: same factors."""
    coefs = {"a": 0.6, "c": -0.4, "d": 0.3}
    model = load_peft("llama", {a: llama_adapters[a] for a in coefs})
    model.add_weighted_adapter(list(coefs), list(coefs.values()), "linear", combination_type="linear")
    for names, layers, terms in groups(model, coefs):
        A, B = kernels.peft_linear(terms)
        for index, layer in enumerate(layers):
            A_p, B_p, scaling = merged_factors(layer, "linear")
            assert scaling == 1.0
            close(A[index], A_p)
            close(B[index], B_p)


def test_pem_is_the_papers_parameter_interpolation_and_negation():
    """Convex weights: (λB₁+(1−λ)B₂)(λA₁+(1−λ)A₂)·s; c = −1: (A, −sB)."""
    gen = torch.Generator().manual_seed(4)
    A1, A2 = torch.randn(2, 2, 4, 9, generator=gen)
    B1, B2 = torch.randn(2, 2, 6, 4, generator=gen)
    lam, s = 0.3, torch.tensor([2.0, 0.5])
    A, B = kernels.pem([(lam, A1, B1, s), (1 - lam, A2, B2, s)])
    expected = s.view(2, 1, 1) * (lam * B1 + (1 - lam) * B2) @ (lam * A1 + (1 - lam) * A2)
    close(kernels.lora_delta(A, B), expected)
    neg_A, neg_B = kernels.pem([(-1.0, A1, B1, s)])
    close(neg_A, A1)
    close(neg_B, -s.view(2, 1, 1) * B1)


def test_pem_and_peft_linear_refuse_unequal_ranks():
    A4, B4 = torch.zeros(1, 4, 3), torch.zeros(1, 5, 4)
    A2, B2 = torch.zeros(1, 2, 3), torch.zeros(1, 5, 2)
    for operator in (kernels.pem, kernels.peft_linear):
        with pytest.raises(ValueError, match="equal ranks"):
            operator([(1.0, A4, B4, 1.0), (1.0, A2, B2, 1.0)])


# ---------------------------------------------------- dense: PEFT *_svd methods


@pytest.mark.parametrize(
    "method, dense",
    [
        ("ties_svd", lambda tasks, w: kernels.ties(tasks, w, 0.5)),
        ("magnitude_prune_svd", lambda tasks, w: kernels.magnitude_prune(tasks, w, 0.5)),
    ],
)
def test_peft_pruning_svd_methods_match(llama_adapters, method, dense):
    """``svd(ties(...))`` equals PEFT's ``ties_svd``, and the same for ``magnitude_prune_svd``."""
    coefs = {"a": 0.6, "b": 0.4}
    rank = 4
    model = load_peft("llama", {a: llama_adapters[a] for a in coefs})
    model.add_weighted_adapter(
        list(coefs), list(coefs.values()), "merged", combination_type=method, svd_rank=rank, density=0.5
    )
    for names, layers, terms in groups(model, coefs):
        A, B = kernels.svd_dense(dense(*kernels.stack_task_tensors(terms)), rank)
        for index, layer in enumerate(layers):
            A_p, B_p, _ = merged_factors(layer, "merged")
            close(B[index] @ A[index], B_p @ A_p, atol=1e-5, rtol=1e-3)


@pytest.mark.parametrize(
    "fixture, coefs, method",
    [
        ("llama_adapters", {"a": 0.7, "b": -0.5}, "dare_linear_svd"),
        ("llama_adapters", {"a": 0.7, "b": -0.5}, "dare_ties_svd"),
        ("gpt2_adapters", GPT2_COEFS, "dare_ties_svd"),
    ],
)
def test_peft_dare_svd_methods_match_with_the_same_random_stream(request, monkeypatch, fixture, coefs, method):
    """DARE through PEFT's whole ``add_weighted_adapter``, masks drawn from the same stream.

    PEFT draws from torch's global generator, after injecting the new adapter
    (which itself consumes random numbers). We reseed that global generator at
    the start of PEFT's module loop (right after ``_freeze_adapter``) and hand
    our kernel one generator with the same seed, visiting modules in PEFT's order.
    """
    rank, density, seed = 4, 0.6, 1234
    original_freeze = peft_lora_model._freeze_adapter

    def freeze_then_reseed(*args, **kwargs):
        original_freeze(*args, **kwargs)
        torch.manual_seed(seed)

    monkeypatch.setattr(peft_lora_model, "_freeze_adapter", freeze_then_reseed)
    model = load_for(request, fixture, coefs)
    model.add_weighted_adapter(
        list(coefs), list(coefs.values()), "merged", combination_type=method, svd_rank=rank, density=density
    )
    stream = torch.Generator().manual_seed(seed)
    checked = 0
    for name, layer in lora_layers(model).items():  # PEFT's module order
        present = {a: c for a, c in coefs.items() if factors(layer, a) is not None}
        if not present:
            continue
        _, _, terms = next(iter(groups_of_one(layer, present)))
        tasks, weights = kernels.stack_task_tensors(terms)
        transposed = is_transposed(layer, next(iter(present)))  # PEFT draws in the weight's layout
        if method == "dare_linear_svd":
            dense = kernels.dare_linear(tasks, weights, density, [stream], draw_transposed=transposed)
        else:
            dense = kernels.dare_ties(tasks, weights, density, [stream], draw_transposed=transposed)
        A, B = kernels.svd_dense(dense, rank)
        A_p, B_p, _ = merged_factors(layer, "merged")
        close(B[0] @ A[0], B_p @ A_p, atol=1e-5, rtol=1e-3)
        checked += 1
    assert checked >= 3


def groups_of_one(layer: LoraLayer, coefs: dict[str, float]):
    """One module as a group of one (for following PEFT's module order exactly)."""
    terms = []
    for adapter, coef in coefs.items():
        A, B = factors(layer, adapter)
        terms.append(kernels.LoraTerm(coef, A[None], B[None], torch.tensor([float(layer.scaling[adapter])])))
    yield None, [layer], terms


# ------------------------------------------- dense: merge_utils, per module


task_shapes = st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 7), st.integers(1, 7))


def random_tasks(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    tasks = torch.randn(shape, generator=gen)
    weights = torch.randn(shape[0], generator=gen)
    return tasks, weights


@FAST
@given(shape=task_shapes, density=st.floats(0.0, 1.0), majority=st.sampled_from(["total", "frequency"]), seed=st.integers(0, 2**16))
def test_ties_and_magnitude_prune_match_merge_utils_per_module(shape, density, majority, seed):
    tasks, weights = random_tasks(shape, seed)
    ours_ties = kernels.ties(tasks, weights, density, majority)
    ours_prune = kernels.magnitude_prune(tasks, weights, density)
    for module in range(shape[1]):
        per_task = [tasks[i, module] for i in range(shape[0])]
        close(ours_ties[module], merge_utils.ties(per_task, weights, density, majority), atol=1e-6, rtol=1e-5)
        close(ours_prune[module], merge_utils.magnitude_prune(per_task, weights, density), atol=1e-6, rtol=1e-5)


@FAST
@given(shape=task_shapes, density=st.floats(0.05, 1.0), majority=st.sampled_from(["total", "frequency"]), seed=st.integers(0, 2**16))
def test_dare_matches_merge_utils_seeded_identically(shape, density, majority, seed):
    """PEFT draws from torch's global generator; seeding it as our module's generator gives its masks.

    A wrong draw order, shape or probability would give other masks, so this is
    a comparison of the random drop itself, not only of the arithmetic around it.
    """
    tasks, weights = random_tasks(shape, seed)
    names = [f"model.layers.{j}.mlp.down_proj" for j in range(shape[1])]
    linear = kernels.dare_linear(tasks, weights, density, [kernels.module_generator(seed, n) for n in names])
    tied = kernels.dare_ties(tasks, weights, density, [kernels.module_generator(seed, n) for n in names], majority)
    for module, name in enumerate(names):
        per_task = [tasks[i, module] for i in range(shape[0])]
        torch.manual_seed(kernels.module_generator(seed, name).initial_seed())
        close(linear[module], merge_utils.dare_linear(per_task, weights, density), atol=1e-6, rtol=1e-5)
        torch.manual_seed(kernels.module_generator(seed, name).initial_seed())
        close(tied[module], merge_utils.dare_ties(per_task, weights, density, majority), atol=1e-6, rtol=1e-5)


def test_dare_is_deterministic_per_module_and_seed():
    """Same seed: same bytes, whatever the grouping; another seed or module name: other masks."""
    tasks, weights = random_tasks((3, 2, 16, 16), 7)
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]

    def run(seed, group_names, group_tasks):
        return kernels.dare_ties(group_tasks, weights, 0.5, [kernels.module_generator(seed, n) for n in group_names])

    first = run(0, names, tasks)
    assert torch.equal(first, run(0, names, tasks))
    alone = run(0, names[1:], tasks[:, 1:])
    assert torch.equal(first[1], alone[0])  # a module's mask does not depend on its group
    assert not torch.equal(first, run(1, names, tasks))
    assert not torch.equal(first[0], run(0, names[::-1], tasks)[1])


def test_module_generator_is_sha256_of_seed_and_name():
    import hashlib

    digest = hashlib.sha256(b"3:model.layers.0.self_attn.q_proj").digest()
    expected = int.from_bytes(digest[:8], "big") >> 1
    generator = kernels.module_generator(3, "model.layers.0.self_attn.q_proj")
    assert generator.initial_seed() == expected < 2**63


def test_density_edges_follow_peft():
    tasks, weights = random_tasks((2, 1, 4, 4), 8)
    gens = [kernels.module_generator(0, "m")]
    close(kernels.dare_linear(tasks, weights, 1.0, gens), (tasks * weights.view(-1, 1, 1, 1)).sum(0))
    assert torch.count_nonzero(kernels.magnitude_prune(tasks, weights, 0.0)) == 0
    with pytest.raises(ValueError):
        kernels.ties(tasks, weights, -0.1)
    with pytest.raises(ValueError):
        kernels.dare_linear(tasks, weights, 0.0, gens)


# -------------------------------------------------------------------- (IA)³


def test_ia3_combine_is_one_plus_weighted_effects():
    gen = torch.Generator().manual_seed(9)
    l1, l2 = 1 + 0.2 * torch.randn(2, 3, 8, 1, generator=gen)
    close(kernels.ia3_combine([(0.5, l1), (-2.0, l2)]), 1 + 0.5 * (l1 - 1) - 2.0 * (l2 - 1))
    close(kernels.ia3_combine([(-1.0, l1)]), 2 - l1)


def test_ia3_combine_matches_peft_add_weighted_adapter_for_convex_weights(tmp_path):
    from peft.tuners.ia3 import IA3Layer

    paths = {"x": make_ia3(tmp_path / "x", seed=1), "y": make_ia3(tmp_path / "y", seed=2)}
    model = load_peft("llama", paths)
    weights = [0.3, 0.7]
    model.add_weighted_adapter(["x", "y"], weights, "mix")
    layers = [m for m in model.base_model.model.modules() if isinstance(m, IA3Layer)]
    assert len(layers) == 6
    for layer in layers:
        stacked = [layer.ia3_l[a].detach()[None] for a in ("x", "y")]
        ours = kernels.ia3_combine(list(zip(weights, stacked)))[0]
        close(ours, layer.ia3_l["mix"].detach())


# ----------------------------------------------------------------- plumbing


def test_lora_delta_with_per_module_scale_and_low_precision_inputs():
    gen = torch.Generator().manual_seed(10)
    A = torch.randn(2, 3, 5, generator=gen).to(torch.bfloat16)
    B = torch.randn(2, 4, 3, generator=gen).to(torch.bfloat16)
    scale = torch.tensor([0.5, 3.0])
    delta = kernels.lora_delta(A, B, scale)
    assert delta.dtype == torch.float32
    expected = torch.stack([scale[i] * (B[i].float() @ A[i].float()) for i in range(2)])
    close(delta, expected)


def test_scale_of_wrong_length_is_refused():
    with pytest.raises(ValueError, match="scale"):
        kernels.exact_sum([(1.0, torch.zeros(2, 1, 3), torch.zeros(2, 4, 1), torch.ones(3))])


# ---------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_results_match_cpu():
    """Same results on the GPU: canonical SVD signs, clamp quantiles, and DARE masks drawn on CPU."""
    gen = torch.Generator().manual_seed(11)
    terms = [(0.6, torch.randn(4, 5, 48, generator=gen), torch.randn(4, 40, 5, generator=gen), 2.0),
             (-0.3, torch.randn(4, 3, 48, generator=gen), torch.randn(4, 40, 3, generator=gen), torch.rand(4, generator=gen))]
    on_gpu = [(c, A.cuda(), B.cuda(), s.cuda() if isinstance(s, torch.Tensor) else s) for c, A, B, s in terms]

    for cpu, gpu in zip(kernels.exact_sum(terms), kernels.exact_sum(on_gpu)):
        close(gpu.cpu(), cpu)
    cpu_A, cpu_B = kernels.svd_from_factors(*kernels.exact_sum(terms), rank=4, clamp=0.9)
    gpu_A, gpu_B = kernels.svd_from_factors(*kernels.exact_sum(on_gpu), rank=4, clamp=0.9)
    close(gpu_A.cpu(), cpu_A, atol=1e-4)
    close(gpu_B.cpu(), cpu_B, atol=1e-4)

    tasks, weights = kernels.stack_task_tensors(terms)
    names = [f"model.layers.{j}.self_attn.q_proj" for j in range(4)]
    cpu_dare = kernels.dare_ties(tasks, weights, 0.5, [kernels.module_generator(0, n) for n in names])
    gpu_dare = kernels.dare_ties(tasks.cuda(), weights, 0.5, [kernels.module_generator(0, n) for n in names])
    close(gpu_dare.cpu(), cpu_dare)
    close(kernels.ties(tasks.cuda(), weights, 0.3).cpu(), kernels.ties(tasks, weights, 0.3))
    cpu_A, cpu_B = kernels.svd_dense(cpu_dare, rank=3, clamp=0.95)
    gpu_A, gpu_B = kernels.svd_dense(gpu_dare, rank=3, clamp=0.95)
    close(gpu_A.cpu(), cpu_A, atol=1e-4)
    close(gpu_B.cpu(), cpu_B, atol=1e-4)
