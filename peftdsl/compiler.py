"""The front-end driver: recipe -> checked, canonical `Analysis`.

    load YAML with positions → parse expressions → build the IR → resolve names
    → read input metadata → infer kinds → canonicalise → check compositions

Each stage is a function that takes what the earlier ones returned and returns its
own result; user errors go to one sink, and the driver goes on while the IR it
needs exists, so a single run reports every error it can find. The `Analysis` it
returns is frozen: a sweep point is `analysis.at(params)`, a new object. Nothing
here imports torch: `lint` and `explain` are this and a renderer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from peftdsl import build, canonical, check, ir, tasks
from peftdsl.diagnostics import Sink
from peftdsl.inputs import AdapterInfo, BaseInfo
from peftdsl.numbers import show_point


@dataclass(frozen=True)
class Options:
    use_files: bool = True  # False: --no-inputs (declared kinds and ranks only)
    allow_pickle: bool = False
    overrides: tuple[tuple[str, float], ...] = ()  # --set p=v
    given: Mapping[str, AdapterInfo] = field(default_factory=dict)  # in-memory sources (the API)


@dataclass(frozen=True)
class Analysis:
    """What the front end knows about a recipe: every stage's result, at one set of params."""

    recipe: ir.Recipe
    adapters: Mapping[str, AdapterInfo]  # readable adapters, by name
    base: BaseInfo | None
    kinds: Mapping[str, ir.Kind | None]  # adapters and compositions; None: unknown (reported)
    canonical: Mapping[str, ir.Combination]
    params: Mapping[str, float]  # every param's value for these canonical forms
    overrides: Mapping[str, float] = field(default_factory=dict)  # `--set` values: they pin the sweep

    @property
    def task(self) -> str:
        """What kind of model the recipe's base and adapters are (peftdsl.tasks): it picks the
        class evaluation loads and the metrics it can compute."""
        return tasks.model_task((info.task_type for info in self.adapters.values()),
                                self.base.config if self.base else None)

    @property
    def task_known(self) -> bool:
        """Whether `task` comes from the inputs: an adapter's `task_type`, or the base's config
        once read. With `lint --no-inputs` (no base read) a silent recipe's task is unknown,
        and checks that depend on it wait for the inputs instead of assuming a causal LM."""
        return self.base is not None or tasks.declared_task(
            (info.task_type for info in self.adapters.values()), None) is not None

    def at(self, params: Mapping[str, float], sink: Sink | None = None) -> Analysis:
        """The same recipe with its forms canonicalised at `params` (a sweep point, say);
        what canonicalising there finds (a division by zero, a cancellation) goes to `sink`."""
        values = {**self.params, **params}
        forms = canonical.canonicalise(self.recipe, self.kinds, sink if sink is not None else Sink(), values)
        return dataclasses.replace(self, canonical=forms, params=values)


def analyse(path: Path, sink: Sink, options: Options = Options()) -> Analysis | None:
    """Run every front-end stage on one recipe file; None when it could not be built."""
    recipe = build.load_recipe(path, sink)
    if recipe is None:
        return None
    return analyse_recipe(recipe, sink, options)


def analyse_recipe(recipe: ir.Recipe, sink: Sink, options: Options = Options()) -> Analysis:
    check.resolve_names(recipe, sink)
    inputs = check.read_inputs(recipe, sink, use_files=options.use_files, allow_pickle=options.allow_pickle,
                               given=options.given)
    kinds = check.infer_kinds(recipe, inputs.adapters, sink)
    params = {p.name: p.value for p in recipe.params} | dict(options.overrides)
    forms = canonical.canonicalise(recipe, kinds, sink, params)
    analysis = Analysis(recipe, inputs.adapters, inputs.base, kinds, forms, params, dict(options.overrides))
    check.check_compositions(analysis, sink, use_files=options.use_files)
    _check_sweep_points(analysis, sink)
    return analysis


def _check_sweep_points(analysis: Analysis, sink: Sink) -> None:
    """Canonicalise at every grid point so that, say, a division by a swept zero is found now,
    or a head that only an affine combination can set gets weights that do not sum to 1."""
    known = {(d.code, d.span.start if d.span else None) for d in sink.items}
    for point in sweep_points(analysis.recipe, analysis.overrides):
        scratch = Sink()
        at_point = analysis.at(point, scratch)
        if not scratch.errors:
            check.check_parts(at_point, scratch)
        for diag in scratch.errors:
            if (diag.code, diag.span.start if diag.span else None) not in known:
                known.add((diag.code, diag.span.start if diag.span else None))
                sink.emit(diag.code, f"{diag.message} (at sweep point {show_point(point)})", diag.span,
                          label=diag.label, labels=diag.labels, help=diag.help)


def sweep_points(recipe: ir.Recipe, overrides: Mapping[str, float] | None = None) -> list[dict[str, float]]:
    """The cartesian grid of the sweep, in order; a `--set` override pins a param to one value."""
    if recipe.sweep is None:
        return []
    points: list[dict[str, float]] = [{}]
    for name, values in recipe.sweep.grid:
        if overrides and name in overrides:
            values = (overrides[name],)
        points = [{**p, name: v} for p in points for v in values]
    return points
