"""Merges at the speed of the disk: ``merge: true`` of four LoRAs into a Llama-3.2-1B-shaped base.

The world (DESIGN §8, issue 11 item 4): a bf16 base of Llama-3.2-1B's shape with an
untied ``lm_head`` (16 layers, hidden 2048, MLP 8192, 32 heads / 8 KV heads, vocab
128256: 1.5 B parameters, 3.0 GB in 2 shards), and four rank-16 float32 LoRAs on all
seven projections, composed ``0.5·l0 + 0.3·l1 + 0.7·l2 − 0.2·l3`` and merged into the
base (bf16 out). Everything is written directly as safetensors (no transformers model
is built); ``--scale S`` multiplies the layer count and the vocabulary (and below 1/16
the widths too), so ``--scale 0.02`` is a CI-sized world of a few MB.

Three commands run on the same files in one run, interleaved, each in a fresh process
and with the inputs evicted from the page cache first:

- **floor**: read every base shard and write the same bytes to a new folder, then fsync
  each file (plain Python, 16 MiB buffers): the least a merge has to do;
- **peftdsl**: ``peftdsl run RECIPE`` (a fresh interpreter running the API's
  ``peftdsl.load(recipe).run()``, imports included); the child also reports the time
  of ``run()`` alone, after imports;
- **mergekit** (when installed): ``mergekit-yaml`` ``task_arithmetic`` over
  ``base+lora`` models, with its LoRA merge cache emptied first (its scratch copies).

Peak RSS is the kernel's high-water mark of each process (``ru_maxrss`` from ``wait4``).
Cold cache: ``--cold fadvise`` (default) drops the world's files from the page cache
with ``posix_fadvise(DONTNEED)`` after a ``sync`` (and checks with ``fincore`` when
present); ``--cold drop`` writes 3 to ``/proc/sys/vm/drop_caches`` (root only; it also
evicts Python's and torch's libraries, so imports are cold too), falling back to
fadvise; ``--cold none`` leaves the cache warm.

    python bench/scale.py [--scale 0.5] [--repeats 3] [--mergekit-repeats 1] [--no-mergekit]
                          [--cold fadvise|drop|none] [--keep DIR] [--md FILE] [--world lora|full]

``--world full`` merges three synthetic full fine-tunes instead (``0.5·f0 + 0.3·f1 + 0.2·f2``,
task arithmetic, mergekit's ``task_arithmetic`` on the same folders); its floor reads the
four models and writes one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

WEIGHTS = [0.5, 0.3, 0.7, -0.2]
RANK = 16

# Llama-3.2-1B, with lm_head stored (untied): 1.50 B parameters.
LAYERS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 16, 2048, 8192, 32, 8, 128256


def shape(scale: float) -> dict[str, int]:
    """The world's sizes at ``scale``: layers and vocabulary scale; below 1/16 the widths too."""
    layers = max(1, round(LAYERS * scale))
    width = min(1.0, LAYERS * scale)  # 1 layer left: shrink the matrices instead
    head_dim = 64
    heads = max(2, round(HEADS * width / 2) * 2)
    kv = max(1, heads // (HEADS // KV_HEADS))
    return {"layers": layers, "hidden": heads * head_dim, "intermediate": max(64, round(INTERMEDIATE * width / 64) * 64),
            "heads": heads, "kv_heads": kv, "head_dim": head_dim, "vocab": max(512, round(VOCAB * scale))}


def base_tensors(s: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape, as transformers' LlamaForCausalLM stores them."""
    hidden, inter, kv = s["hidden"], s["intermediate"], s["kv_heads"] * s["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (s["vocab"], hidden),
                                          "model.norm.weight": (hidden,), "lm_head.weight": (s["vocab"], hidden)}
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
        })
    return shapes


def llama_config(s: dict[str, int]) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16",
            "vocab_size": s["vocab"], "hidden_size": s["hidden"], "intermediate_size": s["intermediate"],
            "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
            "num_key_value_heads": s["kv_heads"], "head_dim": s["head_dim"], "hidden_act": "silu",
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "initializer_range": 0.02,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192},
            "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
            "tie_word_embeddings": False, "use_cache": True, "bos_token_id": 128000, "eos_token_id": 128001}


def build_world(root: Path, scale: float) -> dict:
    """Write the base (2 shards + index + config) and four LoRAs under ``root``; reuse a finished one."""
    import torch
    from safetensors.torch import save_file

    s = shape(scale)
    stamp = root / "world.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("shape") == s:
        return json.loads(stamp.read_text())
    shutil.rmtree(root, ignore_errors=True)
    base = root / "base"
    base.mkdir(parents=True)
    shapes = base_tensors(s)
    names = sorted(shapes)
    sizes = {n: 2 * _numel(shapes[n]) for n in names}
    half = sum(sizes.values()) / 2
    shards, size = [[]], 0
    for n in names:  # two shards, split near the middle, in name order (what save_pretrained does)
        if shards[-1] and size >= half and len(shards) == 1:
            shards.append([])
        shards[-1].append(n)
        size += sizes[n]
    generator = torch.Generator().manual_seed(0)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for n in shard:
            t = torch.empty(shapes[n], dtype=torch.bfloat16)
            t.normal_(0.0, 0.02, generator=generator) if len(shapes[n]) > 1 else t.fill_(1.0)
            tensors[n] = t
        save_file(tensors, str(base / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
        del tensors
    (base / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, indent=2))
    (base / "config.json").write_text(json.dumps(llama_config(s), indent=2))
    (base / "generation_config.json").write_text(json.dumps({"bos_token_id": 128000, "eos_token_id": 128001}))
    kv = s["kv_heads"] * s["head_dim"]
    modules = C.llama_modules(s["layers"], s["hidden"], s["intermediate"], kv=kv)
    for i in range(len(WEIGHTS)):
        C.write_lora(root / f"lora{i}", modules, r=RANK, alpha=2 * RANK, seed=20 + i, base=str(base))
    world = {"shape": s, "base_bytes": sum(sizes.values()), "params": sum(_numel(v) for v in shapes.values()),
             "shards": len(shards)}
    stamp.write_text(json.dumps(world))
    return world


def write_fine_tune(root: Path, name: str, seed: int, signal_rank: int = 32) -> Path:
    """A synthetic full fine-tune of ``root/base`` in ``root/name`` (same shards and index): every
    matrix moved by a rank-``signal_rank`` signal plus dense noise, every vector by small noise."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    ft, base = root / name, root / "base"
    if (ft / "done").is_file():
        return ft
    shutil.rmtree(ft, ignore_errors=True)
    ft.mkdir()
    generator = torch.Generator().manual_seed(seed)
    for shard in sorted(base.glob("*.safetensors")):
        tensors = {}
        with safe_open(shard, "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 — a safe_open handle, not a dict
                w = handle.get_tensor(key).float()
                if w.dim() == 2:
                    rows, cols = w.shape
                    u = torch.randn(rows, signal_rank, generator=generator) / signal_rank ** 0.5
                    v = torch.randn(signal_rank, cols, generator=generator) / cols ** 0.5
                    w += 0.01 * (u @ v) + 1e-4 * torch.randn(rows, cols, generator=generator)
                else:
                    w += 1e-3 * torch.randn(w.shape, generator=generator)
                tensors[key] = w.to(torch.bfloat16)
        save_file(tensors, str(ft / shard.name), metadata={"format": "pt"})
        del tensors
    for side in ("model.safetensors.index.json", "config.json", "generation_config.json"):
        shutil.copy(base / side, ft / side)
    (ft / "done").write_text("1")
    return ft


FULL_WEIGHTS = [0.5, 0.3, 0.2]


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


# ----------------------------------------------------------------------- the commands

FLOOR = r"""
import os, sys
from pathlib import Path
out = Path(sys.argv[1]); out.mkdir(parents=True)
buffer = bytearray(16 << 20)
view = memoryview(buffer)
read_only = [a.removeprefix("read:") for a in sys.argv[2:] if a.startswith("read:")]
for source in read_only:  # inputs a merge reads but does not rewrite (the fine-tunes of task arithmetic)
    with open(source, "rb", buffering=0) as src:
        while src.readinto(buffer):
            pass
for source in [a for a in sys.argv[2:] if not a.startswith("read:")]:
    with open(source, "rb", buffering=0) as src, open(out / Path(source).name, "wb", buffering=0) as dst:
        while True:
            n = src.readinto(buffer)
            if not n:
                break
            written = 0
            while written < n:
                written += dst.write(view[written:n])
        os.fsync(dst.fileno())
"""

PEFTDSL = r"""
import json, sys, time
started = time.perf_counter()
import torch  # noqa: F401
import peftdsl, peftdsl.runner, peftdsl.outputs.merge  # noqa: F401
imported = time.perf_counter()
try:
    peftdsl.load(sys.argv[1]).run(quiet=True, force=True, device="cpu", no_eval=True)
except peftdsl.RecipeError as err:
    sys.exit(str(err))
done = time.perf_counter()
print(json.dumps({"imports": imported - started, "run": done - imported}))
"""


# A small launcher between the benchmark and each command: a child's ``ru_maxrss`` includes
# what it inherited at fork, so commands are forked from this (a bare interpreter), not from
# the benchmark, which has imported torch.
LAUNCH = r"""
import json, os, subprocess, sys, time
start = time.perf_counter()
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as out:
    json.dump({"wall": wall, "code": os.waitstatus_to_exitcode(status), "rss": usage.ru_maxrss * 1024,
               "cpu": usage.ru_utime + usage.ru_stime}, out)
"""


def measure(cmd: list[str]) -> dict:
    """Wall time and the kernel's peak RSS (``ru_maxrss``, from ``wait4``) of one command."""
    with tempfile.TemporaryDirectory() as tmp:
        result, stdout, stderr = Path(tmp) / "result.json", Path(tmp) / "out", Path(tmp) / "err"
        with stdout.open("w") as out, stderr.open("w") as err:
            subprocess.run([sys.executable, "-c", LAUNCH, str(result), *cmd], stdout=out, stderr=err,
                           env=C._env(None), check=False)
        run = json.loads(result.read_text()) if result.is_file() else {"code": -1}
        run.update(stdout=stdout.read_text(), stderr=stderr.read_text())
    if run["code"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({run['code']}):\n{run['stdout'][-3000:]}\n{run['stderr'][-3000:]}")
    return run


def evict(paths: list[Path], how: str) -> str:
    """Take ``paths`` out of the page cache (after a sync, so that nothing dirty stays behind)."""
    os.sync()
    if how == "none":
        return "warm"
    if how == "drop":
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "drop_caches"
        except OSError:
            pass  # not root, or /proc/sys read-only: fall back
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


def resident(paths: list[Path]) -> float | None:
    """Fraction of ``paths``' bytes in the page cache (util-linux ``fincore``), or None."""
    if shutil.which("fincore") is None:
        return None
    done = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES,SIZE", *map(str, paths)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return None
    res = size = 0
    for line in done.stdout.split("\n"):
        if line.strip():
            r, s = line.split()
            res, size = res + int(r), size + int(s)
    return res / size if size else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mergekit-repeats", type=int, default=1)
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--cold", choices=("fadvise", "drop", "none"), default="fadvise")
    parser.add_argument("--keep", type=Path, default=None, help="build the world in (or reuse it from) this folder")
    parser.add_argument("--md", type=Path, default=None)
    parser.add_argument("--world", choices=("lora", "full"), default="lora",
                        help="lora: four LoRAs merged into the base; full: task arithmetic over three full fine-tunes")
    args = parser.parse_args()
    print(f"machine: {C.machine()}; load average {os.getloadavg()[0]:.1f}", flush=True)

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-scale-", dir=os.environ.get("TMPDIR")))
    try:
        started = time.perf_counter()
        world = build_world(root, args.scale)
        print(f"world: {world} ({time.perf_counter() - started:.0f} s)", flush=True)
        base = root / "base"
        shards = sorted(base.glob("model-*.safetensors"))
        if args.world == "full":
            tunes = [write_fine_tune(root, f"ft{i}", seed=30 + i) for i in range(len(FULL_WEIGHTS))]
            print(f"fine-tunes written ({time.perf_counter() - started:.0f} s)", flush=True)
            read_only = [f for ft in tunes for f in sorted(ft.glob("model-*.safetensors"))]
            sources = {f"f{i}": (f"{{path: ft{i}, kind: full}}", w, str(ft)) for i, (ft, w)
                       in enumerate(zip(tunes, FULL_WEIGHTS, strict=True))}
        else:
            read_only = []
            sources = {f"l{i}": (f"lora{i}", w, f"{base}+{root / f'lora{i}'}") for i, w in enumerate(WEIGHTS)}
        inputs = shards + read_only + sorted(root.glob("lora*/adapter_model.safetensors"))
        recipe = C.recipe(root, "peftdsl: 1\nbase: base\nadapters:\n"
                          + "".join(f"  {name}: {source}\n" for name, (source, _, _) in sources.items())
                          + "compose:\n  merged: " + " + ".join(f"({w}) * {name}" for name, (_, w, _) in sources.items())
                          + "\noutputs:\n  merged: {path: out/peftdsl, merge: true}\n")
        config = root / "mergekit.yaml"
        config.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\ndtype: bfloat16\n"
                          "parameters: {normalize: false}\nmodels:\n"
                          + "".join(f"  - model: {model}\n    parameters: {{weight: {w}}}\n"
                                    for _, w, model in sources.values()))
        kit = shutil.which("mergekit-yaml") if not args.no_mergekit else None
        cache, kit_out = root / "lora-cache", root / "out" / "mergekit"
        commands = {
            "floor": [sys.executable, "-c", FLOOR, str(root / "out" / "floor"), *(f"read:{f}" for f in read_only),
                      *map(str, shards)],
            "peftdsl": [sys.executable, "-c", PEFTDSL, str(recipe)],
            "mergekit": kit and [kit, str(config), str(kit_out), "--lora-merge-cache", str(cache),
                                 "--lora-merge-dtype", "bfloat16", "--no-cuda", "--quiet", "--no-copy-tokenizer",
                                 "--no-write-model-card"],
        }
        outputs = {"floor": [root / "out" / "floor"], "peftdsl": [root / "out" / "peftdsl"],
                   "mergekit": [kit_out, cache]}
        runs: dict[str, list[dict]] = {name: [] for name in commands}
        method = "warm"
        for repeat in range(args.repeats):
            for name, cmd in commands.items():
                if not cmd or (name == "mergekit" and repeat >= args.mergekit_repeats):
                    continue
                for path in outputs[name]:
                    shutil.rmtree(path, ignore_errors=True)
                method = evict(inputs, args.cold)
                cached = resident(inputs)
                run = measure(cmd)
                run["cached"] = cached
                if name == "peftdsl":
                    run.update(json.loads(run["stdout"].strip().splitlines()[-1]))
                if name == "mergekit":
                    run["scratch"] = C.dir_bytes(cache)
                runs[name].append(run)
                extra = f", run() {run['run']:.1f} s" if name == "peftdsl" else ""
                print(f"  {name} #{repeat + 1}: {run['wall']:.1f} s{extra}, CPU {run['cpu']:.1f} s, "
                      f"peak RSS {C.mib(run['rss'])}, "
                      f"inputs cached {'?' if cached is None else f'{cached:.0%}'} before, load "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
        out_bytes = C.dir_bytes(root / "out" / "peftdsl")
        text = report(runs, world, args, method, out_bytes)
        what = (f"4 × r{RANK} on 7 projections" if args.world == "lora"
                else f"task arithmetic over {len(FULL_WEIGHTS)} full fine-tunes (floor: read 4 models, write 1)")
        C.emit(f"merge at the speed of the disk (cpu; --scale {args.scale:g}: {world['params'] / 1e9:.2f} B params, "
               f"{world['base_bytes'] / 1e9:.2f} GB bf16 in {world['shards']} shards, {what}; "
               f"cache {method}; medians of {args.repeats})", text, args.md)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for path in (root / "out", root / "lora-cache"):
                shutil.rmtree(path, ignore_errors=True)


def report(runs: dict[str, list[dict]], world: dict, args, method: str, out_bytes: int) -> str:
    floor = C.median([r["wall"] for r in runs["floor"]])
    rows = []
    for name, label in (("floor", "floor: read shards + write + fsync"), ("peftdsl", "peftdsl run (merge: true)"),
                        ("mergekit", "mergekit-yaml task_arithmetic")):
        if not runs[name]:
            continue
        wall = C.median([r["wall"] for r in runs[name]])
        inner = C.median([r["run"] for r in runs[name]]) if name == "peftdsl" else None
        rows.append([label, len(runs[name]), C.seconds(wall), f"{wall / floor:.2f}×",
                     C.seconds(inner) if inner else "", f"{inner / floor:.2f}×" if inner else "",
                     C.seconds(C.median([r["cpu"] for r in runs[name]])),
                     C.mib(C.median([r["rss"] for r in runs[name]])),
                     C.mib(C.median([r.get("scratch", 0) for r in runs[name]]))])
    text = C.table(["command", "runs", "wall (median)", "÷ floor", "run() after imports", "÷ floor",
                    "CPU (user+sys)", "peak RSS", "scratch disk"], rows)
    walls = {name: [f"{r['wall']:.1f}" for r in rs] for name, rs in runs.items() if rs}
    text += "\n\nevery run (s): " + "; ".join(f"{name} {', '.join(w)}" for name, w in walls.items())
    text += f"\n\npeftdsl's output: {out_bytes / 1e9:.2f} GB. Targets: ≤ 1.25× the floor, ≤ 1 GiB peak RSS."
    if args.no_mergekit or not runs["mergekit"]:
        text += " mergekit: " + ("skipped (--no-mergekit)" if args.no_mergekit else "not installed") + "."
    return text


if __name__ == "__main__":
    main()
