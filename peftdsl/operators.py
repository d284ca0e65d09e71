"""The functions of the expression language, as data (DESIGN §2).

Type checking, canonicalisation, lowering and execution all read this one table:
adding a function is adding a row here and a kernel in `kernels.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from peftdsl.ir import Kind


@dataclass(frozen=True, slots=True)
class Keyword:
    name: str
    type: str  # "int" | "float" | "choice"
    required: bool = False
    low: float | None = None  # inclusive unless low_open
    high: float | None = None  # inclusive
    low_open: bool = False
    choices: tuple[str, ...] = ()
    default: object = None
    description: str = ""

    def problem(self, value: object) -> str | None:
        """Why `value` is not acceptable, or None."""
        if self.type == "choice":
            if value not in self.choices:
                return f"must be one of {', '.join(repr(c) for c in self.choices)}"
            return None
        if isinstance(value, str):
            return "must be a number"
        if self.type == "int" and float(value) != int(value):
            return "must be a whole number"
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"must be {'>' if self.low_open else '≥'} {_num(self.low)}" + (
                f" and ≤ {_num(self.high)}" if self.high is not None else "")
        if self.high is not None and value > self.high:
            return f"must be ≤ {_num(self.high)}"
        return None


@dataclass(frozen=True, slots=True)
class Function:
    name: str
    accepts: frozenset[Kind]
    returns: Kind
    keywords: tuple[Keyword, ...]
    adapters_only: bool = False  # the argument must combine source adapters only (pem, peft_linear)
    equal_ranks: bool = False  # shared modules must have equal ranks
    summary: str = ""

    def keyword(self, name: str) -> Keyword | None:
        return next((k for k in self.keywords if k.name == name), None)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


_LORA_OR_DENSE = frozenset({Kind.LORA, Kind.DENSE})
_DENSITY = Keyword("density", "float", required=True, low=0.0, low_open=True, high=1.0,
                   description="fraction of entries kept")
_MAJORITY = Keyword("majority", "choice", choices=("total", "frequency"), default="total",
                    description="how the sign of each entry is elected")

FUNCTIONS: dict[str, Function] = {
    f.name: f
    for f in (
        Function("svd", _LORA_OR_DENSE, Kind.LORA,
                 (Keyword("rank", "int", required=True, low=1, description="rank of the result"),
                  Keyword("clamp", "float", low=0.0, high=1.0, description="quantile to clamp values at")),
                 summary="best rank-k approximation of the delta (Eckart–Young)"),
        Function("pem", frozenset({Kind.LORA}), Kind.LORA, (), adapters_only=True, equal_ranks=True,
                 summary="the paper's parameter-space arithmetic: A = Σ|c|·A, B = Σ c·s·B"),
        Function("peft_linear", frozenset({Kind.LORA}), Kind.LORA, (), adapters_only=True, equal_ranks=True,
                 summary="PEFT add_weighted_adapter(combination_type='linear')"),
        Function("ties", _LORA_OR_DENSE, Kind.DENSE, (_DENSITY, _MAJORITY),
                 summary="TIES merging of the task deltas (peft.utils.merge_utils.ties)"),
        Function("dare_linear", _LORA_OR_DENSE, Kind.DENSE, (_DENSITY,),
                 summary="DARE random pruning and rescaling, then a weighted sum"),
        Function("dare_ties", _LORA_OR_DENSE, Kind.DENSE, (_DENSITY, _MAJORITY),
                 summary="DARE random pruning, then TIES sign election"),
        Function("magnitude_prune", _LORA_OR_DENSE, Kind.DENSE, (_DENSITY,),
                 summary="keep the largest entries of each task delta, then a weighted sum"),
    )
}
