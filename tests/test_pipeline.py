"""The merged writer's pipeline (peftdsl.outputs.pipeline): large tensors merged a block of
rows at a time give the bytes of the whole-tensor merge, and a failure in any thread —
reader, writer, or the calling thread, SIGINT included — aborts the output whole.

References: ``fold_weight`` on the whole weight (bit for bit), and the same base merged
with splitting off and with every tensor through the whole-tensor path of earlier
releases (file bytes). Bases are written directly as safetensors, tiny: tests make the
pipeline split by lowering ``BLOCK_ELEMENTS`` so that its smallest blocks
(``MIN_BLOCK_ROWS`` rows) are used.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from peftdsl.errors import InputDataError
from peftdsl.outputs import merge, pipeline
from peftdsl.runtime import tensorio
from peftdsl.runtime.fold import (
    DenseDelta,
    IA3Delta,
    LoraDelta,
    PartDelta,
    delta_rows,
    fold_part,
    fold_weight,
    part_rows,
)

REPO = Path(__file__).resolve().parents[1]


def smallest_blocks(monkeypatch) -> None:
    """Split every tensor of at least 2 × MIN_BLOCK_ROWS rows into blocks of MIN_BLOCK_ROWS."""
    monkeypatch.setattr(pipeline, "BLOCK_ELEMENTS", 1)


def randn(*shape: int, seed: int, scale: float = 0.02) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def by_blocks(weight: torch.Tensor, fold) -> torch.Tensor:
    blocks = pipeline.row_blocks(tuple(weight.shape))
    assert blocks is not None and len(blocks) > 1
    return torch.cat([fold(weight[start:stop], start, stop) for start, stop in blocks])


# --------------------------------------------------------------------------- row blocks


def test_row_blocks_are_aligned_and_never_short(monkeypatch):
    assert pipeline.row_blocks((100, 64)) is None and pipeline.row_blocks(()) is None
    blocks = pipeline.row_blocks((128256, 2048))
    sizes = [stop - start for start, stop in blocks]
    assert blocks[0][0] == 0 and blocks[-1][1] == 128256 and all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    assert all(size % pipeline.ROW_ALIGN == 0 for size in sizes[:-1]) and min(sizes) >= pipeline.MIN_BLOCK_ROWS
    assert max(sizes) * 2048 <= 2 * pipeline.BLOCK_ELEMENTS
    smallest_blocks(monkeypatch)
    assert pipeline.row_blocks((511, 8)) is None
    assert pipeline.row_blocks((767, 8)) == [(0, 256), (256, 767)]  # the remainder joins the last block


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("rows", "cols", "rank", "policy"), [
    (8192, 2048, 64, "default"), (4099, 1000, 200, "default"),  # Llama-3.2-1B's MLP; a remainder
    (8192, 2048, 64, "smallest"), (2051, 512, 16, "smallest"), (50257, 64, 8, "smallest"),
    (1027, 333, 3, "smallest"), (1800, 700, 1, "smallest"),
])
def test_addmm_on_row_blocks_gives_the_bits_of_the_whole_product(monkeypatch, threads, rows, cols, rank, policy):
    """What lets LoRA merges be split: on this BLAS, ``addmm`` over blocks of ≥ MIN_BLOCK_ROWS rows
    computes every element as the whole product does (blocks of 1–11 rows would not)."""
    if policy == "smallest":
        smallest_blocks(monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        W = randn(rows, cols, seed=0)
        linear = LoraDelta(A=randn(rank, cols, seed=1), B=randn(rows, rank, seed=2))  # rows are outputs
        stored_t = LoraDelta(A=randn(rank, rows, seed=3), B=randn(cols, rank, seed=4), layout="embedding")
        for delta in (linear, stored_t):
            whole = fold_weight(W, delta)
            split = by_blocks(W, lambda block, start, stop, d=delta: fold_weight(
                block.clone(), delta_rows(d, start, stop), inplace=True))  # as the pipeline folds
            assert torch.equal(split.view(torch.int32), whole.view(torch.int32)), delta.layout
    finally:
        torch.set_num_threads(before)


def deltas_of_every_kind(rows: int, cols: int) -> dict[str, object]:
    """Deltas for a stored weight of (rows, cols) in each layout and kind."""
    return {
        "lora linear": LoraDelta(A=randn(5, cols, seed=1), B=randn(rows, 5, seed=2)),
        "lora embedding": LoraDelta(A=randn(5, rows, seed=3), B=randn(cols, 5, seed=4), layout="embedding"),
        "lora conv1d": LoraDelta(A=randn(5, rows, seed=5), B=randn(cols, 5, seed=6), layout="conv1d"),
        "dense linear": DenseDelta(delta=randn(rows, cols, seed=7)),
        "dense conv1d": DenseDelta(delta=randn(cols, rows, seed=8), layout="conv1d"),
        "ia3 linear": IA3Delta(l=1 + randn(rows, 1, seed=9), feedforward=False),
        "ia3 linear ff": IA3Delta(l=1 + randn(1, cols, seed=10), feedforward=True),
        "ia3 conv1d": IA3Delta(l=1 + randn(cols, 1, seed=11), feedforward=False, layout="conv1d"),
        "ia3 conv1d ff": IA3Delta(l=1 + randn(1, rows, seed=12), feedforward=True, layout="conv1d"),
    }


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("kind", list(deltas_of_every_kind(1, 1)))
def test_delta_rows_folds_to_the_rows_of_the_whole_fold(monkeypatch, kind, inplace):
    smallest_blocks(monkeypatch)
    W = randn(600, 40, seed=0)
    delta = deltas_of_every_kind(600, 40)[kind]
    split = by_blocks(W, lambda block, start, stop: fold_weight(
        block.clone(), delta_rows(delta, start, stop), inplace=inplace))
    assert torch.equal(split, fold_weight(W, delta))
    if inplace:
        with pytest.raises(TypeError, match="in-place"):
            fold_weight(W.to(torch.bfloat16), delta, inplace=True)


@pytest.mark.parametrize("part", [
    PartDelta(value=randn(3, 40, seed=1), rows=(3, 300, 599), role="tokens"),
    PartDelta(value=randn(600, 40, seed=2)),
    PartDelta(value=randn(600, 40, seed=3), add=True, role="lora_bias"),
], ids=["token rows", "value", "delta"])
def test_part_rows_fold_to_the_rows_of_the_whole_fold(monkeypatch, part):
    smallest_blocks(monkeypatch)
    W = randn(600, 40, seed=0)

    def fold(block, start, stop):
        piece = part_rows(part, start, stop)
        return block if piece is None else fold_part(block, piece)

    assert torch.equal(by_blocks(W, fold), fold_part(W, part))
    assert part_rows(PartDelta(value=randn(1, 40, seed=4), rows=(5,)), 256, 600) is None


# --------------------------------------------------------------------------- whole merges

EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"
LINEAR, SMALL = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"
CONV, IA3 = "model.layers.0.conv.weight", "model.layers.0.ia3.weight"


def write_base(folder: Path, dtype: torch.dtype = torch.float32, **values: torch.Tensor) -> Path:
    """A base in three files: tensors of every case, two of them over 2 × MIN_BLOCK_ROWS rows."""
    tensors = {
        EMBED: randn(1100, 64, seed=1, scale=1), HEAD: randn(1100, 64, seed=2, scale=1),
        LINEAR: randn(640, 64, seed=3, scale=1), SMALL: randn(64, 640, seed=4, scale=1),
        CONV: randn(520, 48, seed=5, scale=1), IA3: randn(600, 32, seed=6, scale=1),
        "model.layers.0.norm.weight": torch.ones(64), "model.score.weight": randn(700, 64, seed=7),
    }
    tensors = {name: t.to(dtype) for name, t in tensors.items()} | values
    folder.mkdir()
    names = sorted(tensors)
    files = [names[:3], names[3:6], names[6:]]
    weight_map = {}
    for i, group in enumerate(files, start=1):
        file = f"model-{i:05d}-of-00003.safetensors"
        save_file({n: tensors[n] for n in group}, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def transform_of_every_kind() -> merge.MergeTransform:
    deltas = {
        "model.embed_tokens": LoraDelta(A=randn(4, 1100, seed=11), B=randn(64, 4, seed=12), layout="embedding"),
        "lm_head": LoraDelta(A=randn(4, 64, seed=13), B=randn(1100, 4, seed=14)),
        "model.layers.0.mlp.up_proj": LoraDelta(A=randn(4, 64, seed=15), B=randn(640, 4, seed=16)),
        "model.layers.0.mlp.down_proj": LoraDelta(A=randn(4, 640, seed=17), B=randn(64, 4, seed=18)),
        "model.layers.0.conv": LoraDelta(A=randn(4, 520, seed=19), B=randn(48, 4, seed=20), layout="conv1d"),
        "model.layers.0.ia3": IA3Delta(l=1 + randn(1, 32, seed=21), feedforward=True),
    }
    parts = {EMBED: PartDelta(value=randn(3, 64, seed=22), rows=(2, 700, 1099), role="tokens"),
             "model.score.weight": PartDelta(value=randn(700, 64, seed=23))}
    return merge.merge_transform(deltas, parts=parts)


def tie(monkeypatch, *names: str) -> None:
    """Make ``names`` one tie group, as ``tied_groups`` finds for a tied embedding."""
    monkeypatch.setattr(merge, "_may_touch_tied", lambda *args: True)
    monkeypatch.setattr(merge, "tied_groups", lambda base_dir, stored, task=None: {n: names for n in names})


def files_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def siblings(target: Path) -> list[str]:
    return sorted(path.name for path in target.parent.iterdir() if path.name.startswith(f".{target.name}."))


def pipeline_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("peftdsl-")]


def merged(target: Path, base: Path, transform=None, **options) -> dict[str, bytes]:
    merge.write_merged(target, base_dir=base, transform=transform or transform_of_every_kind(), force=False,
                       max_shard_bytes=200_000, **options)
    assert not pipeline_threads()
    return files_bytes(target)


def whole_tensors_only(monkeypatch) -> None:
    """Every float tensor through ``merged_tensor`` whole, as earlier releases merged them."""
    monkeypatch.setattr(pipeline._TensorMerge, "_mode",
                        lambda self, split, streamed=False: "copy" if self.compute is None else "whole")


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
@pytest.mark.parametrize("tied", [False, True])
def test_split_merge_writes_the_bytes_of_the_whole_merge(tmp_path, monkeypatch, dtype, tied):
    """A shard boundary, tensors bigger than a block in every layout, a tie group, parts on split
    tensors, a cast: three ways of merging give one set of bytes."""
    base = write_base(tmp_path / "base")
    if tied:
        tie(monkeypatch, EMBED, HEAD)
    reference = merged(tmp_path / "whole", base, dtype=dtype)  # default blocks: nothing here is split
    with monkeypatch.context() as patch:
        whole_tensors_only(patch)
        assert merged(tmp_path / "earlier", base, dtype=dtype) == reference

    modes, reads = [], []
    real_mode, real_read = pipeline._TensorMerge._mode, tensorio.SafetensorsReader.read_rows
    smallest_blocks(monkeypatch)
    monkeypatch.setattr(pipeline, "WRITEBACK_BYTES", 1)  # writeback started after every write
    monkeypatch.setattr(pipeline._TensorMerge, "_mode", lambda self, split, streamed=False: modes.append(
        (self.entry.name, real_mode(self, split, streamed))) or modes[-1][1])
    monkeypatch.setattr(tensorio.SafetensorsReader, "read_rows",
                        lambda self, *a, **k: reads.append(a) or real_read(self, *a, **k))
    assert merged(tmp_path / "split", base, dtype=dtype) == reference

    assert len([name for name in reference if name.startswith("model-")]) > 1  # a shard boundary
    modes = dict(modes)
    assert {modes[n] for n in (EMBED, HEAD, LINEAR, CONV, IA3)} == {"rows"}
    assert modes[SMALL] == "whole" and modes["model.layers.0.norm.weight"] == ("copy" if dtype is None else "cast")
    assert modes["model.score.weight"] == "rows" and len({a[0] for a in reads}) >= 6


def test_split_merge_of_a_bfloat16_base_copies_untouched_tensors(tmp_path, monkeypatch):
    base = write_base(tmp_path / "base", dtype=torch.bfloat16)
    reference = merged(tmp_path / "whole", base)
    smallest_blocks(monkeypatch)
    assert merged(tmp_path / "split", base) == reference


def test_overflow_of_a_split_tensor_is_the_error_of_the_whole_one(tmp_path, monkeypatch):
    """Finite in float32, infinite in float16: refused, split or not; a float32 result that already
    holds an Inf elsewhere is written as it is, split or not (tensorio.stored's rule)."""
    big = randn(1100, 64, seed=1, scale=1)
    big[900, 3] = 70000.0  # over float16's 65504 in a later block
    base = write_base(tmp_path / "base", **{EMBED: big})
    for split in (False, True):
        with monkeypatch.context() as patch:
            if split:
                smallest_blocks(patch)
            with pytest.raises(InputDataError, match="overflows float16"):
                merged(tmp_path / f"refused-{split}", base, dtype="float16")
            assert not (tmp_path / f"refused-{split}").exists() and not siblings(tmp_path / f"refused-{split}")

    big[10, 0] = float("inf")  # an earlier block: the merged float32 tensor is not finite
    base = write_base(tmp_path / "inf-base", **{EMBED: big})
    reference = merged(tmp_path / "inf-whole", base, dtype="float16")
    smallest_blocks(monkeypatch)
    assert merged(tmp_path / "inf-split", base, dtype="float16") == reference


@pytest.mark.parametrize("bad", ["lora", "part"])
def test_a_misfit_on_a_split_tensor_is_the_error_of_the_whole_one(tmp_path, monkeypatch, bad):
    base = write_base(tmp_path / "base")
    if bad == "lora":
        transform = merge.merge_transform({"model.embed_tokens": LoraDelta(A=randn(4, 1000, seed=1),
                                                                           B=randn(64, 4, seed=2), layout="embedding")})
        error = ValueError
    else:
        transform = merge.merge_transform({}, parts={EMBED: PartDelta(value=randn(2, 63, seed=3), rows=(1, 2))})
        error = InputDataError
    messages = []
    for split in (False, True):
        with monkeypatch.context() as patch:
            if split:
                smallest_blocks(patch)
            with pytest.raises(error) as caught:
                merged(tmp_path / f"merged-{split}", base, transform)
            messages.append(str(caught.value))
            assert_nothing_left(tmp_path / f"merged-{split}")
    assert messages[0] == messages[1] and "(1100, 64)" in messages[0]


# --------------------------------------------------------------------------- failures


def assert_nothing_left(target: Path) -> None:
    assert not target.exists() and siblings(target) == []
    assert not pipeline_threads(), "a pipeline thread outlived its merge"


def test_a_read_failure_aborts_the_output(tmp_path, monkeypatch):
    base = write_base(tmp_path / "base")
    smallest_blocks(monkeypatch)
    real_read, calls = tensorio.SafetensorsReader.read_rows, []

    def failing(self, name, start, stop, out=None):
        calls.append(name)
        if len(calls) == 4:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_read(self, name, start, stop, out)

    monkeypatch.setattr(tensorio.SafetensorsReader, "read_rows", failing)
    with pytest.raises(OSError) as caught:
        merged(tmp_path / "merged", base)
    assert caught.value.errno == errno.EIO
    assert_nothing_left(tmp_path / "merged")


@pytest.mark.parametrize("after", [0, 5, 15])
def test_a_full_disk_in_the_writer_aborts_the_output(tmp_path, monkeypatch, after):
    base = write_base(tmp_path / "base")
    smallest_blocks(monkeypatch)
    real_write, calls = tensorio._write_all, []

    def full(fd, data, offset):
        calls.append(offset)
        if len(calls) > after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(fd, data, offset)

    monkeypatch.setattr(tensorio, "_write_all", full)
    with pytest.raises(OSError) as caught:
        merged(tmp_path / "merged", base)
    assert caught.value.errno == errno.ENOSPC
    assert_nothing_left(tmp_path / "merged")


@pytest.mark.parametrize(("where", "error"), [("worker", ValueError), ("worker", KeyboardInterrupt),
                                              ("calling thread", ValueError), ("calling thread", KeyboardInterrupt)])
def test_a_failure_while_merging_aborts_the_output(tmp_path, monkeypatch, where, error):
    """Raised in the middle of a split tensor — on a worker merging a block, or in the calling
    thread handing blocks on (where SIGINT lands) — while the reader reads ahead and the writer
    writes behind: every thread stops, and the error comes out as it was raised."""
    base = write_base(tmp_path / "base")
    smallest_blocks(monkeypatch)
    owner, method = (pipeline._TensorMerge, "merge_block") if where == "worker" else (pipeline._Pipeline, "merge")
    real, seen = getattr(owner, method), []

    def failing(self, *args):
        seen.append(args)
        if len(seen) == 3:
            raise error("stop here")
        return real(self, *args)

    monkeypatch.setattr(owner, method, failing)
    with pytest.raises(error, match="stop here"):
        merged(tmp_path / "merged", base)
    assert_nothing_left(tmp_path / "merged")


SLOW_RUN = r"""
import sys, time
import peftdsl.outputs.pipeline as pipeline
from peftdsl.cli import main

pipeline.BLOCK_ELEMENTS = 1
merge = pipeline._Pipeline.merge
def slow(self, *args):  # a merge that lasts long enough to be interrupted in the middle
    time.sleep(0.05)
    return merge(self, *args)
pipeline._Pipeline.merge = slow
sys.exit(main(sys.argv[1:]))
"""


def test_sigint_during_a_merge_leaves_nothing(tmp_path):
    """``peftdsl run`` interrupted (Ctrl-C) while the pipeline's threads run: exit 130, no output,
    no temporary folder."""
    from tests.factories import make_lora

    base = write_base(tmp_path / "base")
    (base / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 1100}))
    make_lora(tmp_path / "lora", r=4, targets=("up_proj",), base=_tiny_llama_like())
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("peftdsl: 1\nbase: base\nadapters:\n  a: lora\ncompose:\n  mix: 2 * a\n"
                      "outputs:\n  mix: {path: merged, merge: true}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PEFTDSL_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_RUN, "run", str(recipe), "--quiet", "--no-eval"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not siblings(tmp_path / "merged"):
            time.sleep(0.01)
        assert siblings(tmp_path / "merged"), f"the merge never started: {proc.communicate()[0]}"
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out
    assert "interrupted" in out and "Traceback" not in out, out
    assert not (tmp_path / "merged").exists() and siblings(tmp_path / "merged") == []


def _tiny_llama_like():
    """A model whose `model.layers.0.mlp.up_proj` is a 64 → 640 Linear, for PEFT to build a LoRA on."""
    from tests.factories import tiny_llama

    return tiny_llama(layers=1, hidden=64, intermediate=640, vocab=1100)
