"""Hostile adapter folders and recipes: each gets a clear diagnostic, never a traceback.

Every case expects exit status 1 (or 0 for the warnings), the right code, a message
that says what is wrong, no "internal error", and nothing written at the output
path (no temporary leftovers either). Adapters come from the session fixtures of
tests/conftest.py; broken variants are made here, in temporary folders, by
rewriting a good adapter's files. Pickles are generated here and never committed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from peftdsl.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fx(corpus_root: Path) -> Path:
    return corpus_root / "fixtures"


def cli(*argv: str) -> tuple[int, str]:
    """Run the CLI in process; (status, stdout + stderr). An escaping exception fails the test."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = main(list(argv))
    text = out.getvalue()
    assert "internal error" not in text and "Traceback" not in text, text
    return status, text


def recipe(folder: Path, adapters: dict[str, Path | str], expression: str = "2 * a", *, merge: bool = False,
           base: Path | None = None) -> Path:
    lines = ["peftdsl: 1"]
    if base is not None:
        lines.append(f"base: {base}")
    lines.append("adapters:")
    lines += [f"  {name}: {path}" for name, path in adapters.items()]
    lines += ["compose:", f"  mix: {expression}", "outputs:"]
    lines.append("  mix: {path: out, merge: true}" if merge else "  mix: out")
    path = folder / "recipe.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def assert_refused(folder: Path, path: Path, code: str, *words: str, command: str = "both",
                   extra: tuple[str, ...] = ()) -> str:
    """lint and run both exit 1 with `code` and every one of `words`; run writes nothing."""
    texts = []
    if command in ("both", "lint"):
        status, text = cli("lint", str(path), *extra)
        assert status == 1, text
        assert f"error[{code}]" in text, text
        texts.append(text)
    if command in ("both", "run"):
        status, text = cli("run", str(path), "--quiet", "--no-eval", *extra)
        assert status == 1, text
        assert f"error[{code}]" in text, text
        assert not (folder / "out").exists()
        assert not list(folder.glob(".out.peftdsl-*")), "temporary leftovers"
        texts.append(text)
    for text in texts:
        for word in words:
            assert word in text, (word, text)
    return texts[-1]


def copy_adapter(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def rewrite_header(weights: Path, edit) -> None:
    """Apply `edit(header) -> header` to a safetensors file's JSON header, keeping its data."""
    raw = weights.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8:8 + length]))
    encoded = json.dumps(header).encode()
    encoded += b" " * ((8 - len(encoded) % 8) % 8)
    weights.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length:])


def first_key(weights: Path) -> str:
    return sorted(load_file(weights))[0]


# ---------------------------------------------------------------- adapter_config.json


def test_missing_config(fx, tmp_path):
    bad = copy_adapter(fx / "lora_r4", tmp_path / "bad")
    (bad / "adapter_config.json").unlink()
    assert_refused(tmp_path, recipe(tmp_path, {"a": bad}), "I302", "has no `adapter_config.json`")


@pytest.mark.parametrize("text, words", [
    ('{"peft_type": "LORA", ', ("not valid JSON",)),
    ("[1, 2]", ("not a JSON object",)),
    (b"\xff\xfe{}", ("not valid JSON",)),
    ('{"peft_type": "LORA", "r": 0, "lora_alpha": 8}', ("`r` and `lora_alpha` must be positive",)),
    ('{"peft_type": "LORA", "r": "4", "lora_alpha": 8}', ("`r` and `lora_alpha` must be positive",)),
    ('{"r": 4, "lora_alpha": 8}', ("no `peft_type`",)),
])
def test_malformed_config(fx, tmp_path, text, words):
    bad = copy_adapter(fx / "lora_r4", tmp_path / "bad")
    (bad / "adapter_config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
    assert_refused(tmp_path, recipe(tmp_path, {"a": bad}), "I302", *words)


@pytest.mark.parametrize("peft_type", ["LOHA", "PROMPT_TUNING", "lora", 7])
def test_unknown_peft_type(fx, tmp_path, peft_type):
    bad = copy_adapter(fx / "lora_r4", tmp_path / "bad")
    config = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, "peft_type": peft_type}))
    assert_refused(tmp_path, recipe(tmp_path, {"a": bad}), "I303", f"`{peft_type}` adapter", "LoRA and (IA)³")


def test_dora_is_refused_with_the_reason(fx, tmp_path):
    assert_refused(tmp_path, recipe(tmp_path, {"a": fx / "dora"}), "I303", "use_dora", "not linear")


# ---------------------------------------------------------------- safetensors files


def test_header_longer_than_the_file(fx, tmp_path):
    bad = copy_adapter(fx / "lora_r4", tmp_path / "bad")
    weights = bad / "adapter_model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(struct.pack("<Q", len(raw) * 4) + raw[8:])
    assert_refused(tmp_path, recipe(tmp_path, {"a": bad}), "I304", "header", "truncated or corrupt")


@pytest.mark.parametrize("content, words", [
    (b"", ("too short",)),
    (b"\x00" * 4, ("too short",)),
    (struct.pack("<Q", 2**63) + b"{}", ("declares a", "header")),
    (struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc", ("malformed header",)),
    (struct.pack("<Q", 2) + b"[]", ("malformed header",)),
    (struct.pack("<Q", 8) + b'{"x": 1}', ("malformed header entry",)),
])
def test_garbage_weights(fx, tmp_path, content, words):
    bad = copy_adapter(fx / "lora_r4", tmp_path / "bad")
    (bad / "adapter_model.safetensors").write_bytes(content)
    assert_refused(tmp_path, recipe(tmp_path, {"a": bad}), "I304", *words)


def test_truncated_data(fx, tmp_path):
    assert_refused(tmp_path, recipe(tmp_path, {"a": fx / "truncated"}), "I304", "truncated", "lies past the end")


@pytest.mark.parametrize("edit, words", [
    (lambda e: {**e, "shape": [-1, 4]}, ("malformed header entry",)),
    (lambda e: {**e, "data_offsets": [0, 10**12]}, ("truncated",)),
    (lambda e: {**e, "data_offsets": [8, 0]}, ("truncated",)),
    (lambda e: {**e, "shape": [e["shape"][0], e["shape"][1] * 2]}, ("corrupt", "holds")),
])
def test_header_entries_that_lie(fx, tmp_path, edit, words):
    bad = copy_adapter(fx / "lora_r4", tmp_path / "bad")
    weights = bad / "adapter_model.safetensors"
    key = first_key(weights)
    rewrite_header(weights, lambda h: {**h, key: edit(h[key])})
    assert_refused(tmp_path, recipe(tmp_path, {"a": bad}), "I304", *words)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_non_float_tensors(fx, tmp_path, dtype):
    bad = copy_adapter(fx / "lora_r4", tmp_path / "bad")
    weights = bad / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].to(dtype)
    save_file(tensors, weights)
    assert_refused(tmp_path, recipe(tmp_path, {"a": bad}), "I304", key, "not a float type")


@pytest.mark.parametrize("value, expression", [(float("nan"), "2 * a"), (float("inf"), "svd(a, rank=2)"),
                                               (float("-inf"), "a + a")])
def test_nan_and_inf_tensors_are_named_by_the_run(fx, tmp_path, value, expression):
    """Headers cannot show tensor data: lint passes, run reports R601 naming the tensor."""
    bad = copy_adapter(fx / "lora_r4", tmp_path / "bad")
    weights = bad / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[-1]
    tensors[key][0, 0] = value
    save_file(tensors, weights)
    path = recipe(tmp_path, {"a": bad}, expression)
    assert cli("lint", str(path))[0] == 0
    text = assert_refused(tmp_path, path, "R601", key, "NaN or infinite", "computing `mix` failed",
                          command="run")
    assert "recipe.yaml:5:" in text  # points at the composition


@pytest.mark.parametrize("adapter, expression, words", [
    ("lora_r4", "1e38 * a + 1e38 * a", ("not finite", "overflow")),
    ("lora_r4", "1e300 * a", ("not finite", "overflow")),
    ("ia3", "1e40 * a - 1e40 * b", ("not finite", "overflow")),
    ("lora_r4", "svd(1e38 * a + 1e38 * a, rank=2)", ("non-finite",)),
])
def test_results_that_overflow_float32_are_not_written(fx, tmp_path, adapter, expression, words):
    """Finite inputs, finite coefficients, an infinite result: R601, never an adapter full of Inf."""
    path = recipe(tmp_path, {"a": fx / adapter, "b": fx / f"{adapter}_b" if adapter == "ia3" else fx / "lora_r4b"},
                  expression)
    assert_refused(tmp_path, path, "R601", *words, command="run")


def test_shapes_that_disagree_with_r(fx, tmp_path):
    assert_refused(tmp_path, recipe(tmp_path, {"a": fx / "rank_lie"}), "I304", "rank 4", "r=6")


@pytest.mark.parametrize("half", ["lora_B.weight", "lora_A.weight"])
def test_half_a_lora_pair(fx, tmp_path, half):
    """Either half of a pair alone is I304, never silently dropped."""
    bad = copy_adapter(fx / "lora_r4", tmp_path / "bad")
    weights = bad / "adapter_model.safetensors"
    tensors = load_file(weights)
    dropped = next(k for k in sorted(tensors) if k.endswith(half))
    del tensors[dropped]
    save_file(tensors, weights)
    assert_refused(tmp_path, recipe(tmp_path, {"a": bad}), "I304", "has no matching", dropped)


def test_full_weights_the_config_does_not_declare(fx, tmp_path):
    """A full tensor that is none of PEFT's parts (no `modules_to_save` names it) is refused,
    never dropped and never taken for a saved module."""
    bad = copy_adapter(fx / "lora_r4", tmp_path / "bad")
    weights = bad / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.lm_head.weight"] = torch.zeros(128, 64)
    save_file(tensors, weights)
    assert_refused(tmp_path, recipe(tmp_path, {"a": bad}), "I304", "base_model.model.lm_head.weight",
                   "neither a factor nor a part PEFT saves")


# ---------------------------------------------------------------- adapters of different bases


def test_adapters_of_different_sizes(fx, tmp_path):
    path = recipe(tmp_path, {"a": fx / "lora_r4", "w": fx / "lora_wide"}, "a + w")
    assert_refused(tmp_path, path, "I307", "q_proj", "64", "96")


def test_adapter_that_does_not_fit_the_base(fx, tmp_path):
    path = recipe(tmp_path, {"a": fx / "lora_wide"}, base=fx / "base", merge=True)
    assert_refused(tmp_path, path, "I307")


def test_differing_base_names_are_a_warning_only(fx, tmp_path):
    path = recipe(tmp_path, {"a": fx / "lora_r4", "o": fx / "lora_other_base"}, "a + o")
    status, text = cli("lint", str(path), "--format", "concise")
    assert status == 0 and "warning[I306]" in text and "other-org/other-model" in text
    status, text = cli("run", str(path), "--quiet", "--no-eval")
    assert status == 0 and (tmp_path / "out" / "adapter_model.safetensors").exists()


# ---------------------------------------------------------------- symlinks


def test_weights_linked_outside_the_folder_are_refused(fx, tmp_path):
    text = assert_refused(tmp_path, recipe(tmp_path, {"a": fx / "link_outside"}), "I312",
                          "adapter_model.safetensors", "outside the adapter's folder")
    assert "lora_r4" in text  # says where the link points


@pytest.mark.parametrize("target", ["/etc/passwd", "/dev/zero", "/proc/version"])
def test_links_to_system_files_are_refused(fx, tmp_path, target):
    bad = copy_adapter(fx / "lora_r4", tmp_path / "bad")
    (bad / "adapter_model.safetensors").unlink()
    (bad / "adapter_model.safetensors").symlink_to(target)
    assert_refused(tmp_path, recipe(tmp_path, {"a": bad}), "I312", target)


def test_config_linked_outside_is_refused(fx, tmp_path):
    bad = copy_adapter(fx / "lora_r4", tmp_path / "bad")
    (bad / "adapter_config.json").unlink()
    (bad / "adapter_config.json").symlink_to(fx / "lora_r4" / "adapter_config.json")
    assert_refused(tmp_path, recipe(tmp_path, {"a": bad}), "I312", "adapter_config.json")


def test_links_inside_the_folder_are_followed(fx, tmp_path):
    good = copy_adapter(fx / "lora_r4", tmp_path / "good")
    (good / "blobs").mkdir()
    os.rename(good / "adapter_model.safetensors", good / "blobs" / "weights.safetensors")
    (good / "adapter_model.safetensors").symlink_to(Path("blobs") / "weights.safetensors")
    path = recipe(tmp_path, {"a": good})
    assert cli("run", str(path), "--quiet", "--no-eval")[0] == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()


def test_a_fifo_is_refused_without_blocking(fx, tmp_path):
    """A named pipe in place of the weights would block `open` forever."""
    bad = copy_adapter(fx / "lora_r4", tmp_path / "bad")
    (bad / "adapter_model.safetensors").unlink()
    os.mkfifo(bad / "adapter_model.safetensors")
    assert_refused(tmp_path, recipe(tmp_path, {"a": bad}), "I304", "not a regular file")


def test_hf_cache_snapshots_may_link_into_their_blobs(fx, tmp_path, monkeypatch):
    """The Hugging Face cache stores files as snapshot links into the repo's blobs/: allowed."""
    repo = tmp_path / "hub" / "models--org--adapter"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(fx / "lora_r4" / name, repo / "blobs" / name)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = recipe(tmp_path, {"a": '"hf:org/adapter"'})
    status, text = cli("lint", str(path), "--format", "concise")
    assert status == 0, text


# ---------------------------------------------------------------- pickles


def test_pickled_adapter_is_refused_naming_the_flag(fx, tmp_path):
    assert_refused(tmp_path, recipe(tmp_path, {"a": fx / "pickled"}), "I310", "pickle", "--allow-pickle")


def test_allowed_pickle_loads_with_weights_only_and_matches_safetensors(fx, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(fx / "lora_r4" / "adapter_config.json", pickled)
    torch.save(load_file(fx / "lora_r4" / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (tmp_path / "p").mkdir()
    (tmp_path / "s").mkdir()
    from_pickle = recipe(tmp_path / "p", {"a": pickled}, "svd(a + a, rank=2)")
    from_safetensors = recipe(tmp_path / "s", {"a": fx / "lora_r4"}, "svd(a + a, rank=2)")
    assert cli("run", str(from_pickle), "--quiet", "--no-eval")[0] == 1  # still refused without the flag
    status, text = cli("run", str(from_pickle), "--quiet", "--no-eval", "--allow-pickle")
    assert status == 0, text
    assert cli("run", str(from_safetensors), "--quiet", "--no-eval")[0] == 0
    written = "adapter_model.safetensors"
    assert (tmp_path / "p" / "out" / written).read_bytes() == (tmp_path / "s" / "out" / written).read_bytes()


class _Exploit:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_allowed_pickle_never_runs_code(fx, tmp_path):
    """--allow-pickle still loads with weights_only=True: a pickle that calls os.system is refused."""
    sentinel = tmp_path / "PWNED"
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(fx / "lora_r4" / "adapter_config.json", evil)
    torch.save({"base_model.model.x.lora_A.weight": _Exploit(sentinel)}, evil / "adapter_model.bin")
    path = recipe(tmp_path, {"a": evil})
    assert_refused(tmp_path, path, "I304", "weights_only=True", command="run", extra=("--allow-pickle",))
    assert not sentinel.exists()


# ---------------------------------------------------------------- YAML safety and the package


@pytest.mark.parametrize("tagged", [
    '!!python/object/apply:os.system ["touch {s}"]',
    '!!python/object/apply:subprocess.check_call [[touch, "{s}"]]',
    '!!python/object/new:os.system ["touch {s}"]',
    '!<tag:yaml.org,2002:python/object/apply:os.system> ["touch {s}"]',
])
def test_yaml_tags_never_execute(fx, tmp_path, tagged):
    sentinel = tmp_path / "PWNED"
    path = tmp_path / "recipe.yaml"
    path.write_text(f"peftdsl: 1\nseed: {tagged.format(s=sentinel)}\nadapters:\n  a: {fx / 'lora_r4'}\n"
                    "compose:\n  mix: 2 * a\noutputs:\n  mix: out\n")
    for command in (("lint",), ("explain",), ("lock",), ("run", "--quiet", "--no-eval")):
        status, text = cli(command[0], str(path), *command[1:])
        assert status == 1 and "error[Y007]" in text and "is not allowed" in text, (command, text)
    assert not sentinel.exists()
    assert not (tmp_path / "out").exists()


def test_yaml_safety_through_the_real_command_line(fx, tmp_path):
    """The same, as a user runs it: a separate `python -m peftdsl` process, no traceback."""
    sentinel = tmp_path / "PWNED"
    path = tmp_path / "recipe.yaml"
    path.write_text(f'peftdsl: 1\nname: !!python/object/apply:os.system ["touch {sentinel}"]\n')
    env = {k: v for k, v in os.environ.items() if k != "PEFTDSL_DEBUG"}
    result = subprocess.run([sys.executable, "-m", "peftdsl", "lint", str(path)], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 1 and "error[Y007]" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert not sentinel.exists()


def test_no_trust_remote_code_anywhere_in_the_package():
    """Loading a base or tokenizer must never run code shipped with a model folder."""
    offenders = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "peftdsl").rglob("*.py"))
                 if "trust_remote_code" in p.read_text(encoding="utf-8")]
    assert not offenders, offenders


def test_pickles_are_loaded_only_with_weights_only():
    """Every torch.load in the package passes weights_only=True."""
    import re

    calls = []
    for path in sorted((ROOT / "peftdsl").rglob("*.py")):
        for match in re.finditer(r"torch\.load\(([^)]*)\)", path.read_text(encoding="utf-8")):
            calls.append((path.name, match.group(1)))
    assert calls, "expected the allowed-pickle readers"
    assert all("weights_only=True" in args for _, args in calls), calls



@pytest.mark.parametrize("merge", [False, True])
def test_results_that_overflow_the_output_dtype_are_not_written(fx, tmp_path, merge):
    """Finite in float32, infinite in float16: R601 naming the tensor, nothing written."""
    path = tmp_path / "recipe.yaml"
    path.write_text(f"peftdsl: 1\nbase: {fx / 'base'}\nadapters: {{a: {fx / 'lora_r4'}}}\n"
                    f"compose:\n  x: 1e7 * a\noutputs:\n  x: {{path: {tmp_path / 'out'}, dtype: float16, "
                    f"merge: {str(merge).lower()}}}\n")
    assert_refused(tmp_path, path, "R601", "overflows float16", command="run")
    assert not (tmp_path / "out").exists()


def test_coefficients_below_float32_range_are_warned_about(fx, tmp_path):
    import peftdsl

    recipe = peftdsl.loads(f"peftdsl: 1\nadapters: {{a: {fx / 'lora_r4'}}}\ncompose:\n  x: 1e-320 * a\n",
                           root=tmp_path)
    assert [(d.code, d.severity.value) for d in recipe.diagnostics] == [("T409", "warning")]
    assert "below float32's range" in recipe.diagnostics[0].message


def test_nested_outputs_are_refused_at_lint(fx, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"peftdsl: 1\nadapters: {{a: {fx / 'lora_r4'}}}\ncompose:\n  x: 2 * a\n  y: 3 * a\n"
                    f"outputs:\n  x: {tmp_path / 'out'}\n  y: {tmp_path / 'out' / 'inner'}\n")
    assert_refused(tmp_path, path, "N210", "output `x`")


def test_an_output_below_a_regular_file_is_refused_before_compute(fx, tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    path = tmp_path / "recipe.yaml"
    path.write_text(f"peftdsl: 1\nadapters: {{a: {fx / 'lora_r4'}}}\ncompose:\n  x: 2 * a\n"
                    f"outputs:\n  x: {tmp_path / 'afile' / 'out'}\n")
    assert_refused(tmp_path, path, "R601", "below a file", command="run")
    assert (tmp_path / "afile").read_text() == "not a folder"


@pytest.mark.parametrize("name, data", [
    ("bad.txt", b"the cat\n\xff\xfe sat\n"),
    ("bad.jsonl", b'{"text": "ok"}\n{"text": "\xc3("}\n'),
    ("deep.jsonl", b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"),
])
def test_unreadable_eval_data_is_a_diagnostic(tmp_path, name, data):
    from factories import save_tiny_llama_with_tokenizer

    base = save_tiny_llama_with_tokenizer(tmp_path / "base")
    (tmp_path / name).write_bytes(data)
    path = tmp_path / "recipe.yaml"
    path.write_text(f"peftdsl: 1\nbase: {base}\neval:\n  - name: p\n    models: [base]\n    metric: perplexity\n"
                    f"    data: {name}\n")
    status, text = cli("run", str(path), "--quiet", "--report", str(tmp_path / "report"))
    assert status == 1 and "error[E501]" in text, text
    assert "Traceback" not in text and "internal error" not in text
    assert ("UTF-8" in text) if name.startswith("bad") else ("nests too deeply" in text)


def test_lock_pins_a_symlinks_target_and_keeps_the_link(fx, tmp_path):
    real = tmp_path / "real.yaml"
    real.write_text(f"peftdsl: 1\nadapters:\n  a: {fx / 'lora_r4'}\ncompose:\n  x: 2 * a\n")
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    status, text = cli("lock", str(link))
    assert status == 0, text
    assert link.is_symlink() and "sha256:" in real.read_text()


def test_lock_in_a_read_only_folder_is_an_error_not_a_traceback(fx, tmp_path, monkeypatch, capsys):
    """Root ignores permission bits, so the refusal a read-only folder gives is injected."""
    import tempfile

    from peftdsl.lock import lock_command

    recipe = tmp_path / "r.yaml"
    text = f"peftdsl: 1\nadapters:\n  a: {fx / 'lora_r4'}\ncompose:\n  x: 2 * a\n"
    recipe.write_text(text)

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    assert lock_command(recipe) == 1
    assert "cannot write the pinned recipe" in capsys.readouterr().err
    assert recipe.read_text() == text


def test_max_length_beyond_the_models_positions_is_clamped_and_said(tmp_path):
    import peftdsl
    from factories import save_tiny_llama_with_tokenizer

    base = save_tiny_llama_with_tokenizer(tmp_path / "base")
    long_line = " ".join(["the cat sat on the mat"] * 40)  # ≈ 240 tokens, past the 128 positions
    (tmp_path / "t.txt").write_text(long_line + "\n")

    def perplexity(max_length: int):
        recipe = peftdsl.loads(f"peftdsl: 1\nbase: {base}\neval:\n  - name: p\n    models: [base]\n"
                               f"    metric: perplexity\n    data: t.txt\n    max_length: {max_length}\n",
                               root=tmp_path)
        return recipe, recipe.run(report=tmp_path / f"r{max_length}").results[0].value

    recipe, clamped = perplexity(10_000)
    [warning] = recipe.diagnostics
    assert (warning.code, warning.severity.value) == ("E501", "warning") and "128 positions" in warning.message
    _, at_limit = perplexity(128)
    assert clamped == at_limit and math.isfinite(clamped)
