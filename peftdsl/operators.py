"""The operators of the expression language, as data (docs/recipes.md): one row each.

A row is everything the compiler knows about a function — its keyword signature and
argument checks, which kinds it takes and returns (its kind rule), the rank of its
result (its rank rule, used by lowering and the memory estimate), how its argument is
handed to the kernel, and the kernel's name in `peftdsl.runtime.ops`. Name
resolution, type checking, canonicalisation, lowering and execution all read this
table and nothing else, so adding an operator is adding a row here and a kernel
there (tests/test_operators.py walks every row end to end).

No torch here: the kernel is named, and resolved only when a plan executes.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from peftdsl.ir import Kind
from peftdsl.numbers import show_number


@dataclass(frozen=True, slots=True)
class Keyword:
    name: str
    type: str  # "int" | "float" | "choice" | "bool"
    required: bool = False
    low: float | None = None  # inclusive unless low_open
    high: float | None = None  # inclusive
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    default: object = None
    description: str = ""

    def problem(self, value: object) -> str | None:
        """Why `value` is not acceptable, or None."""
        if self.type == "choice":
            if value not in self.choices:
                return f"must be one of {', '.join(repr(c) for c in self.choices)}"
            return None
        if self.type == "bool":
            return None if isinstance(value, bool) else "must be `true` or `false`"
        if isinstance(value, str):
            return "must be a number"
        if self.type == "int" and float(value) != int(value):
            return "must be a whole number"
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"must be {'>' if self.low_open else '≥'} {show_number(self.low)}" + (
                f" and ≤ {show_number(self.high)}" if self.high is not None else "")
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return f"must be {'<' if self.high_open else '≤'} {show_number(self.high)}"
        return None


class Argument(enum.Enum):
    """How the executor hands an operator its argument (one preparation per mode, not per operator)."""

    VALUE = "value"  # the argument's combination, evaluated to one value (lora factors or a dense delta)
    FACTORS = "factors"  # each term's LoRA factors with its coefficient: [(c, A, B, s), ...]
    TASKS = "tasks"  # each term's dense task tensor ΔWᵢ, stacked, with the coefficients as weights


class Parts(enum.Enum):
    """How an operator carries the tensors beside the factors (saved modules, biases, token
    rows; DESIGN §2 "Beyond factors") of its argument: `peftdsl.parts` reads it."""

    LINEAR = "linear"  # as the argument's linear combination (svd, pem, peft_linear act on factors only)
    TASKS = "tasks"  # as task tensors handed to the kernel, like the factors' deltas (ties, dare…)


@dataclass(frozen=True, slots=True)
class RankContext:
    """What a rank rule sees for one group of modules."""

    options: Mapping[str, object]
    inner: int | None  # rank of the argument's combination on these modules (None: dense)
    adapter_ranks: tuple[int, ...]  # ranks of the source adapters in the argument that target them
    out_features: int
    in_features: int


RankRule = Callable[[RankContext], "int | None"]


@dataclass(frozen=True, slots=True)
class Operator:
    name: str
    accepts: frozenset[Kind]  # the kind rule: what the argument may be ...
    returns: Kind  # ... and what the result is
    keywords: tuple[Keyword, ...]
    rank: RankRule  # the rank rule: the result's rank on a group (None: dense)
    argument: Argument
    kernel: str  # a function of `peftdsl.runtime.ops`
    adapters_only: bool = False  # the argument must combine source adapters only (pem, peft_linear)
    equal_ranks: bool = False  # shared modules must have equal ranks
    note: tuple[str, str, str] | None = None  # (code, message, help) said once when the operator is used
    summary: str = ""
    parts: Parts = Parts.LINEAR  # how the argument's saved modules, biases and token rows pass through
    exclusive: tuple[tuple[str, str], ...] = ()  # keyword pairs that may not be given together

    def keyword(self, name: str) -> Keyword | None:
        return next((k for k in self.keywords if k.name == name), None)


# ---------------------------------------------------------------- rank rules


def _truncated(ctx: RankContext) -> int:
    """svd: at most `rank`, the matrix's smaller side, and the argument's own rank."""
    limit = min(int(ctx.options["rank"]), ctx.out_features, ctx.in_features)
    return limit if ctx.inner is None else min(limit, ctx.inner)


def _common_rank(ctx: RankContext) -> int:
    """pem, peft_linear: the (equal) rank of the adapters they combine."""
    return max(ctx.adapter_ranks, default=0)


def _dense(ctx: RankContext) -> None:
    return None


# ---------------------------------------------------------------- the rows


_LORA_OR_DENSE = frozenset({Kind.LORA, Kind.DENSE})
_DENSITY = Keyword("density", "float", required=True, low=0.0, low_open=True, high=1.0,
                   description="fraction of entries kept")
_MAJORITY = Keyword("majority", "choice", choices=("total", "frequency"), default="total",
                    description="how the sign of each entry is elected")
_PEM_NOTE = ("T411", "`pem` adds A and B factors separately (the paper's parameter-space arithmetic); "
             "its delta has cross terms Bⱼ·Aᵢ and is not the sum of the adapters' deltas",
             "write the expression without `pem(...)` for the exact sum of deltas")


def _task_tensor_operator(name: str, keywords: tuple[Keyword, ...], summary: str) -> Operator:
    """The merge_utils family: dense results from the terms' task tensors."""
    return Operator(name, _LORA_OR_DENSE, Kind.DENSE, keywords, _dense, Argument.TASKS, name, summary=summary,
                    parts=Parts.TASKS)


OPERATORS: dict[str, Operator] = {
    op.name: op
    for op in (
        Operator("svd", _LORA_OR_DENSE, Kind.LORA,
                 (Keyword("rank", "int", required=True, low=1, description="rank of the result"),
                  Keyword("clamp", "float", low=0.0, high=1.0, description="quantile to clamp values at"),
                  Keyword("keep", "float", low=0.0, low_open=True, high=1.0,
                          description="per module, the smallest rank ≤ `rank` holding this share of ‖ΔW‖_F"),
                  Keyword("tol", "float", low=0.0, high=1.0, high_open=True,
                          description="per module, keep the singular values ≥ tol·σ₁ (at most `rank`)"),
                  Keyword("rest", "choice", choices=("drop", "save"), default="drop",
                          description="a full fine-tune's tensors a LoRA cannot hold (norms, biases, "
                          "embeddings): dropped (warned), or saved whole as modules_to_save"),
                  Keyword("embed", "bool",
                          description="also extract a full fine-tune's input embeddings as embedding LoRA "
                          "(`lora_embedding_A/B`) instead of dropping or saving them")),
                 _truncated, Argument.VALUE, "svd",
                 summary="best rank-k approximation of the delta (Eckart–Young)", exclusive=(("keep", "tol"),)),
        Operator("pem", frozenset({Kind.LORA}), Kind.LORA, (), _common_rank, Argument.FACTORS, "pem",
                 adapters_only=True, equal_ranks=True, note=_PEM_NOTE,
                 summary="the paper's parameter-space arithmetic: A = Σ|c|·A, B = Σ c·s·B"),
        Operator("peft_linear", frozenset({Kind.LORA}), Kind.LORA, (), _common_rank, Argument.FACTORS,
                 "peft_linear", adapters_only=True, equal_ranks=True,
                 summary="PEFT add_weighted_adapter(combination_type='linear')"),
        _task_tensor_operator("ties", (_DENSITY, _MAJORITY),
                              "TIES merging of the task deltas (peft.utils.merge_utils.ties)"),
        _task_tensor_operator("dare_linear", (_DENSITY,),
                              "DARE random pruning and rescaling, then a weighted sum"),
        _task_tensor_operator("dare_ties", (_DENSITY, _MAJORITY),
                              "DARE random pruning, then TIES sign election"),
        _task_tensor_operator("magnitude_prune", (_DENSITY,),
                              "keep the largest entries of each task delta, then a weighted sum"),
    )
}
