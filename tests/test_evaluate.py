"""Evaluation engine: in-memory application against PEFT, metrics against plain transformers.

Every reference here is computed independently of peftdsl: PEFT's own forward
pass and merge for ``applied``; a per-sequence loop with ``model(ids,
labels=ids)`` for perplexity; a per-row, per-candidate loop for accuracy;
``model.generate`` for generation. Models and tokenizers are built in the test
(no downloads).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from factories import (
    VOCAB,
    load_peft,
    make_ia3,
    make_lora,
    tiny_gpt2,
    tiny_llama,
    tiny_tokenizer,
)

from peftdsl.evaluation.apply import DenseDelta, IA3Delta, LoraDelta, applied
from peftdsl.evaluation.evaluate import (
    EvalDataError,
    EvalSpec,
    accuracy,
    evaluate_models,
    generate,
    load_data,
    perplexity,
    run_eval,
)

WORDS = (
    "the a movie film was is great good bad terrible awful fine plot actors story "
    "i we you they liked loved hated saw watched it this that and but very not really "
    "cat dog sat on mat ran fast slow red blue green sky sea tree yes no maybe"
).split()

SENTENCES = [
    "the movie was great",
    "i hated this film and the plot was terrible",
    "we watched it",
    "the cat sat on the mat and the dog ran fast but the sky was blue",
    "good",
    "they really liked the actors",
    "this story is not very good but the sea is green",
]


# --------------------------------------------------------------------- fixtures


def build_tokenizer():
    """A word-level tokenizer over WORDS that fits the tiny vocab."""
    return tiny_tokenizer(VOCAB, WORDS)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(0)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lora") / "a"
    return make_lora(
        path,
        seed=3,
        targets=("q_proj", "v_proj", "down_proj", "embed_tokens"),
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 3.0},
        init_scale=0.3,
    )


def _lora_deltas(peft_model, adapter: str, layout: str = "linear") -> dict:
    """Factors read off PEFT's loaded layers, with PEFT's own per-module scaling folded into B."""
    deltas = {}
    for name, module in peft_model.base_model.model.named_modules():
        if adapter in getattr(module, "lora_A", {}):
            B = module.lora_B[adapter].weight.detach() * module.scaling[adapter]
            deltas[name] = LoraDelta(A=module.lora_A[adapter].weight.detach(), B=B, layout=layout)
        if adapter in getattr(module, "lora_embedding_A", {}):
            B = module.lora_embedding_B[adapter].detach() * module.scaling[adapter]
            deltas[name] = LoraDelta(A=module.lora_embedding_A[adapter].detach(), B=B, layout="embedding")
    return deltas


def _ia3_deltas(peft_model, adapter: str, layout: str = "linear") -> dict:
    deltas = {}
    for name, module in peft_model.base_model.model.named_modules():
        if adapter in getattr(module, "ia3_l", {}):
            l = module.ia3_l[adapter].detach().clone()  # noqa: E741
            deltas[name] = IA3Delta(l=l, feedforward=module.is_feedforward, layout=layout)
    return deltas


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _assert_restored(model, snapshot) -> None:
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for name, tensor in state.items():
        assert tensor.dtype == snapshot[name].dtype, name
        assert torch.equal(tensor, snapshot[name]), name


IDS = torch.randint(4, 60, (2, 12), generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------- applied


def test_lora_matches_peft_forward_and_restores_exactly(llama, lora_dir):
    peft_model = load_peft("llama", {"a": lora_dir})
    deltas = _lora_deltas(peft_model, "a")
    assert any(d.layout == "embedding" for d in deltas.values())
    snapshot = _snapshot(llama)
    with torch.no_grad():
        expected = peft_model(input_ids=IDS).logits
        before = llama(input_ids=IDS).logits
        with applied(llama, deltas):
            got = llama(input_ids=IDS).logits
        after = llama(input_ids=IDS).logits
    assert (expected - before).abs().max() > 1e-2  # the adapter does something
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(after, before)
    _assert_restored(llama, snapshot)


def test_dense_delta_equals_its_factors(llama, lora_dir):
    deltas = _lora_deltas(load_peft("llama", {"a": lora_dir}), "a")
    dense = {name: DenseDelta(delta=d.B @ d.A, layout=d.layout) for name, d in deltas.items()}
    with torch.no_grad():
        with applied(llama, deltas):
            low_rank = llama(input_ids=IDS).logits
        with applied(llama, dense):
            full = llama(input_ids=IDS).logits
    torch.testing.assert_close(full, low_rank, rtol=1e-5, atol=1e-6)


def test_ia3_matches_peft_forward_and_merge(llama, tmp_path):
    path = make_ia3(tmp_path / "ia3", seed=4, targets=("k_proj", "v_proj", "up_proj", "down_proj"))
    peft_model = load_peft("llama", {"i": path})
    deltas = _ia3_deltas(peft_model, "i")
    assert {d.feedforward for d in deltas.values()} == {True, False}
    snapshot = _snapshot(llama)
    with torch.no_grad():
        expected = peft_model(input_ids=IDS).logits
        with applied(llama, deltas):
            got = llama(input_ids=IDS).logits
            patched = _snapshot(llama)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    merged = peft_model.merge_and_unload().state_dict()
    for name, tensor in patched.items():
        torch.testing.assert_close(tensor, merged[name], rtol=0, atol=0, msg=name)
    _assert_restored(llama, snapshot)


def test_gpt2_conv1d_lora_and_ia3_with_bias(tmp_path):
    """GPT-2's Conv1D stores weights in×out, and (IA)³ also scales the bias there."""
    lora = make_lora(tmp_path / "lora", base="gpt2", seed=5, targets=("c_attn", "c_proj"))
    ia3 = make_ia3(tmp_path / "ia3", base="gpt2", seed=6, targets=("c_attn", "c_fc", "mlp.c_proj"), feedforward=("mlp.c_proj",))
    for path, extract in ((lora, _lora_deltas), (ia3, _ia3_deltas)):
        peft_model = load_peft("gpt2", {"a": path})
        deltas = extract(peft_model, "a", layout="conv1d")
        base = tiny_gpt2(0)
        snapshot = _snapshot(base)
        with torch.no_grad():
            expected = peft_model(input_ids=IDS).logits
            with applied(base, deltas):
                got = base(input_ids=IDS).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        _assert_restored(base, snapshot)


def test_tied_embedding_follows_peft_merge_and_warns(tmp_path):
    """GPT-2 ties wte to lm_head: PEFT's unmerged forward and its merge disagree there.

    Patching a weight can only mean the merge (both uses change), so that is the
    reference, and the user is warned.
    """
    path = make_lora(tmp_path / "wte", base="gpt2", seed=2, targets=("wte",))
    deltas = _lora_deltas(load_peft("gpt2", {"a": path}), "a")
    merged = load_peft("gpt2", {"a": path}).merge_and_unload()
    base = tiny_gpt2(0)
    with torch.no_grad():
        expected = merged(input_ids=IDS).logits
        with pytest.warns(UserWarning, match="tied weights"):
            with applied(base, deltas):
                got = base(input_ids=IDS).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_bfloat16_weights_are_patched_in_float32_and_restored(lora_dir):
    model = tiny_llama(0).to(torch.bfloat16)
    deltas = _lora_deltas(load_peft("llama", {"a": lora_dir}), "a")
    snapshot = _snapshot(model)
    name = "model.layers.0.self_attn.q_proj"
    weight = model.get_submodule(name).weight
    expected = (weight.float() + deltas[name].B @ deltas[name].A).to(torch.bfloat16)
    with applied(model, deltas):
        assert model.get_submodule(name).weight.dtype == torch.bfloat16
        assert torch.equal(model.get_submodule(name).weight, expected)
    _assert_restored(model, snapshot)


def test_restores_when_the_block_raises_and_rejects_bad_deltas(llama, lora_dir):
    deltas = _lora_deltas(load_peft("llama", {"a": lora_dir}), "a")
    snapshot = _snapshot(llama)
    with pytest.raises(RuntimeError, match="boom"):
        with applied(llama, deltas):
            raise RuntimeError("boom")
    _assert_restored(llama, snapshot)
    bad = dict(deltas)
    bad["model.layers.0.self_attn.k_proj"] = deltas["model.layers.0.self_attn.q_proj"]  # k_proj is narrower
    with pytest.raises(ValueError, match="does not fit"):
        with applied(llama, bad):
            pass
    with pytest.raises(KeyError, match="no module"):
        with applied(llama, {"model.layers.9.mlp": deltas["model.layers.0.self_attn.q_proj"]}):
            pass
    _assert_restored(llama, snapshot)


# ------------------------------------------------------------------- perplexity


def _reference_perplexity(model, tokenizer, texts, max_length=None) -> float:
    """A plain loop: HF's mean loss per sequence, weighted back by its token count."""
    nll, tokens = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"][:max_length]])
            if ids.shape[1] < 2:
                continue
            loss = model(input_ids=ids, labels=ids).loss
            nll += float(loss) * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    return math.exp(nll / tokens)


def test_perplexity_matches_reference_loop(llama, tokenizer):
    expected = _reference_perplexity(llama, tokenizer, SENTENCES)
    got = perplexity(llama, tokenizer, SENTENCES, batch_size=3)
    assert got == pytest.approx(expected, rel=1e-4)


def test_perplexity_does_not_depend_on_padding(llama, tokenizer):
    one = perplexity(llama, tokenizer, SENTENCES, batch_size=1)
    four = perplexity(llama, tokenizer, SENTENCES, batch_size=4)
    assert four == pytest.approx(one, rel=1e-5)


def test_perplexity_truncates_to_max_length(llama, tokenizer):
    expected = _reference_perplexity(llama, tokenizer, SENTENCES, max_length=5)
    assert perplexity(llama, tokenizer, SENTENCES, batch_size=4, max_length=5) == pytest.approx(expected, rel=1e-4)


# --------------------------------------------------------------------- accuracy


def _continuation_logprob(model, context: list[int], continuation: list[int]) -> float:
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(context) + i - 1, token]) for i, token in enumerate(continuation))


def _reference_predictions(model, tokenizer, texts, candidates_per_row) -> list[int]:
    predictions = []
    for text, candidates in zip(texts, candidates_per_row):
        context = tokenizer(text)["input_ids"]
        scores = [_continuation_logprob(model, context, tokenizer(c, add_special_tokens=False)["input_ids"]) for c in candidates]
        predictions.append(max(range(len(scores)), key=lambda i: (scores[i], -i)))
    return predictions


LABELS = {"pos": "very good", "neg": "bad", "meh": "fine"}


def _label_rows():
    golds = ["pos", "neg", "meh", "pos", "neg", "pos", "meh"]
    return [{"text": text, "label": gold} for text, gold in zip(SENTENCES, golds)]


def test_accuracy_with_labels_matches_reference(llama, tokenizer):
    rows = _label_rows()
    predictions = _reference_predictions(llama, tokenizer, [r["text"] for r in rows], [list(LABELS.values())] * len(rows))
    gold = [list(LABELS).index(r["label"]) for r in rows]
    expected = sum(p == g for p, g in zip(predictions, gold)) / len(rows)
    assert accuracy(llama, tokenizer, rows, labels=LABELS, batch_size=4) == expected
    assert accuracy(llama, tokenizer, rows, labels=LABELS, batch_size=1) == expected


def test_accuracy_with_choices_matches_reference(llama, tokenizer, tmp_path):
    choices = [["yes", "no", "maybe so"], ["the cat", "a dog"], ["red", "blue", "green", "sea"]]
    texts = SENTENCES[:3]
    predictions = _reference_predictions(llama, tokenizer, texts, choices)
    # Answers given as an index or as the text of a choice; make some right, some wrong.
    answers = [predictions[0], choices[1][1 - predictions[1]], choices[2][predictions[2]]]
    path = tmp_path / "mc.jsonl"
    lines = [json.dumps({"q": t, "opts": c, "gold": a}) for t, c, a in zip(texts, choices, answers)]
    path.write_text("\n".join(lines[:2]) + "\n\n" + lines[2] + "\n")
    spec = EvalSpec(name="mc", metric="accuracy", data=path, text_field="q", choices_field="opts", answer_field="gold", batch_size=3)
    outcome = run_eval(llama, tokenizer, spec)
    assert outcome.value == pytest.approx(2 / 3, abs=0)
    assert outcome.details["predictions"] == predictions


def test_accuracy_rejects_bad_rows(llama, tokenizer):
    with pytest.raises(EvalDataError, match="label `joy` is not in `labels`"):
        accuracy(llama, tokenizer, [{"text": "the", "label": "joy"}], labels=LABELS)
    with pytest.raises(EvalDataError, match="out of range"):
        accuracy(llama, tokenizer, [{"text": "the", "choices": ["a"], "answer": 3}])
    with pytest.raises(EvalDataError, match="missing field `text`"):
        accuracy(llama, tokenizer, [{"label": "pos"}], labels=LABELS)


# --------------------------------------------------------------------- generate


def test_generate_matches_greedy_model_generate(llama, tokenizer):
    prompts = SENTENCES[:3]
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            out = llama.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, pad_token_id=0)
            expected.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    assert generate(llama, tokenizer, prompts, max_new_tokens=6) == expected
    assert any(expected)


def test_sampling_is_seeded_and_leaves_global_rng_alone(llama, tokenizer):
    state = torch.get_rng_state()
    first = generate(llama, tokenizer, SENTENCES[:2], max_new_tokens=5, do_sample=True, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert generate(llama, tokenizer, SENTENCES[:2], max_new_tokens=5, do_sample=True, seed=7) == first


# ------------------------------------------------------------------ data, specs


def test_txt_skips_blank_lines_and_limit_counts_sequences(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("one two\n\n   \nthree \r\nfour\n")
    assert load_data(EvalSpec(name="p", metric="perplexity", data=path)) == ["one two", "three ", "four"]
    assert load_data(EvalSpec(name="p", metric="perplexity", data=path, limit=2)) == ["one two", "three "]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"body": "x y"}\n\n{"body": "z"}\n')
    assert load_data(EvalSpec(name="p", metric="perplexity", data=jsonl, text_field="body")) == ["x y", "z"]
    jsonl.write_text('{"body": "x y"}\n{"text": "z"}\n')
    with pytest.raises(EvalDataError, match=r"d.jsonl:2: missing field `body`"):
        load_data(EvalSpec(name="p", metric="perplexity", data=jsonl, text_field="body"))


def test_evaluate_models_patches_each_model_once_base_untouched(llama, tokenizer, lora_dir, tmp_path):
    data = tmp_path / "ppl.txt"
    data.write_text("\n".join(SENTENCES) + "\n")
    labelled = tmp_path / "cls.jsonl"
    labelled.write_text("\n".join(json.dumps(r) for r in _label_rows()) + "\n")
    specs = [
        EvalSpec(name="ppl", metric="perplexity", data=data, models=("base", "a"), batch_size=4),
        EvalSpec(name="cls", metric="accuracy", data=labelled, models=("a",), labels=LABELS),
    ]
    peft_model = load_peft("llama", {"a": lora_dir})
    snapshot = _snapshot(llama)
    results = evaluate_models(llama, tokenizer, specs, {"a": _lora_deltas(peft_model, "a")}, params={"lam": 0.5})
    _assert_restored(llama, snapshot)
    assert [(r.eval, r.model, r.metric, r.params) for r in results] == [
        ("ppl", "base", "perplexity", {"lam": 0.5}),
        ("ppl", "a", "perplexity", {"lam": 0.5}),
        ("cls", "a", "accuracy", {"lam": 0.5}),
    ]
    assert results[0].value == pytest.approx(_reference_perplexity(llama, tokenizer, SENTENCES), rel=1e-4)
    assert results[1].value == pytest.approx(_reference_perplexity(peft_model, tokenizer, SENTENCES), rel=1e-4)
    assert results[1].value != pytest.approx(results[0].value, rel=1e-3)


# ------------------------------------------------------------------------- cuda


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_apply_restore_and_metrics_match_cpu(tokenizer, lora_dir):
    """Deltas on the CPU are moved to the weight's device; results agree with the CPU."""
    deltas = _lora_deltas(load_peft("llama", {"a": lora_dir}), "a")
    cpu = tiny_llama(0)
    with applied(cpu, deltas):
        expected = perplexity(cpu, tokenizer, SENTENCES, batch_size=4)
        expected_text = generate(cpu, tokenizer, SENTENCES[:2], max_new_tokens=4)
    for dtype, rel in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        model = tiny_llama(0).to("cuda", dtype)
        snapshot = _snapshot(model)
        with applied(model, deltas):
            assert model.get_submodule("model.embed_tokens").weight.device.type == "cuda"
            assert perplexity(model, tokenizer, SENTENCES, batch_size=4) == pytest.approx(expected, rel=rel)
            if dtype == torch.float32:
                assert generate(model, tokenizer, SENTENCES[:2], max_new_tokens=4) == expected_text
        _assert_restored(model, snapshot)
