"""Full fine-tunes as task vectors (DESIGN §2): τ = θ − θ_base, task arithmetic, LoRA extraction.

The references are plain torch over the models' state dicts: task arithmetic
θ_base + Σ cᵢ·(θᵢ − θ_base) for every tensor (mergekit's `task_arithmetic`), and for
extraction the best rank-k approximation of each module's τ (Eckart–Young), whose error
is the tail of its singular values.
"""

from __future__ import annotations

import json
import shutil
import re
import math
import warnings
from pathlib import Path

import pytest
import torch
from factories import make_lora, tiny_gpt2, tiny_llama
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import peftdsl
from peftdsl.cli import main

ATOL = 2e-5


def fine_tune(base: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """A "fine-tune": every floating tensor of the base moved by seeded noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(base.named_parameters()):
            param.add_(torch.randn(param.shape, generator=generator) * scale)
    return base


def state(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: v.float() for k, v in load_file(f).items()})
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    tiny_llama().save_pretrained(root / "base")
    fine_tune(tiny_llama(), 1).save_pretrained(root / "ft1")
    fine_tune(tiny_llama(), 2).save_pretrained(root / "ft2", max_shard_size="200KB")  # sharded
    make_lora(root / "lora", seed=3)
    tiny_llama(hidden=96, intermediate=192).save_pretrained(root / "other")
    return root


def recipe(folder: Path, world: Path, compose: str, outputs: str, sources=("ft1", "ft2", "lora")) -> Path:
    lines = ["peftdsl: 1", "name: full", f"base: {world / 'base'}", "adapters:"]
    lines += [f"  {name}: {world / name}" for name in sources]
    lines += ["compose:", *[f"  {line}" for line in compose.splitlines()], "outputs:",
              *[f"  {line}" for line in outputs.splitlines()]]
    path = folder / "recipe.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_task_arithmetic_over_full_fine_tunes_and_a_lora(world, tmp_path):
    path = recipe(tmp_path, world, "mix: 0.5 * ft1 + 0.3 * ft2 - 0.2 * lora", "mix: {path: out/mix, merge: true}")
    peftdsl.load(path).run()
    base, ft1, ft2 = state(world / "base"), state(world / "ft1"), state(world / "ft2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world / "base"),
                                         world / "lora").merge_and_unload().state_dict()
    got = state(tmp_path / "out" / "mix")
    assert set(got) == set(base)
    for name, w0 in base.items():
        expected = w0 + 0.5 * (ft1[name] - w0) + 0.3 * (ft2[name] - w0) - 0.2 * (lora[name].float() - w0)
        assert torch.allclose(got[name], expected, atol=ATOL), name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "mix")
    assert model is not None


def merged_bytes(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def bf16_world(world, tmp_path_factory):
    """The world's base and fine-tunes stored in bfloat16, as real checkpoints are."""
    root = tmp_path_factory.mktemp("full-bf16")
    for name in ("base", "ft1", "ft2"):
        model = AutoModelForCausalLM.from_pretrained(world / name).to(torch.bfloat16)
        model.save_pretrained(root / name, max_shard_size="200KB" if name == "ft2" else "5GB")
    return root


@pytest.mark.parametrize("stored", ["float32", "bfloat16"])
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_task_arithmetic_from_rows_is_the_general_merge_bit_for_bit(world, bf16_world, tmp_path, monkeypatch,
                                                                   stored, dtype):
    """A linear combination of full fine-tunes is merged from their rows as the pipeline reads them
    (peftdsl.outputs.task_arithmetic), in blocks and cache-sized pieces: the very bytes of the
    general path, which computes each τ whole first; and what mergekit's formula says."""
    from peftdsl.outputs import pipeline, task_arithmetic

    root = world if stored == "float32" else bf16_world
    outputs = "{path: out/%s, merge: true" + (f", dtype: {dtype}" if dtype else "") + "}"
    planned = []
    real = task_arithmetic.plan
    monkeypatch.setattr(task_arithmetic, "plan", lambda *args: planned.append(real(*args)) or planned[-1])
    monkeypatch.setattr(task_arithmetic, "PIECE", 100)  # pieces that end inside rows
    monkeypatch.setattr(pipeline, "BLOCK_ELEMENTS", 1024)  # tensors of several blocks
    monkeypatch.setattr(pipeline, "MIN_BLOCK_ROWS", 8)
    monkeypatch.setattr(pipeline, "ROW_ALIGN", 8)
    compose = "x: 0.6 * ft1 - 0.3 * ft2"
    peftdsl.load(recipe(tmp_path, root, compose, "x: " + outputs % "rows", sources=("ft1", "ft2"))).run()
    assert isinstance(planned[0], task_arithmetic.TaskArithmetic)
    assert len(planned[0].terms) == len(state(root / "base"))  # every tensor, embeddings and norms too
    monkeypatch.setattr(task_arithmetic, "plan", lambda *args: None)
    peftdsl.load(recipe(tmp_path, root, compose, "x: " + outputs % "general", sources=("ft1", "ft2"))).run()
    assert merged_bytes(tmp_path / "out" / "rows") == merged_bytes(tmp_path / "out" / "general")
    base, ft1, ft2 = state(root / "base"), state(root / "ft1"), state(root / "ft2")
    got = state(tmp_path / "out" / "rows")
    for name, w0 in base.items():
        expected = w0 + 0.6 * (ft1[name] - w0) - 0.3 * (ft2[name] - w0)
        assert torch.allclose(got[name], expected, atol=ATOL if stored == dtype == "float32" else 1e-2), name


def test_task_arithmetic_from_rows_refuses_a_non_finite_fine_tune(world, tmp_path, capsys):
    """A NaN in one fine-tune's tensor stops the streamed merge with R601, naming the source and
    the tensor, and leaves nothing at the output path."""
    broken = tmp_path / "broken"
    shutil.copytree(world / "ft1", broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    text = recipe(tmp_path, world, "x: 0.5 * ft1 + 0.5 * ft2", "x: {path: out/x, merge: true}",
                  sources=("ft1", "ft2")).read_text().replace(str(world / "ft1"), str(broken))
    (tmp_path / "recipe.yaml").write_text(text)
    assert main(["run", str(tmp_path / "recipe.yaml")]) == 1
    out = capsys.readouterr().err
    assert "R601" in out and "adapter `ft1`: `model.layers.1.mlp.up_proj.weight` holds NaN" in out, out
    assert not (tmp_path / "out" / "x").exists()


@pytest.mark.parametrize(("compose", "message"), [
    ("0.5 * ft1 + 0.5 * ft2", "the base model's `model.layers.1.mlp.up_proj.weight` holds NaN"),
    ("1e40 * ft1 - 1e40 * ft2", "float32 overflow"),
])
@pytest.mark.parametrize("streamed", [True, False])
def test_task_arithmetic_refuses_a_non_finite_result(world, tmp_path, capsys, monkeypatch, compose, message,
                                                     streamed):
    """A NaN in the base, or weights past float32's range (which `add_` refused with a
    RuntimeError before): R601 naming the tensor, nothing written, on both paths."""
    from peftdsl.outputs import task_arithmetic

    if not streamed:
        monkeypatch.setattr(task_arithmetic, "plan", lambda *args: None)
    broken = tmp_path / "base"
    shutil.copytree(world / "base", broken)
    if "1e40" not in compose:
        weights = load_file(broken / "model.safetensors")
        weights["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
        save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    text = recipe(tmp_path, world, f"x: {compose}", "x: {path: out/x, merge: true}", sources=("ft1", "ft2")).read_text()
    (tmp_path / "recipe.yaml").write_text(text.replace(str(world / "base"), str(broken)))
    assert main(["run", str(tmp_path / "recipe.yaml")]) == 1
    out = capsys.readouterr().err
    assert "R601" in out and message in out, out
    assert not (tmp_path / "out" / "x").exists()


def test_ties_over_full_task_vectors(world, tmp_path):
    from peft.utils.merge_utils import ties

    path = recipe(tmp_path, world, "t: ties(0.6 * ft1 + 0.4 * ft2, density=0.3)", "t: {path: out/t, merge: true}",
                  sources=("ft1", "ft2"))
    peftdsl.load(path).run()
    base, ft1, ft2 = state(world / "base"), state(world / "ft1"), state(world / "ft2")
    got = state(tmp_path / "out" / "t")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.norm.weight", "model.embed_tokens.weight"):
        tasks = torch.stack([ft1[name] - base[name], ft2[name] - base[name]])
        expected = base[name] + ties(tasks, torch.tensor([0.6, 0.4]), 0.3)
        assert torch.allclose(got[name], expected, atol=ATOL), name


@pytest.mark.parametrize("rest", ["drop", "save"])
def test_lora_extraction_is_the_best_rank_k_approximation(world, tmp_path, capsys, rest):
    path = recipe(tmp_path, world, f"x: svd(ft1, rank=4, rest=\"{rest}\")", "x: out/x", sources=("ft1",))
    peftdsl.load(path).run()
    base, ft1 = state(world / "base"), state(world / "ft1")
    out = tmp_path / "out" / "x"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world / "base"), out)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"):
        tau = ft1[f"{name}.weight"] - base[f"{name}.weight"]
        U, S, Vh = torch.linalg.svd(tau.double(), full_matrices=False)
        best = (U[:, :4] * S[:4]) @ Vh[:4]
        layer = model.get_submodule(f"base_model.model.{name}")
        delta = layer.get_delta_weight("default").double()
        assert torch.allclose(delta, best, atol=1e-5), name
    norm = "model.norm.weight"
    saved = config.get("modules_to_save") or []
    if rest == "save":
        assert "model.norm" in saved and "model.embed_tokens" in saved
        held = model.base_model.model.model.norm.modules_to_save["default"].weight
        assert torch.allclose(held, ft1[norm], atol=ATOL)
    else:
        assert not saved


@pytest.mark.parametrize("block", [None, 100])
def test_dropped_tensors_and_their_share_of_the_norm_are_reported(world, tmp_path, capsys, monkeypatch, block):
    """`svd` of `0.7·ft1 − 0.3·ft2` drops norms and embeddings: the run names them and prints
    √(Σ‖x_dropped‖² / ‖x‖²), recomputed here from the checkpoints with plain torch; read a block
    of rows at a time (100 elements: many blocks per tensor) it is the same."""
    if block is not None:
        from peftdsl.runtime import parts

        monkeypatch.setattr(parts, "CACHED_BLOCK_ELEMENTS", block)
    path = recipe(tmp_path, world, "x: svd(0.7 * ft1 - 0.3 * ft2, rank=2)", "x: out/x", sources=("ft1", "ft2"))
    assert main(["run", str(path)]) == 0
    captured = capsys.readouterr()
    printed = re.sub(r"\s+", " ", captured.out + captured.err)  # rich wraps long lines
    base, ft1, ft2 = state(world / "base"), state(world / "ft1"), state(world / "ft2")
    x = {name: 0.7 * (ft1[name] - w0) - 0.3 * (ft2[name] - w0) for name, w0 in base.items()}
    modules = {n for n, t in base.items() if t.dim() == 2 and n != "model.embed_tokens.weight"}
    dropped = sorted(set(x) - modules)
    share = math.sqrt(sum(x[n].double().square().sum() for n in dropped) / sum(t.double().square().sum()
                                                                                for t in x.values()))
    match = re.search(r"x: svd dropped (\d+) tensors holding ([\d.]+)% of ‖x‖_F \((.+)\)", printed)
    assert match, printed
    assert int(match[1]) == len(dropped)
    assert float(match[2]) == pytest.approx(100 * share, abs=0.006)
    assert match[3].startswith(", ".join(dropped[:3]))


def test_embed_true_extracts_the_embeddings_as_embedding_lora(world, tmp_path, capsys):
    """`svd(x, rank=k, embed=true)`: the input embedding's τ becomes PEFT embedding factors whose
    delta is its best rank-k approximation (plain torch SVD); the rest are dropped as without it."""
    x = "0.7 * ft1 - 0.3 * ft2"
    path = recipe(tmp_path, world, f"x: svd({x}, rank=3, embed=true)",
                  "x: out/x",
                  sources=("ft1", "ft2"))
    assert main(["lint", str(path)]) == 0
    captured = capsys.readouterr()
    assert "model.embed_tokens.weight" not in captured.out + captured.err  # not among the dropped (T415)
    peftdsl.load(path).run()
    base, ft1, ft2 = state(world / "base"), state(world / "ft1"), state(world / "ft2")
    out = tmp_path / "out" / "x"
    config = json.loads((out / "adapter_config.json").read_text())
    assert "model.embed_tokens" in config["target_modules"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world / "base"), out)
    for name in ("model.embed_tokens", "model.layers.0.self_attn.q_proj"):
        w = f"{name}.weight"
        tau = 0.7 * (ft1[w] - base[w]) - 0.3 * (ft2[w] - base[w])
        U, S, Vh = torch.linalg.svd(tau.double(), full_matrices=False)
        best = (U[:, :3] * S[:3]) @ Vh[:3]
        delta = model.get_submodule(f"base_model.model.{name}").get_delta_weight("default").double()
        assert delta.shape == tau.shape
        assert torch.allclose(delta, best, atol=1e-5), name


def test_embed_true_merged_folds_the_rank_k_embedding(world, tmp_path):
    path = recipe(tmp_path, world, "x: svd(ft1, rank=2, embed=true)", "x: {path: out/x, merge: true}",
                  sources=("ft1",))
    peftdsl.load(path).run()
    base, ft1, got = state(world / "base"), state(world / "ft1"), state(tmp_path / "out" / "x")
    w = "model.embed_tokens.weight"
    U, S, Vh = torch.linalg.svd((ft1[w] - base[w]).double(), full_matrices=False)
    assert torch.allclose(got[w], base[w] + ((U[:, :2] * S[:2]) @ Vh[:2]).float(), atol=ATOL)
    assert torch.equal(got["model.norm.weight"], base["model.norm.weight"])  # dropped: the base's


def test_embed_true_must_be_a_whole_composition(world, tmp_path, capsys):
    path = recipe(tmp_path, world, "e: svd(ft1, rank=2, embed=true)\nmix: 0.5 * e + 0.5 * lora", "mix: out/mix",
                  sources=("ft1", "lora"))
    assert main(["lint", str(path)]) == 1
    captured = capsys.readouterr()
    assert "error[T416]" in captured.out + captured.err


def test_a_pickled_full_fine_tune_needs_allow_pickle(world, tmp_path, capsys):
    """A fine-tune saved as `pytorch_model.bin`: I310 without `--allow-pickle`, and with it the
    same task vector as the safetensors copy (loaded with weights_only=True)."""
    pickled = tmp_path / "ft1-bin"
    pickled.mkdir()
    shutil.copy(world / "ft1" / "config.json", pickled / "config.json")
    torch.save(state(world / "ft1"), pickled / "pytorch_model.bin")
    lines = ["peftdsl: 1", f"base: {world / 'base'}", "adapters:", f"  ft: {{path: {pickled}, kind: full}}",
             "compose:", "  m: 0.5 * ft", "outputs:", "  m: {path: out/m, merge: true}"]
    path = tmp_path / "recipe.yaml"
    path.write_text("\n".join(lines) + "\n")
    assert main(["run", str(path)]) == 1
    captured = capsys.readouterr()
    assert "error[I310]" in captured.out + captured.err and not (tmp_path / "out").exists()
    assert main(["run", str(path), "--allow-pickle"]) == 0
    base, ft1, got = state(world / "base"), state(world / "ft1"), state(tmp_path / "out" / "m")
    for name, w0 in base.items():
        assert torch.allclose(got[name], w0 + 0.5 * (ft1[name] - w0), atol=ATOL), name


def test_large_tensors_read_a_block_of_rows_at_a_time_give_the_same_result(world, tmp_path, monkeypatch):
    """A module past the block size (a 128k-vocab lm_head in real life) is read and subtracted a
    block of rows at a time: the extraction equals the whole-tensor reads' bit for bit."""
    from safetensors.torch import load_file as load

    from peftdsl.runtime import execute

    path = recipe(tmp_path, world, "x: svd(0.6 * ft1 + 0.4 * ft2, rank=3)", "x: out/whole", sources=("ft1", "ft2"))
    peftdsl.load(path).run()
    whole = load(tmp_path / "out" / "whole" / "adapter_model.safetensors")
    blocks = []
    real = execute.Executor._dense_by_rows
    monkeypatch.setattr(execute, "_ROW_BLOCK_ELEMENTS", 1000)  # tensors past 1000 elements by rows,
    monkeypatch.setattr(execute, "_CACHED_BLOCK_ELEMENTS", 1000)  # ~15 rows of 64 a block
    monkeypatch.setattr(execute, "modules_per_chunk", lambda *args: 1)  # one module a chunk, as for a huge one
    monkeypatch.setattr(execute.Executor, "_dense_by_rows",
                        lambda self, adapter, key: blocks.append(key) or real(self, adapter, key))
    path = recipe(tmp_path, world, "x: svd(0.6 * ft1 + 0.4 * ft2, rank=3)", "x: out/rows", sources=("ft1", "ft2"))
    peftdsl.load(path).run()
    rows = load(tmp_path / "out" / "rows" / "adapter_model.safetensors")
    assert "lm_head.weight" in blocks and "model.layers.0.mlp.down_proj.weight" in blocks
    assert rows.keys() == whole.keys()
    for key in whole:
        assert torch.equal(rows[key], whole[key]), key


def test_a_fine_tune_of_another_base_is_refused(world, tmp_path, capsys):
    path = recipe(tmp_path, world, "x: 0.5 * other", "x: {path: out/x, merge: true}", sources=("other",))
    assert main(["lint", "--format", "concise", str(path)]) == 1
    out = capsys.readouterr().out
    assert "error[I307] full fine-tune `other`:" in out and "in the base" in out


def test_a_full_source_needs_a_base(world, tmp_path, capsys):
    (tmp_path / "r.yaml").write_text(f"peftdsl: 1\nadapters:\n  ft1: {world / 'ft1'}\ncompose:\n  x: svd(ft1, rank=2)\n"
                                     "outputs:\n  x: out/x\n")
    assert main(["lint", "--format", "concise", str(tmp_path / "r.yaml")]) == 1
    assert "full fine-tune `ft1` needs the recipe's `base`" in capsys.readouterr().out


def test_a_full_source_cannot_be_an_adapter_output(world, tmp_path, capsys):
    path = recipe(tmp_path, world, "x: ft1 - ft2", "x: out/x", sources=("ft1", "ft2"))
    assert main(["lint", "--format", "concise", str(path)]) == 1
    assert "error[T403]" in capsys.readouterr().out


def test_pem_of_a_full_source_is_a_type_error(world, tmp_path, capsys):
    path = recipe(tmp_path, world, "x: pem(0.5 * ft1 + 0.5 * lora)", "x: out/x", sources=("ft1", "lora"))
    assert main(["lint", "--format", "concise", str(path)]) == 1
    assert "error[T413]" in capsys.readouterr().out


def test_a_resized_vocabulary_names_the_tensor(world, tmp_path, capsys):
    bigger = tiny_llama(vocab=160)
    bigger.save_pretrained(tmp_path / "resized")
    path = recipe(tmp_path, world, "x: 0.5 * resized", "x: {path: out/x, merge: true}", sources=())
    text = path.read_text().replace("adapters:\n", f"adapters:\n  resized: {tmp_path / 'resized'}\n")
    path.write_text(text)
    assert main(["lint", "--format", "concise", str(path)]) == 1
    out = capsys.readouterr().out
    assert "`lm_head.weight` is 160×64 but 128×64 in the base (a resized vocabulary?)" in out


def test_gpt2_conv1d_full_fine_tune_extraction(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path / "base")
    fine_tune(tiny_gpt2(), 5).save_pretrained(tmp_path / "ft")
    (tmp_path / "r.yaml").write_text("peftdsl: 1\nbase: base\nadapters:\n  ft: ft\ncompose:\n"
                                     "  x: svd(ft, rank=3)\n  m: 0.5 * ft\noutputs:\n  x: out/x\n"
                                     "  m: {path: out/m, merge: true}\n")
    peftdsl.load(tmp_path / "r.yaml").run()
    base, ft = state(tmp_path / "base"), state(tmp_path / "ft")
    merged = state(tmp_path / "out" / "m")
    for name, w0 in base.items():
        assert torch.allclose(merged[name], w0 + 0.5 * (ft[name] - w0), atol=ATOL), name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "out" / "x")
    name = "transformer.h.0.attn.c_attn"
    tau = (ft[f"{name}.weight"] - base[f"{name}.weight"]).T.double()  # Conv1D stores in×out
    U, S, Vh = torch.linalg.svd(tau, full_matrices=False)
    delta = model.get_submodule(f"base_model.model.{name}").get_delta_weight("default").double()
    assert torch.allclose(delta.T if delta.shape != tau.shape else delta, (U[:, :3] * S[:3]) @ Vh[:3], atol=1e-5)


def test_full_source_pin_covers_every_shard(world, tmp_path):
    path = recipe(tmp_path, world, "x: 0.5 * ft2", "x: {path: out/x, merge: true}", sources=("ft2",))
    assert main(["lock", str(path)]) == 0
    text = path.read_text()
    assert "sha256:" in text
    assert main(["run", "--quiet", "--locked", str(path)]) == 0
    shard = sorted((world / "ft2").glob("model-*.safetensors"))[-1]
    tensors = load_file(shard)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key] + 1
    copy = tmp_path / "ft2"
    copy.mkdir()
    for f in (world / "ft2").iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    save_file(tensors, copy / shard.name, metadata={"format": "pt"})
    path.write_text(text.replace(str(world / "ft2"), str(copy)))
    assert main(["run", "--quiet", "--force", "--locked", str(path)]) == 1


# ---------------------------------------------------------------- rank selection


def _spectrum(values):
    from peftdsl.runtime.kernels import Spectrum

    sigma = torch.tensor([values], dtype=torch.float64)
    return Spectrum(sigma, sigma.pow(2).sum(dim=1))


@pytest.mark.parametrize("keep, expected", [
    (0.5 ** 0.5, 1),           # exactly the first value's share: rank 1, not 2
    (0.5 ** 0.5 + 1e-6, 2),
    (0.8 ** 0.5, 2),           # exactly two values' share
    (0.8 ** 0.5 + 1e-6, 3),
    (1.0, 3),
])
def test_keep_picks_the_smallest_rank_at_the_boundary(keep, expected):
    from peftdsl.runtime.kernels import select_ranks

    ranks, kept = select_ranks(_spectrum([0.5 ** 0.5, 0.3 ** 0.5, 0.2 ** 0.5]), 8, keep=keep)
    assert ranks == [expected]
    assert kept[0] >= keep - 1e-9


def test_keep_counts_the_whole_spectrum_and_caps_at_rank():
    from peftdsl.runtime.kernels import Spectrum, select_ranks

    sigma = torch.tensor([[3.0, 2.0, 1.0]], dtype=torch.float64)
    # A randomized SVD saw three values of a matrix whose norm holds more (total 28, not 14).
    ranks, kept = select_ranks(Spectrum(sigma, torch.tensor([28.0], dtype=torch.float64)), 3, keep=0.9)
    assert ranks == [3] and kept[0] == pytest.approx((14 / 28) ** 0.5)
    ranks, _ = select_ranks(_spectrum([3.0, 2.0, 1.0]), 2, keep=0.999)
    assert ranks == [2]


@pytest.mark.parametrize("tol, expected", [(0.5, 2), (0.5 + 1e-6, 1), (0.25, 3), (0.0, 4)])
def test_tol_keeps_values_at_least_t_sigma_one(tol, expected):
    from peftdsl.runtime.kernels import select_ranks

    ranks, _ = select_ranks(_spectrum([4.0, 2.0, 1.0, 0.5]), 8, tol=tol)
    assert ranks == [expected]


def test_rank_selection_end_to_end(world, tmp_path, capsys):
    path = recipe(tmp_path, world, "x: svd(0.5 * ft1 + 0.5 * ft2, rank=16, keep=0.5)", "x: out/x",
                  sources=("ft1", "ft2"))
    assert main(["run", str(path)]) == 0
    printed = capsys.readouterr().err
    assert "x: ranks min" in printed
    out = tmp_path / "out" / "x"
    provenance = json.loads((out / "peftdsl.json").read_text())
    config = json.loads((out / "adapter_config.json").read_text())
    base, ft1, ft2 = state(world / "base"), state(world / "ft1"), state(world / "ft2")
    tensors = load_file(out / "adapter_model.safetensors")
    for module, chosen in provenance["ranks"].items():
        tau = 0.5 * (ft1[f"{module}.weight"] + ft2[f"{module}.weight"]) - base[f"{module}.weight"]
        s = torch.linalg.svdvals(tau.double())
        share = (s ** 2).cumsum(0) / (s ** 2).sum()
        expected = int((share >= 0.25 * (1 - 1e-9)).nonzero()[0]) + 1
        assert chosen["rank"] == min(expected, 16), module
        assert tensors[f"base_model.model.{module}.lora_A.weight"].shape[0] == chosen["rank"]
    ranks = {m: c["rank"] for m, c in provenance["ranks"].items()}
    assert len(set(ranks.values())) > 1 and config["rank_pattern"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(world / "base"), out)


@pytest.mark.parametrize("args, message", [
    ("rank=4, keep=0", "must be > 0"), ("rank=4, keep=1.5", "must be ≤ 1"),
    ("rank=4, tol=1", "must be < 1"), ("rank=4, keep=0.5, tol=0.1", "not both"),
])
def test_bad_rank_selection_arguments(world, tmp_path, capsys, args, message):
    path = recipe(tmp_path, world, f"x: svd(ft1, {args})", "x: out/x", sources=("ft1",))
    assert main(["lint", "--format", "concise", str(path)]) == 1
    out = capsys.readouterr().out
    assert "error[T406]" in out and message in out


def test_randomized_svd_is_within_one_percent_of_the_optimum():
    from peftdsl.runtime import kernels

    generator = torch.Generator().manual_seed(0)
    side = kernels.RANDOMIZED_MIN_SIDE + 76
    # A fine-tune-like spectrum: decaying, with a heavy tail.
    U, _ = torch.linalg.qr(torch.randn(side, side, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(side, side, generator=generator))
    sigma = 1.0 / (1.0 + torch.arange(side, dtype=torch.float32)) ** 0.6
    delta = (U * sigma) @ V.T
    rank = 32
    assert kernels.uses_randomized_svd(side, side, rank)
    A, B = kernels.svd_dense(delta.unsqueeze(0), rank, generators=[torch.Generator().manual_seed(1)])
    error = torch.linalg.matrix_norm(delta - B[0] @ A[0])
    optimum = sigma[rank:].pow(2).sum().sqrt()
    assert error <= 1.01 * optimum, (float(error), float(optimum))
    again = kernels.svd_dense(delta.unsqueeze(0), rank, generators=[torch.Generator().manual_seed(1)])
    assert torch.equal(A, again[0])  # seeded: the same bytes every time


def test_equal_to_mergekit_task_arithmetic(world, tmp_path):
    """Where mergekit is installed (not in CI: its import alone takes tens of seconds here),
    its `task_arithmetic` on the same models gives the same tensors."""
    pytest.importorskip("mergekit")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = {"merge_method": "task_arithmetic", "base_model": str(world / "base"), "dtype": "float32",
              "parameters": {"normalize": False},
              "models": [{"model": str(world / "ft1"), "parameters": {"weight": 0.6}},
                         {"model": str(world / "ft2"), "parameters": {"weight": 0.3}}]}
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(config))), str(tmp_path / "mk"),
              options=MergeOptions(copy_tokenizer=False, lazy_unpickle=False, low_cpu_memory=True))
    path = recipe(tmp_path, world, "x: 0.6 * ft1 + 0.3 * ft2", "x: {path: out/x, merge: true}", sources=("ft1", "ft2"))
    peftdsl.load(path).run()
    ours, theirs = state(tmp_path / "out" / "x"), state(tmp_path / "mk")
    assert set(theirs) <= set(ours)
    for name, tensor in theirs.items():
        assert torch.allclose(ours[name], tensor, atol=1e-6), name


@pytest.mark.parametrize("shape", [(1100, 2300), (2300, 1100)])
def test_randomized_svd_reaches_the_optimum_on_a_flat_noise_tail(shape):
    """The hard case for a range finder, and bench/extract.py's: a rank-32 signal over dense
    noise truncated at rank 64, so σ₆₄ and σ₆₅ are nearly equal. Subspace iteration alone was
    1.0023× the optimum here; the block Krylov span is within 5e-6 of it in either orientation
    on this 1100 side, where 8 of its 12 blocks fit (3e-7 at bench/extract.py's 2048 side)."""
    from peftdsl.runtime import kernels

    generator = torch.Generator().manual_seed(3)
    rows, cols = shape
    signal = (torch.randn(rows, 32, generator=generator) / 32 ** 0.5) @ (torch.randn(32, cols, generator=generator)
                                                                         / cols ** 0.5)
    delta = 0.01 * signal + 1e-4 * torch.randn(rows, cols, generator=generator)
    rank = 64
    assert kernels.uses_randomized_svd(rows, cols, rank)
    A, B = kernels.svd_dense(delta.unsqueeze(0), rank, generators=[torch.Generator().manual_seed(1)])
    error = torch.linalg.matrix_norm((delta - B[0] @ A[0]).double())
    optimum = torch.linalg.svdvals(delta.double())[rank:].square().sum().sqrt()
    assert error <= 1.00001 * optimum, float(error / optimum)


def _low_rank(generator, rows, cols, rank):
    return torch.randn(rows, rank, generator=generator) @ torch.randn(rank, cols, generator=generator) / cols ** 0.5


def test_randomized_svd_of_a_low_rank_matrix_falls_back_to_an_orthonormal_basis():
    """Rank 5 under a 72-column test block: the Krylov space is exhausted after one block and the
    later blocks are rounding noise, not orthogonal to the first. The check catches that, the
    projection is taken from a re-orthonormalized basis, and the result is the matrix itself
    (batched with a full-rank module, whose result must not change)."""
    from peftdsl.runtime import kernels

    generator = torch.Generator().manual_seed(5)
    low = _low_rank(generator, 1100, 2300, 5)
    full = 0.01 * _low_rank(generator, 1100, 2300, 32) + 1e-4 * torch.randn(1100, 2300, generator=generator)
    seeds = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    U, sigma, Vh = kernels.randomized_svd(torch.stack([low, full]), 64, seeds)
    assert torch.allclose(U[0, :, :5] * sigma[0, :5] @ Vh[0, :5], low, atol=1e-5 * float(low.abs().max()))
    assert float(sigma[0, 5:].max()) <= 1e-5 * float(sigma[0, 0])
    exact = torch.linalg.svdvals(low.double())[:5]
    assert torch.allclose(sigma[0, :5].double(), exact, rtol=1e-5)
    for basis in (U, Vh.transpose(1, 2)):  # orthonormal wherever σ is not zero
        gram = basis[1].transpose(0, 1) @ basis[1]
        assert torch.allclose(gram, torch.eye(gram.shape[0]), atol=1e-4)
    alone = kernels.randomized_svd(full.unsqueeze(0), 64, [torch.Generator().manual_seed(2)])
    assert torch.allclose(alone[1][0, :64], sigma[1, :64], rtol=1e-5)


def test_randomized_svd_projection_pieces_do_not_change_the_result(monkeypatch):
    """The float64 Gram matrix is summed a piece of rows at a time; with pieces smaller than the
    matrix (as for a 128k-row `lm_head`) the singular values and vectors are the same."""
    from peftdsl.runtime import kernels

    generator = torch.Generator().manual_seed(6)
    delta = (0.01 * _low_rank(generator, 2300, 1100, 32) + 1e-4 * torch.randn(2300, 1100, generator=generator))[None]
    whole = kernels.randomized_svd(delta, 64, [torch.Generator().manual_seed(1)])
    monkeypatch.setattr(kernels, "_PROJECTION_PIECE", 700)
    pieces = kernels.randomized_svd(delta, 64, [torch.Generator().manual_seed(1)])
    (U, sigma, Vh), (U2, sigma2, Vh2) = whole, pieces
    assert torch.allclose(sigma[:, :64], sigma2[:, :64], rtol=1e-5)
    assert torch.allclose(U[..., :64], U2[..., :64], atol=1e-5)
    assert torch.allclose(Vh[:, :64], Vh2[:, :64], atol=1e-5)



# ---------------------------------------------------------------- reading and hashing beside the compute


def test_chunks_are_read_ahead_and_the_result_does_not_change(world, tmp_path, monkeypatch):
    """Every chunk's full-fine-tune and base tensors are handed to the kernel (POSIX_FADV_WILLNEED)
    while chunks before it are still to compute, the one that reads least computing first;
    advice and order change no byte of the adapter."""
    import os

    from peftdsl.runtime import execute

    monkeypatch.setattr(execute, "modules_per_chunk", lambda *args: 1)
    path = recipe(tmp_path, world, "x: svd(ft2, rank=3)", "x: out/ahead", sources=("ft2",))
    advised_files, advised, computed = set(), [], []
    real_fadvise, real_ahead, real_compute = os.posix_fadvise, execute.Executor.read_ahead, execute.Executor.compute
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, advice: advised_files.add(
        os.readlink(f"/proc/self/fd/{fd}")) or real_fadvise(fd, offset, length, advice))
    monkeypatch.setattr(execute.Executor, "read_ahead",
                        lambda self, chunk: advised.append((chunk.modules, len(computed))) or real_ahead(self, chunk))
    monkeypatch.setattr(execute.Executor, "compute",
                        lambda self, task, chunk: computed.append(chunk) or real_compute(self, task, chunk))
    peftdsl.load(path).run()
    assert len(computed) > 3
    sizes = [c.out_features * c.in_features for c in computed]
    assert sizes[0] == min(sizes)
    when = dict(advised)
    for j, chunk in enumerate(computed[1:], start=1):
        # asked for while the chunks before it computed: _READ_AHEAD of them, or from the start
        assert when[chunk.modules] <= max(0, j - execute._READ_AHEAD), (j, chunk.modules)
    assert any("/ft2/" in f for f in advised_files) and any("/base/" in f for f in advised_files)
    monkeypatch.setattr(execute.Executor, "read_ahead", lambda self, chunk: None)
    monkeypatch.setattr(execute.Executor, "_reading_order", lambda self, chunks: chunks)
    path = recipe(tmp_path, world, "x: svd(ft2, rank=3)", "x: out/plain", sources=("ft2",))
    peftdsl.load(path).run()
    ahead = load_file(tmp_path / "out" / "ahead" / "adapter_model.safetensors")
    plain = load_file(tmp_path / "out" / "plain" / "adapter_model.safetensors")
    assert ahead.keys() == plain.keys() and all(torch.equal(ahead[k], plain[k]) for k in ahead)
    assert (tmp_path / "out" / "ahead" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "out" / "plain" / "adapter_model.safetensors").read_bytes()


def test_an_unpinned_source_hashed_beside_the_compute_is_in_the_provenance(world, tmp_path):
    from peftdsl.lock import sha256_files

    path = recipe(tmp_path, world, "x: svd(ft2, rank=3)", "x: out/x", sources=("ft2",))
    peftdsl.load(path).run()
    provenance = json.loads((tmp_path / "out" / "x" / "peftdsl.json").read_text())
    expected = sha256_files(sorted((world / "ft2").glob("*.safetensors")))
    assert provenance["inputs"]["ft2"]["sha256"] == expected
    assert expected in (tmp_path / "out" / "x" / "README.md").read_text()


def test_a_source_unreadable_while_hashed_beside_the_compute_writes_nothing(world, tmp_path, capsys, monkeypatch):
    from peftdsl.runtime import tensorio

    def broken(self, stop=None):
        raise OSError("input/output error")

    from peftdsl.runtime import execute

    monkeypatch.setattr(tensorio.SafetensorsReader, "sha256", broken)
    computed = []
    real = execute.Executor.compute
    monkeypatch.setattr(execute.Executor, "compute",
                        lambda self, task, chunk: computed.append(chunk) or real(self, task, chunk))
    path = recipe(tmp_path, world, "x: svd(ft1, rank=3)\nm: 0.5 * ft1", "x: out/x\nm: {path: out/m, merge: true}",
                  sources=("ft1",))
    assert main(["run", "--quiet", str(path)]) == 1
    assert computed  # the hash ran beside the computation, and its failure still stopped every write
    err = capsys.readouterr().err
    assert "error[I304]" in err and "cannot read adapter `ft1`" in err and "input/output error" in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_pinned_source_is_hashed_before_any_compute(world, tmp_path, capsys, monkeypatch):
    """A pin is checked before the work it guards: a mismatch is I309 with nothing computed."""
    from peftdsl.runtime import execute

    path = recipe(tmp_path, world, "x: svd(ft1, rank=3)", "x: out/x", sources=("ft1",))
    path.write_text(path.read_text().replace(f"ft1: {world / 'ft1'}", f"ft1: {{path: {world / 'ft1'}, sha256: {'0' * 64}}}"))
    computed = []
    monkeypatch.setattr(execute.Executor, "compute", lambda self, task, chunk: computed.append(chunk))
    assert main(["run", "--quiet", str(path)]) == 1
    assert "error[I309]" in capsys.readouterr().err
    assert not computed and not (tmp_path / "out").exists()


# ---------------------------------------------------------------- the dense SVD's kernels


@pytest.mark.parametrize("shape", [(3, 300, 700), (2, 700, 300)])
def test_gram_svd_is_the_exact_svd(shape):
    """The float64 Gram path (short sides of 256 and more on the CPU) gives the dense SVD's
    values and the optimum's error (Eckart–Young), for wide and tall matrices alike."""
    from peftdsl.runtime import kernels

    generator = torch.Generator().manual_seed(4)
    g, rows, cols = shape
    signal = torch.randn(g, rows, 24, generator=generator) @ torch.randn(g, 24, cols, generator=generator)
    delta = signal + 0.05 * torch.randn(shape, generator=generator)
    assert kernels.uses_gram_svd(delta) and not kernels.uses_randomized_svd(rows, cols, 16)
    U, sigma, _ = kernels.gram_svd(delta, 40)
    exact = torch.linalg.svdvals(delta.double())
    lapack = torch.linalg.svdvals(delta)[:, :40].double()  # float32 LAPACK: 4.6e-6 off here
    error = ((sigma.double() - exact[:, :40]) / exact[:, :40]).abs().max()
    assert error <= ((lapack - exact[:, :40]) / exact[:, :40]).abs().max()
    assert error < 2e-6
    eye = torch.eye(40, dtype=torch.float64)
    assert torch.allclose(U.double().transpose(1, 2) @ U.double(), eye.expand(g, -1, -1), atol=1e-5)
    A, B = kernels.svd_dense(delta, 16)
    for j in range(g):
        error = torch.linalg.matrix_norm(delta[j].double() - B[j].double() @ A[j].double())
        optimum = exact[j, 16:].square().sum().sqrt()
        assert error <= optimum * (1 + 1e-6), (j, float(error), float(optimum))


def test_cholesky_qr_twice_is_orthonormal_and_falls_back_where_the_gram_is_singular():
    from peftdsl.runtime import kernels

    generator = torch.Generator().manual_seed(5)
    left, _ = torch.linalg.qr(torch.randn(2, 2048, 72, generator=generator))
    right, _ = torch.linalg.qr(torch.randn(2, 72, 72, generator=generator))
    tall = (left * torch.logspace(0, -6, 72)) @ right  # condition number 1e6
    eye = torch.eye(72).expand(2, -1, -1)
    once = kernels._orthonormal_rows(tall.transpose(1, 2)).transpose(1, 2)
    assert float((once.transpose(1, 2) @ once - eye).abs().max()) > 1e-4  # why the second pass is there
    basis = kernels._orthonormal_columns(tall)
    assert float((basis.transpose(1, 2) @ basis - eye).abs().max()) < 1e-5
    assert float((tall - basis @ (basis.transpose(1, 2) @ tall)).norm() / tall.norm()) < 1e-5  # the same span
    deficient = tall.clone()
    deficient[..., -1] = deficient[..., 0]  # rank 71: the Gram is singular, the Householder QR takes over
    basis = kernels._orthonormal_columns(deficient)
    assert float((basis.transpose(1, 2) @ basis - eye).abs().max()) < 1e-5


def test_randomized_svd_sums_the_gram_in_float64_only_where_float32_cannot_resolve_it(monkeypatch):
    """The projection's Gram is a float32 product unless its width-th eigenvalue comes near
    float32's rounding of the trace (a steeply decaying spectrum): then float64, and either way
    the optimum's error."""
    from peftdsl.runtime import kernels

    widened = []
    real = kernels._lower_gram_float64
    monkeypatch.setattr(kernels, "_lower_gram_float64", lambda p: widened.append(p.shape) or real(p))
    generator = torch.Generator().manual_seed(6)
    rows, cols, rank = 1100, 2048, 32
    U, _ = torch.linalg.qr(torch.randn(rows, rows, generator=generator, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, rows, generator=generator, dtype=torch.float64))
    for decay, steep in ((4.0, True), (1e9, False)):  # e^(−i/4): λ₄₀ is 1e-9 of the trace
        sigma = torch.exp(-torch.arange(rows, dtype=torch.float64) / decay)
        delta = ((U * sigma) @ V.T).float()
        widened.clear()
        A, B = kernels.svd_dense(delta.unsqueeze(0), rank, generators=[torch.Generator().manual_seed(1)])
        assert bool(widened) == steep
        error = torch.linalg.matrix_norm(delta.double() - B[0].double() @ A[0].double())
        optimum = torch.linalg.svdvals(delta.double())[rank:].square().sum().sqrt()
        assert error <= 1.01 * optimum, (decay, float(error), float(optimum))


def test_randomized_svd_of_values_past_a_float32_gram_is_right():
    """σ₁ ≈ 4e19: the float32 Gram of the projection overflows, so it is summed in float64
    (the result is the scaled-down matrix's, scaled back), never a finite wrong answer."""
    from peftdsl.runtime import kernels

    generator = torch.Generator().manual_seed(8)
    delta = torch.randn(1, 1100, 2048, generator=generator)
    small = kernels.randomized_svd(delta, 32, [torch.Generator().manual_seed(1)])
    large = kernels.randomized_svd(delta * 1e18, 32, [torch.Generator().manual_seed(1)])
    assert torch.allclose(large[1] / 1e18, small[1], rtol=1e-5)
    rebuilt = (large[0][0, :, :32].double() * large[1][0, :32].double()) @ large[2][0, :32].double()
    expected = (small[0][0, :, :32].double() * small[1][0, :32].double()) @ small[2][0, :32].double() * 1e18
    assert torch.allclose(rebuilt, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
