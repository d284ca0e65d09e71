"""Stage 5: resolve names, read input metadata, and type-check, before any weight is read.

Every check appends to the sink and goes on, so one lint run reports every error.
Kinds follow docs/recipes.md: `scalar`, `lora`, `ia3`, `dense`; `None` means "unknown"
(an input that could not be read), which unifies with anything so that one bad
input does not cascade into a screenful of errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from peftdsl import experts, ir, tasks
from peftdsl.diagnostics import Label, Severity, Sink
from peftdsl.inputs import (
    AdapterInfo,
    BaseInfo,
    InputError,
    locate_adapter,
    path_kind,
    read_source,
    read_base,
)
from peftdsl.ir import adapter_leaves
from peftdsl.operators import OPERATORS
from peftdsl.parts import DELTA, drops_full_parts, extracts_embeddings, omitted_tensors, plan_parts
from peftdsl.spans import Span

if TYPE_CHECKING:
    from peftdsl.compiler import Analysis

Kind = ir.Kind
_ARTICLE = {Kind.LORA: "a LoRA adapter", Kind.IA3: "an (IA)³ adapter", Kind.DENSE: "a dense delta",
            Kind.SCALAR: "a number"}


def describe(kind: Kind | None) -> str:
    return _ARTICLE.get(kind, "of unknown kind")


# ---------------------------------------------------------------- names


def resolve_names(recipe: ir.Recipe, sink: Sink) -> None:
    """Every name is defined before use; outputs, evals and sweeps name things that exist."""
    # Errors from building (a composition that did not parse, a rejected name) may hide uses.
    built_cleanly = not sink.has_errors()
    sources = {a.name for a in recipe.adapters} | {p.name for p in recipe.params}
    later = {c.name: c for c in recipe.compose}
    available: set[str] = set()
    used: set[str] = set()
    for comp in recipe.compose:
        later.pop(comp.name, None)
        for node in ir.walk(comp.expr):
            if isinstance(node, ir.Call):
                _check_function_name(node, sink)
            elif isinstance(node, ir.Name):
                used.add(node.id)
                _check_name(node, comp, sources | available, later, sink)
        available.add(comp.name)
    defined = sources | available
    for out in recipe.outputs:
        used.add(out.name)
        if out.name not in available and out.name not in {a.name for a in recipe.adapters}:
            _unknown(sink, "N206", f"output `{out.name}` names no composition", out.name_span,
                     out.name, available, "outputs are keyed by the name of a composition")
    for target in recipe.evals:
        for model, span in zip(target.models, target.model_spans):
            used.add(model)
            if model != "base" and model not in defined - {p.name for p in recipe.params}:
                _unknown(sink, "N209", f"eval `{target.name}` names unknown model `{model}`", span, model,
                         available | {a.name for a in recipe.adapters} | {"base"},
                         "models are `base`, adapters or compositions")
    _check_eval_names(recipe, sink)
    check_output_paths(recipe, sink)
    _check_sweep(recipe, sink, used)
    _check_search(recipe, sink, used)
    for item in (*recipe.adapters, *recipe.params):
        if item.name not in used and built_cleanly:
            what = "adapter" if isinstance(item, ir.Adapter) else "param"
            sink.emit("N208", f"{what} `{item.name}` is never used", item.name_span,
                      help="remove it, or use it in a composition")


def _check_eval_names(recipe: ir.Recipe, sink: Sink) -> None:
    first: dict[str, ir.EvalTarget] = {}
    for target in recipe.evals:
        if target.name in first:
            sink.emit("N211", f"eval `{target.name}` is defined twice", target.span,
                      labels=(Label(first[target.name].span, "first defined here"),),
                      help="give every eval entry its own name")
        first.setdefault(target.name, target)


def _inside(path: Path, folder: Path) -> bool:
    return path != folder and path.is_relative_to(folder)


def check_output_paths(recipe: ir.Recipe, sink: Sink) -> None:
    """No output may replace, hold or sit inside what the recipe reads, or another output."""
    inputs = [(f"adapter `{a.name}`", a.path) for a in recipe.adapters if a.path is not None]
    inputs += [("the base model", recipe.base_path)] if recipe.base_path is not None else []
    inputs += [(f"the data of eval `{e.name}`", e.data) for e in recipe.evals if e.data is not None]
    inputs += [(f"the tasks of eval `{e.name}`", Path(folder)) for e in recipe.evals
               if (folder := dict(e.options).get("include_path")) is not None]
    folder = recipe.path.resolve().parent
    written: dict[Path, str] = {}
    for out in recipe.outputs:
        path = out.path
        clash = next((what for what, p in inputs if path == p or _inside(p, path) or _inside(path, p)), None)
        if path == folder or _inside(folder, path):
            clash = "the recipe's folder"
        if clash is None:  # the same path, or one output inside another (`o` and `o/inner`)
            other = next((name for p, name in written.items() if p == path or _inside(p, path) or _inside(path, p)),
                         None)
            clash = f"output `{other}`" if other is not None else None
        if clash is not None:
            sink.emit("N210", f"output `{out.name}` would overwrite {clash}", out.span,
                      help="write each output to a path of its own, outside every input")
        written.setdefault(path, out.name)


def _check_function_name(node: ir.Call, sink: Sink) -> None:
    if node.func not in OPERATORS:
        _unknown(sink, "N207", f"unknown function `{node.func}`", node.func_span, node.func, OPERATORS,
                 "functions: " + ", ".join(OPERATORS))


def _check_name(node: ir.Name, comp: ir.Composition, defined: set[str], later: dict, sink: Sink) -> None:
    if node.id in defined:
        return
    if node.id == comp.name:
        sink.emit("N203", f"composition `{comp.name}` uses itself", node.span,
                  help="a composition can use adapters, params and compositions defined above it")
    elif node.id in later:
        sink.emit("N202", f"`{node.id}` is used before it is defined", node.span,
                  labels=(Label(later[node.id].name_span, "defined here, later"),),
                  help="compositions are evaluated in order: move this one below it")
    elif node.id == "base":
        sink.emit("N201", "`base` is the base model, not an adapter", node.span,
                  help="the base model is what every delta is added to; it has no delta of its own")
    elif node.id in OPERATORS:
        sink.emit("N201", f"`{node.id}` is a function", node.span, help=f"call it: `{node.id}(x, …)`")
    else:
        _unknown(sink, "N201", f"undefined name `{node.id}`", node.span, node.id, defined,
                 "names are defined under adapters, params or compose")


def _unknown(sink: Sink, code: str, message: str, span: Span, name: str, known, fallback: str) -> None:
    guess = difflib.get_close_matches(name, sorted(known), n=1)
    sink.emit(code, message, span, help=f"did you mean `{guess[0]}`?" if guess else fallback)


def _check_sweep(recipe: ir.Recipe, sink: Sink, used: set[str]) -> None:
    sweep = recipe.sweep
    if sweep is None:
        return
    params = {p.name for p in recipe.params}
    for (name, _), span in zip(sweep.grid, sweep.param_spans):
        used.add(name)
        if name not in params:
            guess = difflib.get_close_matches(name, sorted(params), n=1)
            sink.emit("E502", f"sweep over `{name}`, which is not a param", span,
                      help=f"did you mean `{guess[0]}`?" if guess else "declare it under `params:`")
    if not sweep.grid:
        sink.emit("E502", "sweep has no params to vary", sweep.span, help="add `param: [values…]`")
    select = sweep.select
    if select is None:
        return
    target = next((e for e in recipe.evals if e.name == select.eval), None)
    if target is None:
        sink.emit("E502", f"`select` names unknown eval `{select.eval}`", select.span,
                  help="choose one of: " + (", ".join(e.name for e in recipe.evals) or "(no evals defined)"))
    elif select.model not in target.models:
        sink.emit("E502", f"`select` names model `{select.model}`, which eval `{select.eval}` does not evaluate",
                  select.span, help="models of that eval: " + ", ".join(target.models))
    elif target.metric == "generate":
        sink.emit("E502", f"`select` needs a number to compare, but eval `{select.eval}` generates text",
                  select.span, help="select on a perplexity or accuracy eval")


def _check_search(recipe: ir.Recipe, sink: Sink, used: set[str]) -> None:
    search = recipe.search
    if search is None:
        return
    if recipe.sweep is not None:
        sink.emit("E503", "a recipe has either `sweep` or `search`, not both", search.span,
                  labels=(Label(recipe.sweep.span, "the sweep"),),
                  help="a grid and a search both choose params: keep one of them")
    params = {p.name: p for p in recipe.params}
    for (name, lower, upper), span, bounds in zip(search.bounds, search.param_spans, search.bound_spans):
        used.add(name)
        if name not in params:
            guess = difflib.get_close_matches(name, sorted(params), n=1)
            sink.emit("E503", f"search over `{name}`, which is not a param", span,
                      help=f"did you mean `{guess[0]}`?" if guess else
                      "declare it under `params:`; its value there is where the search starts")
        elif lower >= upper:
            what = "empty" if lower == upper else "reversed"
            sink.emit("E503", f"the bounds of `{name}` are {what}: [{lower:g}, {upper:g}]", bounds,
                      help="write them as [lower, upper] with lower < upper")
        elif not lower <= params[name].value <= upper:
            sink.emit("E503", f"`{name}` starts at {params[name].value:g}, outside its bounds "
                      f"[{lower:g}, {upper:g}]", bounds, labels=(Label(params[name].span, "the start"),),
                      help="the search starts from the param's value: widen the bounds or move the start")
    if not search.bounds:
        sink.emit("E503", "search has no params to vary", search.span, help="add `params: {w: [lower, upper]}`")
    _check_objective(recipe, search.objective, sink)
    _check_search_extra(search, sink)


def _check_objective(recipe: ir.Recipe, objective: ir.Select, sink: Sink) -> None:
    target = next((e for e in recipe.evals if e.name == objective.eval), None)
    if target is None:
        guess = difflib.get_close_matches(objective.eval, [e.name for e in recipe.evals], n=1)
        sink.emit("E503", f"`objective` names unknown eval `{objective.eval}`", objective.span,
                  help=f"did you mean `{guess[0]}`?" if guess else
                  "choose one of: " + (", ".join(e.name for e in recipe.evals) or "(no evals defined)"))
    elif objective.model not in target.models:
        sink.emit("E503", f"`objective` names model `{objective.model}`, which eval `{objective.eval}` does not "
                  "evaluate", objective.span, help="models of that eval: " + ", ".join(target.models))
    elif target.metric == "generate":
        sink.emit("E503", f"`objective` needs a number, but eval `{objective.eval}` generates text",
                  objective.span, help="optimise a perplexity or accuracy eval")


def _check_search_extra(search: ir.Search, sink: Sink) -> None:
    """The optimiser's library is importable (found without importing it: lint stays fast)."""
    needed = ["nevergrad"] + (["cma"] if search.optimizer == "cma" else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        sink.emit("E504", f"`optimizer: {search.optimizer}` needs {' and '.join(missing)}, which is not installed",
                  search.optimizer_span, help="pip install 'peftdsl[search]'")


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Inputs:
    """What the input files (or in-memory sources) say, read from metadata only."""

    adapters: Mapping[str, AdapterInfo]  # readable adapters, by recipe name
    base: BaseInfo | None


def read_inputs(recipe: ir.Recipe, sink: Sink, *, use_files: bool, allow_pickle: bool = False,
                given: Mapping[str, AdapterInfo | None] | None = None) -> Inputs:
    """Read adapters' and base's metadata; check declarations, base models and shapes.

    `given` holds sources passed in memory (the Python API): they stand for the recipe's
    adapter of the same name, whose path is then never looked at.
    """
    given = given or {}
    adapters: dict[str, AdapterInfo] = {}
    base = _read_base(recipe, sink) if use_files else None  # full fine-tunes are read against it
    for adapter in recipe.adapters:
        # An in-memory source stands for the file even when it was refused (None): never read both.
        info = (given[adapter.name] if adapter.name in given
                else _read_one(adapter, sink, use_files, allow_pickle, base))
        if info is not None:
            adapters[adapter.name] = info
            _check_declared(adapter, info, sink)
    _check_base_names(recipe, adapters, sink)
    adapters = _settle_layouts(adapters, base)
    adapters = experts.settle_experts(recipe, adapters, base, sink)
    _check_shapes(recipe, adapters, base, sink)
    _check_part_shapes(recipe, adapters, base, sink)
    _check_tied_embeddings(recipe, adapters, base, sink)
    return Inputs(adapters, base)


def _read_base(recipe: ir.Recipe, sink: Sink) -> BaseInfo | None:
    if recipe.base_path is not None:
        try:
            return read_base(recipe.base_path)
        except InputError as err:
            sink.emit(err.code, _as_written(err.message, recipe.base_path, recipe.base), recipe.base_span,
                      help=err.help or ("paths are relative to the recipe's folder" if err.code == "I301" else ""))
    elif recipe.base and recipe.base.startswith("hf:"):
        from peftdsl.inputs import resolve_hf

        try:
            return read_base(resolve_hf(recipe.base))
        except InputError as err:
            sink.emit(err.code, err.message, recipe.base_span, help=err.help)
    return None


def _read_one(adapter: ir.Adapter, sink: Sink, use_files: bool, allow_pickle: bool,
              base: BaseInfo | None) -> AdapterInfo | None:
    if not use_files:
        if adapter.kind is None:
            sink.emit("I308", f"adapter `{adapter.name}` declares no `kind`, so --no-inputs cannot check it",
                      adapter.name_span, help="declare `kind: lora` (and `rank:`) in the long form")
        return None
    try:
        return read_source(adapter.name, locate_adapter(adapter), allow_pickle=allow_pickle, base=base,
                           declared=adapter.kind)
    except InputError as err:
        message = _as_written(err.message, adapter.path, adapter.location)
        sink.emit(err.code, message, adapter.span, help=err.help)
        return None


def _as_written(message: str, path, location: str) -> str:
    """Show a resolved path the way the recipe wrote it (stable, and what the user recognises)."""
    return message.replace(str(path), location) if path is not None else message


def _check_declared(adapter: ir.Adapter, info: AdapterInfo, sink: Sink) -> None:
    if adapter.kind is not None and adapter.kind is not info.kind:
        sink.emit("I305", f"adapter `{adapter.name}` is declared `{adapter.kind}` but its files hold "
                  f"{describe(info.kind)}", adapter.name_span, help=f"declare `kind: {info.kind}`")
    if adapter.rank is not None and info.kind is Kind.LORA and adapter.rank != info.rank:
        sink.emit("I305", f"adapter `{adapter.name}` is declared rank {adapter.rank} but its config says "
                  f"r={info.rank}", adapter.name_span, help=f"declare `rank: {info.rank}`")


# transformers models whose projections are `Conv1D` (weights stored in×out).
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})


def _settle_layouts(adapters: Mapping[str, AdapterInfo], base: BaseInfo | None) -> dict[str, AdapterInfo]:
    """Take each module's layout from the base when there is one, as PEFT does at load time.

    PEFT decides `fan_in_fan_out` per module from its type (and rewrites the flag for
    `Conv1D`), so an adapter's config may say `false` for GPT-2's Conv1D modules. The
    base's weight shape tells which layout holds; for square weights its model type does.
    """
    if base is None or not base.weights:
        return dict(adapters)
    conv1d_model = base.config.get("model_type") in CONV1D_MODEL_TYPES
    return {name: info if info.kind is Kind.DENSE else _with_base_layouts(info, base, conv1d_model)
            for name, info in adapters.items()}  # a full fine-tune's layouts come from its own read


def _with_base_layouts(info: AdapterInfo, base: BaseInfo, conv1d_model: bool) -> AdapterInfo:
    """`info` with each module's layout as the base's weight decides (a new object when any changes)."""
    modules = {}
    for name, module in info.modules.items():
        weight = base.module_weight(name)
        if module.layout != "embedding" and weight is not None and len(weight.shape) == 2:
            linear, conv1d = _layout_fits(module, tuple(weight.shape))
            layout = "conv1d" if conv1d and (not linear or conv1d_model) else "linear"
            module = dataclasses.replace(module, layout=layout) if layout != module.layout else module
        modules[name] = module
    changed = any(modules[n] is not m for n, m in info.modules.items())
    return dataclasses.replace(info, modules=modules) if changed else info


def _layout_fits(module, shape: tuple[int, int]) -> tuple[bool, bool]:
    """Whether the base weight's shape fits the module as a Linear (out×in) and as a Conv1D (in×out).

    An (IA)³ vector knows one side only: its outputs (rows of a Linear weight, columns
    of a Conv1D one), or its inputs when it is feed-forward.
    """
    if module.rank == 0:  # (IA)³
        side = 1 if module.feedforward else 0
        size = module.in_features if module.feedforward else module.out_features
        return shape[side] == size, shape[1 - side] == size
    out_in = (module.out_features, module.in_features)
    return shape == out_in, shape == out_in[::-1]


def _check_base_names(recipe: ir.Recipe, adapters: Mapping[str, AdapterInfo], sink: Sink) -> None:
    """Differing or missing `base_model_name_or_path` is a warning: hub ids and paths name one model."""
    named = {n: i.base_model for n, i in adapters.items()}
    distinct = {v for v in named.values() if v}
    if len(distinct) > 1 or (distinct and None in named.values()):
        first = next(iter(adapters))
        for name, value in named.items():
            if value != named[first]:
                adapter = recipe.adapter(name)
                sink.emit("I306", f"adapter `{name}` was trained on `{value}`, adapter `{first}` on "
                          f"`{named[first]}`", adapter.name_span,
                          help="check that both fit the same base model; shapes are checked separately")


def _check_shapes(recipe: ir.Recipe, adapters: Mapping[str, AdapterInfo], base: BaseInfo | None,
                  sink: Sink) -> None:
    seen: dict[str, tuple[str, tuple[int, int], bool]] = {}
    for name, info in adapters.items():
        adapter = recipe.adapter(name)
        if info.kind is Kind.DENSE:  # a full fine-tune: read against the base, tensor by tensor
            continue
        for module in info.modules.values():
            shape = (module.out_features, module.in_features)
            if info.kind is Kind.LORA:  # (IA)³ vectors know one dimension only; the base check covers them
                if module.name in seen and seen[module.name][1] != shape:
                    other, other_shape, _ = seen[module.name]
                    sink.emit("I307", f"module `{module.name}` is {_shape(shape)} in `{name}` but "
                              f"{_shape(other_shape)} in `{other}`", adapter.span,
                              help="adapters must be trained on the same base model")
                    break
                seen.setdefault(module.name, (name, shape, module.feedforward))
            if base is not None and base.weights and module.expert is None and not _fits_base(base, module):
                sink.emit("I307", _base_mismatch(base, module, name), adapter.span,
                          help="the adapter was trained on another base model")
                break


def _check_part_shapes(recipe: ir.Recipe, adapters: Mapping[str, AdapterInfo], base: BaseInfo | None,
                       sink: Sink) -> None:
    """Saved modules, biases and token rows must fit the base and each other (I307)."""
    seen: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, info in adapters.items():
        for tensor, part in info.parts.items():
            problem = _part_mismatch(name, part, seen.get(tensor), base)
            if problem:
                sink.emit("I307", problem, recipe.adapter(name).span,
                          help="adapters must be trained on the same base model")
                break
            seen.setdefault(tensor, (name, _part_shape(part)))


def _part_shape(part) -> tuple[int, ...]:
    """The shape of the tensor a part sets, as far as the part knows it (token rows: the width)."""
    return (None, part.shape[1]) if part.role == "tokens" else part.shape


def _part_mismatch(name: str, part, other: tuple[str, tuple] | None, base: BaseInfo | None) -> str | None:
    shape = _part_shape(part)
    if other is not None and other[1] != shape:
        what = "rows of width" if part.role == "tokens" else "shape"
        return (f"`{part.tensor}` has {what} {_shape(s for s in shape if s)} in `{name}` but "
                f"{_shape(s for s in other[1] if s)} in `{other[0]}`")
    stored_name = base.stored_as(part.tensor) if base is not None and part.role != "tokens" else part.tensor
    stored = base.weights.get(stored_name) if base is not None and stored_name is not None else None
    if stored is None:
        return None
    if part.role == "tokens":
        if len(stored.shape) != 2 or stored.shape[1] != part.shape[1]:
            return (f"adapter `{name}` trains rows of `{part.tensor}` {part.shape[1]} wide, but the base's "
                    f"embedding is {_shape(stored.shape)}")
        if max(part.rows, default=-1) >= stored.shape[0]:
            return (f"adapter `{name}` trains row {max(part.rows)} of `{part.tensor}`, but the base's "
                    f"embedding has {stored.shape[0]} rows")
        return None
    if tuple(stored.shape) != tuple(part.shape):
        return f"`{part.tensor}` is {_shape(part.shape)} in `{name}` but {_shape(stored.shape)} in the base"
    return None


def _check_tied_embeddings(recipe: ir.Recipe, adapters: Mapping[str, AdapterInfo], base: BaseInfo | None,
                           sink: Sink) -> None:
    """A delta on a tied embedding acts on the output layer too, once merged or patched in:
    what `merge_and_unload` gives, but not what PEFT's unmerged forward computes."""
    if base is None or not base.config.get("tie_word_embeddings", True):
        return
    task = tasks.model_task((info.task_type for info in adapters.values()), base.config)
    if task not in (tasks.CAUSAL_LM, tasks.SEQ_2_SEQ_LM):  # a classifier has no output layer to share it
        return
    for name, info in adapters.items():
        tied = next((m for m in info.modules.values()
                     if m.layout == "embedding" or m.name.split(".")[-1] == "lm_head"), None)
        if tied is not None:
            sink.emit("I313", f"adapter `{name}` adapts `{tied.name}`, which the base ties to its output layer",
                      recipe.adapter(name).name_span,
                      help="merged outputs and evaluation apply its delta to the shared weight, as "
                      "`merge_and_unload` does; PEFT's unmerged forward applies it to the input side only")


def _fits_base(base: BaseInfo, module) -> bool:
    weight = base.module_weight(module.name)
    return weight is not None and len(weight.shape) == 2 and any(_layout_fits(module, tuple(weight.shape)))


def _base_mismatch(base: BaseInfo, module, adapter: str) -> str:
    weight = base.module_weight(module.name)
    if weight is None:
        return f"adapter `{adapter}` adapts `{module.name}`, which the base model does not have"
    return (f"module `{module.name}` is {_shape((module.out_features, module.in_features))} in `{adapter}` "
            f"but its base weight is {_shape(weight.shape)}")


def _shape(shape) -> str:
    return "×".join(map(str, shape))


# ---------------------------------------------------------------- kinds


def infer_kinds(recipe: ir.Recipe, adapters: Mapping[str, AdapterInfo], sink: Sink) -> dict[str, Kind | None]:
    """The kind of every adapter (read, else declared) and composition; reports what does not type."""
    kinds: dict[str, Kind | None] = {a.name: adapters[a.name].kind if a.name in adapters else a.kind
                                     for a in recipe.adapters}
    for comp in recipe.compose:
        kind = KindInference(recipe, kinds, sink).of(comp.expr)
        if kind is Kind.SCALAR:
            sink.emit("T412", f"composition `{comp.name}` is a number, not an adapter", comp.span,
                      help="put numbers under `params:`")
            kind = None
        kinds[comp.name] = kind
    return kinds


class KindInference:
    def __init__(self, recipe: ir.Recipe, kinds: Mapping[str, Kind | None], sink: Sink):
        self.kinds, self.sink = kinds, sink
        self.params = {p.name for p in recipe.params}

    def of(self, expr: ir.Expr) -> Kind | None:
        return getattr(self, f"_{type(expr).__name__.lower()}")(expr)

    def _number(self, expr: ir.Number) -> Kind:
        return Kind.SCALAR

    def _name(self, expr: ir.Name) -> Kind | None:
        if expr.id in self.params:
            return Kind.SCALAR
        return self.kinds.get(expr.id)

    def _neg(self, expr: ir.Neg) -> Kind | None:
        return self.of(expr.operand)

    def _binary(self, chain: ir.Binary) -> Kind | None:
        spine = ir.left_spine(chain)  # a loop, not a call per term: sums may have thousands
        kind = self.of(spine[-1].left)
        for expr in reversed(spine):
            kind = self._operator(expr, kind, self.of(expr.right))
        return kind

    def _operator(self, expr: ir.Binary, left: Kind | None, right: Kind | None) -> Kind | None:
        if left is None or right is None:  # already reported, or an unreadable input
            return None
        if expr.op in "+-":
            return self._add(expr, left, right)
        return self._scale(expr, left, right)

    def _add(self, expr: ir.Binary, left: Kind, right: Kind) -> Kind | None:
        if left is right:
            return left
        if {left, right} == {Kind.LORA, Kind.DENSE}:
            return Kind.DENSE
        verb = "add" if expr.op == "+" else "subtract"
        if Kind.SCALAR in (left, right):
            self.sink.emit("T402", f"cannot {verb} a number and an adapter", expr.span,
                           help="scale adapters instead: `0.5 * a + 0.5 * b`")
            return None
        self.sink.emit("T401", f"cannot {verb} `{left}` and `{right}` adapters", expr.right.span,
                       label=self._what(expr.right, right), labels=(Label(expr.left.span, self._what(expr.left, left)),),
                       help="compose each kind separately, or convert with svd(...) first"
                       if Kind.IA3 not in (left, right) else
                       "compose (IA)³ and LoRA adapters separately, and write each to its own output")
        return None

    def _scale(self, expr: ir.Binary, left: Kind, right: Kind) -> Kind | None:
        if expr.op == "*" and Kind.SCALAR in (left, right):
            return right if left is Kind.SCALAR else left
        if expr.op == "/" and right is Kind.SCALAR:
            return left
        if expr.op == "/":
            self.sink.emit("T402", "cannot divide by an adapter", expr.right.span,
                           label=self._what(expr.right, right), help="divide by a number: `a / 2`")
        else:
            self.sink.emit("T402", "cannot multiply two adapters", expr.span,
                           help="weight adapters by numbers: `0.5 * a`; products of adapters are not linear")
        return None

    def _what(self, expr: ir.Expr, kind: Kind) -> str:
        if isinstance(expr, ir.Name):
            return f"`{expr.id}` is {describe(kind)}"
        return f"this is {describe(kind)}"

    def _call(self, expr: ir.Call) -> Kind | None:
        function = OPERATORS.get(expr.func)
        kinds = [self.of(a) for a in expr.args]
        for keyword in expr.keywords:
            if not isinstance(keyword.value, ir.Literal):
                self._check_scalar_keyword(keyword)
        if function is None:
            return None
        if len(expr.args) != 1:
            self.sink.emit("T406", f"`{expr.func}` takes one expression, got {len(expr.args)}", expr.span,
                           help=f"write `{expr.func}(0.5 * a + 0.5 * b{', …' if function.keywords else ''})`")
            return function.returns
        self._check_keywords(expr, function)
        kind = kinds[0]
        if kind is not None and kind not in function.accepts:
            accepted = " or ".join(describe(k) for k in sorted(function.accepts, key=lambda k: k.value))
            self.sink.emit("T413", f"`{expr.func}` takes {accepted}, not {describe(kind)}", expr.args[0].span,
                           help=function.summary)
        return function.returns

    def _check_scalar_keyword(self, keyword: ir.Keyword) -> None:
        if self.of(keyword.value) not in (Kind.SCALAR, None):
            self.sink.emit("T406", f"argument `{keyword.name}` must be a number", keyword.value.span)

    def _check_keywords(self, expr: ir.Call, function) -> None:
        given, guessed = set(), set()
        for keyword in expr.keywords:
            spec = function.keyword(keyword.name)
            if spec is None:
                known = [k.name for k in function.keywords]
                guess = difflib.get_close_matches(keyword.name, known, n=1)
                guessed.update(guess)  # `rnak=` is one mistake, not also a missing `rank=`
                self.sink.emit("T406", f"`{expr.func}` has no argument `{keyword.name}`", keyword.span,
                               help=f"did you mean `{guess[0]}`?" if guess else
                               (f"its arguments: {', '.join(known)}" if known else f"`{expr.func}` takes none"))
            elif keyword.name in given:
                self.sink.emit("T406", f"argument `{keyword.name}` is given twice", keyword.span)
            elif not ir.literal_fits(spec.type, keyword.value):
                need = {"choice": "a quoted string", "bool": "`true` or `false`"}.get(spec.type, "a number")
                self.sink.emit("T406", f"argument `{keyword.name}` must be {need}", keyword.value.span,
                               help=f"one of {', '.join(repr(c) for c in spec.choices)}" if spec.choices else "")
            given.add(keyword.name)
        for spec in function.keywords:
            if spec.required and spec.name not in given and spec.name not in guessed:
                self.sink.emit("T406", f"`{expr.func}` needs `{spec.name}=`", expr.span,
                               help=f"`{spec.name}`: {spec.description}")
        for first, second in function.exclusive:
            if first in given and second in given:
                later = next(k for k in expr.keywords if k.name == second)
                self.sink.emit("T406", f"`{expr.func}` takes `{first}=` or `{second}=`, not both", later.span,
                               help="they are two rules for one choice of rank")


# ---------------------------------------------------------------- after canonicalisation


def op_leaves(comb: ir.Combination):
    """Every OpLeaf reachable from a combination, innermost first, each once."""
    seen: dict[ir.OpLeaf, None] = {}

    def visit(c: ir.Combination) -> None:
        for term in c.terms:
            if isinstance(term.leaf, ir.OpLeaf) and term.leaf not in seen:
                visit(term.leaf.arg)
                seen[term.leaf] = None

    visit(comb)
    return list(seen)


def check_compositions(analysis: Analysis, sink: Sink, *, use_files: bool = True) -> None:
    """Checks that need canonical forms: ranks for pem/peft_linear, (IA)³ flags, outputs."""
    leaves: dict[ir.OpLeaf, None] = {}
    for comb in analysis.canonical.values():
        leaves.update(dict.fromkeys(op_leaves(comb)))
    for leaf in leaves:
        _check_op(analysis, leaf, sink)
    for name, comb in analysis.canonical.items():
        if comb.kind is Kind.IA3:
            _check_feedforward(analysis, comb, sink)
    check_parts(analysis, sink)
    check_dropped(analysis, sink)
    check_embedding_extraction(analysis, sink)
    check_outputs(analysis, sink)
    _check_evals(analysis, sink, use_files)


def check_dropped(analysis: Analysis, sink: Sink) -> None:
    """`svd` of a full fine-tune keeps what LoRA factors can hold, its modules' weights: say
    which of its tensors are dropped (T415), once per `svd`, with `rest="save"` as the fix."""
    for leaf in op_leaves_of(analysis):
        if not drops_full_parts(leaf):
            continue
        dropped = omitted_tensors(analysis.adapters, leaf)
        if dropped:
            shown = ", ".join(f"`{t}`" for t in dropped[:3]) + (f" and {len(dropped) - 3} more" if len(dropped) > 3 else "")
            sink.emit("T415", f"`svd` extracts LoRA factors of module weights only: {len(dropped)} tensors of the "
                      f"full fine-tune are dropped ({shown})", leaf.span,
                      help='pass `rest="save"` to keep them whole (as modules_to_save); `run` says which share '
                      'of the norm they held')


def check_embedding_extraction(analysis: Analysis, sink: Sink) -> None:
    """`svd(…, embed=true)` gives embedding factors that peftdsl writes, merges and evaluates,
    but does not combine further: it must be a whole composition (T416)."""
    for name, comb in analysis.canonical.items():
        for leaf in op_leaves(comb):
            whole = len(comb.terms) == 1 and comb.terms[0].leaf == leaf and comb.terms[0].coef == 1.0
            if extracts_embeddings(leaf) and not whole:
                sink.emit("T416", f"`{name}` combines `svd(…, embed=true)` further: its embedding factors can "
                          "only be written, merged or evaluated as they are", leaf.span,
                          help="make the `svd` a composition of its own and use it whole; `embed=true` is "
                          "not needed for `svd` inside larger expressions")
                return


def op_leaves_of(analysis: Analysis) -> list[ir.OpLeaf]:
    leaves: dict[ir.OpLeaf, None] = {}
    for comb in analysis.canonical.values():
        leaves.update(dict.fromkeys(op_leaves(comb)))
    return list(leaves)


def check_parts(analysis: Analysis, sink: Sink) -> None:
    """Each composition must be able to set every saved module, bias and token row its terms
    carry (peftdsl.parts): T414 at the expression, before any weight is read."""
    reported: set[str] = set()
    for comp in analysis.recipe.compose:
        form = analysis.canonical.get(comp.name)
        if form is None or not all(leaf in analysis.adapters for leaf in adapter_leaves(form)):
            continue
        if ir.combination_text(form) in reported:  # `merged: mix` says nothing `mix` did not
            continue
        plans, problems = plan_parts(form, analysis.adapters, analysis.base)
        for problem in problems[:1]:  # one per composition: the others say the same
            reported.add(ir.combination_text(form))
            more = f" (and {len(problems) - 1} more tensors)" if len(problems) > 1 else ""
            sink.emit("T414", problem.message + more, comp.expr.span, help=problem.help)
    base = analysis.base
    for out in analysis.recipe.outputs:
        form = analysis.canonical.get(out.name)
        if not out.merge or base is None or not base.weights or form is None:
            continue
        plans, _ = plan_parts(form, analysis.adapters, base)
        unbiased = [p.tensor for p in plans if p.mode == DELTA and p.tensor not in base.weights]
        if unbiased:
            sink.emit("T414", f"output `{out.name}` cannot be merged: `{unbiased[0]}` gets a `lora_bias` delta, "
                      "but the base has no such bias", out.span,
                      help="write an adapter output instead (PEFT cannot merge it either)")


def _check_op(analysis: Analysis, leaf: ir.OpLeaf, sink: Sink) -> None:
    operator = OPERATORS[leaf.func]
    if operator.adapters_only:
        ops = [t for t in leaf.arg.terms if isinstance(t.leaf, ir.OpLeaf)]
        if ops:
            sink.emit("T413", f"`{leaf.func}` combines source adapters, not `{ir.leaf_text(ops[0].leaf)}`",
                      ops[0].span, help=f"`{leaf.func}` acts on the A and B factors of the adapters it is given")
            return
    if operator.equal_ranks:
        _check_equal_ranks(analysis, leaf, sink)
    if operator.note is not None and leaf.arg.kind in operator.accepts:  # not after a type error
        code, message, help = operator.note
        sink.emit_once(code, message, leaf.span, help=help)


def _check_equal_ranks(analysis: Analysis, leaf: ir.OpLeaf, sink: Sink) -> None:
    names = [t.leaf.name for t in leaf.arg.terms if isinstance(t.leaf, ir.AdapterLeaf)]
    infos = [analysis.adapters.get(n) for n in names]
    if all(infos):
        ranks: dict[str, dict[str, int]] = {}
        for name, info in zip(names, infos):
            for module in info.modules.values():
                ranks.setdefault(module.name, {})[name] = module.rank
        for module, by_adapter in sorted(ranks.items()):
            if len(set(by_adapter.values())) > 1:
                shown = ", ".join(f"`{n}` r={r}" for n, r in by_adapter.items())
                sink.emit("T404", f"`{leaf.func}` needs equal ranks, but module `{module}` has {shown}",
                          leaf.span, help="use the exact sum (no function), or svd(..., rank=N) first")
                return
        return
    declared = {n: analysis.recipe.adapter(n).rank for n in names}
    if len({r for r in declared.values() if r is not None}) > 1:
        shown = ", ".join(f"`{n}` rank {r}" for n, r in declared.items() if r is not None)
        sink.emit("T404", f"`{leaf.func}` needs equal ranks, but {shown}", leaf.span,
                  help="use the exact sum (no function), or svd(..., rank=N) first")


def _check_feedforward(analysis: Analysis, comb: ir.Combination, sink: Sink) -> None:
    flags: dict[str, tuple[str, bool]] = {}
    for term in comb.terms:
        info = analysis.adapters.get(getattr(term.leaf, "name", ""))
        if info is None:
            continue
        for module in info.modules.values():
            other = flags.setdefault(module.name, (info.name, module.feedforward))
            if other[1] != module.feedforward:
                sink.emit("T405", f"module `{module.name}` is feed-forward in `{other[0] if other[1] else info.name}` "
                          f"but not in `{info.name if other[1] else other[0]}`", comb.span,
                          help="(IA)³ adapters must agree on `feedforward_modules` to be composed")
                return


def check_outputs(analysis: Analysis, sink: Sink) -> None:
    recipe = analysis.recipe
    for out in recipe.outputs:
        comb = analysis.canonical.get(out.name)
        if comb is None:
            continue
        if comb.kind is Kind.DENSE and not out.merge:
            sink.emit("T403", f"`{out.name}` is a dense delta and cannot be written as an adapter", out.span,
                      help=f"write `svd({out.name}, rank=N)` as a composition, or set `merge: true`")
        if not adapter_leaves(comb):  # no term, or only functions of nothing (`pem(0 * a)`)
            sink.emit("T410", f"output `{out.name}` would be empty: its delta is zero", out.span,
                      severity=Severity.ERROR)
        if out.merge and recipe.base is None:
            sink.emit("Y005", f"output `{out.name}` has `merge: true` but the recipe names no `base`", out.span,
                      help="add `base: path/to/model`")


def _data_file(path: Path) -> bool:
    """Whether eval data is a regular file; a name no file can have (too long, a NUL) is not one."""
    try:
        return path_kind(path) == "file"
    except InputError:  # a folder on the way we may not read: the run says which
        return False


def context_length(config: Mapping) -> int | None:
    """How many positions the model has, as its config says (None: unbounded or unknown)."""
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = config.get(key) or (config.get("text_config") or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _mistyped_labels(labels: Mapping | None, task: str) -> bool:
    """True when `labels` maps to the wrong kind of value for the task (tasks.LABEL_VALUES)."""
    kind = tasks.LABEL_VALUES.get(task)
    return kind is not None and any(not isinstance(v, kind) for v in (labels or {}).values())


def _check_evals(analysis: Analysis, sink: Sink, use_files: bool) -> None:
    recipe = analysis.recipe
    task = analysis.task
    positions = context_length(analysis.base.config) if analysis.base is not None else None
    for target in recipe.evals:
        max_length = dict(target.options).get("max_length")
        if positions is not None and max_length is not None and max_length > positions:
            sink.emit("E501", f"eval `{target.name}` asks for max_length {max_length}, but the base model has "
                      f"{positions} positions: sequences are cut at {positions}", target.span,
                      severity=Severity.WARNING, help=f"set `max_length: {positions}` or less")
        if not analysis.task_known:  # `lint --no-inputs`: metric and labels are checked once the base is read
            continue
        if target.metric not in tasks.metrics(task):
            offered = ", ".join(f"`{m}`" for m in tasks.metrics(task)) or "none yet"
            sink.emit("E501", f"eval `{target.name}` asks for `{target.metric}`, which a {task} model has no "
                      "evaluation for", target.span, help=f"metrics for {task} models: {offered}")
        elif _mistyped_labels(dict(target.options).get("labels"), task):
            if tasks.LABEL_VALUES[task] is int:
                sink.emit("E501", f"eval `{target.name}` maps labels to text, but a {task} model predicts class "
                          "indices", target.span, help="map each data label to its class index: `labels: {neg: 0, "
                          "pos: 1}`, or leave `labels` out to use the config's `label2id`")
            else:
                sink.emit("E501", f"eval `{target.name}` maps labels to class indices, but a {task} model scores "
                          "each label's verbalizer, a text", target.span,
                          help="map each label to its text: `labels: {neg: \" negative\", pos: \" positive\"}`")
        elif task == tasks.SEQ_2_SEQ_LM and target.metric == "perplexity" and target.data is not None \
                and target.data.suffix == ".txt":
            sink.emit("E501", f"seq2seq perplexity scores a target given an input: eval `{target.name}` needs "
                      ".jsonl rows, not .txt", target.span, help="rows like {\"input\": …, \"target\": …}")
    dtypes = {dict(t.options).get("dtype") for t in recipe.evals} - {None}
    if len(dtypes) > 1:  # the base is loaded once per run, in one dtype
        sink.emit("E501", f"eval entries ask for different dtypes ({', '.join(sorted(dtypes))}), but the base "
                  "model is loaded once per run", recipe.evals[0].span, help="give them all the same `dtype`")
    for target in recipe.evals:
        has_data = target.metric != "lm_eval" and check_data_eval(target, sink)
        if has_data and use_files and target.data.suffix in (".txt", ".jsonl") and not _data_file(target.data):
            sink.emit("E501", f"eval `{target.name}` reads `{target.data.name}`, which does not exist",
                      target.span, help="data paths are relative to the recipe's folder")
        if recipe.base is None:
            sink.emit("E501", f"eval `{target.name}` needs a `base` model to run on", target.span,
                      help="add `base: path/to/model`")
        if target.metric == "lm_eval":
            check_lm_eval(target, sink, use_files)
        if not has_data:
            continue
        suffix = target.data.suffix
        if suffix not in (".txt", ".jsonl"):
            sink.emit("E501", f"eval `{target.name}` reads `{target.data.name}`; data is .txt or .jsonl",
                      target.span)
        elif target.metric in tasks.ROW_METRICS and suffix == ".txt":
            sink.emit("E501", f"metric `{target.metric}` reads rows from .jsonl, not .txt", target.span)


def check_data_eval(target: ir.EvalTarget, sink: Sink) -> bool:
    """An eval entry of a metric that reads `data` has it, and sets no `lm_eval` option; False
    when it has no data to check further."""
    from peftdsl.evaluation.lm_eval import OPTIONS

    options = dict(target.options)
    for option in (o for o in OPTIONS if o in options):
        sink.emit("E501", f"eval `{target.name}` sets `{option}`, which only metric `lm_eval` reads", target.span,
                  help=f"remove `{option}`, or use `metric: lm_eval`")
    if target.data is None:
        sink.emit("E501", f"eval `{target.name}` has no `data` for `{target.metric}`", target.span,
                  help="add `data:`, a .txt or .jsonl file relative to the recipe's folder")
        return False
    return True


def check_lm_eval(target: ir.EvalTarget, sink: Sink, use_files: bool) -> None:
    """`lm_eval` entries: tasks named, no `data`, the extra installed, the include_path a folder
    and `measure` a metric of each task whose YAML there lists its metrics. Task YAMLs are read
    as plain YAML: lint imports neither the harness nor torch."""
    from peftdsl.evaluation import lm_eval

    options = dict(target.options)
    names, measure, include = options.get("tasks") or [], options.get("measure"), options.get("include_path")
    if not names:
        sink.emit("E501", f"eval `{target.name}` uses `lm_eval` but names no `tasks`", target.span,
                  help="list lm-evaluation-harness tasks, e.g. `tasks: [hellaswag]`, or your own under `include_path`")
    if target.data is not None:
        sink.emit("E501", f"eval `{target.name}`: `lm_eval` reads each task's own data, not `data`", target.span,
                  help="remove `data`; a task YAML under `include_path` names its files (`dataset_kwargs: {data_files: …}`)")
    if not use_files:
        return
    if not lm_eval.installed():
        sink.emit("E501", f"eval `{target.name}` uses `lm_eval`, but lm-evaluation-harness is not installed",
                  target.span, help=f"install the extra: {lm_eval.INSTALL_HINT}")
    if include is None:
        return
    folder = Path(include)
    if not folder.is_dir():
        sink.emit("E501", f"eval `{target.name}`: include_path `{folder.name}` is not a folder", target.span,
                  help="include_path is a folder of task YAMLs, relative to the recipe's folder")
        return
    if measure is None:
        return
    known = lm_eval.task_metrics(folder) or {}
    for name in names:
        metrics = known.get(name)
        if metrics is not None and lm_eval.measure_name(measure) not in metrics:
            sink.emit("E501", f"eval `{target.name}` measures `{measure}`, which task `{name}` does not compute",
                      target.span, help=f"metrics of `{name}`: {', '.join(f'`{m}`' for m in metrics)}")
