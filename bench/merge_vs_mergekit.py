"""Merged model output (``merge: true``) vs mergekit ``task_arithmetic`` over ``base+lora`` models.

Same base (a random Llama, ~200 MB fp32) and the same 4 rank-16 LoRAs on all 7
projections; result ``base + Σ wᵢ·ΔWᵢ`` in float32. Both tools run as
subprocesses (peftdsl: a fresh interpreter running ``peftdsl.load(recipe).run()``, what
``peftdsl run`` does; mergekit: ``mergekit-yaml``); we measure wall time, the peak summed RSS of the process tree
(psutil, polled every 10 ms) and scratch disk: mergekit's ``--lora-merge-cache``
(emptied before every run, as a user's first run pays it). peftdsl writes no
scratch copy: it streams base shards into a temporary folder that becomes the
output. Targets: ≥ 5× faster, ≤ 1/5 the peak memory, no scratch copies.

mergekit is a benchmark-only dependency, installed without letting pip touch torch:
``pip install --no-deps mergekit immutables protobuf sentencepiece``.

    python bench/merge_vs_mergekit.py [--quick] [--repeats N] [--md FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

WEIGHTS = [0.5, 0.3, 0.7, -0.2]


def mergekit_command() -> list[str] | None:
    exe = shutil.which("mergekit-yaml")
    return [exe] if exe else None


def max_model_diff(left: Path, right: Path) -> tuple[float, int]:
    """Largest |difference| over tensors both models store, and how many were compared."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        keys = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), "pt") as handle:
                keys.update({k: file for k in handle.keys()})
        return keys

    li, ri = index(left), index(right)
    common = sorted(set(li) & set(ri))
    worst = 0.0
    for key in common:
        with safe_open(str(li[key]), "pt") as fl, safe_open(str(ri[key]), "pt") as fr:
            a, b = fl.get_tensor(key).double(), fr.get_tensor(key).double()
        worst = max(worst, float((a - b).abs().max()))
    missing = sorted(set(li) ^ set(ri))
    if missing:
        print(f"tensors in only one output: {missing[:6]}{' …' if len(missing) > 6 else ''}")
    return worst, len(common)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--md", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        layers, hidden, inter, vocab, repeats = 2, 256, 688, 1000, 2
    else:
        layers, hidden, inter, vocab, repeats = 6, 768, 2048, 4000, 3
    repeats = args.repeats or repeats
    print(f"machine: {C.machine()}; load average {os.getloadavg()[0]:.1f}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-merge-") as tmp:
        root = Path(tmp)
        base = C.save_llama(root / "base", layers, hidden, inter, vocab=vocab)
        base_bytes = sum(p.stat().st_size for p in base.glob("*.safetensors"))
        modules = C.llama_modules(layers, hidden, inter)
        loras = [C.write_lora(root / f"lora{i}", modules, r=16, alpha=32, seed=20 + i, base=str(base))
                 for i in range(len(WEIGHTS))]
        recipe = C.recipe(root, "peftdsl: 1\nbase: base\nadapters:\n"
                          + "".join(f"  l{i}: lora{i}\n" for i in range(len(WEIGHTS)))
                          + "compose:\n  merged: " + " + ".join(f"({w}) * l{i}" for i, w in enumerate(WEIGHTS))
                          + "\noutputs:\n  merged: {path: out/peftdsl, merge: true, dtype: float32}\n")
        config = root / "mergekit.yaml"
        config.write_text(
            f"merge_method: task_arithmetic\nbase_model: {base}\ndtype: float32\n"
            "parameters: {normalize: false}\nmodels:\n"
            + "".join(f"  - model: {base}+{lora}\n    parameters: {{weight: {w}}}\n"
                      for lora, w in zip(loras, WEIGHTS)))
        ours_cmd = C.peftdsl_run_cmd(recipe, force=True, device="cpu")
        kit = mergekit_command()
        cache = root / "lora-cache"
        kit_cmd = kit and [*kit, str(config), str(root / "out/mergekit"), "--lora-merge-cache", str(cache),
                           "--lora-merge-dtype", "float32", "--no-cuda", "--quiet", "--copy-tokenizer"]
        results: dict[str, list[dict]] = {"peftdsl": [], "mergekit": []}
        kit_error = None
        for _ in range(repeats):
            results["peftdsl"].append(C.measure_tree(ours_cmd))
            if kit_cmd and kit_error is None:
                shutil.rmtree(cache, ignore_errors=True)
                shutil.rmtree(root / "out/mergekit", ignore_errors=True)
                try:
                    run = C.measure_tree(kit_cmd)
                except RuntimeError as err:
                    kit_error = str(err)[-1500:]
                    continue
                run["scratch"] = C.dir_bytes(cache)
                results["mergekit"].append(run)
        ours_scratch = sum(C.dir_bytes(p) for p in root.glob("out/.*"))  # leftovers beside the output: none
        diff = ncompared = None
        if results["mergekit"]:
            diff, ncompared = max_model_diff(root / "out/peftdsl", root / "out/mergekit")

    def med(name: str, field: str) -> float:
        return C.median([r[field] for r in results[name]])

    rows = [["peftdsl run (merge: true)", C.seconds(med("peftdsl", "wall")), C.mib(med("peftdsl", "peak_rss")),
             C.mib(ours_scratch)]]
    if results["mergekit"]:
        rows.append(["mergekit-yaml task_arithmetic", C.seconds(med("mergekit", "wall")),
                     C.mib(med("mergekit", "peak_rss")), C.mib(med("mergekit", "scratch"))])
    text = C.table(["tool", "wall (median)", "peak RSS of tree", "scratch disk"], rows)
    if results["mergekit"]:
        speed = med("mergekit", "wall") / med("peftdsl", "wall")
        memory = med("mergekit", "peak_rss") / med("peftdsl", "peak_rss")
        text += (f"\n\nspeed-up {speed:.1f}× (target ≥ 5×: {'met' if speed >= 5 else 'missed'}); "
                 f"memory {memory:.1f}× less (target ≥ 5×: {'met' if memory >= 5 else 'missed'}); "
                 f"max |difference| {diff:.1e} over {ncompared} tensors")
    else:
        text += f"\n\nmergekit did not run: {kit_error or 'mergekit-yaml not found on PATH'}"
    C.emit(f"merged model vs mergekit (cpu; base {C.mib(base_bytes)} fp32, {layers} layers at "
           f"{hidden}/{inter}, 4 × r16 on 7 modules; medians of {repeats})", text, args.md)


if __name__ == "__main__":
    main()
