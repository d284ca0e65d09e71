"""The values the executor computes with: one group of modules, stacked along a leading `g`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from peftdsl.runtime import kernels


@dataclass
class Lora:
    A: torch.Tensor  # [g, r, in]
    B: torch.Tensor  # [g, out, r]
    scale: object = 1.0  # float or Tensor[g]
    # Rank selection (`svd(..., keep=, tol=)`): each module's rank (its factors are zero past
    # it, so arithmetic on the padded stack stays exact) and the share of ‖ΔW‖_F it keeps.
    ranks: list[int] | None = None
    kept: list[float] | None = None


@dataclass
class Dense:
    delta: torch.Tensor  # [g, out, in]


@dataclass
class Ia3:
    l: torch.Tensor  # noqa: E741  [g, ...]


Value = Lora | Dense | Ia3


def folded_B(value: Lora) -> torch.Tensor:
    """B with the module scaling folded in (s·B), so that the factors alone give ΔW."""
    if isinstance(value.scale, float):
        return value.B if value.scale == 1.0 else value.B * value.scale
    return value.B * value.scale.view(-1, 1, 1)


def dense_of(value: Lora | Dense) -> torch.Tensor:
    """A value's delta as a dense [g, out, in] tensor."""
    if isinstance(value, Dense):
        return value.delta
    return kernels.lora_delta(value.A, value.B, value.scale)
