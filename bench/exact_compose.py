"""Exact composition ``a + b - 0.5*c`` written as an adapter, against PEFT and the I/O floor.

- peftdsl: the recipe run in process through the API (``peftdsl.load(recipe).run(force=True)``,
  what ``peftdsl run`` does), so that interpreter start and imports (paid once by every tool)
  do not hide the work.
- PEFT: ``PeftModel.from_pretrained`` + ``load_adapter`` ×2 + ``add_weighted_adapter(cat)``
  + ``save_pretrained``, in process, on a base model built beforehand (untimed) with
  uninitialised weights (``cat`` never reads base weights).
- floor: ``safetensors.torch.load_file`` of the three inputs and ``save_file`` of the
  same number of bytes as peftdsl's output — the least any tool must do. Shown
  without and with an ``fsync`` of the file (peftdsl fsyncs its outputs before
  renaming them into place; PEFT does not).

Target: peftdsl within 1.5× of the floor. Inputs sit in the page cache after the
first run, so "I/O" here is memory bandwidth plus the file system's write path.

    python bench/exact_compose.py [--quick] [--device cpu|cuda] [--repeats N] [--md FILE]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

WEIGHTS = [1.0, 1.0, -0.5]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--md", type=Path, default=None)
    parser.add_argument("--no-peft", action="store_true", help="skip the PEFT anchor")
    args = parser.parse_args()
    if args.quick:
        layers, hidden, inter, repeats = 2, 1024, 2752, 3
    else:
        layers, hidden, inter, repeats = 16, 4096, 11008, 5
    layers = args.layers or layers
    repeats = args.repeats or repeats
    print(f"machine: {C.machine()}; device {args.device}; load average {os.getloadavg()[0]:.1f}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-exact-") as tmp:
        root = Path(tmp)
        modules = C.llama_modules(layers, hidden, inter)
        names = ["a", "b", "c"]
        inputs = [C.write_lora(root / n, modules, r=16, alpha=32, seed=i) for i, n in enumerate(names)]
        recipe = C.recipe(root, """peftdsl: 1
adapters: {a: a, b: b, c: c}
compose:
  mix: a + b - 0.5 * c
outputs:
  mix: out/peftdsl
""")
        in_bytes = sum(C.dir_bytes(p / "adapter_model.safetensors") for p in inputs)
        results = {"peftdsl": [], "PEFT cat": [], "floor": [], "floor + fsync": []}
        out_bytes = 0

        def ours():
            C.peftdsl_run(recipe, force=True, device=args.device)  # raises RecipeError if it fails

        def peft_cat(base):
            from peft import PeftModel

            model = PeftModel.from_pretrained(base, str(inputs[0]), adapter_name="a")
            for name, path in zip(names[1:], inputs[1:]):
                model.load_adapter(str(path), adapter_name=name)
            model.add_weighted_adapter(names, WEIGHTS, "mix", combination_type="cat")
            model.save_pretrained(str(root / "out/peft"), selected_adapters=["mix"], safe_serialization=True)

        def floor(fsync: bool):
            import torch
            from safetensors.torch import load_file, save_file

            loaded = {}
            for i, path in enumerate(inputs):
                for key, value in load_file(str(path / "adapter_model.safetensors")).items():
                    loaded[f"{i}.{key}"] = value
            total = sum(t.numel() * t.element_size() for t in loaded.values())
            pad = max(0, out_bytes - total) // 4
            if pad:
                loaded["pad"] = torch.zeros(pad)
            target = root / "out/floor.safetensors"
            save_file(loaded, str(target))
            if fsync:
                fd = os.open(target, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)

        ours()  # warm-up: imports, page cache
        out_bytes = C.dir_bytes(root / "out/peftdsl/adapter_model.safetensors")
        for i in range(repeats):
            shutil.rmtree(root / "out/peftdsl", ignore_errors=True)
            (root / "out/floor.safetensors").unlink(missing_ok=True)
            results["peftdsl"].append(C.timed(ours))
            results["floor"].append(C.timed(lambda: floor(False)))
            results["floor + fsync"].append(C.timed(lambda: floor(True)))
            if not args.no_peft and i < max(2, repeats // 2 + 1):
                base = C.empty_llama(layers, hidden, inter, dtype="float32", device=args.device)
                shutil.rmtree(root / "out/peft", ignore_errors=True)
                start = time.perf_counter()
                peft_cat(base)
                C.sync(args.device)
                results["PEFT cat"].append(time.perf_counter() - start)
                del base
        diff = scale = float("nan")
        if results["PEFT cat"]:
            diff, scale = C.max_product_diff(root / "out/peftdsl", root / "out/peft", dtype="float32")

    med = {k: C.median(v) for k, v in results.items() if v}
    label = (f"{layers} layers × 7 modules at {hidden}/{inter}, 3 × r16 fp32 in "
             f"({C.mib(in_bytes)}), {C.mib(out_bytes)} out")
    rows = []
    for name, value in med.items():
        rows.append([name, C.seconds(value), f"{len(results[name])}",
                     f"{value / med['floor']:.2f}×", f"{value / med['floor + fsync']:.2f}×"])
    C.emit(f"exact composition ({args.device}): {label}",
           C.table(["tool", "median", "runs", "÷ floor", "÷ floor+fsync"], rows)
           + f"\n\npeftdsl vs PEFT cat: {med.get('PEFT cat', float('nan')) / med['peftdsl']:.2f}× faster; "
           f"max |ΔW diff| {diff:.1e} (max |ΔW| {scale:.1e}); target ≤ 1.5× floor: "
           f"{'met' if med['peftdsl'] <= 1.5 * med['floor'] else 'missed'} (vs floor), "
           f"{'met' if med['peftdsl'] <= 1.5 * med['floor + fsync'] else 'missed'} (vs floor+fsync)", args.md)


if __name__ == "__main__":
    main()
