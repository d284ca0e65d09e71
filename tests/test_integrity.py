"""The bytes peftdsl computes from are the bytes it checked (issue 12, items 2, 3, 6, 14).

- safetensors headers the safetensors library refuses are refused at lint (I304, naming
  the file); the library itself is the reference for every mutation;
- a pin is hashed from the open file the run reads: weights replaced after hashing are
  never read, weights written in place during the run stop it;
- the resource guard counts dense intermediates and refuses before allocating;
- a sharded checkpoint's index decides which shard's copy of a tensor is used.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from peftdsl import inputs
from peftdsl.cli import main
from peftdsl.lock import sha256_file

PREFIX = "base_model.model."


def cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = main(list(argv))
    return status, out.getvalue()


def lora_adapter(folder: Path, modules: dict[str, tuple[int, int]], *, r: int = 1, seed: int = 0,
                 alpha: float = 1.0) -> Path:
    """A LoRA adapter written by hand: `modules` maps a module name to (out, in)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out, inn) in modules.items():
        tensors[f"{PREFIX}{module}.lora_A.weight"] = torch.randn(r, inn, generator=generator)
        tensors[f"{PREFIX}{module}.lora_B.weight"] = torch.randn(out, r, generator=generator)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted({m.split(".")[-1] for m in modules}),
        "fan_in_fan_out": False}))
    return folder


def library_refuses(path: Path) -> bool:
    """The reference: does the safetensors library open and read every tensor of `path`?"""
    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has keys(), not __iter__
                handle.get_tensor(key)
            handle.metadata()
    except Exception:  # noqa: BLE001 - any refusal counts
        return True
    return False


# ---------------------------------------------------------------- item 14: hostile headers


def _split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _write(path: Path, header_text: bytes, data: bytes, length: int | None = None) -> None:
    header_text += b" " * (-len(header_text) % 8)
    path.write_bytes(struct.pack("<Q", len(header_text) if length is None else length) + header_text + data)


def _sorted_keys(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _shift(header: dict, by: int) -> dict:
    first, second = _sorted_keys(header)[:2]
    begin, end = header[second]["data_offsets"]
    return {**header, second: {**header[second], "data_offsets": [begin + by, end + by]}, first: header[first]}


def _mutations():
    """(name, mutate(header, data) -> (header text, data, declared length or None))."""
    dump = lambda h: json.dumps(h).encode()
    return {
        "overlapping offsets": lambda h, d: (dump(_shift(h, -4)), d, None),
        "gap between tensors": lambda h, d: (dump(_shift(h, 4)), d + b"\0" * 4, None),
        "trailing bytes": lambda h, d: (dump(h), d + b"\0" * 8, None),
        # The first tensor's name again, with the second's entry: the library's last copy wins,
        # and two names then share one range.
        "duplicate names": lambda h, d: (dump(h)[:-1] + b', "' + _sorted_keys(h)[0].encode() + b'": '
                                         + json.dumps(h[_sorted_keys(h)[1]]).encode() + b"}", d, None),
        "offsets not dtype x shape": lambda h, d: (dump({**h, _sorted_keys(h)[-1]: {
            **h[_sorted_keys(h)[-1]], "dtype": "F16"}}), d, None),
        "metadata is a list": lambda h, d: (dump({**h, "__metadata__": ["format", "pt"]}), d, None),
        "metadata value not a string": lambda h, d: (dump({**h, "__metadata__": {"format": 1}}), d, None),
        "header length beyond the file": lambda h, d: (dump(h), d, len(dump(h)) + len(d) + 64),
        "unknown dtype": lambda h, d: (dump({**h, _sorted_keys(h)[0]: {**h[_sorted_keys(h)[0]], "dtype": "F17"}}),
                                       d, None),
        "header not an object": lambda h, d: (json.dumps([h]).encode(), d, None),
    }


@pytest.fixture
def good(tmp_path: Path) -> Path:
    return lora_adapter(tmp_path / "a", {"model.layers.0.q_proj": (8, 8), "model.layers.0.v_proj": (8, 8)})


def _lint(tmp_path: Path, adapter: Path) -> tuple[int, str]:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"peftdsl: 1\nadapters:\n  a: {adapter}\ncompose:\n  m: 2 * a\noutputs:\n  m: out\n")
    return cli("lint", str(recipe))


def test_a_valid_file_is_accepted_by_both(tmp_path, good):
    assert not library_refuses(good / "adapter_model.safetensors")
    status, text = _lint(tmp_path, good)
    assert status == 0, text


@pytest.mark.parametrize("name", sorted(_mutations()))
def test_headers_the_library_refuses_are_refused_at_lint(tmp_path, good, name):
    weights = good / "adapter_model.safetensors"
    header, data = _split(weights)
    _write(weights, *_mutations()[name](header, data)[:2], length=_mutations()[name](header, data)[2])
    assert library_refuses(weights), f"the reference accepts `{name}`: the mutation is wrong"
    status, text = _lint(tmp_path, good)
    assert status == 1, text
    assert "error[I304]" in text and "`adapter_model.safetensors`" in text, text
    assert "Traceback" not in text and "internal error" not in text


def test_an_absurd_header_is_refused_before_it_is_parsed(tmp_path, good, monkeypatch):
    """2 MiB of header for 512 bytes of data: over 1 MiB and 1/16 of the file (docs/conventions.md)."""
    weights = good / "adapter_model.safetensors"
    header, data = _split(weights)
    header["__metadata__"] = {"format": "pt", "pad": "x" * (2 << 20)}
    _write(weights, json.dumps(header).encode(), data)
    parsed = []
    monkeypatch.setattr(inputs.safetensors_header, "parse_header", lambda *a: parsed.append(a))
    status, text = _lint(tmp_path, good)
    assert status == 1 and "error[I304]" in text and "1/16 of the file" in text, text
    assert not parsed


def test_the_same_header_is_fine_beside_enough_data(tmp_path):
    """The cap is relative: 1.1 MiB of header beside 20 MiB of tensors is a real file's shape."""
    adapter = lora_adapter(tmp_path / "big", {"model.layers.0.q_proj": (40960, 40960)}, r=64)
    weights = adapter / "adapter_model.safetensors"
    header, data = _split(weights)
    header["__metadata__"] = {"format": "pt", "pad": "x" * (1100 << 10)}
    _write(weights, json.dumps(header).encode(), data)
    assert not library_refuses(weights)
    status, text = _lint(tmp_path, adapter)
    assert status == 0, text


# ---------------------------------------------------------------- item 2: pins and the bytes read


def _pinned_recipe(tmp_path: Path, adapter: Path, out: str) -> Path:
    recipe = tmp_path / f"{out}.yaml"
    recipe.write_text(f"peftdsl: 1\nadapters:\n  a: {{path: {adapter}, sha256: \"{sha256_file(adapter / 'adapter_model.safetensors')}\"}}\n"
                      f"compose:\n  m: 2 * a\noutputs:\n  m: {out}\n")
    return recipe


def _after_pins(monkeypatch, action) -> None:
    from peftdsl.runner import Session

    original = Session.verify_pins

    def verify_then_act(self, **kw):
        original(self, **kw)
        action()

    monkeypatch.setattr(Session, "verify_pins", verify_then_act)


def test_weights_replaced_after_hashing_are_never_read(tmp_path, monkeypatch):
    modules = {"model.layers.0.q_proj": (16, 8)}
    adapter = lora_adapter(tmp_path / "a", modules, seed=1)
    other = lora_adapter(tmp_path / "b", modules, seed=2)
    weights = adapter / "adapter_model.safetensors"
    pin = sha256_file(weights)
    assert cli("run", str(_pinned_recipe(tmp_path, adapter, "ref")), "--quiet", "--no-eval", "--locked")[0] == 0
    replacement = tmp_path / "replacement.safetensors"
    replacement.write_bytes((other / "adapter_model.safetensors").read_bytes())
    _after_pins(monkeypatch, lambda: os.replace(replacement, weights))
    status, text = cli("run", str(_pinned_recipe(tmp_path, adapter, "out")), "--quiet", "--no-eval", "--locked")
    assert status == 0, text
    assert sha256_file(weights) != pin  # the swap did happen
    ref, got = load_file(tmp_path / "ref" / "adapter_model.safetensors"), load_file(
        tmp_path / "out" / "adapter_model.safetensors")
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    provenance = json.loads((tmp_path / "out" / "peftdsl.json").read_text())
    assert provenance["inputs"]["a"]["sha256"] == pin


def test_weights_written_in_place_during_the_run_stop_it(tmp_path, monkeypatch):
    adapter = lora_adapter(tmp_path / "a", {"model.layers.0.q_proj": (16, 8)}, seed=1)
    weights = adapter / "adapter_model.safetensors"

    def rewrite_in_place():
        time.sleep(0.05)  # past the file system's timestamp granularity
        size = weights.stat().st_size
        with weights.open("r+b") as handle:
            handle.seek(size - 4)
            handle.write(b"\0\0\x80\x3f")  # the last float becomes 1.0

    _after_pins(monkeypatch, rewrite_in_place)
    status, text = cli("run", str(_pinned_recipe(tmp_path, adapter, "out")), "--quiet", "--no-eval", "--locked")
    assert status == 1, text
    assert "changed while peftdsl was reading it" in text, text
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- item 3: the guard sees dense work


def test_the_guard_counts_dense_intermediates_and_refuses_before_allocating(tmp_path, monkeypatch):
    """Two rank-1 adapters (1.6 MB each) on a 200000×200000 module: ties materialises
    160 GB per term. The guard must say so before any tensor is allocated."""
    shape = {"model.layers.0.q_proj": (200_000, 200_000)}
    h1, h2 = lora_adapter(tmp_path / "h1", shape, seed=1), lora_adapter(tmp_path / "h2", shape, seed=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"peftdsl: 1\nadapters:\n  h1: {h1}\n  h2: {h2}\n"
                      "compose:\n  m: svd(ties(h1 + h2, density=0.5), rank=1)\noutputs:\n  m: out\n")
    status, text = cli("explain", str(recipe))
    assert status == 0, text
    peak = next(line for line in text.splitlines() if "peak ~" in line)
    assert "TiB" in peak or ("GiB" in peak and float(peak.split("peak ~")[1].split()[0]) >= 149), peak

    def no_allocation(*args, **kwargs):
        raise AssertionError("the run allocated a tensor before the guard refused")

    from peftdsl.runtime import execute

    monkeypatch.setattr(execute.Executor, "compute", no_allocation)
    status, text = cli("run", str(recipe), "--quiet", "--no-eval")
    assert status == 1, text
    assert "error[R603]" in text and "the plan needs about" in text, text
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- item 6: the index decides


def _reshard_with_stale_copy(folder: Path, stale: str) -> torch.Tensor:
    """Split `model.safetensors` into two shards mapped by an index; the second shard also
    holds a stale copy of `stale` (the index maps it to the first). Returns the indexed value."""
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    keys = sorted(tensors)
    first, second = keys[: len(keys) // 2] + [stale], [k for k in keys[len(keys) // 2:] if k != stale]
    save_file({k: tensors[k] for k in first}, folder / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file({**{k: tensors[k] for k in second}, stale: torch.full_like(tensors[stale], 7.0)},
              folder / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = {**dict.fromkeys(first, "model-00001-of-00002.safetensors"),
                  **dict.fromkeys(second, "model-00002-of-00002.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tensors[stale]


def test_a_sharded_base_uses_the_indexed_copy(tmp_path):
    from tests.factories import make_lora, save_tiny_llama

    base = save_tiny_llama(tmp_path / "base")
    module = "model.layers.0.self_attn.q_proj"
    indexed = _reshard_with_stale_copy(base, f"{module}.weight")
    assert base_files(base)[f"{module}.weight"].name == "model-00001-of-00002.safetensors"
    adapter = make_lora(tmp_path / "a", seed=3)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"peftdsl: 1\nbase: {base}\nadapters:\n  a: {adapter}\ncompose:\n  m: a\n"
                      "outputs:\n  m: {path: out, merge: true}\n")
    status, text = cli("run", str(recipe), "--quiet", "--no-eval")
    assert status == 0, text
    merged = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        merged.update(load_file(shard))
    factors = load_file(adapter / "adapter_model.safetensors")
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    delta = scale * factors[f"{PREFIX}{module}.lora_B.weight"] @ factors[f"{PREFIX}{module}.lora_A.weight"]
    torch.testing.assert_close(merged[f"{module}.weight"], indexed + delta)


def base_files(folder: Path) -> dict[str, Path]:
    return inputs.read_base(folder).files


def test_a_sharded_full_source_uses_the_indexed_copy(tmp_path):
    from tests.factories import save_tiny_llama

    base = save_tiny_llama(tmp_path / "base")
    tuned = save_tiny_llama(tmp_path / "tuned", seed=5)
    stale = "model.layers.0.mlp.up_proj.weight"
    _reshard_with_stale_copy(tuned, stale)
    info = inputs.read_full("t", tuned, inputs.read_base(base))
    assert info.tensor_files[stale].name == "model-00001-of-00002.safetensors"
    assert all(name in info.tensor_files for name in inputs.read_base(base).weights)


# ---------------------------------------------------------------- the fuzz surface, on a fixed seed


def test_hostile_headers_never_crash_and_follow_the_library(corpus_root, tmp_path):
    """bench/fuzz.py's header surface: 150 mutants through lint/explain (and the API), no
    traceback, status 0 or 1, and every file the safetensors library refuses refused."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import fuzz

    ws = fuzz.build_workspace(tmp_path, fixtures=corpus_root / "fixtures")
    summary = fuzz.header_fuzz(ws, cases=150, seed=20240601, case_limit=30, api_every=5)
    assert not summary.failures, [(f.case, f.failure) for f in summary.failures[:5]]
    assert set(summary.statuses) == {0, 1}
