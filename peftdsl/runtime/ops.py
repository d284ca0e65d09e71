"""The kernels of the operators, one function per registry row (`peftdsl.operators`).

Each takes its argument as its row's `Argument` mode prepares it, the call's keyword
options, and the group's `Context`, and returns a value for the group. The numerics
live in `kernels`; these functions only map an operator's options onto them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from peftdsl.errors import InputDataError
from peftdsl.runtime import kernels
from peftdsl.runtime.values import Dense, Lora, folded_B


@dataclass(frozen=True, slots=True)
class Context:
    """The group an operator runs on: what seeded and layout-aware kernels need."""

    seed: int
    modules: tuple[str, ...]
    layout: str


# ---------------------------------------------------------------- Argument.VALUE


def svd(value: Lora | Dense, options: Mapping, context: Context) -> Lora:
    rank = options["rank"]
    selects = options.get("keep") is not None or options.get("tol") is not None
    try:
        if isinstance(value, Lora):
            A, B, spectrum = kernels.svd_from_factors_spectrum(value.A, folded_B(value), rank, options.get("clamp"))
        elif selects:
            A, B, spectrum = kernels.svd_dense_spectrum(value.delta, rank, options.get("clamp"), _generators(context))
        else:  # no rank selection: ‖ΔW‖ is not needed
            A, B = kernels.svd_dense(value.delta, rank, options.get("clamp"), _generators(context))
    except torch.linalg.LinAlgError as err:  # finite inputs whose combination overflowed float32
        raise InputDataError(f"svd of module `{context.modules[0]}` failed: {str(err).splitlines()[0]} "
                             "(float32 overflow? scale the coefficients down)") from err
    if not selects:
        return Lora(A, B)
    ranks, kept = kernels.select_ranks(spectrum, rank, options.get("keep"), options.get("tol"))
    limit = torch.tensor(ranks, device=A.device).view(-1, 1)
    mask = torch.arange(A.shape[1], device=A.device).view(1, -1) < limit  # [g, k]: inside each rank
    return Lora(A * mask.unsqueeze(2), B * mask.unsqueeze(1), ranks=ranks, kept=kept)


# ---------------------------------------------------------------- Argument.FACTORS


def pem(terms: list[tuple], options: Mapping, context: Context) -> Lora:
    return Lora(*kernels.pem(terms))


def peft_linear(terms: list[tuple], options: Mapping, context: Context) -> Lora:
    return Lora(*kernels.peft_linear(terms))


# ---------------------------------------------------------------- Argument.TASKS


def ties(tasks: tuple[torch.Tensor, torch.Tensor], options: Mapping, context: Context) -> Dense:
    stacked, weights = tasks
    return Dense(kernels.ties(stacked, weights, options["density"], options["majority"]))


def magnitude_prune(tasks: tuple[torch.Tensor, torch.Tensor], options: Mapping, context: Context) -> Dense:
    stacked, weights = tasks
    return Dense(kernels.magnitude_prune(stacked, weights, options["density"]))


def _generators(context: Context) -> list[torch.Generator]:
    """One generator per module, seeded by the recipe's seed and the module's name."""
    return [kernels.module_generator(context.seed, module, "cpu") for module in context.modules]


def dare_linear(tasks: tuple[torch.Tensor, torch.Tensor], options: Mapping, context: Context) -> Dense:
    stacked, weights = tasks
    return Dense(kernels.dare_linear(stacked, weights, options["density"], _generators(context),
                                     context.layout != "linear"))


def dare_ties(tasks: tuple[torch.Tensor, torch.Tensor], options: Mapping, context: Context) -> Dense:
    stacked, weights = tasks
    return Dense(kernels.dare_ties(stacked, weights, options["density"], _generators(context),
                                   options["majority"], context.layout != "linear"))
