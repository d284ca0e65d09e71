"""The front-end driver: recipe file -> checked, canonical `Analysis`.

    load YAML with positions → parse expressions → build the IR → resolve names
    → read input metadata → infer kinds → canonicalise → check compositions

Each stage appends to one sink and the driver goes on while the IR it needs
exists, so a single run reports every error it can find. Nothing here imports
torch: `lint` and `explain` are this and a renderer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peftdsl import build, canonical, check
from peftdsl.check import Analysis
from peftdsl.diagnostics import Sink


@dataclass(frozen=True)
class Options:
    use_files: bool = True  # False: --no-inputs (declared kinds and ranks only)
    allow_pickle: bool = False
    overrides: tuple[tuple[str, float], ...] = ()  # --set p=v


def analyse(path: Path, sink: Sink, options: Options = Options()) -> Analysis | None:
    """Run every front-end stage on one recipe file; None when it could not be built."""
    recipe = build.load_recipe(path, sink)
    if recipe is None:
        return None
    return analyse_recipe(recipe, sink, options)


def analyse_recipe(recipe, sink: Sink, options: Options = Options()) -> Analysis:
    analysis = Analysis(recipe)
    check.resolve_names(recipe, sink)
    check.read_inputs(analysis, sink, use_files=options.use_files, allow_pickle=options.allow_pickle)
    check.infer_kinds(analysis, sink)
    params = dict(options.overrides)
    canonical.canonicalise(analysis, sink, params)
    _check_sweep_points(analysis, sink, params)
    check.check_compositions(analysis, sink, use_files=options.use_files)
    return analysis


def _check_sweep_points(analysis: Analysis, sink: Sink, params: dict[str, float]) -> None:
    """Canonicalise at every grid point so that, say, a division by a swept zero is found now."""
    for point in sweep_points(analysis.recipe, params):
        scratch = Sink()
        saved = analysis.canonical
        canonical.canonicalise(analysis, scratch, {**params, **point})
        analysis.canonical = saved
        shown = ", ".join(f"{k}={v:g}" for k, v in point.items())
        known = {(d.code, d.span.start if d.span else None) for d in sink.items}
        for diag in scratch.errors:
            if (diag.code, diag.span.start if diag.span else None) not in known:
                sink.emit(diag.code, f"{diag.message} (at sweep point {shown})", diag.span,
                          label=diag.label, labels=diag.labels, help=diag.help)


def sweep_points(recipe, pinned: dict[str, float] | None = None) -> list[dict[str, float]]:
    """The cartesian grid of the sweep, in order; `--set` pins a param to one value."""
    if recipe.sweep is None:
        return []
    points: list[dict[str, float]] = [{}]
    for name, values in recipe.sweep.grid:
        if pinned and name in pinned:
            values = (pinned[name],)
        points = [{**p, name: v} for p in points for v in values]
    return points
