"""`metric: lm_eval` (docs/recipes.md, "lm_eval"): lm-evaluation-harness tasks on the patched model.

The reference is the harness itself: `lm_eval.simple_evaluate` on PEFT's `merge_and_unload` of
the same composition. Tasks are built here (task YAMLs and jsonl data in a temporary folder);
nothing is downloaded. The lint checks run without the harness installed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import peftdsl
from tests.factories import (
    load_peft,
    make_lora,
    save_tiny_llama_with_tokenizer,
    tiny_tokenizer,
)

needs_harness = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-evaluation-harness is not installed (pip install 'peftdsl[lm-eval]')")

MC_ROWS = [
    {"text": "the cat sat on the", "choices": [" mat", " log", " tree"], "answer": 0},
    {"text": "the dog ran under the", "choices": [" log", " mat"], "answer": 0},
    {"text": "i like the", "choices": [" movie", " film", " game"], "answer": 2},
    {"text": "this food is very", "choices": [" good", " bad"], "answer": 1},
    {"text": "the bird flew over the", "choices": [" tree", " mat", " log"], "answer": 0},
    {"text": "we love this", "choices": [" game", " film"], "answer": 1},
]
TEXTS = ["the cat sat on the mat", "the dog ran under the log and the bird flew over the tree",
         "i like this movie it is very good", "we hate that film it was awful"]


def write_tasks(folder: Path, cache: Path) -> Path:
    """Two local tasks: multiple choice (acc) and rolling log-likelihood (perplexities), sharing
    a template through `include:`, reading jsonl files named relative to the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mc.jsonl").write_text("".join(json.dumps(row) + "\n" for row in MC_ROWS))
    (folder / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    (folder / "_template.yaml").write_text(f"""dataset_path: json
dataset_kwargs:
  cache_dir: {cache}
test_split: test
""")
    (folder / "tiny_mc.yaml").write_text("""include: _template.yaml
task: tiny_mc
dataset_kwargs:
  data_files: {test: mc.jsonl}
output_type: multiple_choice
doc_to_text: "{{text}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
fewshot_split: test
metric_list:
  - metric: acc
  - metric: acc_norm
""")
    (folder / "tiny_ppl.yaml").write_text("""include: _template.yaml
task: tiny_ppl
dataset_kwargs:
  data_files: {test: texts.jsonl}
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{text}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""")
    return folder


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lmeval")
    save_tiny_llama_with_tokenizer(root / "base")
    make_lora(root / "a", seed=1, init_scale=0.4)
    make_lora(root / "b", seed=2, init_scale=0.4)
    return root


def recipe_text(evals: str, outputs: str = "") -> str:
    return f"""peftdsl: 1
base: base
adapters: {{a: a, b: b}}
compose:
  mix: a - 0.4 * b
{outputs}eval:
{evals}"""


def lint(folder: Path, text: str) -> list:
    """The front end's diagnostics of a recipe written into `folder`."""
    path = folder / "recipe.yaml"
    path.write_text(text)
    return peftdsl.load(path).diagnostics


# ---------------------------------------------------------------- against the harness itself


@needs_harness
def test_values_equal_simple_evaluate_on_the_merged_model(lab: Path, tmp_path: Path, monkeypatch):
    """Each model's value is what the harness gives on PEFT's merge of that composition, with
    the options passed through (`num_fewshot`, `limit`, `measure`); the card shows it too."""
    tasks = write_tasks(tmp_path / "tasks", tmp_path / "cache")
    evals = f"""  - {{name: mc, models: [base, mix], metric: lm_eval, tasks: [tiny_mc], include_path: {tasks},
     num_fewshot: 1, limit: 5}}
  - {{name: ppl, models: [base, mix], metric: lm_eval, tasks: [tiny_ppl], include_path: {tasks},
     measure: bits_per_byte}}
"""
    recipe = lab / "harness.yaml"
    recipe.write_text(recipe_text(evals, outputs=f"outputs:\n  mix: {tmp_path}/mix\n"))
    result = peftdsl.load(recipe).run(quiet=True, report=tmp_path / "report")
    got = {(r.eval, r.model): r.value for r in result.results}

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM

    reference = load_peft(lab / "base", {"a": lab / "a", "b": lab / "b"})
    reference.add_weighted_adapter(["a", "b"], [1.0, -0.4], "mix", combination_type="cat")
    reference.set_adapter("mix")
    models = {"mix": reference.merge_and_unload().eval(),
              "base": AutoModelForCausalLM.from_pretrained(lab / "base").eval()}
    monkeypatch.chdir(tasks)  # the harness reads a task's relative data files from the working folder
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    for name, model in models.items():
        lm = HFLM(pretrained=model, tokenizer=tiny_tokenizer(), batch_size=8)
        mc = simple_evaluate(model=lm, tasks=["tiny_mc"], num_fewshot=1, limit=5, task_manager=manager,
                             bootstrap_iters=0, log_samples=False)
        ppl = simple_evaluate(model=lm, tasks=["tiny_ppl"], task_manager=manager, bootstrap_iters=0,
                              log_samples=False)
        assert got["mc", name] == mc["results"]["tiny_mc"]["acc,none"]  # the first metric by default
        assert got["ppl", name] == pytest.approx(ppl["results"]["tiny_ppl"]["bits_per_byte,none"], rel=1e-5)
    assert got["ppl", "mix"] != pytest.approx(got["ppl", "base"], rel=1e-3)  # the composition changed something
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert {r["metric"] for r in report["results"]} == {"lm_eval"}
    card = (tmp_path / "mix" / "README.md").read_text()
    assert f"| ppl | lm_eval | mix | {got['ppl', 'mix']:.6g} |" in card


@needs_harness
def test_seq2seq_models_run_on_the_harness_seq2seq_backend(tmp_path: Path, monkeypatch):
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                      num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)
    T5ForConditionalGeneration(config).save_pretrained(tmp_path / "base")
    tiny_tokenizer().save_pretrained(tmp_path / "base")
    model = get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "base"),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
    model.save_pretrained(tmp_path / "a")
    tasks = write_tasks(tmp_path / "tasks", tmp_path / "cache")
    recipe = peftdsl.loads(f"""peftdsl: 1
base: base
adapters: {{a: a}}
compose:
  twice: 2 * a
eval:
  - {{name: ppl, models: [twice], metric: lm_eval, tasks: [tiny_ppl], include_path: {tasks}}}
""", root=tmp_path)
    [row] = recipe.run(quiet=True, report=tmp_path / "report").results
    reference = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "base"), tmp_path / "a")
    reference.add_weighted_adapter(["default"], [2.0], "twice", combination_type="cat")
    reference.set_adapter("twice")
    monkeypatch.chdir(tasks)
    want = simple_evaluate(model=HFLM(pretrained=reference.merge_and_unload().eval(), tokenizer=tiny_tokenizer(),
                                      batch_size=8), tasks=["tiny_ppl"], bootstrap_iters=0, log_samples=False,
                           task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
    assert row.value == pytest.approx(want["results"]["tiny_ppl"]["word_perplexity,none"], rel=1e-5)


@needs_harness
def test_several_tasks_average_and_the_model_is_untouched(lab: Path, tmp_path: Path):
    import random

    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from peftdsl.evaluation import lm_eval
    from peftdsl.evaluation.evaluate import EvalSpec

    tasks = write_tasks(tmp_path / "tasks", tmp_path / "cache")
    model = AutoModelForCausalLM.from_pretrained(lab / "base").eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    states = (random.getstate(), np.random.get_state()[1].copy(), torch.random.get_rng_state())
    spec = EvalSpec(name="both", metric="lm_eval", tasks=["tiny_mc", "tiny_ppl"], include_path=str(tasks),
                    measure=None, models=("base",))
    outcome = lm_eval.evaluate(model, tiny_tokenizer(), spec)
    each = outcome.details["tasks"]
    assert each["tiny_mc"]["metric"] == "acc,none" and each["tiny_ppl"]["metric"] == "word_perplexity,none"
    assert outcome.value == pytest.approx((each["tiny_mc"]["value"] + each["tiny_ppl"]["value"]) / 2)
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    assert random.getstate() == states[0] and (np.random.get_state()[1] == states[1]).all()
    assert torch.equal(torch.random.get_rng_state(), states[2])


@needs_harness
def test_a_task_that_would_need_the_network_is_a_diagnostic(lab: Path, tmp_path: Path):
    """The harness runs offline: a dataset on the Hub that is not cached is E501 at the eval, not a
    download (and not a traceback)."""
    tasks = write_tasks(tmp_path / "tasks", tmp_path / "cache")
    (tasks / "hub.yaml").write_text("task: needs_hub\ndataset_path: someone/not-cached-anywhere\n"
                                    "output_type: multiple_choice\ntest_split: test\n"
                                    "doc_to_text: x\ndoc_to_choice: [a, b]\ndoc_to_target: 0\n")
    recipe = lab / "hub.yaml"
    recipe.write_text(recipe_text(f"  - {{name: e, models: [mix], metric: lm_eval, tasks: [needs_hub], "
                                  f"include_path: {tasks}}}\n"))
    with pytest.raises(peftdsl.RecipeError) as err:
        peftdsl.load(recipe).run(quiet=True, report=tmp_path / "report")
    [error] = err.value.diagnostics
    assert error.code == "E501" and "lm_eval cannot load `needs_hub`" in error.message
    assert "offline" in error.message.lower() or "not-cached-anywhere" in error.message, error.message
    assert error.span.text.startswith("{name: e")


# ---------------------------------------------------------------- lint: no harness needed


def test_lint_wants_tasks_and_no_data(lab: Path):
    (lab / "t.txt").write_text("the cat\n")
    [missing, data] = [d for d in lint(lab, recipe_text("  - {name: e, models: [mix], metric: lm_eval, data: t.txt}\n"))
                       if d.code == "E501" and "installed" not in d.message]
    assert "names no `tasks`" in missing.message and "tasks: [hellaswag]" in missing.help
    assert "not `data`" in data.message and "remove `data`" in data.help


def test_lint_checks_the_measure_against_the_task_yaml(lab: Path, tmp_path: Path):
    tasks = write_tasks(tmp_path / "tasks", tmp_path / "cache")
    (tasks / "custom.yaml").write_text("include: tiny_mc.yaml\ntask: custom\nprocess_docs: !function utils.docs\n"
                                       "metric_list: [{metric: exact_match}]\n")
    evals = (f"  - {{name: e, models: [mix], metric: lm_eval, tasks: [tiny_mc, custom, hellaswag], "
             f"include_path: {tasks}, ")
    diagnostics = lint(lab, recipe_text(evals + "measure: bleu}\n"))
    [wrong, custom] = [d for d in diagnostics if "measures" in d.message]
    assert wrong.code == "E501" and "task `tiny_mc` does not compute" in wrong.message
    assert wrong.help == "metrics of `tiny_mc`: `acc`, `acc_norm`"  # hellaswag is not under include_path: unknown
    assert custom.help == "metrics of `custom`: `exact_match`"  # its own list, over the included one
    fine = f"  - {{name: e, models: [mix], metric: lm_eval, tasks: [tiny_mc], include_path: {tasks}, "
    assert not [d for d in lint(lab, recipe_text(fine + "measure: 'acc_norm,none'}\n")) if "measures" in d.message]


def test_lint_names_the_extra_when_the_harness_is_missing(lab: Path, tmp_path: Path, monkeypatch):
    from peftdsl.evaluation import lm_eval

    monkeypatch.setattr(lm_eval, "installed", lambda: False)
    tasks = write_tasks(tmp_path / "tasks", tmp_path / "cache")
    [error] = lint(lab, recipe_text(f"  - {{name: e, models: [mix], metric: lm_eval, tasks: [tiny_mc], "
                                    f"include_path: {tasks}}}\n"))
    assert error.code == "E501" and "not installed" in error.message
    assert error.help == "install the extra: pip install 'peftdsl[lm-eval]'"


def test_lint_checks_include_path_and_options_of_other_metrics(lab: Path):
    (lab / "t.txt").write_text("the cat\n")
    diagnostics = lint(lab, recipe_text(
        "  - {name: e, models: [mix], metric: lm_eval, tasks: [x], include_path: no-such-folder}\n"
        "  - {name: p, models: [mix], metric: perplexity, data: t.txt, num_fewshot: 2}\n"
        "  - {name: q, models: [mix], metric: perplexity}\n"))
    messages = [d.message for d in diagnostics if d.code == "E501" and "installed" not in d.message]
    assert messages == ["eval `e`: include_path `no-such-folder` is not a folder",
                        "eval `p` sets `num_fewshot`, which only metric `lm_eval` reads",
                        "eval `q` has no `data` for `perplexity`"]


def test_lint_refuses_lm_eval_on_a_classifier(tmp_path: Path):
    import torch
    from safetensors.torch import save_file

    base = tmp_path / "classifier"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"architectures": ["BertForSequenceClassification"],
                                                  "model_type": "bert"}))
    save_file({"classifier.weight": torch.zeros(2, 4)}, str(base / "model.safetensors"))
    recipe = peftdsl.loads("peftdsl: 1\nbase: classifier\neval:\n  - {name: e, models: [base], "
                           "metric: lm_eval, tasks: [x]}\n", root=tmp_path)
    [error] = [d for d in recipe.errors if "SEQ_CLS" in d.message]
    assert error.code == "E501" and "`lm_eval`" in error.message and "`accuracy`" in error.help


def test_lint_of_an_lm_eval_recipe_imports_neither_torch_nor_the_harness(lab: Path, tmp_path: Path):
    tasks = write_tasks(tmp_path / "tasks", tmp_path / "cache")
    path = lab / "light.yaml"
    path.write_text(recipe_text(f"  - {{name: e, models: [mix], metric: lm_eval, tasks: [tiny_mc], "
                                f"include_path: {tasks}, measure: acc}}\n"))
    code = ("import sys\nfrom peftdsl.cli import main\n"
            f"status = main(['lint', '--format', 'concise', {str(path)!r}])\n"
            "print(status, sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'lm_eval', 'datasets'}))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.stdout.strip().splitlines()[-1].endswith(" []"), result.stdout + result.stderr


def test_the_value_is_the_measure_or_the_tasks_first_metric():
    """How a task's results become the value (no harness needed: the results' shape is its)."""
    from peftdsl.errors import EvalDataError
    from peftdsl.evaluation.lm_eval import _measured

    results = {"results": {"t": {"alias": "t", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match":
                                 "N/A", "exact_match,flexible": 0.5, "f1,none": 0.75}},
               "configs": {"t": {"metric_list": [{"metric": "exact_match"}, {"metric": "f1"}]}},
               "higher_is_better": {"t": {"exact_match": True, "f1": True}}}
    assert _measured(results, "t", None, "e") == ("exact_match,strict-match", 0.25)  # first metric, first filter
    assert _measured(results, "t", "exact_match,flexible", "e") == ("exact_match,flexible", 0.5)
    assert _measured(results, "t", "f1", "e") == ("f1,none", 0.75)
    del results["configs"]["t"]["metric_list"]  # a task that lists none: the metrics its type gave it
    results["higher_is_better"]["t"] = {"f1": True, "exact_match": True}
    assert _measured(results, "t", None, "e") == ("f1,none", 0.75)
    with pytest.raises(EvalDataError, match=r"task `t` has no metric `bleu` \(its metrics: `exact_match,strict-"):
        _measured(results, "t", "bleu", "e")
