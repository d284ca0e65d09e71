"""Peak memory of ``peftdsl run`` composing 8 rank-16 LoRAs at 7B shapes.

32 layers × 7 modules (q,k,v,o 4096×4096; gate, up 11008×4096; down 4096×11008),
8 adapters (fp32 by default: 8 × 160 MiB), two recipes, each run in a fresh child
process:

- exact: ``a0 + … + a7`` (rank 128) written as an adapter;
- svd:   ``svd(a0 + … + a7, rank=16)`` written as an adapter.

The child imports everything a run imports, records its RSS (the baseline), runs the
recipe through the API (``peftdsl.load(recipe).run(force=True)``, what ``peftdsl run`` does)
in process and polls RSS every 5 ms (with
``ru_maxrss`` as a floor). Reported: peak RSS − baseline, and the same for the
anonymous part (``RssAnon``: memory the process owns, not file pages of the
memory-mapped inputs, which the kernel can drop). Target: < 1 GiB above baseline.

    python bench/peak_memory.py [--quick] [--dtype float32|bfloat16] [--md FILE] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

CHILD = r"""
import json, resource, sys, threading, time
import torch, safetensors, peft, transformers  # noqa: F401  (a run imports these)
import rich.console  # noqa: F401  (the run's console)
import peftdsl, peftdsl.runner, peftdsl.runtime.execute, peftdsl.outputs.write, peftdsl.lower  # noqa: F401

def status():
    fields = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) * 1024
    return fields

base = status()
peak = dict(base)
stop = threading.Event()
def poll():
    while not stop.is_set():
        now = status()
        for key, value in now.items():
            peak[key] = max(peak[key], value)
        stop.wait(0.005)
thread = threading.Thread(target=poll, daemon=True)
thread.start()
start = time.perf_counter()
code = 0
try:
    peftdsl.load(sys.argv[1]).run(quiet=True, force=True, device=sys.argv[2])
except peftdsl.RecipeError as err:
    print(err, file=sys.stderr)
    code = 1
wall = time.perf_counter() - start
stop.set(); thread.join()
peak["VmRSS"] = max(peak["VmRSS"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
print(json.dumps({"code": code, "wall": wall, "base": base, "peak": peak}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 layers instead of 32")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--md", type=Path, default=None)
    parser.add_argument("--keep", type=Path, default=None, help="generate into (or reuse) this folder")
    args = parser.parse_args()
    layers = 4 if args.quick else 32
    count = 8
    print(f"machine: {C.machine()}; load average {os.getloadavg()[0]:.1f}", flush=True)

    root = args.keep or Path(tempfile.mkdtemp(prefix="bench-peak-"))
    try:
        modules = C.llama_modules(layers, 4096, 11008)
        for i in range(count):
            if not (root / f"a{i}" / "adapter_model.safetensors").exists():
                C.write_lora(root / f"a{i}", modules, r=16, alpha=32, seed=i, dtype=args.dtype)
        in_bytes = sum(C.dir_bytes(root / f"a{i}" / "adapter_model.safetensors") for i in range(count))
        total = " + ".join(f"a{i}" for i in range(count))
        adapters = "".join(f"  a{i}: a{i}\n" for i in range(count))
        recipes = {
            "exact sum → adapter (rank 128)": C.recipe(
                root, f"peftdsl: 1\nadapters:\n{adapters}compose:\n  total: {total}\n"
                "outputs:\n  total: out/exact\n", "exact.yaml"),
            "svd(sum, rank=16) → adapter": C.recipe(
                root, f"peftdsl: 1\nadapters:\n{adapters}compose:\n  small: svd({total}, rank=16)\n"
                "outputs:\n  small: out/svd\n", "svd.yaml"),
        }
        rows = []
        for label, path in recipes.items():
            runs = []
            for _ in range(args.repeats):
                _, proc = C.run_cmd([sys.executable, "-c", CHILD, str(path), args.device])
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                if runs[-1]["code"] != 0:
                    raise SystemExit(f"peftdsl run failed: {proc.stderr[-2000:]}")
            out = root / "out" / ("exact" if "exact" in path.name else "svd")
            rss = C.median([r["peak"]["VmRSS"] - r["base"]["VmRSS"] for r in runs])
            anon = C.median([r["peak"]["RssAnon"] - r["base"]["RssAnon"] for r in runs])
            wall = C.median([r["wall"] for r in runs])
            rows.append([label, C.seconds(wall), C.mib(runs[0]["base"]["VmRSS"]), C.mib(rss), C.mib(anon),
                         C.mib(C.dir_bytes(out / "adapter_model.safetensors")),
                         "met" if rss < 2**30 else ("anon only" if anon < 2**30 else "missed")])
        C.emit(f"peak memory ({args.device}): {count} × r16 {args.dtype} LoRAs, {layers} layers × 7 modules at "
               f"4096/11008 ({C.mib(in_bytes)} of inputs); median of {args.repeats}",
               C.table(["recipe", "wall", "baseline RSS", "peak RSS − baseline", "peak RssAnon − baseline",
                        "output file", "< 1 GiB?"], rows), args.md)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
        else:
            shutil.rmtree(root / "out", ignore_errors=True)


if __name__ == "__main__":
    main()
