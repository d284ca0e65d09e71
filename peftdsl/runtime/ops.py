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
    try:
        if isinstance(value, Lora):
            A, B = kernels.svd_from_factors(value.A, folded_B(value), options["rank"], options.get("clamp"))
        else:
            A, B = kernels.svd_dense(value.delta, options["rank"], options.get("clamp"))
    except torch.linalg.LinAlgError as err:  # finite inputs whose combination overflowed float32
        raise InputDataError(f"svd of module `{context.modules[0]}` failed: {str(err).splitlines()[0]} "
                             "(float32 overflow? scale the coefficients down)") from err
    return Lora(A, B)


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
