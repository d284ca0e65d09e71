"""Outputs: adapters PEFT loads as they are, merged models equal to PEFT's merge, atomic writes.

References are independent of the code under test: PEFT's own loading,
``get_delta_weight`` and ``merge_and_unload``; transformers' ``from_pretrained``;
plain torch (``W + BA``) for forward passes; file bytes for reproducibility.
Factors are taken from PEFT adapters built by ``tests/factories.py`` with
seeded, non-zero values, so no comparison is vacuous.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from peft.tuners.ia3 import IA3Layer
from peft.tuners.lora import LoraLayer
from peft.utils.other import get_pattern_key
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from peftdsl.errors import InputDataError, OutputError
from peftdsl.outputs import atomic
from peftdsl.outputs import merge
from peftdsl.evaluation.apply import IA3Delta, LoraDelta
from peftdsl.outputs.atomic import OutputExists, atomic_output
from peftdsl.outputs.merge import PickledWeights, merge_transform, write_merged
from peftdsl.outputs.write import (
    exact_pattern_key,
    ia3_adapter_files,
    lora_adapter_files,
    write_adapter,
)
from tests.factories import load_peft, make_ia3, make_lora, tiny_gpt2, tiny_llama

TOKENIZER_FILES = {"tokenizer.json": '{"version": "1.0"}\n', "tokenizer_config.json": '{"model_max_length": 128}\n'}
PROVENANCE = {"recipe": "peftdsl: 1\n", "expression": "a", "seed": 0}


# --------------------------------------------------------------------------- helpers


def save_base(model: torch.nn.Module, directory: Path, max_shard_size: str | None = None) -> Path:
    """Save a base with a small shard size (several shards) and some tokenizer files."""
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    for name, text in TOKENIZER_FILES.items():
        (directory / name).write_text(text)
    return directory


def lora_factors(peft_model: PeftModel, adapter: str = "default") -> dict[str, LoraDelta]:
    """PEFT's factors per module in the factor frame, scaling folded into B."""
    factors = {}
    for name, module in peft_model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.scaling:
            continue
        scaling = module.scaling[adapter]
        if adapter in module.lora_A:
            A, B = module.lora_A[adapter].weight, module.lora_B[adapter].weight
            layout = "conv1d" if module.fan_in_fan_out else "linear"
        else:
            A, B = module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]
            layout = "embedding"
        factors[name] = LoraDelta(A=A.detach().clone(), B=(B * scaling).detach().clone(), layout=layout)
    return factors


def ia3_vectors(peft_model: PeftModel, adapter: str = "default") -> dict[str, IA3Delta]:
    vectors = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, IA3Layer) and adapter in module.ia3_l:
            layout = "conv1d" if module.fan_in_fan_out else "linear"
            vectors[name] = IA3Delta(
                l=module.ia3_l[adapter].detach().clone(), feedforward=module.is_feedforward, layout=layout
            )
    return vectors


def truncated(delta: LoraDelta, rank: int) -> LoraDelta:
    return LoraDelta(A=delta.A[:rank].clone(), B=delta.B[:, :rank].clone(), layout=delta.layout)


def weight_frame(delta: LoraDelta) -> torch.Tensor:
    product = delta.B @ delta.A
    return product if delta.layout == "linear" else product.T


def logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(2, 18).reshape(2, 8)
    with torch.no_grad():
        return model(input_ids=ids).logits


def load_quietly(base: torch.nn.Module, path: Path) -> tuple[PeftModel, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, path).eval()
    return model, [str(w.message) for w in caught]


def files_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def siblings(target: Path) -> list[str]:
    return sorted(path.name for path in target.parent.iterdir() if path.name.startswith(f".{target.name}."))


# --------------------------------------------------------------------------- adapters


def test_pattern_keys_match_exactly_one_module():
    names = [name for name, _ in tiny_llama(layers=12).named_modules()]
    names.append("vision_tower.model.layers.1.self_attn.q_proj")  # a nested copy of a path, as in multimodal models
    for name in names:
        key = exact_pattern_key(name)
        assert [other for other in names if get_pattern_key([key], other) == key] == [name]
    # What a plain name would do: PEFT's suffix match picks up the nested copy too.
    plain = "model.layers.1.self_attn.q_proj"
    assert "vision_tower.model.layers.1.self_attn.q_proj" in [n for n in names if get_pattern_key([plain], n) == plain]


def test_lora_adapter_with_mixed_ranks_and_embedding_loads_in_peft(tmp_path):
    source = make_lora(
        tmp_path / "in", base=tiny_llama(layers=12), r=4, alpha=8,
        targets=("q_proj", "v_proj", "embed_tokens"), task_type="CAUSAL_LM", base_model_name_or_path="tiny-llama",
    )
    factors = lora_factors(load_peft(tiny_llama(layers=12), {"default": source}))
    # Layer 1 and layer 11 get different ranks: a pattern key for one must not reach the other.
    factors["model.layers.1.self_attn.q_proj"] = truncated(factors["model.layers.1.self_attn.q_proj"], 2)
    factors["model.embed_tokens"] = truncated(factors["model.embed_tokens"], 3)
    template = json.loads((source / "adapter_config.json").read_text())
    config, tensors = lora_adapter_files(factors, template=template, dtype=torch.float32)
    out = write_adapter(tmp_path / "out", config=config, tensors=tensors, provenance=PROVENANCE, force=False)

    written = json.loads((out / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"]) == (4, 4)
    assert written["task_type"] == "CAUSAL_LM" and written["base_model_name_or_path"] == "tiny-llama"
    assert written["rank_pattern"] == written["alpha_pattern"] and len(written["rank_pattern"]) == 2

    model, messages = load_quietly(tiny_llama(layers=12), out)
    assert not [m for m in messages if "did not match" in m]
    layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)}
    assert sorted(layers) == sorted(factors)
    for name, delta in factors.items():
        assert layers[name].r["default"] == delta.A.shape[0]
        assert layers[name].scaling["default"] == 1.0
        torch.testing.assert_close(layers[name].get_delta_weight("default"), weight_frame(delta))

    reference = tiny_llama(layers=12)
    with torch.no_grad():
        for name, delta in factors.items():
            reference.get_submodule(name).weight += weight_frame(delta)
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)


def test_lora_adapter_conv1d_gpt2_loads_in_peft(tmp_path):
    source = make_lora(tmp_path / "in", base="gpt2", r=4, targets=("c_attn", "c_proj"))
    factors = lora_factors(load_peft("gpt2", {"default": source}))
    factors["transformer.h.0.attn.c_attn"] = truncated(factors["transformer.h.0.attn.c_attn"], 1)
    assert {delta.layout for delta in factors.values()} == {"conv1d"}
    config, tensors = lora_adapter_files(factors, template={}, dtype="float32")
    assert config["fan_in_fan_out"] is True
    out = write_adapter(tmp_path / "out", config=config, tensors=tensors, provenance=PROVENANCE, force=False)

    model, _ = load_quietly(tiny_gpt2(), out)
    for name, delta in factors.items():
        layer = model.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.get_delta_weight("default"), (delta.B @ delta.A).T)
    reference = tiny_gpt2()
    with torch.no_grad():
        for name, delta in factors.items():
            reference.get_submodule(name).weight += (delta.B @ delta.A).T
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)


def test_adapter_tensors_use_peft_key_names_and_dtype(tmp_path):
    factors = {
        "model.embed_tokens": LoraDelta(A=torch.ones(2, 128), B=torch.ones(64, 2), layout="embedding"),
        "model.layers.0.self_attn.q_proj": LoraDelta(A=torch.ones(2, 64), B=torch.ones(64, 2)),
    }
    _, tensors = lora_adapter_files(factors, template={}, dtype=torch.bfloat16)
    assert sorted(tensors) == [
        "base_model.model.model.embed_tokens.lora_embedding_A",
        "base_model.model.model.embed_tokens.lora_embedding_B",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
    ]
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in tensors.values())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ia3_adapter_loads_and_matches_input(tmp_path, family):
    targets = {"llama": ("k_proj", "v_proj", "down_proj"), "gpt2": ("c_attn", "mlp.c_proj", "c_fc")}[family]
    feedforward = {"llama": ("down_proj",), "gpt2": ("mlp.c_proj",)}[family]
    source = make_ia3(tmp_path / "in", base=family, targets=targets, feedforward=feedforward)
    reference = load_peft(family, {"default": source})
    vectors = ia3_vectors(reference)
    assert any(v.feedforward for v in vectors.values()) and not all(v.feedforward for v in vectors.values())
    config, tensors = ia3_adapter_files(vectors, template={}, dtype=torch.float32)
    out = write_adapter(tmp_path / "out", config=config, tensors=tensors, provenance=PROVENANCE, force=False)

    model, _ = load_quietly(tiny_llama() if family == "llama" else tiny_gpt2(), out)
    layers = {n: m for n, m in model.base_model.model.named_modules() if isinstance(m, IA3Layer)}
    assert sorted(layers) == sorted(vectors)
    for name, vector in vectors.items():
        assert layers[name].is_feedforward == vector.feedforward
        torch.testing.assert_close(layers[name].ia3_l["default"].data, vector.l)
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)


def test_ia3_refuses_names_peft_would_misclassify():
    vectors = {
        "mlp.proj": IA3Delta(l=torch.ones(1, 4), feedforward=True),
        "attn.mlp.proj": IA3Delta(l=torch.ones(4, 1), feedforward=False),  # ends with "mlp.proj"
    }
    with pytest.raises(OutputError, match="feed-forward"):
        ia3_adapter_files(vectors, template={}, dtype=torch.float32)


def test_adapter_rerun_is_byte_identical(tmp_path):
    source = make_lora(tmp_path / "in", base="llama", r=4, targets=("q_proj", "v_proj", "embed_tokens"))

    def build(target: Path) -> Path:
        factors = lora_factors(load_peft("llama", {"default": source}))
        factors["model.layers.0.self_attn.q_proj"] = truncated(factors["model.layers.0.self_attn.q_proj"], 2)
        config, tensors = lora_adapter_files(factors, template={"task_type": "CAUSAL_LM"}, dtype="bfloat16")
        return write_adapter(target, config=config, tensors=tensors, provenance=PROVENANCE, force=False)

    first, second = build(tmp_path / "a"), build(tmp_path / "b")
    assert sorted(files_bytes(first)) == ["adapter_config.json", "adapter_model.safetensors", "peftdsl.json"]
    assert files_bytes(first) == files_bytes(second)
    assert (first / "adapter_config.json").read_text().endswith("}\n")
    with safe_open(str(first / "adapter_model.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}


# --------------------------------------------------------------------------- merged models


def reference_merge(base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = load_peft(AutoModelForCausalLM.from_pretrained(base_dir), {"default": adapter}).merge_and_unload()
    return merged.state_dict()


def loaded_state(directory: Path) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    model = AutoModelForCausalLM.from_pretrained(directory)
    return model, model.state_dict()


def assert_states_close(actual: dict, expected: dict, **tolerance) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(actual[name].float(), expected[name].float(), msg=name, **tolerance)


@pytest.fixture(scope="module")
def llama_base(tmp_path_factory) -> Path:
    return save_base(tiny_llama(), tmp_path_factory.mktemp("llama") / "base", max_shard_size="60KB")


@pytest.fixture(scope="module")
def llama_lora(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("llama-lora") / "adapter"
    return make_lora(directory, base="llama", r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj", "embed_tokens"))


def test_merged_lora_llama_equals_merge_and_unload(tmp_path, llama_base, llama_lora):
    assert len(list(llama_base.glob("model-*.safetensors"))) > 1  # the base really is sharded
    factors = lora_factors(load_peft(AutoModelForCausalLM.from_pretrained(llama_base), {"default": llama_lora}))
    out = write_merged(tmp_path / "merged", base_dir=llama_base, transform=merge_transform(factors),
                       force=False, max_shard_bytes=100_000)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(path.name for path in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in loaded_state(llama_base)[1].values()
    )
    for name, text in TOKENIZER_FILES.items():
        assert (out / name).read_text() == text
    assert (out / "generation_config.json").read_bytes() == (llama_base / "generation_config.json").read_bytes()
    assert_states_close(loaded_state(out)[1], reference_merge(llama_base, llama_lora), rtol=1e-5, atol=1e-6)


def test_merged_streams_one_base_file_at_a_time(tmp_path, llama_base, monkeypatch):
    opened, open_now, most = [], [0], [0]
    real_reader = merge._tensor_reader

    @contextlib.contextmanager
    def counting_reader(source):
        opened.append(source.name)
        open_now[0] += 1
        most[0] = max(most[0], open_now[0])
        try:
            with real_reader(source) as read:
                yield read
        finally:
            open_now[0] -= 1

    monkeypatch.setattr(merge, "_tensor_reader", counting_reader)
    write_merged(tmp_path / "merged", base_dir=llama_base, transform=lambda n, t: None, force=False)
    base_files = sorted(path.name for path in llama_base.glob("model-*.safetensors"))
    assert opened == base_files and most[0] == 1 and open_now[0] == 0


def test_merged_bfloat16_output(tmp_path, llama_base, llama_lora):
    factors = lora_factors(load_peft(AutoModelForCausalLM.from_pretrained(llama_base), {"default": llama_lora}))
    out = write_merged(tmp_path / "merged", base_dir=llama_base, transform=merge_transform(factors),
                       dtype="bfloat16", force=False)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * 2 for t in loaded_state(llama_base)[1].values())
    model, state = loaded_state(out)
    assert model.dtype == torch.bfloat16 and all(t.dtype == torch.bfloat16 for t in state.values())
    expected = {name: t.to(torch.bfloat16) for name, t in reference_merge(llama_base, llama_lora).items()}
    assert_states_close(state, expected, rtol=0, atol=0)  # one rounding of the same float32 sum


def test_merged_lora_gpt2_conv1d_and_tied_embeddings(tmp_path):
    base = save_base(tiny_gpt2(), tmp_path / "base", max_shard_size="40KB")
    adapter = make_lora(tmp_path / "adapter", base="gpt2", r=4, targets=("c_attn", "c_fc", "wte", "lm_head"))
    factors = lora_factors(load_peft(AutoModelForCausalLM.from_pretrained(base), {"default": adapter}))
    assert {d.layout for d in factors.values()} == {"conv1d", "embedding", "linear"}
    transform = merge_transform(factors)
    assert "lm_head.weight" in transform.weight_names  # tied: only transformer.wte.weight is stored
    stored = set(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"])
    assert merge.tied_groups(base, stored) == {"transformer.wte.weight": ("transformer.wte.weight", "lm_head.weight")}
    out = write_merged(tmp_path / "merged", base_dir=base, transform=transform, force=False, max_shard_bytes=50_000)

    model, state = loaded_state(out)
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied, as merge_and_unload leaves it
    # Both the wte and the lm_head delta land on the one shared tensor, as in PEFT's merge.
    # (So the merged model is not the unmerged PeftModel: there each delta acts on one side
    # only. That is the complication PEFT warns about for tied targets.)
    assert_states_close(state, reference_merge(base, adapter), rtol=1e-5, atol=1e-6)


def with_random_biases(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """GPT-2 initialises biases to zero, which would hide a missing bias scaling."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


def test_merged_ia3_gpt2_scales_weights_and_biases(tmp_path):
    base = save_base(with_random_biases(tiny_gpt2()), tmp_path / "base")
    targets, feedforward = ("c_attn", "c_fc", "mlp.c_proj"), ("mlp.c_proj",)
    adapter = make_ia3(tmp_path / "adapter", base=base, targets=targets, feedforward=feedforward)
    vectors = ia3_vectors(load_peft(AutoModelForCausalLM.from_pretrained(base), {"default": adapter}))
    out = write_merged(tmp_path / "merged", base_dir=base, transform=merge_transform(vectors), force=False)
    assert_states_close(loaded_state(out)[1], reference_merge(base, adapter), rtol=1e-6, atol=1e-6)


def test_merged_rerun_is_byte_identical(tmp_path, llama_base, llama_lora):
    factors = lora_factors(load_peft(AutoModelForCausalLM.from_pretrained(llama_base), {"default": llama_lora}))
    runs = [
        write_merged(tmp_path / name, base_dir=llama_base, transform=merge_transform(factors), force=False,
                     max_shard_bytes=100_000, provenance=PROVENANCE)
        for name in ("a", "b")
    ]
    assert json.loads((runs[0] / "peftdsl.json").read_text()) == PROVENANCE
    assert files_bytes(runs[0]) == files_bytes(runs[1])


def test_merged_refuses_pickle_unless_allowed(tmp_path, llama_base):
    base = tmp_path / "pickled"
    base.mkdir()
    state = loaded_state(llama_base)[1]
    torch.save(state, base / "pytorch_model.bin")
    (base / "config.json").write_bytes((llama_base / "config.json").read_bytes())
    identity = lambda name, tensor: None  # noqa: E731
    with pytest.raises(PickledWeights):
        write_merged(tmp_path / "refused", base_dir=base, transform=identity, force=False)
    assert not (tmp_path / "refused").exists()
    out = write_merged(tmp_path / "allowed", base_dir=base, transform=identity, force=False, allow_pickle=True)
    assert_states_close(loaded_state(out)[1], state, rtol=0, atol=0)


def test_merged_refuses_deltas_for_missing_tensors(tmp_path, llama_base):
    transform = merge_transform({"model.layers.9.mlp.up_proj": LoraDelta(A=torch.ones(1, 64), B=torch.ones(128, 1))})
    with pytest.raises(InputDataError, match="model.layers.9.mlp.up_proj.weight"):
        write_merged(tmp_path / "merged", base_dir=llama_base, transform=transform, force=False)
    assert not (tmp_path / "merged").exists() and siblings(tmp_path / "merged") == []


def test_merged_transform_error_leaves_nothing(tmp_path, llama_base):
    def bad(name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        return tensor[:1] if name.endswith("down_proj.weight") else None

    with pytest.raises(ValueError, match="shape"):
        write_merged(tmp_path / "merged", base_dir=llama_base, transform=bad, force=False)
    assert not (tmp_path / "merged").exists() and siblings(tmp_path / "merged") == []


def test_merged_without_force_refuses_before_reading_the_base(tmp_path):
    (tmp_path / "merged").mkdir()
    with pytest.raises(OutputExists):
        write_merged(tmp_path / "merged", base_dir=tmp_path / "no-such-base", transform=lambda n, t: None, force=False)


# --------------------------------------------------------------------------- atomicity


def test_exception_leaves_neither_target_nor_temp(tmp_path):
    target = tmp_path / "out"
    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(error):
            with atomic_output(target, force=False) as tmp:
                (tmp / "half.bin").write_bytes(b"x")
                raise error()
        assert not target.exists() and siblings(target) == []


def test_existing_target_is_kept_on_failure(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_output(target, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError()
    assert files_bytes(target) == {"old.txt": b"old"} and siblings(target) == []


def test_existing_target_without_force_raises_before_the_body(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    ran = []
    with pytest.raises(OutputExists):
        with atomic_output(target, force=False):
            ran.append(True)
    assert ran == [] and siblings(target) == []
    with pytest.raises(OutputExists):
        atomic.check_output_free(target, force=False)
    atomic.check_output_free(target, force=True)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "move-aside"])
def test_force_replaces_whole_directory(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_output(target, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert files_bytes(target) == {"new.txt": b"new"} and siblings(target) == []


def test_leftovers_of_killed_runs_are_cleaned(tmp_path):
    target = tmp_path / "out"
    dead = tmp_path / ".out.peftdsl-tmp-999999999-deadbeef"  # above any pid_max: no such process
    dead.mkdir()
    (dead / "half.bin").write_bytes(b"x")
    (tmp_path / ".out.peftdsl-tmp-garbage").mkdir()
    alive = tmp_path / f".out.peftdsl-tmp-{os.getppid()}-0123abcd"  # a running run still writing: it holds
    alive.mkdir()                                                     # the folder's flock
    unrelated = tmp_path / ".other.peftdsl-tmp-999999999-deadbeef"
    unrelated.mkdir()
    holder = os.open(alive, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with atomic_output(target, force=False) as tmp:
            (tmp / "f").write_text("f")
    finally:
        os.close(holder)
    assert siblings(target) == [alive.name] and unrelated.exists()


def test_old_output_moved_aside_by_a_killed_run_is_restored(tmp_path):
    target = tmp_path / "out"
    old = tmp_path / ".out.peftdsl-old-999999999-deadbeef"
    old.mkdir()
    (old / "kept.txt").write_text("kept")
    ran = []
    with pytest.raises(OutputExists):
        with atomic_output(target, force=False):
            ran.append(True)
    assert ran == [] and files_bytes(target) == {"kept.txt": b"kept"} and siblings(target) == []


def test_a_killed_run_leaves_no_output_and_its_temp_is_cleaned(tmp_path):
    target = tmp_path / "out"
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from peftdsl.outputs.atomic import atomic_output\n"
        "with atomic_output(Path(sys.argv[1]), force=False) as tmp:\n"
        "    (tmp / 'half.bin').write_bytes(b'x')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", script, str(target)], env=env, timeout=120)
    assert result.returncode == -9
    assert not target.exists() and len(siblings(target)) == 1  # what SIGKILL leaves behind
    with atomic_output(target, force=False) as tmp:
        (tmp / "done.txt").write_text("done")
    assert files_bytes(target) == {"done.txt": b"done"} and siblings(target) == []


def test_merged_float64_base_keeps_every_bit(tmp_path):
    """A float64 base is merged in float64: untouched tensors come back bit for bit, and a
    changed one equals W + B·A computed in float64 (no round trip through float32)."""
    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    base.mkdir()
    generator = torch.Generator().manual_seed(0)
    tensors = {"layer.weight": torch.randn(8, 6, generator=generator, dtype=torch.float64) / 3,
               "other.weight": torch.randn(5, generator=generator, dtype=torch.float64) / 7}
    save_file(tensors, str(base / "model.safetensors"))
    (base / "config.json").write_text('{"model_type": "llama", "vocab_size": 32}')
    A = torch.randn(2, 6, generator=generator, dtype=torch.float64)
    B = torch.randn(8, 2, generator=generator, dtype=torch.float64)
    transform = merge_transform({"layer": LoraDelta(A=A, B=B)})
    write_merged(tmp_path / "merged", base_dir=base, transform=transform, force=False)
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    [shard] = set(index["weight_map"].values())
    out = load_file(str(tmp_path / "merged" / shard))
    assert out["other.weight"].dtype == torch.float64 and torch.equal(out["other.weight"], tensors["other.weight"])
    torch.testing.assert_close(out["layer.weight"], tensors["layer.weight"] + B @ A, rtol=0, atol=1e-15)
