"""Evaluation reports: report.json, report.md, plots of a sweep, a terminal table.

The JSON schema is docs/recipes.md's::

    {"recipe": "…", "results": [{"eval": …, "model": …, "metric": …,
      "value": …, "params": {…}}], "selected": {…} | null}

Rows keep the order they were produced in (recipe order within a grid point,
grid order across points), so a report diffs cleanly between runs and
:func:`select_best` can break ties by grid order. A non-finite value (an
overflowing perplexity) is written as ``null``: JSON has no infinity.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftdsl.numbers import show_point

if TYPE_CHECKING:
    from rich.console import Console

GOALS: tuple[str, ...] = ("max", "min")


@dataclass(frozen=True, slots=True, kw_only=True)
class Result:
    """One evaluated (eval, model, grid point): a row of report.json."""

    eval: str
    model: str
    metric: str
    value: float | list[str]
    params: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"eval": self.eval, "model": self.model, "metric": self.metric, "value": _json_value(self.value), "params": dict(self.params)}

    @property
    def numeric(self) -> bool:
        return isinstance(self.value, (int, float)) and not isinstance(self.value, bool)


def _json_value(value: float | list[str]) -> float | list[str] | None:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def report_json(recipe_name: str, results: Sequence[Result], selected: Mapping[str, Any] | None,
                search: Mapping[str, Any] | None = None) -> str:
    """The text of report.json: fixed key order, indent 2, a final newline; a search adds
    `search: {candidates, best}` (peftdsl.evaluation.search.SearchOutcome.to_json)."""
    document = {
        "recipe": recipe_name,
        "results": [result.to_json() for result in results],
        "selected": dict(selected) if selected is not None else None,
    }
    if search is not None:
        document["search"] = dict(search)
    return json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def write_report(
    directory: str | Path,
    recipe_name: str,
    results: Sequence[Result],
    selected: Mapping[str, Any] | None = None,
    swept_params: Sequence[str] = (),
    search: Mapping[str, Any] | None = None,
    search_goal: str = "min",
) -> list[Path]:
    """Write report.json, report.md and, for a sweep, one PNG per (eval, swept param);
    for a search, a PNG of the objective against the step.

    Returns the paths written, in a stable order. Written as outputs are: in a temporary
    folder, then renamed into place, so a failure (a full disk) leaves the previous report whole.
    """
    from peftdsl.outputs.atomic import replaced_files

    directory = Path(directory)
    with replaced_files(directory) as staging:
        written = [staging / "report.json", staging / "report.md"]
        written[0].write_text(report_json(recipe_name, results, selected, search), encoding="utf-8")
        markdown = report_markdown(recipe_name, results, selected, swept_params)
        if search is not None:
            markdown += search_markdown(search)
        written[1].write_text(markdown, encoding="utf-8")
        if search is not None:
            written.append(plot_search(staging, search, search_goal))
        for eval_name in _unique(r.eval for r in results if r.numeric):
            for param in swept_params:
                written.append(plot_sweep(staging, [r for r in results if r.eval == eval_name], eval_name, param))
    return [directory / path.name for path in written]


# ------------------------------------------------------------------------ tables


def _unique(items) -> list:
    return list(dict.fromkeys(items))


def _format_value(value: float | list[str]) -> str:
    if isinstance(value, list):
        return f"{len(value)} texts"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.6g}"




def table_rows(results: Sequence[Result], swept_params: Sequence[str] = ()) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per (grid point, model), one column per eval.

    Without a sweep that is models as rows and evals as columns; with one, each
    swept param gets a leading column and every grid point its own rows.
    """
    evals = _unique(r.eval for r in results)
    metric = {r.eval: r.metric for r in results}
    keys = _unique((tuple(r.params.get(p) for p in swept_params), r.model) for r in results)
    cells = {(tuple(r.params.get(p) for p in swept_params), r.model, r.eval): r.value for r in results}
    header = [*swept_params, "model", *(f"{e} ({metric[e]})" for e in evals)]
    rows = []
    for point, model in keys:
        values = [_format_value(cells[point, model, e]) if (point, model, e) in cells else "" for e in evals]
        rows.append([*(f"{v:g}" if isinstance(v, float) else str(v) for v in point), model, *values])
    return header, rows


def report_markdown(
    recipe_name: str, results: Sequence[Result], selected: Mapping[str, Any] | None = None, swept_params: Sequence[str] = ()
) -> str:
    """report.md: the table, the selected point, then the generated texts in full."""
    header, rows = table_rows(results, swept_params)
    lines = [f"# peftdsl report: {recipe_name}", ""]
    lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
    lines.append("|" + "|".join("---" for _ in header) + "|")
    lines.extend("| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows)
    if selected is not None:
        lines += ["", f"Selected: {show_point(selected)}"]
    generations = [r for r in results if isinstance(r.value, list)]
    if generations:
        lines += ["", "## Generations"]
    for result in generations:
        suffix = f" ({show_point(result.params)})" if result.params else ""
        lines += ["", f"### {result.eval} · {result.model}{suffix}", ""]
        lines.extend(f"{i}. {_md_cell(text)}" for i, text in enumerate(result.value, start=1))
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    """Text safe inside a markdown table cell or list item: one line, pipes escaped."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def print_table(results: Sequence[Result], console: Console, swept_params: Sequence[str] = ()) -> None:
    """The report's table in the terminal."""
    from rich.table import Table

    header, rows = table_rows(results, swept_params)
    table = Table(*header)
    for row in rows:
        table.add_row(*row)
    console.print(table)


# ------------------------------------------------------------------------- plots


def plot_file_name(eval_name: str, param: str) -> str:
    """``<eval>-vs-<param>.png``, with characters unsafe in file names replaced."""
    safe = re.compile(r"[^A-Za-z0-9_.-]+")
    return f"{safe.sub('_', eval_name)}-vs-{safe.sub('_', param)}.png"


def plot_sweep(directory: Path, results: Sequence[Result], eval_name: str, param: str) -> Path:
    """The eval's value against ``param``: one line per model and setting of other params."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers or CI
    import matplotlib.pyplot as plt

    numeric = [r for r in results if r.numeric and param in r.params]
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in numeric:
        others = {k: v for k, v in r.params.items() if k != param}
        label = r.model + (f" ({show_point(others)})" if others else "")
        lines.setdefault(label, []).append((float(r.params[param]), float(r.value)))
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        for label, points in lines.items():
            points.sort()
            axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
        metric = numeric[0].metric if numeric else ""
        axes.set(xlabel=param, ylabel=metric, title=f"{eval_name}: {metric} vs {param}")
        if lines:
            axes.legend()
        figure.tight_layout()
        path = directory / plot_file_name(eval_name, param)
        figure.savefig(path, format="png", metadata={"Software": None})
    finally:
        plt.close(figure)
    return path


SEARCH_PLOT = "search-objective.png"


def plot_search(directory: Path, search: Mapping[str, Any], goal: str = "min") -> Path:
    """The objective of every candidate against its step, and the best so far as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(c["step"], c["objective"]) for c in search["candidates"] if c["objective"] is not None]
    best, running = [], None
    for _, objective in points:
        running = objective if running is None else (min if goal == "min" else max)(running, objective)
        best.append(running)
    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    try:
        axes.scatter([s for s, _ in points], [o for _, o in points], s=14, color="tab:gray", label="candidate")
        axes.step([s for s, _ in points], best, where="post", color="tab:blue", label="best so far")
        axes.set(xlabel="step", ylabel="objective", title="search: objective vs step")
        axes.legend()
        figure.tight_layout()
        path = directory / SEARCH_PLOT
        figure.savefig(path, format="png", metadata={"Software": None})
    finally:
        plt.close(figure)
    return path


def search_markdown(search: Mapping[str, Any]) -> str:
    """report.md's search section: every candidate, then the best point."""
    candidates = search["candidates"]
    if not candidates:
        return ""
    names = list(candidates[0]["params"])
    lines = ["", "## Search", "", f"![objective vs step]({SEARCH_PLOT})", ""]
    lines.append("| step | " + " | ".join(_md_cell(n) for n in names) + " | value | objective |")
    lines.append("|" + "|".join("---" for _ in range(len(names) + 3)) + "|")
    for c in candidates:
        cells = [str(c["step"]), *(f"{c['params'][n]:.4g}" for n in names),
                 *("" if v is None else f"{v:.6g}" for v in (c["value"], c["objective"]))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Best: {show_point(search['best'])}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------- selection


def select_best(results: Sequence[Result], eval: str, model: str, goal: str) -> dict[str, Any]:
    """The params of the best grid point for (eval, model); ties go to the first in grid order.

    NaN is skipped: it compares false with everything, so where it fell in the
    grid would decide whether it won. Infinity takes part (an infinite
    perplexity is a legitimate maximum).
    """
    if goal not in GOALS:
        raise ValueError(f"goal must be `max` or `min`, not `{goal}`")
    sign = 1.0 if goal == "max" else -1.0
    best: Result | None = None
    for result in results:
        if result.eval != eval or result.model != model or not result.numeric:
            continue
        if math.isnan(result.value):
            continue
        if best is None or sign * result.value > sign * best.value:
            best = result
    if best is None:
        raise ValueError(f"no numeric results for eval `{eval}` and model `{model}`")
    return dict(best.params)
