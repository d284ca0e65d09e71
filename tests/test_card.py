"""Model cards (docs/recipes.md, "Model cards"): a README.md in the Hugging Face Hub's format with
every output, written inside the atomic output, the same bytes on every run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

import peftdsl
from peftdsl.outputs.card import card_text, front_matter_of, hub_model_id
from tests.factories import make_ia3, make_lora, save_tiny_llama_with_tokenizer

HUB_BASE = "org/tiny-llama"


def _record_base(adapter: Path, name: str) -> None:
    """Set the adapter's `base_model_name_or_path` (PEFT's save would look the name up online)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = name
    (adapter / "adapter_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("card")
    save_tiny_llama_with_tokenizer(root / "base")
    (root / "base" / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: [en]\n---\n# a tiny llama\n")
    make_lora(root / "a", seed=1, task_type="CAUSAL_LM")
    make_lora(root / "b", seed=2, task_type="CAUSAL_LM")
    make_ia3(root / "i", seed=3)
    for name in ("a", "b", "i"):
        _record_base(root / name, HUB_BASE)
    (root / "text.txt").write_text("the cat sat on the mat\nthe dog ran under the log\n")
    return root


def recipe_text(out: Path, *, evals: bool = True, dtype: str = "float32") -> str:
    text = f"""peftdsl: 1
base: base
adapters: {{a: a, b: b, i: i}}
params: {{lam: 0.4}}
compose:
  mix: a - lam * b
  small: svd(mix, rank=2)
  scaled: 0.5 * i
outputs:
  mix: {{path: {out}/mix, dtype: {dtype}}}
  small: {out}/small
  scaled: {out}/scaled
  merged: {{path: {out}/merged, merge: true}}
"""
    text = text.replace("  scaled: 0.5 * i\n", "  scaled: 0.5 * i\n  merged: mix + b\n")
    if evals:
        text += "eval:\n  - {name: ppl, models: [base, mix, merged], metric: perplexity, data: text.txt}\n"
    return text


def split_card(path: Path) -> tuple[dict, str]:
    text = path.read_text(encoding="utf-8")
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, flags=re.S)
    assert match, text[:200]
    return yaml.safe_load(match.group(1)), match.group(2)


@pytest.fixture(scope="module")
def written(lab: Path, tmp_path_factory) -> tuple[Path, Path, peftdsl.RunResult]:
    out = tmp_path_factory.mktemp("out")
    recipe = lab / "cards.yaml"
    recipe.write_text(recipe_text(out))
    result = peftdsl.load(recipe).run(quiet=True, report=out / "report")
    assert result.written == ("mix", "small", "scaled", "merged")
    return out, recipe, result


def test_front_matter_says_what_the_hub_indexes(written):
    out, _, _ = written
    want = {
        "mix": ("peft", ["peftdsl", "lora", "task-arithmetic"]),
        "small": ("peft", ["peftdsl", "lora", "svd", "task-arithmetic"]),
        "scaled": ("peft", ["peftdsl", "ia3", "task-arithmetic"]),
        "merged": ("transformers", ["peftdsl", "merge", "task-arithmetic"]),
    }
    for name, (library, tags) in want.items():
        meta, _ = split_card(out / name / "README.md")
        assert meta["base_model"] == HUB_BASE, name  # the adapters' record: the recipe's base is a folder
        assert meta["library_name"] == library
        assert meta["tags"] == tags
        assert meta["license"] == "apache-2.0"  # from the base's own card
    assert split_card(out / "mix" / "README.md")[0]["pipeline_tag"] == "text-generation"  # task_type CAUSAL_LM
    # The (IA)³ adapters declare no task type; the base's `LlamaForCausalLM` says it.
    assert split_card(out / "scaled" / "README.md")[0]["pipeline_tag"] == "text-generation"


def test_pipeline_tag_only_where_something_says_the_task():
    from peftdsl import tasks

    assert tasks.declared_task([None], {"architectures": ["BertModel"]}) is None
    assert tasks.declared_task(["SEQ_CLS"], None) == "SEQ_CLS"
    assert tasks.declared_task([], {"is_encoder_decoder": True}) == "SEQ_2_SEQ_LM"
    assert tasks.model_task([None], {"architectures": ["BertModel"]}) == "CAUSAL_LM"  # evaluation's default


def test_huggingface_hub_reads_the_card(written):
    from huggingface_hub import ModelCard

    out, _, _ = written
    card = ModelCard.load(out / "small" / "README.md")
    assert card.data.base_model == HUB_BASE
    assert card.data.library_name == "peft"
    assert "svd" in card.data.tags
    assert "## Recipe" in card.text


def test_body_holds_recipe_expression_inputs_and_results(written):
    out, recipe, _ = written
    _, body = split_card(out / "mix" / "README.md")
    provenance = json.loads((out / "mix" / "peftdsl.json").read_text())
    assert recipe.read_text() in body
    assert f"```\n{provenance['canonical']}\n```" in body
    for name, info in provenance["inputs"].items():
        assert re.search(rf"\| {name} \| `{name}` \| `{info['sha256']}` \|", body)
    report = json.loads((out / "report" / "report.json").read_text())
    values = {(r["model"]): r["value"] for r in report["results"]}
    assert f"| ppl | perplexity | mix | {values['mix']:.6g} |" in body
    assert f"| ppl | perplexity | base | {values['base']:.6g} |" in body  # for comparison
    assert "| merged |" not in body.split("## Evaluation")[1].split("##")[0]  # another output's value
    merged = split_card(out / "merged" / "README.md")[1]
    assert f"| ppl | perplexity | merged | {values['merged']:.6g} |" in merged
    # No eval names `small`: its card says so instead of showing numbers.
    assert "No evaluation results" in split_card(out / "small" / "README.md")[1]


def test_cards_are_byte_identical_across_runs(written, lab: Path):
    out, recipe, _ = written
    first = {name: (out / name / "README.md").read_bytes() for name in ("mix", "small", "scaled", "merged")}
    peftdsl.load(recipe).run(quiet=True, force=True, report=out / "report")
    assert {name: (out / name / "README.md").read_bytes() for name in first} == first


def test_a_failed_run_leaves_no_card(lab: Path, tmp_path: Path):
    """`1e7 * a` overflows float16 while the adapter is written: nothing of it appears, the
    earlier output at that path keeps its card, and no temporary folder is left."""
    recipe = lab / "overflow.yaml"
    recipe.write_text(f"peftdsl: 1\nbase: base\nadapters: {{a: a}}\ncompose:\n  x: 1e7 * a\n"
                      f"outputs:\n  x: {{path: {tmp_path}/x, dtype: float16}}\n")
    with pytest.raises(peftdsl.RecipeError, match="R601"):
        peftdsl.load(recipe).run(quiet=True)
    assert list(tmp_path.iterdir()) == []
    recipe.write_text(recipe.read_text().replace("1e7 * a", "2 * a"))
    peftdsl.load(recipe).run(quiet=True)
    card = (tmp_path / "x" / "README.md").read_bytes()
    recipe.write_text(recipe.read_text().replace("2 * a", "1e7 * a"))
    with pytest.raises(peftdsl.RecipeError, match="R601"):
        peftdsl.load(recipe).run(quiet=True, force=True)
    assert (tmp_path / "x" / "README.md").read_bytes() == card
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


def test_save_writes_the_card_that_run_without_eval_writes(lab: Path, tmp_path: Path):
    """`Composition.save` evaluates nothing: its card is the one `run --no-eval` writes."""
    recipe = lab / "saved.yaml"
    recipe.write_text(recipe_text(tmp_path / "run"))
    loaded = peftdsl.load(recipe)
    loaded.run(quiet=True, no_eval=True, only=["mix"])
    saved = loaded.compose("mix").save(tmp_path / "elsewhere")
    assert (saved / "README.md").read_bytes() == (tmp_path / "run" / "mix" / "README.md").read_bytes()
    assert "No evaluation results" in (saved / "README.md").read_text()


# ---------------------------------------------------------------- the parts, one at a time


@pytest.mark.parametrize("name, want", [
    ("hf:org/model@v2", "org/model"),
    ("hf:gpt2", "gpt2"),
    ("org/model", "org/model"),
    ("gpt2", "gpt2"),  # a legacy single-name id
    ("/abs/path/model", None),
    ("../models/tiny", None),
    ("./tiny", None),
    ("org/sub/model", None),
    ("org--x/model", None),
    ("model.git", None),
    ("", None),
    (None, None),
    ("a" * 97, None),
])
def test_hub_model_id_follows_the_hubs_repo_id_rules(tmp_path: Path, name, want):
    assert hub_model_id(name, tmp_path) == want


def test_a_name_that_is_a_folder_beside_the_recipe_is_no_hub_id(tmp_path: Path):
    (tmp_path / "org" / "model").mkdir(parents=True)
    assert hub_model_id("org/model", tmp_path) is None
    assert hub_model_id("hf:org/model", tmp_path) == "org/model"  # hf: says it is the Hub's


def test_local_base_without_hub_record_has_no_base_model(lab: Path, tmp_path: Path):
    make_lora(tmp_path / "local", seed=4)
    _record_base(tmp_path / "local", str(lab / "base"))  # an absolute path, as PEFT records a local base
    (tmp_path / "base").symlink_to(lab / "base")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"peftdsl: 1\nbase: base\nadapters: {{l: local}}\ncompose:\n  x: 2 * l\n"
                      f"outputs:\n  x: {tmp_path}/x\n")
    peftdsl.load(recipe).run(quiet=True)
    meta, body = split_card(tmp_path / "x" / "README.md")
    assert "base_model" not in meta
    assert "`base` (a local folder, not a Hub id); the card names no `base_model`." in body


def test_license_other_keeps_its_name_and_link(tmp_path: Path):
    (tmp_path / "README.md").write_text("---\nlicense: other\nlicense_name: tiny\nlicense_link: LICENSE\n---\n")
    from peftdsl.outputs.card import base_license

    assert base_license(tmp_path) == {"license": "other", "license_name": "tiny", "license_link": "LICENSE"}
    (tmp_path / "README.md").write_text("---\nlicense: [unclosed\n---\n")
    assert base_license(tmp_path) == {}
    assert base_license(tmp_path / "missing") == {}


def test_recipe_text_with_backticks_keeps_its_fence(tmp_path: Path):
    provenance = {
        "output": "x", "kind": "lora", "merge": False, "peftdsl": "0", "torch": "0", "peft": "0",
        "canonical": "a", "dtype": "float32", "device": "cpu", "seed": 0, "params": {},
        "inputs": {"a": {"path": "a|b", "sha256": "0" * 64}},
        "recipe": {"file": "r.yaml", "name": "r", "sha256": "1" * 64, "text": "# ```` four\npeftdsl: 1\n"},
    }
    text = card_text({"library_name": "peft", "tags": ["peftdsl"]}, provenance, [], base=None)
    assert "`````yaml\n# ```` four\npeftdsl: 1\n`````" in text
    assert r"| a | `a\|b` |" in text
    path = tmp_path / "README.md"
    path.write_text(text)
    assert front_matter_of(path) == {"library_name": "peft", "tags": ["peftdsl"]}
