"""The typed IR: frozen dataclasses whose spans never take part in equality.

Expressions (`Number`, `Name`, `Neg`, `Binary`, `Call`) come from the parser; the
recipe (`Recipe` and its parts) from `build`. Canonical forms (`Combination` over
`Leaf`s) come from `canonical`. Structural equality and hashing ignore positions,
so golden tests and common-subexpression sharing see through where things were
written.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from peftdsl.numbers import show_number
from peftdsl.spans import Span


class Kind(enum.Enum):
    """The type of an expression (docs/recipes.md)."""

    SCALAR = "scalar"
    LORA = "lora"
    IA3 = "ia3"
    DENSE = "dense"

    def __str__(self) -> str:
        return self.value


# ---------------------------------------------------------------- expressions


@dataclass(frozen=True, slots=True, kw_only=True)
class Node:
    span: Span = field(compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Number(Node):
    value: float


@dataclass(frozen=True, slots=True, kw_only=True)
class String(Node):
    value: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Flag(Node):
    """`true` or `false`, as a keyword argument's whole value (`embed=true`)."""

    value: bool


Literal = String | Flag  # a keyword value that is not an expression


def literal_fits(keyword_type: str, value: object) -> bool:
    """Whether a keyword argument's value is what its type takes: a string for a `choice`, a
    flag for a `bool`, an expression (a number) otherwise."""
    wanted = {"choice": String, "bool": Flag}.get(keyword_type)
    return isinstance(value, wanted) if wanted is not None else not isinstance(value, (String, Flag))


@dataclass(frozen=True, slots=True, kw_only=True)
class Name(Node):
    id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Neg(Node):
    operand: Expr


@dataclass(frozen=True, slots=True, kw_only=True)
class Binary(Node):
    op: str  # one of + - * /
    left: Expr
    right: Expr


@dataclass(frozen=True, slots=True, kw_only=True)
class Keyword(Node):
    name: str
    value: Expr | Literal


@dataclass(frozen=True, slots=True, kw_only=True)
class Call(Node):
    func: str
    args: tuple[Expr, ...]
    keywords: tuple[Keyword, ...]
    func_span: Span = field(compare=False, repr=False)


Expr = Number | Name | Neg | Binary | Call


def walk(expr: Expr):
    """Every node of an expression, parents before children (iterative: deep trees are fine)."""
    stack: list[Node] = [expr]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, Neg):
            stack.append(node.operand)
        elif isinstance(node, Binary):
            stack.extend((node.right, node.left))
        elif isinstance(node, Call):
            stack.extend(reversed([*node.args, *(k.value for k in node.keywords)]))


def left_spine(expr: Binary) -> list[Binary]:
    """`expr` and its left operands while they are binary, top first: a left-associative chain
    (`a + b + … + z`, thousands of terms) walked with a loop instead of one call per term."""
    spine = [expr]
    while isinstance(spine[-1].left, Binary):
        spine.append(spine[-1].left)
    return spine


def to_source(expr: Expr | Literal) -> str:
    """Print an expression so that parsing the text gives the same IR (fully parenthesised where needed)."""
    if isinstance(expr, Number):
        return repr(expr.value) if expr.value != int(expr.value) or abs(expr.value) >= 1e16 else str(int(expr.value))
    if isinstance(expr, String):
        return f'"{expr.value}"'
    if isinstance(expr, Flag):
        return "true" if expr.value else "false"
    if isinstance(expr, Name):
        return expr.id
    if isinstance(expr, Neg):
        return f"-{_atom(expr.operand)}"
    if isinstance(expr, Binary):
        spine = left_spine(expr)
        text = to_source(spine[-1].left)
        for node in reversed(spine):
            text = f"({text} {node.op} {to_source(node.right)})"
        return text
    args = [to_source(a) for a in expr.args] + [f"{k.name}={to_source(k.value)}" for k in expr.keywords]
    return f"{expr.func}({', '.join(args)})"


def _atom(expr: Expr) -> str:
    text = to_source(expr)
    return text if isinstance(expr, (Name, Call, Binary)) or not text.startswith("-") else f"({text})"


# ---------------------------------------------------------------- the recipe


@dataclass(frozen=True, slots=True, kw_only=True)
class Adapter(Node):
    """A named source: a PEFT adapter directory (or `hf:org/name[@rev]`)."""

    name: str
    location: str  # as written in the recipe
    path: Path | None  # resolved against the recipe's folder; None for unresolved hf: sources
    sha256: str | None = None
    kind: Kind | None = None  # declared
    rank: int | None = None  # declared
    name_span: Span = field(compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Param(Node):
    name: str
    value: float
    name_span: Span = field(compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Composition(Node):
    name: str
    expr: Expr
    name_span: Span = field(compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Output(Node):
    name: str
    path: Path
    merge: bool = False
    dtype: str | None = None
    name_span: Span = field(compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class EvalTarget(Node):
    name: str
    models: tuple[str, ...]
    metric: str
    data: Path | None  # None for lm_eval, whose tasks name their own data
    options: tuple[tuple[str, object], ...] = ()
    model_spans: tuple[Span, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Select(Node):
    eval: str
    model: str
    goal: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Sweep(Node):
    grid: tuple[tuple[str, tuple[float, ...]], ...]
    select: Select | None
    param_spans: tuple[Span, ...] = field(default=(), compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Search(Node):
    """`search:`: each param's bounds, the objective, and how the optimiser runs."""

    bounds: tuple[tuple[str, float, float], ...]  # (param, lower, upper), in recipe order
    objective: Select
    l1: float  # 0: no penalty
    optimizer: str  # ngopt | cma | random
    budget: int
    seed: int
    batch: int
    param_spans: tuple[Span, ...] = field(default=(), compare=False, repr=False)
    bound_spans: tuple[Span, ...] = field(default=(), compare=False, repr=False)
    optimizer_span: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Recipe(Node):
    path: Path
    name: str
    version: int
    base: str | None
    base_path: Path | None
    seed: int
    adapters: tuple[Adapter, ...]
    params: tuple[Param, ...]
    compose: tuple[Composition, ...]
    outputs: tuple[Output, ...]
    evals: tuple[EvalTarget, ...]
    sweep: Sweep | None
    base_span: Span | None = field(default=None, compare=False, repr=False)
    search: Search | None = None

    def adapter(self, name: str) -> Adapter | None:
        return next((a for a in self.adapters if a.name == name), None)

    def composition(self, name: str) -> Composition | None:
        return next((c for c in self.compose if c.name == name), None)

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


# ---------------------------------------------------------------- canonical forms


@dataclass(frozen=True, slots=True, kw_only=True)
class AdapterLeaf(Node):
    """A source adapter, by name."""

    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class OpLeaf(Node):
    """A function result (svd, pem, ties, ...) over a canonical combination."""

    func: str
    arg: Combination
    options: tuple[tuple[str, object], ...]
    kind: Kind


Leaf = AdapterLeaf | OpLeaf


@dataclass(frozen=True, slots=True, kw_only=True)
class Term(Node):
    coef: float
    leaf: Leaf


@dataclass(frozen=True, slots=True, kw_only=True)
class Combination(Node):
    """Σ cᵢ·xᵢ over distinct leaves, in a stable order; an empty tuple is the zero delta."""

    kind: Kind
    terms: tuple[Term, ...]


def leaf_text(leaf: Leaf) -> str:
    if isinstance(leaf, AdapterLeaf):
        return leaf.name
    opts = "".join(f", {k}={_show_option(v)}" for k, v in leaf.options)
    return f"{leaf.func}({combination_text(leaf.arg)}{opts})"


def combination_text(comb: Combination) -> str:
    """`0.6·a + 0.4·b`-style text, stable, for `explain` and provenance."""
    if not comb.terms:
        return "0"
    parts = []
    for i, term in enumerate(comb.terms):
        sign = "-" if term.coef < 0 else "+"
        magnitude = abs(term.coef)
        body = leaf_text(term.leaf) if magnitude == 1 else f"{show_number(magnitude)}*{leaf_text(term.leaf)}"
        parts.append(("-" if sign == "-" else "") + body if i == 0 else f" {sign} {body}")
    return "".join(parts)


def adapter_leaves(comb: Combination) -> list[str]:
    """Names of the source adapters a combination reads, in first-use order."""
    names: dict[str, None] = {}
    stack = [comb]
    while stack:
        current = stack.pop()
        for term in current.terms:
            if isinstance(term.leaf, AdapterLeaf):
                names.setdefault(term.leaf.name)
            else:
                stack.append(term.leaf.arg)
    return list(names)


def _show_option(value: object) -> str:
    """An operator option as the recipe writes it: `"save"`, `true`, `0.5`."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else show_number(value)
