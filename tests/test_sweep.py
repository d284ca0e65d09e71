"""Evaluation and sweeps through `Recipe.run` (what `peftdsl run` does): values against direct
transformers computations, selection, reports and plots, and the Ray executor against the local
one. `--set` and the missing-Ray usage error (exit 2, stderr) are tested on the command line."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import peftdsl
from peftdsl.cli import main
from tests.factories import load_peft, make_lora, save_tiny_llama_with_tokenizer

TEXTS = ["the cat sat on the mat", "a dog ran under the tree", "i like this movie very much",
         "the bird flew over the log", "this game is not good"]
LAMS = [0.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    save_tiny_llama_with_tokenizer(root / "base")
    make_lora(root / "a", seed=1, init_scale=0.3)
    make_lora(root / "b", seed=2, init_scale=0.3)
    (root / "data.txt").write_text("\n".join(TEXTS) + "\n")
    (root / "recipe.yaml").write_text(f"""peftdsl: 1
name: sweep-test
base: base
adapters: {{a: a, b: b}}
params: {{lam: 0.3}}
compose:
  mix: a - lam * b
outputs:
  mix: out/mix
eval:
  - name: ppl
    models: [base, a, mix]
    metric: perplexity
    data: data.txt
    batch_size: 2
sweep:
  lam: {LAMS}
  select: {{eval: ppl, model: mix, goal: min}}
""")
    return root


def run(recipe: Path, report: Path, **options) -> peftdsl.RunResult:
    """`peftdsl run RECIPE --report REPORT --quiet --force`, through the API."""
    return peftdsl.load(recipe).run(report=report, quiet=True, force=True, **options)


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for this module's Ray tests (`run_on_ray` uses it, as it is
    already initialised): starting Ray costs seconds."""
    ray = pytest.importorskip("ray")
    ray.init(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


def reference_perplexity(model, tokenizer) -> float:
    """exp(Σ NLL / Σ predicted tokens), one sequence at a time, with transformers alone."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in TEXTS:
            ids = tokenizer(text, return_tensors="pt").input_ids
            loss = model(ids, labels=ids).loss.item()
            nll += loss * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(nll / count)


def patched_model(lab: Path, lam: float):
    reference = load_peft(lab / "base", {"a": lab / "a", "b": lab / "b"})
    model = AutoModelForCausalLM.from_pretrained(lab / "base").eval()
    with torch.no_grad():
        for name, module in reference.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "a" in module.lora_A:
                weight = model.get_submodule(name).weight
                weight += module.get_delta_weight("a") - lam * module.get_delta_weight("b")
    return model


def test_sweep_values_selection_report_and_outputs(lab: Path, tmp_path: Path):
    report = tmp_path / "report"
    result = run(lab / "recipe.yaml", report)
    assert result.written == ("mix",) and result.report == report
    document = json.loads((report / "report.json").read_text())
    assert document["recipe"] == "sweep-test"
    assert [r.to_json() for r in result.results] == document["results"]
    rows = document["results"]
    assert len(rows) == len(LAMS) * 3
    tokenizer = AutoTokenizer.from_pretrained(lab / "base")
    expected = {lam: reference_perplexity(patched_model(lab, lam), tokenizer) for lam in LAMS}
    for row in rows:
        if row["model"] == "mix":
            assert row["value"] == pytest.approx(expected[row["params"]["lam"]], rel=1e-4)
    base = reference_perplexity(AutoModelForCausalLM.from_pretrained(lab / "base").eval(), tokenizer)
    assert all(r["value"] == pytest.approx(base, rel=1e-4) for r in rows if r["model"] == "base")
    best = min(LAMS, key=lambda lam: expected[lam])
    assert document["selected"] == result.selected == {"lam": best}
    provenance = json.loads((lab / "out/mix/peftdsl.json").read_text())
    assert provenance["params"]["lam"] == best  # outputs are written for the selected point
    assert (report / "report.md").exists()
    plot = report / "ppl-vs-lam.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_set_pins_a_swept_param(lab: Path, tmp_path: Path):
    report = tmp_path / "report"
    assert main(["run", str(lab / "recipe.yaml"), "--set", "lam=0.5", "--report", str(report),
                 "--quiet", "--force"]) == 0
    document = json.loads((report / "report.json").read_text())
    assert {r["params"]["lam"] for r in document["results"]} == {0.5}


def test_ray_executor_gives_the_local_results(lab: Path, tmp_path: Path, ray_local):
    local, remote = tmp_path / "local", tmp_path / "ray"
    here = run(lab / "recipe.yaml", local)
    there = run(lab / "recipe.yaml", remote, executor="ray")
    assert there.results == here.results and there.selected == here.selected
    assert json.loads((remote / "report.json").read_text()) == json.loads((local / "report.json").read_text())


def test_models_that_do_not_depend_on_the_swept_param_are_evaluated_once(lab: Path, tmp_path: Path,
                                                                          monkeypatch):
    import peftdsl.evaluation.evaluate as evaluate

    calls = []
    real = evaluate.run_eval

    def counting(model, tokenizer, spec, *args, **kwargs):
        calls.append(spec.models)
        return real(model, tokenizer, spec, *args, **kwargs)

    monkeypatch.setattr(evaluate, "run_eval", counting)
    run(lab / "recipe.yaml", tmp_path / "r")
    # base and `a` once each; `mix` (a - lam*b) at each of the three grid points.
    assert len(calls) == 2 + len(LAMS)
    rows = json.loads((tmp_path / "r" / "report.json").read_text())["results"]
    assert len(rows) == 3 * len(LAMS)


def test_missing_ray_is_a_usage_error_naming_the_extra(lab: Path, tmp_path: Path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    status = main(["run", str(lab / "recipe.yaml"), "--report", str(tmp_path / "r"), "--quiet", "--force",
                   "--executor", "ray"])
    assert status == 2
    assert "pip install 'peftdsl[ray]'" in capsys.readouterr().err
    with pytest.raises(peftdsl.UsageError, match=r"pip install 'peftdsl\[ray\]'"):  # the API raises what exits 2
        run(lab / "recipe.yaml", tmp_path / "r", executor="ray")


def test_ray_sweep_keeps_infinite_values(tmp_path: Path, ray_local):
    """Rows come back from Ray workers as `Result` objects, so an infinite perplexity stays
    infinite. (Through JSON it became null: select_best skipped the point and the table crashed.)"""
    from rich.console import Console

    from peftdsl.evaluation.report import print_table, select_best

    save_tiny_llama_with_tokenizer(tmp_path / "base")
    # A LoRA on lm_head scaled by 1e5: logits of ~1e5 (finite in float32), a mean NLL far past
    # the ~709.8 where exp overflows, so the perplexity is exactly inf.
    make_lora(tmp_path / "h", seed=3, targets=("lm_head",), init_scale=1.0)
    (tmp_path / "data.txt").write_text("\n".join(TEXTS[:2]) + "\n")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("""peftdsl: 1
name: overflow
base: base
adapters: {h: h}
params: {lam: 1}
compose:
  mix: lam * h
eval:
  - {name: ppl, models: [mix], metric: perplexity, data: data.txt}
sweep:
  lam: [0.5, 100000]
  select: {eval: ppl, model: mix, goal: max}
""")
    there = run(recipe, tmp_path / "ray", executor="ray")
    values = {r.params["lam"]: r.value for r in there.results}
    assert sorted(values) == [0.5, 100000.0]
    assert math.isfinite(values[0.5]) and values[100000.0] == math.inf
    assert all(r.numeric for r in there.results)
    here = run(recipe, tmp_path / "local")
    assert there.results == here.results  # the local executor gives the same rows
    # inf is the maximum; a null row would have been skipped and lam=0.5 selected
    assert there.selected == select_best(list(there.results), "ppl", "mix", "max") == {"lam": 100000.0}
    assert select_best(list(there.results), "ppl", "mix", "min") == {"lam": 0.5}
    console = Console(record=True, width=120, color_system=None)
    print_table(list(there.results), console, ["lam"])
    assert any("100000" in line and "inf" in line for line in console.export_text().splitlines())
    document = json.loads((tmp_path / "ray" / "report.json").read_text())  # JSON has no inf: null
    assert document["selected"] == {"lam": 100000.0}
    assert [r["value"] for r in document["results"]] == [pytest.approx(values[0.5]), None]
    markdown = (tmp_path / "ray" / "report.md").read_text()
    assert "| 100000 | mix | inf |" in markdown and "Selected: lam=100000" in markdown
    assert (tmp_path / "ray" / "ppl-vs-lam.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
