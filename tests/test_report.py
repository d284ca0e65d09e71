"""Reports: report.json's schema, report.md, sweep plots, the terminal table, selection."""

from __future__ import annotations

import json
import math

import pytest
from rich.console import Console

from peftdsl.evaluation.report import (
    Result,
    plot_file_name,
    print_table,
    report_json,
    select_best,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sweep() -> list[Result]:
    """A 2×2 grid over lam and mu, two models, a perplexity eval and a generate eval."""
    rows = []
    for lam in (0.2, 0.4):
        for mu in (1, 2):
            params = {"lam": lam, "mu": mu}
            rows.append(Result(eval="toxic-ppl", model="base", metric="perplexity", value=30.0, params=params))
            rows.append(Result(eval="toxic-ppl", model="detox", metric="perplexity", value=10 * lam + mu, params=params))
            rows.append(Result(eval="samples", model="detox", metric="generate", value=["a | b", "c\nd"], params=params))
    return rows


def test_report_json_schema_and_order(tmp_path):
    results = _sweep()
    write_report(tmp_path, "detox", results, {"lam": 0.4, "mu": 2}, ["lam", "mu"])
    text = (tmp_path / "report.json").read_text()
    document = json.loads(text)
    assert list(document) == ["recipe", "results", "selected"]
    assert document["recipe"] == "detox"
    assert document["selected"] == {"lam": 0.4, "mu": 2}
    assert [list(row) for row in document["results"]] == [["eval", "model", "metric", "value", "params"]] * len(results)
    assert document["results"][1] == {"eval": "toxic-ppl", "model": "detox", "metric": "perplexity", "value": 3.0, "params": {"lam": 0.2, "mu": 1}}
    assert document["results"][2]["value"] == ["a | b", "c\nd"]
    assert text.startswith('{\n  "recipe": "detox",')  # indent 2
    assert report_json("detox", results, {"lam": 0.4, "mu": 2}) == text  # deterministic


def test_non_finite_values_and_no_selection_are_null():
    document = json.loads(report_json("r", [Result(eval="e", model="m", metric="perplexity", value=math.inf)], None))
    assert document["selected"] is None
    assert document["results"][0]["value"] is None
    assert document["results"][0]["params"] == {}


def test_sweep_plots_one_valid_png_per_numeric_eval_and_param(tmp_path):
    written = write_report(tmp_path, "detox", _sweep(), None, ["lam", "mu"])
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["toxic-ppl-vs-lam.png", "toxic-ppl-vs-mu.png"]  # generate evals are not plotted
    assert {p.name for p in written} == {"report.json", "report.md", *pngs}
    for name in pngs:
        data = (tmp_path / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / pngs[0]).shape[:2] == (400, 600)


def test_no_plots_without_a_sweep(tmp_path):
    results = [Result(eval="ppl", model=m, metric="perplexity", value=v) for m, v in (("base", 12.5), ("chat", 9.25))]
    write_report(tmp_path, "plain", results)
    assert not list(tmp_path.glob("*.png"))
    markdown = (tmp_path / "report.md").read_text()
    assert "| model | ppl (perplexity) |" in markdown
    assert "| base | 12.5 |" in markdown and "| chat | 9.25 |" in markdown


def test_markdown_sweep_rows_and_generations(tmp_path):
    write_report(tmp_path, "detox", _sweep(), {"lam": 0.2, "mu": 1}, ["lam", "mu"])
    markdown = (tmp_path / "report.md").read_text()
    assert "| lam | mu | model | toxic-ppl (perplexity) | samples (generate) |" in markdown
    assert "| 0.4 | 2 | detox | 6 | 2 texts |" in markdown
    assert "| 0.2 | 1 | base | 30 |  |" in markdown
    assert "Selected: lam=0.2, mu=1" in markdown
    assert "1. a \\| b" in markdown and "2. c d" in markdown  # pipes escaped, one line per text


def test_print_table_models_as_rows_evals_as_columns():
    results = [
        Result(eval="ppl", model="base", metric="perplexity", value=12.5),
        Result(eval="acc", model="base", metric="accuracy", value=0.5),
        Result(eval="ppl", model="mix", metric="perplexity", value=8.0),
    ]
    console = Console(record=True, width=120, color_system=None)
    print_table(results, console)
    text = console.export_text()
    header = next(line for line in text.splitlines() if "model" in line)
    assert header.index("ppl (perplexity)") < header.index("acc (accuracy)")
    assert any("base" in line and "12.5" in line and "0.5" in line for line in text.splitlines())
    assert any("mix" in line and "8" in line for line in text.splitlines())


def test_select_best_max_min_and_ties_go_to_the_first_grid_point():
    results = _sweep()
    assert select_best(results, "toxic-ppl", "detox", "max") == {"lam": 0.4, "mu": 2}
    assert select_best(results, "toxic-ppl", "detox", "min") == {"lam": 0.2, "mu": 1}
    assert select_best(results, "toxic-ppl", "base", "max") == {"lam": 0.2, "mu": 1}  # all equal


def test_select_best_skips_nan_and_rejects_bad_requests():
    results = [
        Result(eval="e", model="m", metric="accuracy", value=math.nan, params={"lam": 0.1}),
        Result(eval="e", model="m", metric="accuracy", value=0.5, params={"lam": 0.2}),
        Result(eval="e", model="m", metric="accuracy", value=0.7, params={"lam": 0.3}),
    ]
    assert select_best(results, "e", "m", "max") == {"lam": 0.3}
    assert select_best(results, "e", "m", "min") == {"lam": 0.2}
    with pytest.raises(ValueError, match="goal"):
        select_best(results, "e", "m", "best")
    with pytest.raises(ValueError, match="no numeric results"):
        select_best(results, "e", "other", "max")


def test_plot_file_names_are_safe():
    assert plot_file_name("toxic-ppl", "lam") == "toxic-ppl-vs-lam.png"
    assert plot_file_name("a/b c", "x") == "a_b_c-vs-x.png"
