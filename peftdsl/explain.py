"""`peftdsl explain`: the typed IR, canonical forms and, per output, what will be written."""

from __future__ import annotations

from peftdsl import ir
from peftdsl.check import Analysis


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
        form = analysis.canonical.get(comp.name)
        if form is not None:
            lines.append(f"    canonical  {ir.combination_text(form)}")
    plan_text = _plan(analysis)
    if plan_text:
        lines.extend(["", *plan_text])
    return "\n".join(lines)


def _plan(analysis: Analysis) -> list[str]:
    try:
        from peftdsl.lower import describe_plan
    except ImportError:  # pragma: no cover - lowering not built
        return []
    return describe_plan(analysis)
