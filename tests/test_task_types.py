"""Evaluation follows the model's task (DESIGN §4): seq2seq, classification, token
classification and question answering, against transformers.

The paper's multi-task and analogy settings run on T5 and its generalisation setting on
RoBERTa classifiers; these tiny random models (built here, no downloads) check that each
metric equals the same quantity computed directly with transformers, on the base and on
a LoRA composition (against PEFT's own merge, or the merged weights written out in torch).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import string
from collections import Counter
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    AutoModelForQuestionAnswering,
    AutoModelForSeq2SeqLM,
    AutoModelForTokenClassification,
    BertConfig,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaForTokenClassification,
    T5Config,
    T5ForConditionalGeneration,
)

import peftdsl
from peftdsl import tasks
from peftdsl.cli import main
from peftdsl.evaluation.question_answering import f1_score, normalize_answer
from peftdsl.evaluation.task_metrics import IMPLEMENTATIONS
from tests.factories import TOKENIZER_WORDS, tiny_tokenizer

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
    _write_jsonl(root / "pairs.jsonl", [{"input": source, "target": target} for source, target in PAIRS])
    _write_jsonl(root / "labelled.jsonl", [{"text": text, "label": label} for text, label in
                                           (("the cat sat", "pos"), ("awful food", "neg"), ("great movie", "pos"))])
    return root


def _write_jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


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
    _write_jsonl(root / "data.jsonl", [{"text": text, "label": label} for text, label in rows])
    _write_jsonl(root / "indices.jsonl", [{"text": text, "label": int(label == "pos")} for text, label in rows])
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
  - name: indices
    models: [base]
    metric: accuracy
    data: {classifier / 'indices.jsonl'}
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
    assert values["indices"] == pytest.approx(want)  # an integer label label2id does not name is the index


def test_a_metric_the_task_has_no_evaluation_for_is_a_lint_error(classifier: Path, tmp_path: Path):
    (tmp_path / "t.txt").write_text("the cat\n")
    recipe = peftdsl.loads(f"peftdsl: 1\nbase: {classifier / 'base'}\neval:\n  - name: p\n    models: [base]\n"
                           "    metric: perplexity\n    data: t.txt\n", root=tmp_path)
    [error] = recipe.errors
    assert error.code == "E501" and "SEQ_CLS" in error.message and "`accuracy`" in error.help


def test_every_task_metric_has_an_implementation():
    """tasks.TASKS (what lint accepts) and the evaluator's registry name the same pairs;
    `lm_eval` is the harness's own, dispatched before the registry for every task it runs."""
    listed = {(task, metric) for task, (_, metrics) in tasks.TASKS.items() if task != tasks.CAUSAL_LM
              for metric in metrics if metric != "lm_eval"}
    assert listed == set(IMPLEMENTATIONS)


# ------------------------------------------------------------------- token classification and QA
#
# Most adapters here are built with `PeftModel(...)` rather than `get_peft_model`, which adds the
# head to `modules_to_save`: the head is then the base's own (random, fixed, saved with the base),
# the adapter carries LoRA factors only, and the references merge those into the weights in torch.
# The last test evaluates adapters that save the head, against PEFT's own merge.
# initializer_range=0.2 (not 0.02) makes the random models' attention peaked enough that a
# padding or masking mistake changes predictions.


def _lora(model_class, base: Path, out: Path, task_type: str, seed: int) -> Path:
    model = PeftModel(model_class.from_pretrained(base),
                      LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type=task_type))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_" in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(out)
    assert json.loads((out / "adapter_config.json").read_text())["modules_to_save"] is None
    return out


def _merged(model_class, base: Path, terms: list[tuple[Path, float]]):
    """The base with Σ c·(α/r)·B·A added to each targeted weight."""
    model = model_class.from_pretrained(base).eval()
    modules = dict(model.named_modules())
    with torch.no_grad():
        for adapter, coefficient in terms:
            config = json.loads((adapter / "adapter_config.json").read_text())
            state = load_file(adapter / "adapter_model.safetensors")
            for key, a in state.items():
                if key.endswith(".lora_A.weight"):
                    name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                    b = state[key.replace(".lora_A.", ".lora_B.")]
                    modules[name].weight += coefficient * config["lora_alpha"] / config["r"] * (b @ a)
    return model


def _cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = main(list(argv))
    return status, out.getvalue()


SENTENCES = [
    ["the", "cat", "sat", "on", "the", "mat"],
    ["a", "dog", "don't", "like", "it"],  # `don't`, `cat's`, `dog-food`: three sub-tokens each
    ["i", "love", "this", "very", "good", "film"],
    ["we", "hate", "", "bad", "food"],  # "" has no token: not scored
    [],
    ["the", "cat's", "dog-food", "is", "not", "awful"],
    ["great", "movie", "isn't", "bad"],
]
LABELS = ("O", "B-X", "I-X")


@pytest.fixture(scope="module")
def tagger(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tagger")
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, num_labels=3, id2label=dict(enumerate(LABELS)), initializer_range=0.2,
                           label2id={label: i for i, label in enumerate(LABELS)})
    RobertaForTokenClassification(config).save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    for name, seed in (("a", 1), ("b", 2)):
        _lora(AutoModelForTokenClassification, root / "base", root / name, "TOKEN_CLS", seed)
    return root


def _reference_tags(model, limit: int | None = None) -> list[list[int | None]]:
    """Per sentence, the argmax class on each word's first sub-token (None: not scored), the
    sub-tokens found by tokenising the words one at a time after BOS, one sentence per pass."""
    tokenizer = tiny_tokenizer()
    predicted = []
    for words in SENTENCES:
        ids, first = [tokenizer.bos_token_id], []
        for word in words:
            pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
            first.append(len(ids) if pieces else None)
            ids += pieces
        assert not words or ids == tokenizer(words, is_split_into_words=True)["input_ids"]
        ids = ids[:limit] if limit else ids
        with torch.no_grad():
            argmax = model(input_ids=torch.tensor([ids])).logits[0].argmax(-1).tolist() if words else []
        predicted.append([argmax[p] if p is not None and p < len(ids) else None for p in first])
    return predicted


def _agreement(predicted: list[list[int | None]], truth: list[list[int]]) -> float:
    pairs = [(p, t) for row_p, row_t in zip(predicted, truth) for p, t in zip(row_p, row_t) if p is not None]
    return sum(p == t for p, t in pairs) / len(pairs)


def test_token_classification_accuracy_scores_each_words_first_subtoken(tagger: Path, tmp_path: Path):
    models = {"base": _merged(AutoModelForTokenClassification, tagger / "base", []),
              "a": _merged(AutoModelForTokenClassification, tagger / "base", [(tagger / "a", 1.0)]),
              "mix": _merged(AutoModelForTokenClassification, tagger / "base",
                             [(tagger / "a", 1.0), (tagger / "b", -0.5)])}
    # The truth is what `mix` predicts (unscored words: class 0), so any word it gets wrong shows;
    # every other sentence stores classes as indices, as HF datasets do.
    truth = [[0 if p is None else p for p in row] for row in _reference_tags(models["mix"])]
    _write_jsonl(tmp_path / "tags.jsonl", [{"tokens": words, "tags": tags if i % 2 else [LABELS[t] for t in tags]}
                                           for i, (words, tags) in enumerate(zip(SENTENCES, truth))])
    remap = {"O": 2, "B-X": 0, "I-X": 1}  # the recipe's `labels`: data label -> class index
    named = {index: label for label, index in remap.items()}
    truncated = _reference_tags(models["mix"], limit=5)
    _write_jsonl(tmp_path / "renamed.jsonl", [{"words": words, "ner": [named[0 if p is None else p] for p in row]}
                                              for words, row in zip(SENTENCES, truncated)])
    recipe = peftdsl.loads(f"""peftdsl: 1
base: {tagger / 'base'}
adapters: {{a: {tagger / 'a'}, b: {tagger / 'b'}}}
compose:
  mix: a - 0.5 * b
eval:
  - name: tags
    models: [base, a, mix]
    metric: accuracy
    data: tags.jsonl
    batch_size: 3
  - name: renamed
    models: [mix]
    metric: accuracy
    data: renamed.jsonl
    tokens_field: words
    tags_field: ner
    labels: {{{", ".join(f"{k}: {v}" for k, v in remap.items())}}}
    max_length: 5
""", root=tmp_path)
    recipe.raise_for_errors()
    values = {(r.eval, r.model): r.value for r in recipe.run(report=tmp_path / "report").results}
    assert values["tags", "mix"] == 1.0
    for name in ("base", "a"):
        assert values["tags", name] == pytest.approx(_agreement(_reference_tags(models[name]), truth)), name
        assert values["tags", name] < 1  # the adapters do something
    assert values["renamed", "mix"] == 1.0  # words past max_length are not scored, not counted wrong


def _qa_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny word-level vocabulary, with BERT's pair layout: <s> question </s> context </s>
    and token type ids 0 / 1."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({word: i + 4 for i, word in enumerate(dict.fromkeys(TOKENIZER_WORDS))})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B:1 </s>:1", special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_input_names=["input_ids", "token_type_ids",
                                                                         "attention_mask"])


QA_ROWS = [
    ("what sat on the mat?", "the cat sat on the mat, and the dog ran under the tree."),
    ("who ran?", "a dog ran under a tree; the bird flew over it."),
    ("is it good?", "this film is very good, i like it."),
    ("what was bad?", "the food was bad and the game was awful."),
    ("what do we love?", "we love this movie, not that game."),
    ("what flew?", "a bird flew over the log and the tree."),
    ("what is great?", "that game is great, this food is awful."),
    ("do you like it?", "yes, i like it very much: it is a good film!"),
]


def _reference_span(model, question: str, context: str, longest: int) -> str:
    tokenizer = _qa_tokenizer()
    encoding = tokenizer(question, context, return_offsets_mapping=True)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([encoding["input_ids"]]),
                    token_type_ids=torch.tensor([encoding["token_type_ids"]]))
    start, end = out.start_logits[0].tolist(), out.end_logits[0].tolist()
    inside = [i for i, sequence in enumerate(encoding.sequence_ids()) if sequence == 1]
    best = None
    for s in inside:
        for e in inside:
            if s <= e < s + longest and (best is None or start[s] + end[e] > best[0]):
                best = (start[s] + end[e], s, e)
    offsets = encoding["offset_mapping"]
    return context[offsets[best[1]][0] : offsets[best[2]][1]]


def _squad_normalize(s: str) -> str:
    """SQuAD's evaluation script (v1.1 and v2.0), as written there."""
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def _squad_f1(prediction: str, truth: str) -> float:
    """SQuAD v2.0's `compute_f1` (v1.1's, plus: two texts that normalise to nothing agree)."""
    predicted, gold = _squad_normalize(prediction).split(), _squad_normalize(truth).split()
    if not predicted or not gold:
        return float(predicted == gold)
    common = Counter(predicted) & Counter(gold)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(predicted), same / len(gold)
    return 2 * precision * recall / (precision + recall)


@pytest.fixture(scope="module")
def reader(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qa")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.2)
    BertForQuestionAnswering(config).save_pretrained(root / "base")
    _qa_tokenizer().save_pretrained(root / "base")
    _lora(AutoModelForQuestionAnswering, root / "base", root / "a", "QUESTION_ANS", 3)
    return root


def test_question_answering_exact_match_and_f1_equal_squads(reader: Path, tmp_path: Path):
    base = _merged(AutoModelForQuestionAnswering, reader / "base", [])
    mix = _merged(AutoModelForQuestionAnswering, reader / "base", [(reader / "a", 0.8)])
    spans = {name: [_reference_span(model, q, c, 3) for q, c in QA_ROWS] for name, model in
             (("base", base), ("mix", mix))}
    assert spans["base"] != spans["mix"]  # the adapter does something
    # Answers made from the predictions (so that any span predicted differently shows), in each
    # accepted form: a string, a list, SQuAD's {"text": [...]}; one wrong, one partly right (on
    # the longest of mix's spans, so that its F1 is above 0 whatever the random model predicts).
    mix, base = spans["mix"], spans["base"]
    answers = [f"The {mix[0].upper()}!", "  " + base[1] + "  ", mix[2], {"text": [mix[3]]},
               ["yes", mix[4]], base[5], {"text": ["no", mix[6]], "answer_start": [0, 0]}, "not in the context"]
    partial = max(range(7), key=lambda i: len(_squad_normalize(mix[i]).split()))
    answers[partial] = {"text": [mix[partial] + " very good"]}
    _write_jsonl(tmp_path / "qa.jsonl", [{"question": q, "context": c, "answer": a}
                                         for (q, c), a in zip(QA_ROWS, answers)])
    _write_jsonl(tmp_path / "renamed.jsonl", [{"q": q, "passage": c, "answers": a}
                                              for (q, c), a in zip(QA_ROWS, answers)])
    recipe = peftdsl.loads(f"""peftdsl: 1
base: {reader / 'base'}
adapters: {{a: {reader / 'a'}}}
compose:
  mix: 0.8 * a
eval:
  - name: em
    models: [base, mix]
    metric: accuracy
    data: qa.jsonl
    batch_size: 2
    max_answer_length: 3
  - name: f1
    models: [base, mix]
    metric: f1
    data: renamed.jsonl
    question_field: q
    context_field: passage
    answer_field: answers
    max_answer_length: 3
""", root=tmp_path)
    recipe.raise_for_errors()
    values = {(r.eval, r.model): r.value for r in recipe.run(report=tmp_path / "report").results}
    texts = [[a] if isinstance(a, str) else a if isinstance(a, list) else a["text"] for a in answers]
    for name in ("base", "mix"):
        exact = [max(float(_squad_normalize(p) == _squad_normalize(t)) for t in ts)
                 for p, ts in zip(spans[name], texts)]
        f1 = [max(_squad_f1(p, t) for t in ts) for p, ts in zip(spans[name], texts)]
        assert values["em", name] == pytest.approx(sum(exact) / len(exact)), name
        assert values["f1", name] == pytest.approx(sum(f1) / len(f1)), name
        assert 0 < values["em", name] < 1
    assert values["f1", "mix"] > values["em", "mix"]  # the partial answer counts for F1 only


def test_answers_are_normalised_as_squad_does():
    assert normalize_answer("The  Cat, sat!") == "cat sat" == _squad_normalize("The  Cat, sat!")
    assert normalize_answer("an apple-tree") == "appletree"
    assert f1_score("cat sat", ["the cat sat on a mat"]) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert f1_score("dog", ["cat", "a dog"]) == 1.0
    assert f1_score("the", ["a"]) == 1.0  # both normalise to nothing


TAGGER_BAD_DATA = [
    ('{"tokens": ["the"], "tags": ["O"]}\n{"tokens": ["the", "cat"]}\n', ":2: missing field `tags`"),
    ('{"tokens": ["the", "cat"], "tags": ["O"]}\n', ":1: 2 words in `tokens` but 1 labels in `tags`"),
    ('{"tokens": ["the"], "tags": ["B-Y"]}\n', ":1: label `B-Y` has no class index"),
    ('{"tokens": ["the"], "tags": [7]}\n', ":1: label `7` maps to class 7, but the model has 3 classes"),
    ('{"tokens": "the cat", "tags": ["O", "O"]}\n', ":1: field `tokens` has the wrong type"),
]
CLASSIFIER_BAD_DATA = [
    ('{"text": "the cat", "label": 5}\n', ":1: label `5` maps to class 5, but the model has 2 classes"),
    ('{"text": "the cat", "label": "meh"}\n', ":1: label `meh` has no class index"),
]
READER_BAD_DATA = [
    ('{"question": "who?", "answer": "cat"}\n', ":1: missing field `context`"),
    ('{"question": "who?", "context": "the cat", "answer": []}\n', ":1: `answer` lists no answer"),
    ('{"question": "who?", "context": "the cat", "answer": 3}\n', ":1: field `answer` has the wrong type"),
]


@pytest.mark.parametrize("model, content, expected", [("tagger", *case) for case in TAGGER_BAD_DATA]
                         + [("classifier", *case) for case in CLASSIFIER_BAD_DATA]
                         + [("reader", *case) for case in READER_BAD_DATA])
def test_bad_rows_are_an_error_naming_the_file_and_line(model, content, expected, request, tmp_path: Path):
    base = request.getfixturevalue(model) / "base"
    (tmp_path / "rows.jsonl").write_text(content)
    path = tmp_path / "recipe.yaml"
    path.write_text(f"peftdsl: 1\nbase: {base}\neval:\n  - name: e\n    models: [base]\n    metric: accuracy\n"
                    "    data: rows.jsonl\n")
    status, text = _cli("run", str(path), "--quiet", "--report", str(tmp_path / "report"))
    assert status == 1 and "error[E501]" in text and f"rows.jsonl{expected}" in text, text
    assert "Traceback" not in text and "internal error" not in text


@pytest.mark.parametrize("model, metric, offered", [
    ("tagger", "perplexity", "`accuracy`"), ("tagger", "generate", "`accuracy`"), ("tagger", "f1", "`accuracy`"),
    ("reader", "perplexity", "`accuracy`, `f1`"), ("reader", "generate", "`accuracy`, `f1`"),
    ("classifier", "f1", "`accuracy`"),
])
def test_a_metric_token_classifiers_and_readers_cannot_evaluate_is_a_lint_error(model, metric, offered, request,
                                                                                 tmp_path: Path):
    base = request.getfixturevalue(model) / "base"
    (tmp_path / "rows.jsonl").write_text('{"text": "the cat"}\n')
    recipe = peftdsl.loads(f"peftdsl: 1\nbase: {base}\neval:\n  - name: e\n    models: [base]\n"
                           f"    metric: {metric}\n    data: rows.jsonl\n", root=tmp_path)
    [error] = recipe.errors
    task = {"tagger": "TOKEN_CLS", "reader": "QUESTION_ANS", "classifier": "SEQ_CLS"}[model]
    assert error.code == "E501" and f"`{metric}`, which a {task} model" in error.message
    assert error.span.line == 4 and error.help == f"metrics for {task} models: {offered}"  # the eval entry


def test_question_answering_reads_rows_not_lines(reader: Path, tmp_path: Path):
    (tmp_path / "lines.txt").write_text("the cat\n")
    recipe = peftdsl.loads(f"peftdsl: 1\nbase: {reader / 'base'}\neval:\n  - name: e\n    models: [base]\n"
                           "    metric: f1\n    data: lines.txt\n", root=tmp_path)
    assert [d.code for d in recipe.errors] == ["E501"] and ".jsonl" in recipe.errors[0].message


@pytest.mark.parametrize("model, labels, words", [
    ("classifier", '{pos: "yes", neg: 0}', "maps labels to text, but a SEQ_CLS model predicts class indices"),
    ("tagger", '{O: "o"}', "maps labels to text, but a TOKEN_CLS model predicts class indices"),
    ("t5", "{pos: 1, neg: 0}", "maps labels to class indices, but a SEQ_2_SEQ_LM model scores"),
])
def test_labels_of_the_wrong_kind_for_the_task_are_a_lint_error(model, labels, words, request, tmp_path: Path):
    base = request.getfixturevalue(model) / "base"
    (tmp_path / "rows.jsonl").write_text('{"text": "the cat", "label": "pos"}\n')
    recipe = peftdsl.loads(f"peftdsl: 1\nbase: {base}\neval:\n  - name: e\n    models: [base]\n"
                           f"    metric: accuracy\n    data: rows.jsonl\n    labels: {labels}\n", root=tmp_path)
    [error] = recipe.errors
    assert error.code == "E501" and words in error.message and "labels:" in error.help


@pytest.mark.parametrize("task", ["TOKEN_CLS", "QUESTION_ANS"])
def test_a_peft_adapter_that_saves_the_head_is_evaluated_with_it(task, tagger: Path, reader: Path, tmp_path: Path):
    """`get_peft_model` puts the head in `modules_to_save`; peftdsl applies the saved head too.
    The reference is PEFT's own load and merge."""
    model_class, base = ((AutoModelForTokenClassification, tagger / "base") if task == "TOKEN_CLS"
                         else (AutoModelForQuestionAnswering, reader / "base"))
    model = get_peft_model(model_class.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type=task))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.requires_grad:  # the LoRA factors and the saved head
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(tmp_path / "headed")
    assert json.loads((tmp_path / "headed" / "adapter_config.json").read_text())["modules_to_save"]
    merged = PeftModel.from_pretrained(model_class.from_pretrained(base), tmp_path / "headed").merge_and_unload().eval()
    if task == "TOKEN_CLS":
        truth = [[0 if p is None else p for p in row] for row in _reference_tags(merged)]
        _write_jsonl(tmp_path / "rows.jsonl", [{"tokens": w, "tags": t} for w, t in zip(SENTENCES, truth)])
    else:
        _write_jsonl(tmp_path / "rows.jsonl", [{"question": q, "context": c, "answer": _reference_span(merged, q, c, 30)}
                                               for q, c in QA_ROWS])
    recipe = peftdsl.loads(f"peftdsl: 1\nbase: {base}\nadapters: {{h: {tmp_path / 'headed'}}}\neval:\n"
                           "  - name: e\n    models: [base, h]\n    metric: accuracy\n    data: rows.jsonl\n"
                           "    batch_size: 3\n", root=tmp_path)
    recipe.raise_for_errors()
    values = {r.model: r.value for r in recipe.run(report=tmp_path / "report").results}
    assert values["h"] == 1.0 and values["base"] < 1  # the saved head takes part
