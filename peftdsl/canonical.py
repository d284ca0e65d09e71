"""Stage 6: reduce every composition to its canonical form Σ cᵢ·xᵢ.

Scalars fold (params included, after `--set` and sweep values), like terms collect
(`a + a` → `2·a`), compositions inline into the ones that use them, and terms whose
weight is zero are dropped with a warning. Function calls become leaves
(`OpLeaf`) over the canonical form of their argument, so equal calls are one leaf.
Semantics (docs/recipes.md) are defined on this form.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from peftdsl import ir
from peftdsl.diagnostics import Sink
from peftdsl.numbers import show_number
from peftdsl.operators import OPERATORS
from peftdsl.spans import Span

Kind = ir.Kind
Value = float | ir.Combination | None  # None: not computable (an error was reported)


# Tests turn this on (tests/conftest.py sets PEFTDSL_CHECK_INVARIANTS=1, which the
# subprocesses and Ray workers they start inherit): every canonical form is then checked
# against the invariants below as it is made, and a violation is a bug, raised at once.
FLOAT32_TINY = 1.1754943508222875e-38  # the smallest normal float32: below it, weights lose every bit
CHECK_INVARIANTS = os.environ.get("PEFTDSL_CHECK_INVARIANTS") == "1"


def canonicalise(recipe: ir.Recipe, kinds: Mapping[str, Kind | None], sink: Sink,
                 params: Mapping[str, float] | None = None) -> dict[str, ir.Combination]:
    """Canonical forms of every composition (and of every adapter, as `1·a`), at `params`
    (the recipe's values, overridden by `--set` or a sweep point)."""
    values = {p.name: p.value for p in recipe.params}
    values.update(params or {})
    folder = _Canonicaliser(recipe, kinds, values, sink)
    forms: dict[str, ir.Combination] = {}
    for adapter in recipe.adapters:
        kind = kinds.get(adapter.name)
        if kind is not None:
            forms[adapter.name] = folder.leaf(adapter.name, kind, adapter.name_span)
    for comp in recipe.compose:
        kind = kinds.get(comp.name)
        if kind is None:
            continue
        value = folder.top(comp.expr)
        if isinstance(value, ir.Combination):
            forms[comp.name] = value
            folder.compositions[comp.name] = value
    if CHECK_INVARIANTS:
        dense_sources = frozenset(a.name for a in recipe.adapters if kinds.get(a.name) is Kind.DENSE)
        for name, form in forms.items():
            problems = invariant_violations(form, dense_sources)
            if problems:
                raise AssertionError(f"canonical form of `{name}` breaks its invariants: {'; '.join(problems)}")
    return forms


class _Canonicaliser:
    def __init__(self, recipe: ir.Recipe, kinds: Mapping[str, Kind | None], params: dict[str, float], sink: Sink):
        self.recipe, self.kinds, self.params, self.sink = recipe, kinds, params, sink
        self.compositions: dict[str, ir.Combination] = {}
        self.seen: dict[ir.Leaf, None] = {}  # leaves combined in the current `top` expression

    def leaf(self, name: str, kind: Kind, span: Span) -> ir.Combination:
        term = ir.Term(coef=1.0, leaf=ir.AdapterLeaf(name=name, span=span), span=span)
        return ir.Combination(kind=kind, terms=(term,), span=span)

    def top(self, expr: ir.Expr) -> Value:
        """A whole expression (a composition, or a function's argument), warning about the
        terms its canonical form lost: judged on the result, so `a - a + a` (which is `a`)
        says nothing, and `a + b - b` says `b` cancels."""
        outer, self.seen = self.seen, {}
        try:
            value = self.of(expr)
            if isinstance(value, ir.Combination):
                self._warn_cancelled(value, expr.span)
            return value
        finally:
            self.seen = outer

    def _warn_cancelled(self, value: ir.Combination, span: Span) -> None:
        kept = {term.leaf for term in value.terms}
        lost = [leaf for leaf in self.seen if leaf not in kept]
        if lost and not kept:
            self.sink.emit("T410", f"`{span.text}` cancels out entirely: its delta is zero", span,
                           help="check the signs and weights")
            return
        for leaf in lost:
            self.sink.emit("T409", f"`{ir.leaf_text(leaf)}` cancels out here: its total weight is 0", span,
                           help="remove it, or check the signs and weights")

    def of(self, expr: ir.Expr) -> Value:
        return getattr(self, f"_{type(expr).__name__.lower()}")(expr)

    def _number(self, expr: ir.Number) -> Value:
        return expr.value

    def _name(self, expr: ir.Name) -> Value:
        if expr.id in self.params:
            return self._finite(self.params[expr.id], expr.span)
        if expr.id in self.compositions:
            return self.compositions[expr.id]
        kind = self.kinds.get(expr.id)
        if kind is None or self.recipe.adapter(expr.id) is None:
            return None
        return self.leaf(expr.id, kind, expr.span)

    def _neg(self, expr: ir.Neg) -> Value:
        value = self.of(expr.operand)
        if value is None:
            return None
        return -value if isinstance(value, float) else self._combine([(-1.0, value)], expr.span)

    def _binary(self, chain: ir.Binary) -> Value:
        spine = ir.left_spine(chain)  # a loop, not a call per term: sums may have thousands
        value = self.of(spine[-1].left)
        for expr in reversed(spine):
            value = self._operator(expr, value, self.of(expr.right))
        return value

    def _operator(self, expr: ir.Binary, left: Value, right: Value) -> Value:
        if left is None or right is None:
            return None
        if isinstance(left, float) and isinstance(right, float):
            return self._fold(expr, left, right)
        if expr.op in "+-" and isinstance(left, ir.Combination) and isinstance(right, ir.Combination):
            return self._combine([(1.0, left), (1.0 if expr.op == "+" else -1.0, right)], expr.span)
        if expr.op == "*":
            scale, comb = (left, right) if isinstance(left, float) else (right, left)
            if isinstance(scale, float) and isinstance(comb, ir.Combination):
                return self._combine([(scale, comb)], expr.span)
        if expr.op == "/" and isinstance(left, ir.Combination) and isinstance(right, float):
            if right == 0:
                self._division_by_zero(expr)
                return None
            return self._combine([(1.0 / right, left)], expr.span)
        return None  # a type error, reported by the checker

    def _fold(self, expr: ir.Binary, left: float, right: float) -> float | None:
        if expr.op == "/" and right == 0:
            self._division_by_zero(expr)
            return None
        ops = {"+": left + right, "-": left - right}
        result = ops.get(expr.op, left * right if expr.op == "*" else (left / right if right else 0.0))
        return self._finite(result, expr.span)

    def _division_by_zero(self, expr: ir.Binary) -> None:
        self.sink.emit("T407", "division by zero", expr.right.span,
                       label=f"`{expr.right.span.text}` is 0 here", help="check the params and --set values")

    def _finite(self, value: float, span: Span) -> float | None:
        if math.isfinite(value):
            return value
        self.sink.emit("T408", f"`{span.text}` is {value}, not a finite number", span)
        return None

    def _combine(self, parts: list[tuple[float, ir.Combination]], span: Span) -> ir.Combination | None:
        """Σ (scale × combination), like terms collected, zeros dropped with a warning."""
        totals: dict[ir.Leaf, list[float]] = {}
        first: dict[ir.Leaf, ir.Term] = {}
        kinds = set()
        for scale, comb in parts:
            kinds.add(comb.kind)
            for term in comb.terms:
                totals.setdefault(term.leaf, []).append(scale * term.coef)
                first.setdefault(term.leaf, term)
        terms = []
        self.seen.update(dict.fromkeys(totals))  # for `top`'s warnings about lost terms
        for leaf, contributions in totals.items():
            coef = math.fsum(contributions)
            if not math.isfinite(coef):
                self.sink.emit("T408", f"the weight of `{ir.leaf_text(leaf)}` overflows", span)
                return None
            if abs(coef) > 1e-12 * math.fsum(abs(c) for c in contributions):
                if abs(coef) < FLOAT32_TINY:
                    self.sink.emit("T409", f"the weight of `{ir.leaf_text(leaf)}` ({coef:g}) is below float32's "
                                   "range, the compute dtype: it contributes nothing", span,
                                   help="check the coefficients: weights this small round to 0")
                terms.append(ir.Term(coef=coef, leaf=leaf, span=first[leaf].span))
        terms.sort(key=lambda t: ir.leaf_text(t.leaf))
        kind = Kind.DENSE if Kind.DENSE in kinds else kinds.pop()
        left = {self._leaf_kind(t.leaf) for t in terms}
        if kind is Kind.DENSE and terms and Kind.DENSE not in left and len(left) == 1:
            kind = left.pop()  # every dense term cancelled (`2 * lo - 0 * full`): what is left decides
        return ir.Combination(kind=kind, terms=tuple(terms), span=span)

    def _leaf_kind(self, leaf: ir.Leaf) -> Kind | None:
        return leaf.kind if isinstance(leaf, ir.OpLeaf) else self.kinds.get(leaf.name)

    def _call(self, expr: ir.Call) -> Value:
        function = OPERATORS.get(expr.func)
        if function is None or len(expr.args) != 1:
            return None
        arg = self.top(expr.args[0])
        if not isinstance(arg, ir.Combination):
            return None
        options = self._options(expr, function)
        if options is None:
            return None
        leaf = ir.OpLeaf(func=expr.func, arg=arg, options=options, kind=function.returns, span=expr.span)
        term = ir.Term(coef=1.0, leaf=leaf, span=expr.span)
        return ir.Combination(kind=function.returns, terms=(term,), span=expr.span)

    def _options(self, expr: ir.Call, function) -> tuple[tuple[str, object], ...] | None:
        options: dict[str, object] = {}
        ok = True
        for keyword in expr.keywords:
            spec = function.keyword(keyword.name)
            if spec is None or not ir.literal_fits(spec.type, keyword.value):
                ok = False  # reported by the checker (T406)
                continue
            value = keyword.value.value if isinstance(keyword.value, ir.Literal) else self.of(keyword.value)
            if value is None or isinstance(value, ir.Combination):
                ok = False
                continue
            problem = spec.problem(value)
            if problem:
                self.sink.emit("T406", f"`{keyword.name}` {problem}, got {show_number(value)}", keyword.value.span,
                               help=spec.description)
                ok = False
                continue
            if value is False:  # a flag's default: `svd(x, embed=false)` is `svd(x)`
                continue
            options[keyword.name] = int(value) if spec.type == "int" else value
        for spec in function.keywords:
            if spec.name not in options and spec.default is not None:
                options[spec.name] = spec.default
        return tuple(sorted(options.items())) if ok else None




def invariant_violations(comb: ir.Combination, dense_sources: frozenset[str] = frozenset()) -> list[str]:
    """What is wrong with a combination claimed canonical (empty when nothing is).

    The invariants every later stage relies on: distinct leaves, in `leaf_text` order,
    finite non-zero coefficients, a kind that its terms allow (dense only if a dense
    term is present: a dense function or a full fine-tune in `dense_sources`), and function leaves whose arguments are canonical in turn. Tests
    run it after canonicalisation on generated expressions.
    """
    problems = []
    leaves = [term.leaf for term in comb.terms]
    if len(set(leaves)) != len(leaves):
        problems.append("a leaf appears twice")
    texts = [ir.leaf_text(leaf) for leaf in leaves]
    if texts != sorted(texts):
        problems.append("terms are not in leaf order")
    problems += [f"`{t}` has weight {term.coef}" for t, term in zip(texts, comb.terms)
                 if term.coef == 0 or not math.isfinite(term.coef)]
    leaf_kinds = {term.leaf.kind if isinstance(term.leaf, ir.OpLeaf)
                  else Kind.DENSE if term.leaf.name in dense_sources else None for term in comb.terms}
    if comb.kind is Kind.DENSE and comb.terms and Kind.DENSE not in leaf_kinds:
        problems.append("dense without a dense term")
    if comb.kind is not Kind.DENSE and Kind.DENSE in leaf_kinds:
        problems.append(f"{comb.kind} with a dense term")
    for term in comb.terms:
        if isinstance(term.leaf, ir.OpLeaf):
            problems += [f"in `{ir.leaf_text(term.leaf)}`: {p}"
                         for p in invariant_violations(term.leaf.arg, dense_sources)]
    return problems
