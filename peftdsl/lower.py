"""Stage 7: lower canonical forms to a plan of batched groups.

A *task* computes one composition for every module it touches. Its modules are
partitioned into *groups*: modules with the same shape, layout and pattern of
contributing adapters (which adapters target the module, at which rank), so that a
whole group — e.g. the 32 `q_proj` of a 7B model — runs as one stacked
`torch.linalg` call. Every task keeps the recipe spans it came from, so a failure
at run time still points into the recipe. No torch here: `explain` prints plans.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from peftdsl import ir
from peftdsl.check import op_leaves
from peftdsl.errors import UsageError
from peftdsl.inputs import ModuleInfo
from peftdsl.ir import adapter_leaves  # noqa: F401 — re-exported: the plan's callers read leaves here
from peftdsl.numbers import show_bytes, show_flops
from peftdsl.operators import OPERATORS, RankContext
from peftdsl.parts import PartPlan, plan_parts
from peftdsl.spans import Span

if TYPE_CHECKING:
    from peftdsl.compiler import Analysis

Kind = ir.Kind


@dataclass(frozen=True, slots=True)
class Group:
    """Modules computed together: one shape, one layout, one pattern of contributors."""

    modules: tuple[str, ...]
    out_features: int
    in_features: int
    layout: str
    feedforward: bool
    ranks: tuple[tuple[str, int], ...]  # (adapter, rank on these modules) for adapters present

    @property
    def adapters(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.ranks)


@dataclass(frozen=True, slots=True)
class Task:
    name: str
    form: ir.Combination
    groups: tuple[Group, ...]
    spans: tuple[Span, ...]
    parts: tuple[PartPlan, ...] = ()  # the tensors beside the factors it sets (peftdsl.parts)

    @property
    def kind(self) -> Kind:
        return self.form.kind

    @property
    def modules(self) -> int:
        return sum(len(g.modules) for g in self.groups)


def lower(analysis: Analysis, name: str) -> Task:
    """The task computing composition (or adapter) `name`, its modules grouped."""
    form = analysis.canonical[name]
    leaves = adapter_leaves(form)
    by_signature: dict[tuple, list[str]] = defaultdict(list)
    shapes: dict[str, ModuleInfo] = {}
    for leaf in leaves:
        for module in analysis.adapters[leaf].modules.values():
            shapes.setdefault(module.name, module)
    for module_name in sorted(shapes):
        module = shapes[module_name]
        present = tuple(
            (leaf, analysis.adapters[leaf].modules[module_name].rank)
            for leaf in leaves if module_name in analysis.adapters[leaf].modules
        )
        signature = (module.out_features, module.in_features, module.layout, module.feedforward, present)
        by_signature[signature].append(module_name)
    groups = tuple(
        Group(tuple(mods), out, inn, layout, ff, present)
        for (out, inn, layout, ff, present), mods in sorted(by_signature.items(), key=lambda kv: kv[1][0])
    )
    spans = tuple({id(s): s for s in _spans(analysis, name, form)}.values())
    plans, problems = plan_parts(form, analysis.adapters, analysis.base)
    if problems:  # `check` reports these as T414 for the recipe's own params; other params reach here
        raise UsageError(f"`{name}`: {problems[0].message}; {problems[0].help}")
    return Task(name=name, form=form, groups=groups, spans=spans, parts=tuple(plans))


def _spans(analysis: Analysis, name: str, form: ir.Combination) -> list[Span]:
    comp = analysis.recipe.composition(name)
    spans = [comp.span] if comp else [analysis.recipe.adapter(name).span]
    spans.extend(leaf.span for leaf in op_leaves(form))
    return spans


# ---------------------------------------------------------------- ranks


def group_rank(comb: ir.Combination, group: Group) -> int | None:
    """Rank of a LoRA-valued combination on a group's modules (None: dense); operators
    answer by their registry row's rank rule."""
    ranks = dict(group.ranks)
    total = 0
    for term in comb.terms:
        leaf = term.leaf
        if isinstance(leaf, ir.AdapterLeaf):
            if ranks.get(leaf.name) == 0:  # a full fine-tune's dense task vector
                return None
            total += ranks.get(leaf.name, 0)
            continue
        context = RankContext(options=dict(leaf.options), inner=group_rank(leaf.arg, group),
                              adapter_ranks=tuple(ranks[n] for n in adapter_leaves(leaf.arg) if n in ranks),
                              out_features=group.out_features, in_features=group.in_features)
        rank = OPERATORS[leaf.func].rank(context)
        if rank is None:
            return None
        total += rank
    return total


# ---------------------------------------------------------------- costs
#
# The one memory model: the executor cuts groups into chunks with `working_bytes`,
# `explain` prints `estimate`, and the resource guard of `run` adds up `planned_peak`.

DEFAULT_CHUNK_BYTES = 512 * 1024 * 1024  # the executor's working budget for one chunk


def _is_dense(task: Task) -> bool:
    return task.kind is Kind.DENSE or any(
        isinstance(leaf, ir.OpLeaf) and leaf.kind is Kind.DENSE for leaf in _all_leaves(task.form))


def _all_leaves(comb: ir.Combination):
    for term in comb.terms:
        yield term.leaf
        if isinstance(term.leaf, ir.OpLeaf):
            yield from _all_leaves(term.leaf.arg)


def _materialises(task: Task, group: Group) -> bool:
    """Whether computing `group` holds dense d_out×d_in matrices: a dense operator (ties, dare,
    magnitude_prune…) anywhere in the form, a dense result, or a full fine-tune's task vector
    (rank 0) among the contributors — even under an `svd` that turns the result into factors."""
    return _is_dense(task) or any(r == 0 for _, r in group.ranks)


def working_bytes(task: Task, group: Group) -> int:
    """Bytes of float32 working memory one module of `group` needs while `task` computes it:
    its inputs and intermediates, with a dense delta per term once anything is dense."""
    out, inn = group.out_features, group.in_features
    if task.kind is Kind.IA3:
        return 2 * sum(out or inn for _ in group.ranks) * 4 + 1
    if _materialises(task, group):
        # Measured (ru_maxrss, 6000×6000, CPU): svd(ties(2 terms)) holds 15 such matrices,
        # 3 terms 18, svd(dare_linear(2 terms)) 7: three per term (the task tensor, its
        # magnitudes, the pruned copy) and nine for the rest (masks, sign vote, a float64 svd).
        return out * inn * 4 * (3 * len(group.ranks) + 9)
    return 4 * sum(r * (out + inn) for _, r in group.ranks) * 4 + 1


def modules_per_chunk(per_module: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """How many modules of `per_module` working bytes the executor computes at once: as many as
    fit its budget, and never fewer than one — a module larger than the budget is computed whole."""
    return max(1, chunk_bytes // max(per_module, 1))


def chunk_peak(task: Task, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """The working bytes of `task`'s largest chunk, as the executor cuts its groups."""
    peak = 0
    for group in task.groups:
        per_module = working_bytes(task, group)
        peak = max(peak, min(len(group.modules), modules_per_chunk(per_module, chunk_bytes)) * per_module)
    return peak


@dataclass(frozen=True, slots=True)
class Estimate:
    bytes_read: int
    bytes_written: int
    flops: int
    peak_bytes: int  # the largest group's working memory (before cutting it into chunks)
    ranks: tuple[int, ...]  # distinct output ranks (lora) — empty for dense/ia3


def estimate(analysis: Analysis, task: Task, out_bytes: int = 4) -> Estimate:
    read = written = flops = peak = 0
    ranks: set[int] = set()
    for group in task.groups:
        g, out, inn = len(group.modules), group.out_features, group.in_features
        read += sum(r * (out + inn) if r else (out or inn) for _, r in group.ranks) * 4 * g
        peak = max(peak, working_bytes(task, group) * g)
        if task.kind is Kind.IA3:
            written += (out or inn) * out_bytes * g
            continue
        rank = group_rank(task.form, group)
        big_r = sum(r for _, r in group.ranks)
        dense_flops = g * ((len(group.ranks) + 2) * out * inn * big_r * 2 + 4 * out * inn * min(out, inn))
        if rank is None:  # dense
            written += out * inn * out_bytes * g
            flops += dense_flops
        else:
            ranks.add(rank)
            written += rank * (out + inn) * out_bytes * g
            flops += dense_flops if _materialises(task, group) else g * (4 * (out + inn) * big_r * big_r
                                                                          + 10 * big_r**3)
    return Estimate(read, written, flops, peak, tuple(sorted(ranks)))


def planned_peak(analysis: Analysis, *, streamed: Iterable[str], held: Iterable[str],
                 with_base: bool, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> tuple[int, str]:
    """Peak bytes a run needs, and the composition that needs them (docs/recipes.md).

    The executor holds one chunk at a time: at most its budget, or one whole module when a
    module alone needs more (a dense d_out×d_in intermediate cannot be cut). A `streamed` task (a LoRA
    adapter output, written a chunk at a time) holds nothing more; a `held` one (merged and
    (IA)³ outputs, evaluated models) also holds its float32 results; evaluation holds the base.
    """
    streamed, held = list(streamed), list(held)
    base_bytes = 0
    if with_base and analysis.base is not None:
        base_bytes = sum(t.offsets[1] - t.offsets[0] for t in analysis.base.weights.values())
    peak, worst = 0, ""
    for name in dict.fromkeys([*streamed, *held]):
        task = lower(analysis, name)
        est = estimate(analysis, task)
        need = chunk_peak(task, chunk_bytes) + (est.bytes_written if name in held else 0)
        if need > peak:
            peak, worst = need, name
    return peak + base_bytes, worst


def describe_plan(analysis: Analysis) -> list[str]:
    """The plan section of `peftdsl explain`."""
    names = [o.name for o in analysis.recipe.outputs] + [
        m for e in analysis.recipe.evals for m in e.models if m != "base"]
    names = [n for n in dict.fromkeys(names) if n in analysis.canonical]
    if not names or not all(leaf in analysis.adapters for n in names for leaf in adapter_leaves(analysis.canonical[n])):
        return ["plan: needs the adapters' files (not available with --no-inputs)"] if names else []
    lines = ["plan"]
    for name in names:
        task = lower(analysis, name)
        est = estimate(analysis, task)
        rank_text = "dense" if task.kind is Kind.DENSE else (
            "(IA)³" if task.kind is Kind.IA3 else "rank " + "/".join(map(str, est.ranks)))
        lines.append(f"  {name}: {task.kind}, {task.modules} modules in {len(task.groups)} groups, {rank_text}")
        lines.append(f"    read {show_bytes(est.bytes_read)}, write {show_bytes(est.bytes_written)}, "
                     f"~{show_flops(est.flops)}, peak ~{show_bytes(est.peak_bytes)}")
        for group in task.groups:
            rank = group_rank(task.form, group) if task.kind is not Kind.IA3 else None
            shape = f"{group.out_features}×{group.in_features}" if task.kind is not Kind.IA3 else (
                f"l[{group.in_features or group.out_features}]")
            contributors = ", ".join(f"{n}(r={r})" if r else n for n, r in group.ranks)
            result = "" if task.kind is Kind.IA3 else (" -> dense" if rank is None else f" -> r={rank}")
            lines.append(f"    group ×{len(group.modules):<3} {shape:<12} {group.layout:<9} {contributors}{result}"
                         f"  e.g. {group.modules[0]}")
    return lines
