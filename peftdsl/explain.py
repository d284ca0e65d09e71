"""`peftdsl explain`: the typed IR, canonical forms and, per output, what will be written."""

from __future__ import annotations

from typing import TYPE_CHECKING

from peftdsl import ir
from peftdsl.check import KindInference
from peftdsl.diagnostics import Sink
from peftdsl.lower import describe_plan

if TYPE_CHECKING:
    from peftdsl.compiler import Analysis


def explain(analysis: Analysis) -> str:
    recipe = analysis.recipe
    lines = [f"recipe {recipe.name} (format {recipe.version}, seed {recipe.seed})"]
    if recipe.base:
        lines.append(f"base   {recipe.base}")
    lines.append("")
    lines.append("sources")
    for adapter in recipe.adapters:
        info = analysis.adapters.get(adapter.name)
        kind = analysis.kinds.get(adapter.name)
        detail = f"{len(info.modules)} modules" if info else "declared"
        rank = info.rank if info else adapter.rank
        rank_text = f" r={rank}" if rank and kind is ir.Kind.LORA else ""
        lines.append(f"  {adapter.name:<12} {kind or '?'}{rank_text}  {detail}  {adapter.location}")
    for param in recipe.params:
        lines.append(f"  {param.name:<12} scalar = {param.value:g}")
    lines.append("")
    lines.append("compositions")
    for comp in recipe.compose:
        kind = analysis.kinds.get(comp.name)
        lines.append(f"  {comp.name} : {kind or '?'}")
        lines.append(f"    expr       {ir.to_source(comp.expr)}")
        lines.extend(f"      {line}" for line in typed_tree(analysis, comp.expr))
        form = analysis.canonical.get(comp.name)
        if form is not None:
            lines.append(f"    canonical  {ir.combination_text(form)}")
    plan_text = describe_plan(analysis)
    if plan_text:
        lines.extend(["", *plan_text])
    return "\n".join(lines)


def typed_tree(analysis: Analysis, expr: ir.Expr) -> list[str]:
    """The expression as a tree, each node with its kind: the typed IR.

    A chain of one precedence level (`a + b - c`) is one node whose operands follow it
    with their operators, so a sum of thousands of terms prints one line per term, not
    a staircase; the walk is a loop for the same reason.
    """
    kinds = KindInference(analysis.recipe, analysis.kinds, Sink())
    lines: list[str] = []
    stack = [(expr, "", "", True, True)]
    while stack:
        node, operator, prefix, last, root = stack.pop()
        branch = "" if root else ("└─ " if last else "├─ ")
        lines.append(f"{prefix}{branch}{operator}{_label(node)} : {kinds.of(node) or '?'}")
        children = _children(node)
        inner = prefix if root else prefix + ("   " if last else "│  ")
        for i, (child, op) in reversed(list(enumerate(children))):
            stack.append((child, op, inner, i == len(children) - 1, False))
    return lines


_LEVEL = {"+": "sum", "-": "sum", "*": "product", "/": "product"}


def _label(node: ir.Expr) -> str:
    if isinstance(node, ir.Binary):
        return _LEVEL[node.op]
    if isinstance(node, ir.Neg):
        return "neg"
    if isinstance(node, ir.Call):
        options = ", ".join(f"{k.name}={ir.to_source(k.value)}" for k in node.keywords)
        return f"{node.func}({options})" if options else node.func
    return ir.to_source(node)


def _children(node: ir.Expr) -> list[tuple[ir.Expr, str]]:
    """A node's operands, each with the operator written before it (`- b` in `a - b`)."""
    if isinstance(node, ir.Binary):
        chain = [node]  # the left operands of the same precedence level
        while isinstance(chain[-1].left, ir.Binary) and _LEVEL[chain[-1].left.op] == _LEVEL[node.op]:
            chain.append(chain[-1].left)
        return [(chain[-1].left, ""), *((n.right, f"{n.op} ") for n in reversed(chain))]
    if isinstance(node, ir.Neg):
        return [(node.operand, "")]
    if isinstance(node, ir.Call):
        return [(arg, "") for arg in node.args]
    return []
