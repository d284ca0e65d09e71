"""Learned weights (`search:`): the optimiser finds a known optimum, seeds reproduce, the penalty
is value + l1·mean|w|, the report's shape (DESIGN §4), `--set` pins, front-end checks, and the
Ray executor against the local one.

The constructed problem: a LoRA on `lm_head` of a tiny Llama, and text sampled from the model
with that adapter at weight 1. Perplexity of `w · a` on that text is then smallest near w = 1
(the sampling distribution itself, up to sampling noise and the special tokens' mass); the
optimum is located independently, on a fine grid of plain transformers computations.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import peftdsl
from peftdsl.cli import main
from peftdsl.evaluation.search import penalised
from peftdsl.numbers import show_point
from tests.factories import (
    load_peft,
    make_lora,
    save_tiny_llama_with_tokenizer,
    tiny_llama,
    tiny_tokenizer,
)

START = -1.5  # a bad start: perplexity there is in the millions


def recipe_text(search: str = "", **extra: str) -> str:
    evals = extra.get("evals", """
  - name: ppl
    models: [base, mix]
    metric: perplexity
    data: data.txt
    batch_size: 64""")
    return f"""peftdsl: 1
name: search-test
base: base
adapters: {{a: a}}
params: {{w: {START}, v: 0.0}}
compose:
  mix: w * a + v * a
outputs:
  mix: out/mix
eval:{evals}
{extra.get("sweep", "")}search:
{search or '''  params: {w: [-2, 3], v: [-1, 1]}
  objective: {eval: ppl, model: mix, goal: min}
  optimizer: random
  budget: 6
  batch: 3
  seed: 7'''}
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("search")
    vocab = len(tiny_tokenizer())
    save_tiny_llama_with_tokenizer(root / "base", vocab=vocab)
    make_lora(root / "a", base=tiny_llama(vocab=vocab), seed=1, init_scale=0.3, targets=("lm_head",))
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    teacher = patched_model(root, 1.0)
    generator = torch.Generator().manual_seed(0)
    ids = torch.full((150, 1), tokenizer.bos_token_id)
    with torch.no_grad():
        for _ in range(8):  # words only: special tokens do not survive decoding
            probs = torch.softmax(teacher(ids).logits[:, -1, 4:], -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator) + 4], 1)
    texts = [tokenizer.decode(row[1:]) for row in ids]
    (root / "data.txt").write_text("\n".join(texts) + "\n")
    (root / "recipe.yaml").write_text(recipe_text())
    return root


def patched_model(lab: Path, w: float):
    """The base with w · (the adapter's delta, as PEFT computes it) added to its weights."""
    model = AutoModelForCausalLM.from_pretrained(lab / "base").eval()
    with torch.no_grad():
        for name, delta in _peft_deltas(lab).items():
            model.get_submodule(name).weight += w * delta
    return model


@functools.cache
def _peft_deltas(lab: Path) -> dict:
    reference = load_peft(lab / "base", {"a": lab / "a"})
    return {name: module.get_delta_weight("a").detach() for name, module in reference.base_model.model.named_modules()
            if hasattr(module, "lora_A") and "a" in module.lora_A}


@functools.cache
def reference_perplexity(lab: Path, w: float) -> float:
    """exp(Σ NLL / Σ predicted tokens) with transformers alone (every line has 8 words: one batch)."""
    tokenizer = AutoTokenizer.from_pretrained(lab / "base")
    ids = tokenizer((lab / "data.txt").read_text().splitlines(), return_tensors="pt").input_ids
    with torch.no_grad():
        return math.exp(patched_model(lab, w)(ids, labels=ids).loss.item())


def write(lab: Path, name: str, text: str) -> Path:
    path = lab / name
    path.write_text(text)
    return path


def run(recipe: Path, report: Path, **options) -> peftdsl.RunResult:
    params = options.pop("params", None)
    return peftdsl.load(recipe, params=params).run(report=report, quiet=True, force=True, **options)


def candidates(result: peftdsl.RunResult) -> list[tuple[dict, float, float]]:
    return [(c.params, c.value, c.objective) for c in result.search.candidates]


# ---------------------------------------------------------------- the optimiser


def test_cma_finds_the_known_optimum_from_a_bad_start(lab: Path, tmp_path: Path):
    recipe = write(lab, "optimum.yaml", recipe_text("""  params: {w: [-2, 3], v: [-1, 1]}
  objective: {eval: ppl, model: mix, goal: min}
  optimizer: cma
  budget: 16
  batch: 4
  seed: 0"""))
    result = run(recipe, tmp_path / "r", params={"v": 0.0})  # v pinned: a 1-D problem
    grid = [i / 10 for i in range(21)]  # 0 … 2 by 0.1, plain transformers
    reference = {w: reference_perplexity(lab, w) for w in grid}
    optimum = min(grid, key=reference.get)
    assert 0.5 <= optimum <= 1.2  # the construction's optimum: near 1
    best = result.search.best_candidate
    assert reference_perplexity(lab, START) > 1e5 * reference[optimum]
    assert abs(best.params["w"] - optimum) <= 0.3  # the valley is flat: 16 candidates get near, not onto it
    assert best.value == pytest.approx(reference_perplexity(lab, best.params["w"]), rel=1e-4)
    assert best.value <= reference[optimum] * 1.1
    # Outputs are written at the best point, and the final evaluation ran there.
    provenance = json.loads((lab / "out/mix/peftdsl.json").read_text())
    assert provenance["params"] == {"v": 0.0, "w": best.params["w"]}
    mix = next(r for r in result.results if r.model == "mix")
    assert mix.value == pytest.approx(best.value, rel=1e-6) and mix.params == {"w": best.params["w"]}


def test_the_same_seed_gives_the_same_candidates_and_best(lab: Path, tmp_path: Path):
    first = run(lab / "recipe.yaml", tmp_path / "1")
    second = run(lab / "recipe.yaml", tmp_path / "2")
    assert candidates(first) == candidates(second) and first.selected == second.selected
    assert (tmp_path / "1/report.json").read_text() == (tmp_path / "2/report.json").read_text()
    other = write(lab, "other-seed.yaml", (lab / "recipe.yaml").read_text().replace("seed: 7", "seed: 8"))
    assert candidates(run(other, tmp_path / "3")) != candidates(first)


@pytest.mark.parametrize("optimizer", ["ngopt", "cma", "random"])
def test_each_optimizer_runs_within_bounds_and_the_best_is_the_best_candidate(lab: Path, tmp_path: Path,
                                                                              optimizer: str):
    recipe = write(lab, f"{optimizer}.yaml", recipe_text(f"""  params: {{w: [-2, 3], v: [-1, 1]}}
  objective: {{eval: ppl, model: mix, goal: min}}
  optimizer: {optimizer}
  budget: 8
  batch: 4
  seed: 1"""))
    result = run(recipe, tmp_path / "r")
    found = result.search.candidates
    assert [c.step for c in found] == list(range(1, 9))
    assert all(-2 <= c.params["w"] <= 3 and -1 <= c.params["v"] <= 1 for c in found)
    assert len({(c.params["w"], c.params["v"]) for c in found}) > 1
    best = min(found, key=lambda c: c.objective)
    assert result.selected == best.params == result.search.best
    assert candidates(run(recipe, tmp_path / "again")) == candidates(result)  # every optimiser is seeded


def test_penalty_is_value_plus_l1_times_mean_abs_weight(lab: Path, tmp_path: Path):
    recipe = write(lab, "penalty.yaml", recipe_text("""  params: {w: [-2, 3], v: [-1, 1]}
  objective: {eval: ppl, model: mix, goal: min}
  penalty: {l1: 0.05}
  optimizer: random
  budget: 4
  batch: 2
  seed: 3"""))
    result = run(recipe, tmp_path / "r")
    for c in result.search.candidates:
        mean_abs = (abs(c.params["w"]) + abs(c.params["v"])) / 2
        assert c.objective == pytest.approx(c.value + 0.05 * mean_abs, rel=0, abs=1e-12)
        assert c.objective != c.value
        # The value is the eval's own: the perplexity at that point, with transformers alone.
        assert c.value == pytest.approx(reference_perplexity(lab, c.params["w"] + c.params["v"]), rel=1e-4)
    assert penalised(2.0, [1.0, -3.0], 0.5, "max") == 2.0 - 0.5 * 2.0  # maximising: the penalty subtracts


# ---------------------------------------------------------------- the report


def test_report_json_holds_every_candidate_and_the_best_point(lab: Path, tmp_path: Path):
    report = tmp_path / "report"
    result = run(lab / "recipe.yaml", report)
    document = json.loads((report / "report.json").read_text())
    assert list(document) == ["recipe", "results", "selected", "search"]
    assert list(document["search"]) == ["candidates", "best"]
    rows = document["search"]["candidates"]
    assert [list(r) for r in rows] == [["step", "params", "value", "objective"]] * 6
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(set(r["params"]) == {"w", "v"} for r in rows)
    best = min(rows, key=lambda r: r["objective"])
    assert document["search"]["best"] == best["params"] == document["selected"] == result.selected
    # The eval rows: every model of every eval, once, at the best point.
    assert [(r["model"], r["params"]) for r in document["results"]] == [("base", best["params"]),
                                                                       ("mix", best["params"])]
    assert document["results"][1]["value"] == pytest.approx(best["value"], rel=1e-6)
    assert (report / "search-objective.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (report / "report.md").read_text()
    assert "## Search" in markdown and markdown.count("\n| ") == 2 + 1 + 1 + 6  # results, candidates tables
    assert f"Best: {show_point(best['params'])}" in markdown


def test_set_pins_a_param_out_of_the_search(lab: Path, tmp_path: Path):
    report = tmp_path / "report"
    assert main(["run", str(lab / "recipe.yaml"), "--set", "v=0.25", "--report", str(report), "--quiet",
                 "--force"]) == 0
    document = json.loads((report / "report.json").read_text())
    assert all(list(r["params"]) == ["w"] for r in document["search"]["candidates"])
    assert list(document["search"]["best"]) == ["w"]
    provenance = json.loads((lab / "out/mix/peftdsl.json").read_text())
    assert provenance["params"]["v"] == 0.25 and provenance["params"]["w"] == document["search"]["best"]["w"]
    for row in document["search"]["candidates"][:2]:
        assert row["value"] == pytest.approx(reference_perplexity(lab, row["params"]["w"] + 0.25), rel=1e-4)


# ---------------------------------------------------------------- front-end checks


def diagnostics(lab: Path, text: str) -> list:
    return [d for d in peftdsl.loads(text, root=lab).diagnostics if d.code in ("E503", "E504", "Y004")]


def only(found: list, code: str):
    assert [d.code for d in found] == [code], [(d.code, d.message) for d in found]
    assert found[0].help and found[0].span is not None
    return found[0]


GOOD = "  objective: {eval: ppl, model: mix, goal: min}\n  budget: 4"


def line_of(text: str, start: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if line.startswith(start))


@pytest.mark.parametrize(("params", "message"), [
    ("{w: [-2, 3], u: [0, 1]}", "search over `u`, which is not a param"),
    ("{w: [1, 1]}", "the bounds of `w` are empty"),
    ("{w: [3, -2]}", "the bounds of `w` are reversed"),
    ("{w: [0, 3]}", "`w` starts at -1.5, outside its bounds"),
])
def test_bad_search_params_are_diagnosed(lab: Path, params: str, message: str):
    text = recipe_text(f"  params: {params}\n{GOOD}")
    diag = only(diagnostics(lab, text), "E503")
    assert message in diag.message and diag.span.line == line_of(text, "  params: {w")


@pytest.mark.parametrize(("objective", "message"), [
    ("{eval: nope, model: mix, goal: min}", "unknown eval `nope`"),
    ("{eval: ppl, model: a, goal: min}", "names model `a`, which eval `ppl` does not evaluate"),
    ("{eval: gen, model: mix, goal: min}", "eval `gen` generates text"),
])
def test_bad_objectives_are_diagnosed(lab: Path, objective: str, message: str):
    evals = """
  - name: ppl
    models: [base, mix]
    metric: perplexity
    data: data.txt
  - name: gen
    models: [mix]
    metric: generate
    data: data.txt"""
    text = recipe_text(f"  params: {{w: [-2, 3]}}\n  objective: {objective}\n  budget: 4", evals=evals)
    diag = only(diagnostics(lab, text), "E503")
    assert message in diag.message and diag.span.line == line_of(text, "  objective:")


def test_sweep_and_search_together_are_refused(lab: Path):
    text = recipe_text(sweep="sweep:\n  w: [0.5, 1.0]\n")
    diag = only([d for d in diagnostics(lab, text) if d.code == "E503"], "E503")
    assert "either `sweep` or `search`" in diag.message


def test_a_missing_extra_names_the_install_command(lab: Path, monkeypatch, tmp_path: Path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("nevergrad", "cma")
                        else real(name, *a))
    text = recipe_text().replace("  optimizer: random\n", "")
    diag = only(diagnostics(lab, text), "E504")
    assert diag.help == "pip install 'peftdsl[search]'" and "needs nevergrad" in diag.message
    assert diag.span.line == line_of(text, "  params: {w")  # no `optimizer:` line: the search block
    assert main(["lint", str(lab / "recipe.yaml")]) == 1
    err = capsys.readouterr()
    assert "error[E504]" in err.out + err.err and "Traceback" not in err.out + err.err
    assert main(["run", str(lab / "recipe.yaml"), "--report", str(tmp_path / "r"), "--quiet", "--force"]) == 1
    assert not (tmp_path / "r" / "report.json").exists()


def test_bounds_of_the_wrong_length_are_a_schema_error(lab: Path):
    text = recipe_text(f"  params: {{w: [1]}}\n{GOOD}")
    found = diagnostics(lab, text)
    assert [d.code for d in found] == ["Y004"] and found[0].span.line == line_of(text, "  params: {w")


# ---------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    ray.init(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True, num_cpus=2)
    yield ray
    ray.shutdown()


def test_ray_executor_gives_the_local_candidates(lab: Path, tmp_path: Path, ray_local):
    here = run(lab / "recipe.yaml", tmp_path / "local")
    there = run(lab / "recipe.yaml", tmp_path / "ray", executor="ray")
    assert candidates(there) == candidates(here)
    assert there.selected == here.selected
    assert (tmp_path / "ray/report.json").read_text() == (tmp_path / "local/report.json").read_text()
