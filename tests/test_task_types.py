"""Evaluation follows the model's task (DESIGN §4): seq2seq and classification, against transformers.

The paper's multi-task and analogy settings run on T5 and its generalisation setting on
RoBERTa classifiers; these tiny random models (built here, no downloads) check that each
metric equals the same quantity computed directly with transformers, on the base and on
a LoRA composition (against PEFT's own merge).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoModelForSeq2SeqLM,
    BertConfig,
    BertForSequenceClassification,
    T5Config,
    T5ForConditionalGeneration,
)

import peftdsl
from tests.factories import tiny_tokenizer

PAIRS = [("the cat sat", "on the mat"), ("a dog ran", "under the tree"), ("i like this film", "yes")]


@pytest.fixture(scope="module")
def t5(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    config = T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=2)
    T5ForConditionalGeneration(config).save_pretrained(root / "base")
    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(root / "base")
    for name, seed in (("a", 1), ("b", 2)):
        model = get_peft_model(AutoModelForSeq2SeqLM.from_pretrained(root / "base"),
                               LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM"))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pname, param in sorted(model.named_parameters()):
                if "lora_" in pname:
                    param.copy_(0.3 * torch.randn(param.shape, generator=generator))
        model.save_pretrained(root / name)
    with open(root / "pairs.jsonl", "w") as handle:
        for source, target in PAIRS:
            handle.write(json.dumps({"input": source, "target": target}) + "\n")
    with open(root / "labelled.jsonl", "w") as handle:
        for text, label in (("the cat sat", "pos"), ("awful food", "neg"), ("great movie", "pos")):
            handle.write(json.dumps({"text": text, "label": label}) + "\n")
    return root


def _reference_perplexity(model, tokenizer) -> float:
    nll = tokens = 0.0
    with torch.no_grad():
        for source, target in PAIRS:
            ids = torch.tensor([tokenizer(source)["input_ids"]])
            labels = torch.tensor([tokenizer(text_target=target)["input_ids"]])
            nll += float(model(input_ids=ids, labels=labels).loss) * labels.shape[1]
            tokens += labels.shape[1]
    return math.exp(nll / tokens)


def _recipe(t5: Path, tmp_path: Path) -> peftdsl.Recipe:
    return peftdsl.loads(f"""peftdsl: 1
base: {t5 / 'base'}
adapters: {{a: {t5 / 'a'}, b: {t5 / 'b'}}}
compose:
  mix: 0.5 * a + 0.5 * b
eval:
  - name: ppl
    models: [base, mix]
    metric: perplexity
    data: {t5 / 'pairs.jsonl'}
    batch_size: 2
  - name: acc
    models: [base, mix]
    metric: accuracy
    data: {t5 / 'labelled.jsonl'}
    labels: {{pos: "yes", neg: "no"}}
  - name: gen
    models: [mix]
    metric: generate
    data: {t5 / 'pairs.jsonl'}
    max_new_tokens: 4
""", root=tmp_path)


def test_seq2seq_metrics_equal_transformers(t5: Path, tmp_path: Path):
    recipe = _recipe(t5, tmp_path)
    recipe.raise_for_errors()
    result = recipe.run(report=tmp_path / "report")
    values = {(r.eval, r.model): r.value for r in result.results}
    tokenizer = tiny_tokenizer()
    base = AutoModelForSeq2SeqLM.from_pretrained(t5 / "base").eval()
    from peft import PeftModel

    reference = PeftModel.from_pretrained(AutoModelForSeq2SeqLM.from_pretrained(t5 / "base"), t5 / "a",
                                          adapter_name="a")
    reference.load_adapter(t5 / "b", adapter_name="b")
    reference.add_weighted_adapter(["a", "b"], [0.5, 0.5], "mix", combination_type="cat")
    reference.set_adapter("mix")
    merged = reference.merge_and_unload().eval()
    assert values["ppl", "base"] == pytest.approx(_reference_perplexity(base, tokenizer), rel=1e-5)
    assert values["ppl", "mix"] == pytest.approx(_reference_perplexity(merged, tokenizer), rel=1e-5)
    assert values["ppl", "mix"] != pytest.approx(values["ppl", "base"], rel=1e-3)  # the adapters do something

    # accuracy: the verbalizer with the higher decoder log-likelihood given the text
    def predict(model, text):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        scores = []
        for word in ("yes", "no"):
            labels = torch.tensor([tokenizer(text_target=word)["input_ids"]])
            with torch.no_grad():
                scores.append(-float(model(input_ids=ids, labels=labels).loss) * labels.shape[1])
        return ["pos", "neg"][scores.index(max(scores))]

    rows = [json.loads(line) for line in (t5 / "labelled.jsonl").read_text().splitlines()]
    for name, model in (("base", base), ("mix", merged)):
        want = sum(predict(model, r["text"]) == r["label"] for r in rows) / len(rows)
        assert values["acc", name] == pytest.approx(want)

    # generate: greedy decoding from each input
    generated = []
    for source, _ in PAIRS:
        ids = torch.tensor([tokenizer(source)["input_ids"]])
        out = merged.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                              num_beams=1)
        generated.append(tokenizer.decode(out[0], skip_special_tokens=True))
    assert values["gen", "mix"] == generated


def test_seq2seq_perplexity_on_text_lines_is_a_lint_error(t5: Path, tmp_path: Path):
    (tmp_path / "lines.txt").write_text("the cat sat\n")
    recipe = peftdsl.loads(f"peftdsl: 1\nbase: {t5 / 'base'}\nadapters: {{a: {t5 / 'a'}}}\neval:\n  - name: p\n"
                           f"    models: [a]\n    metric: perplexity\n    data: lines.txt\n", root=tmp_path)
    assert [d.code for d in recipe.errors] == ["E501"] and "jsonl" in recipe.errors[0].message


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cls")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=2, id2label={0: "neg", 1: "pos"},
                        label2id={"neg": 0, "pos": 1})
    BertForSequenceClassification(config).save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    rows = [("the cat sat", "pos"), ("awful food", "neg"), ("great movie", "pos"), ("bad game", "neg")]
    with open(root / "data.jsonl", "w") as handle:
        for text, label in rows:
            handle.write(json.dumps({"text": text, "label": label}) + "\n")
    return root


def test_classification_accuracy_is_the_argmax_of_the_head(classifier: Path, tmp_path: Path):
    recipe = peftdsl.loads(f"""peftdsl: 1
base: {classifier / 'base'}
eval:
  - name: acc
    models: [base]
    metric: accuracy
    data: {classifier / 'data.jsonl'}
  - name: flipped
    models: [base]
    metric: accuracy
    data: {classifier / 'data.jsonl'}
    labels: {{pos: 0, neg: 1}}
""", root=tmp_path)
    recipe.raise_for_errors()
    values = {r.eval: r.value for r in recipe.run(report=tmp_path / "report").results}
    model = BertForSequenceClassification.from_pretrained(classifier / "base").eval()
    tokenizer = tiny_tokenizer()
    rows = [json.loads(line) for line in (classifier / "data.jsonl").read_text().splitlines()]
    with torch.no_grad():
        predicted = [int(model(input_ids=torch.tensor([tokenizer(r["text"])["input_ids"]])).logits.argmax())
                     for r in rows]
    want = sum(p == model.config.label2id[r["label"]] for p, r in zip(predicted, rows)) / len(rows)
    assert values["acc"] == pytest.approx(want)
    assert values["flipped"] == pytest.approx(1 - want)


def test_a_metric_the_task_has_no_evaluation_for_is_a_lint_error(classifier: Path, tmp_path: Path):
    (tmp_path / "t.txt").write_text("the cat\n")
    recipe = peftdsl.loads(f"peftdsl: 1\nbase: {classifier / 'base'}\neval:\n  - name: p\n    models: [base]\n"
                           "    metric: perplexity\n    data: t.txt\n", root=tmp_path)
    [error] = recipe.errors
    assert error.code == "E501" and "SEQ_CLS" in error.message and "`accuracy`" in error.help
