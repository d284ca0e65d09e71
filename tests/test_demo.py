"""The demo's quickstart end to end through the command line, and `peftdsl lint recipes`.

The quickstart runs from a copy whose paths are made absolute and whose output points
into a temporary folder, so the test leaves the repository as it found it; everything
else in the copy is the shipped recipe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo"
QUICKSTART = DEMO / "quickstart.yaml"
BASE = DEMO / "assets" / "base"

pytestmark = pytest.mark.skipif(not (BASE / "model.safetensors").is_file(), reason="demo assets not built")

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def peftdsl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "peftdsl", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def relocated_quickstart(folder: Path) -> tuple[Path, dict[str, Path]]:
    """The shipped quickstart with absolute inputs and its outputs under `folder`."""
    recipe = yaml.safe_load(QUICKSTART.read_text())
    recipe["base"] = str((DEMO / recipe["base"]).resolve())
    for spec in recipe["adapters"].values():
        spec["path"] = str((DEMO / spec["path"]).resolve())
    for entry in recipe["eval"]:
        entry["data"] = str((DEMO / entry["data"]).resolve())
    outputs = {}
    for name, spec in recipe["outputs"].items():
        outputs[name] = folder / "out" / name
        if isinstance(spec, dict):
            spec["path"] = str(outputs[name])
        else:
            recipe["outputs"][name] = str(outputs[name])
    path = folder / "quickstart.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path, outputs


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quickstart")
    recipe, outputs = relocated_quickstart(folder)
    proc = peftdsl("run", str(recipe), "--report", str(folder / "report"), "--force", "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((folder / "report" / "report.json").read_text())
    return report, outputs


def test_shipped_quickstart_writes_only_under_gitignored_out():
    recipe = yaml.safe_load(QUICKSTART.read_text())
    for spec in recipe["outputs"].values():
        target = (DEMO / (spec["path"] if isinstance(spec, dict) else spec)).resolve()
        assert target.is_relative_to(ROOT / "out"), target


def test_report_has_the_table(quickstart):
    report, _ = quickstart
    assert report["recipe"] == "quickstart"
    assert report["selected"] is None
    rows = {(r["eval"], r["model"]): r for r in report["results"]}
    recipe = yaml.safe_load(QUICKSTART.read_text())
    expected = {(e["name"], m) for e in recipe["eval"] for m in e["models"]}
    assert set(rows) == expected
    assert {m for e, m in expected if e == "sentiment"} == {"base", "a", "b", "mix", "mix8"}
    for (ev, model), row in rows.items():
        assert row["metric"] == {"sentiment": "accuracy", "clean-ppl": "perplexity"}[ev]
        assert isinstance(row["value"], float) and row["params"] == {}
    acc = {m: rows["sentiment", m]["value"] for m in ("base", "a", "b", "mix", "mix8")}
    assert all(0.0 <= v <= 1.0 for v in acc.values())
    # The demo's effect, with a wide margin: every adapter and composition knows the task, the base does not.
    assert acc["base"] < 0.6
    assert min(acc["a"], acc["b"], acc["mix"], acc["mix8"]) > 0.9
    ppl = {m: rows["clean-ppl", m]["value"] for m in ("base", "mix")}
    assert all(1.0 < v < 10.0 for v in ppl.values())


def test_composed_adapter_loads_with_peft(quickstart):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, outputs = quickstart
    path = outputs["mix8"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "peftdsl.json"):
        assert (path / name).is_file(), name
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8

    tok = AutoTokenizer.from_pretrained(BASE)
    ids = torch.tensor([tok("the film was great . the review is")["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(BASE).eval()
    with torch.no_grad():
        before = base(input_ids=ids).logits
    model = PeftModel.from_pretrained(base, path).eval()
    lora_A = [m for n, m in model.named_modules() if n.endswith("lora_A.default")]
    assert lora_A and all(m.weight.shape[0] == 8 for m in lora_A)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.isfinite(after).all()
    assert not torch.allclose(before, after)   # the adapter is live


def test_lint_recipes_is_clean():
    proc = peftdsl("lint", "recipes", "--format", "concise")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kinds = {line.split("[")[0].rsplit(" ", 1)[-1] for line in (proc.stdout + proc.stderr).splitlines() if "[" in line}
    assert kinds <= {"note"}, proc.stdout + proc.stderr


def test_lint_recipes_without_inputs_is_clean():
    """The pre-commit form (`--no-inputs`: no base or adapter read) finds no error either: a check
    that needs the model's task (a classifier's integer labels) waits for the inputs instead of
    taking every recipe for a causal LM."""
    proc = peftdsl("lint", "--no-inputs", "recipes", "--format", "concise")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "error[" not in proc.stdout + proc.stderr


def test_classifier_labels_are_still_checked_once_the_inputs_are_read(tmp_path):
    text = (ROOT / "recipes" / "demo" / "roberta_generalisation.yaml").read_text()
    assert "labels: {pos: 0, neg: 1}" in text
    bad = tmp_path / "roberta.yaml"
    bad.write_text(text.replace("labels: {pos: 0, neg: 1}", 'labels: {pos: " positive", neg: " negative"}')
                   .replace("assets/", str(ROOT / "recipes" / "demo" / "assets") + "/")
                   .replace("data/", str(ROOT / "recipes" / "demo" / "data") + "/"))
    proc = peftdsl("lint", str(bad), "--format", "concise")
    assert proc.returncode == 1 and "error[E501]" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes" / "examples").glob("*.yaml")))
def test_example_recipes_run(recipe, tmp_path):
    """The examples in recipes/examples run end to end on the shipped demo assets."""
    result = subprocess.run([sys.executable, "-m", "peftdsl", "run", str(ROOT / "recipes" / "examples" / recipe),
                             "--force", "--quiet", "--report", str(tmp_path / "report")],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "internal error" not in result.stderr


# ---------------------------------------------------------------- the paper's architectures
# RoBERTa, T5 and GPT-2 recipes (assets/arch), each run in-process from a copy whose paths
# are absolute, evaluated on its first rows only and at its first sweep point, so that the
# five cost a few seconds. The RoBERTa merge is recomputed with plain torch.

ARCH = DEMO / "assets" / "arch"
ARCH_RECIPES = ["roberta_generalisation.yaml", "t5_multitask.yaml", "t5_ia3_multitask.yaml", "t5_analogy.yaml",
                "gpt2_ia3_unlearning.yaml"]
ROWS = 12


def shortened(name: str, folder: Path) -> tuple[Path, dict]:
    recipe = yaml.safe_load((DEMO / name).read_text())
    recipe["base"] = str((DEMO / recipe["base"]).resolve())
    for spec in recipe["adapters"].values():
        spec["path"] = str((DEMO / spec["path"]).resolve())
    for entry in recipe["eval"]:
        entry["data"] = str((DEMO / entry["data"]).resolve())
        entry["limit"] = min(entry.get("limit", ROWS), ROWS)
        if entry["metric"] == "generate":
            entry["limit"] = 4
    recipe.pop("outputs", None)
    if "sweep" in recipe:
        recipe["sweep"] = {k: (v if k == "select" else v[:1]) for k, v in recipe["sweep"].items()}
    path = folder / name
    path.write_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True))
    return path, recipe


@pytest.fixture(scope="module")
def arch_reports(tmp_path_factory):
    import peftdsl

    if not (ARCH / "t5" / "base" / "model.safetensors").is_file():
        pytest.skip("assets/arch not built")
    out = {}
    for name in ARCH_RECIPES:
        folder = tmp_path_factory.mktemp(name.removesuffix(".yaml"))
        path, recipe = shortened(name, folder)
        peftdsl.load(path).run(report=folder / "report")
        out[name] = (json.loads((folder / "report" / "report.json").read_text()), recipe)
    return out


@pytest.mark.parametrize("name", ARCH_RECIPES)
def test_paper_architecture_recipes_run(arch_reports, name):
    report, recipe = arch_reports[name]
    rows = {(r["eval"], r["model"]): r["value"] for r in report["results"]}
    assert set(rows) == {(e["name"], m) for e in recipe["eval"] for m in e["models"]}
    for (ev, model), value in rows.items():
        metric = next(e["metric"] for e in recipe["eval"] if e["name"] == ev)
        if metric == "accuracy":
            assert 0.0 <= value <= 1.0
        elif metric == "perplexity":
            assert 1.0 < value < 50.0, (ev, model, value)
        else:
            assert len(value) == 4 and all(isinstance(t, str) for t in value)
    # compositions change the model: a merge is not one of its terms
    if name.startswith("t5_"):
        ev = recipe["eval"][-1]["name"]
        assert rows[ev, "base"] != rows[ev, recipe["eval"][-1]["models"][-1]]


def _lora_merged_classifier(terms: list[tuple[float, str]]):
    """RobertaForSequenceClassification on the masked-LM base with W += Σ cᵢ·sᵢ·Bᵢ·Aᵢ and the
    heads averaged (Σ cᵢ·headᵢ), from the safetensors files with plain torch."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(ARCH / "roberta" / "base", num_labels=2).eval()
    params = dict(model.named_parameters())
    head = {n: torch.zeros_like(p) for n, p in params.items() if n.startswith("classifier.")}
    with torch.no_grad():
        for coef, adapter in terms:
            folder = ARCH / "roberta" / "adapters" / adapter
            config = json.loads((folder / "adapter_config.json").read_text())
            scale = config["lora_alpha"] / config["r"]
            tensors = {k.removeprefix("base_model.model."): v for k, v in
                       load_file(str(folder / "adapter_model.safetensors")).items()}
            for key, value in tensors.items():
                if key.startswith("classifier."):
                    head[key] += coef * value
                elif ".lora_A." in key:
                    module = key.split(".lora_A.")[0]
                    b = tensors[key.replace(".lora_A.", ".lora_B.")]
                    params[module + ".weight"] += coef * scale * b @ value
        for n, value in head.items():
            params[n].copy_(value)
    return model


def test_roberta_merge_with_averaged_heads_equals_plain_torch(arch_reports):
    import torch
    from transformers import AutoTokenizer

    report, recipe = arch_reports["roberta_generalisation.yaml"]
    lam = report["selected"]["lam"]
    entry = next(e for e in recipe["eval"] if e["name"] == "sentiment-test")
    rows = [json.loads(line) for line in Path(entry["data"]).read_text().splitlines()][:ROWS]
    tok = AutoTokenizer.from_pretrained(ARCH / "roberta" / "base")
    batch = tok([r["text"] for r in rows], return_tensors="pt", padding=True)
    got = {r["model"]: r["value"] for r in report["results"] if r["eval"] == "sentiment-test"}
    for model, terms in (("a", [(1.0, "sent_skew_a")]), ("merged", [(lam, "sent_skew_a"), (1 - lam, "sent_skew_b")])):
        with torch.no_grad():
            predicted = _lora_merged_classifier(terms)(**batch).logits.argmax(-1).tolist()
        want = sum(p == entry["labels"][r["label"]] for p, r in zip(predicted, rows)) / len(rows)
        assert got[model] == pytest.approx(want), model
