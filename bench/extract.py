"""LoRA extraction from a full fine-tune: ``svd(ft, rank=64)`` against ``mergekit-extract-lora``.

The world is ``bench/scale.py``'s Llama-3.2-1B-shaped bf16 base (``--scale`` shrinks it the
same way) and one synthetic full fine-tune of it: every matrix moved by a rank-32 signal
plus dense noise (so that rank 64 is a real truncation), norms by small noise. Written as
safetensors directly; no transformers model is built.

Both tools extract rank-64 factors of every linear module's τ = θ − θ_base, in one run,
each in a fresh process with the inputs evicted from the page cache first (as
``scale.py`` measures: wall, peak RSS from ``wait4``). Error: on a sample of modules,
‖τ − ΔW‖_F of each tool's extracted ΔW over the exact optimum's ‖τ − τ₆₄‖_F (Eckart–Young,
float64 SVD here), so 1.000 is optimal.

    python bench/extract.py [--scale 0.25] [--rank 64] [--repeats 1] [--no-mergekit] [--keep DIR] [--md FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C
import scale as S

SIGNAL_RANK = 32
SAMPLE = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj",
          "model.layers.{last}.mlp.gate_proj", "model.layers.{last}.self_attn.o_proj")


def build_fine_tune(root: Path, scale: float) -> dict:
    """The base (scale.py's) and a full fine-tune of it in ``root/ft``."""
    world = S.build_world(root, scale)
    S.write_fine_tune(root, "ft", seed=7, signal_rank=SIGNAL_RANK)
    return world


def lora_delta(folder: Path, module: str):
    """s·B·A of one module of a PEFT LoRA folder, float64 (the scaling from its config)."""
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    key = f"base_model.model.{module}"
    a, b = tensors[f"{key}.lora_A.weight"].double(), tensors[f"{key}.lora_B.weight"].double()
    pattern = config.get("rank_pattern") or {}
    r = next((v for k, v in pattern.items() if module.endswith(k)), config["r"])
    alphas = config.get("alpha_pattern") or {}
    alpha = next((v for k, v in alphas.items() if module.endswith(k)), config["lora_alpha"])
    scaling = alpha / (r ** 0.5) if config.get("use_rslora") else alpha / r
    return scaling * (b @ a)


def errors(root: Path, outputs: dict[str, Path], rank: int, layers: int) -> list[dict]:
    """Per sampled module: each tool's ‖τ − ΔW‖_F over the optimum ‖τ − τ_k‖_F."""
    import torch
    from safetensors import safe_open

    index = json.loads((root / "base" / "model.safetensors.index.json").read_text())["weight_map"]
    rows = []
    for template in SAMPLE:
        module = template.format(last=layers - 1)
        name = f"{module}.weight"
        with safe_open(root / "base" / index[name], "pt") as b, safe_open(root / "ft" / index[name], "pt") as f:
            tau = f.get_tensor(name).double() - b.get_tensor(name).double()
        singular = torch.linalg.svdvals(tau)
        optimum = float(singular[rank:].square().sum().sqrt())
        row = {"module": module}
        for tool, folder in outputs.items():
            row[tool] = float(torch.linalg.matrix_norm(tau - lora_delta(folder, module))) / optimum
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-mergekit", action="store_true")
    parser.add_argument("--cold", choices=("fadvise", "drop", "none"), default="fadvise")
    parser.add_argument("--keep", type=Path, default=None)
    parser.add_argument("--md", type=Path, default=None)
    args = parser.parse_args()

    root = args.keep or Path(tempfile.mkdtemp(prefix="peftdsl-extract-"))
    world = build_fine_tune(root, args.scale)
    print(f"machine: {C.machine()}")
    print(f"world: {world}")
    recipe = C.recipe(root, f"peftdsl: 1\nname: extract\nbase: {root / 'base'}\nadapters:\n  ft: {{path: {root / 'ft'}, "
                            f"kind: full}}\ncompose:\n  x: svd(ft, rank={args.rank})\noutputs:\n  x: {root / 'out-peftdsl'}\n",
                      name="extract.yaml")
    inputs = sorted((root / "base").glob("*.safetensors")) + sorted((root / "ft").glob("*.safetensors"))
    mergekit = shutil.which("mergekit-extract-lora") if not args.no_mergekit else None
    runs: dict[str, list[dict]] = {"peftdsl": [], "mergekit": []}
    for _ in range(args.repeats):
        S.evict(inputs, args.cold)
        runs["peftdsl"].append(S.measure([sys.executable, "-c", S.PEFTDSL, str(recipe)]))
        runs["peftdsl"][-1].update(json.loads(runs["peftdsl"][-1]["stdout"].strip().splitlines()[-1]))
        print(f"  peftdsl: {runs['peftdsl'][-1]['wall']:.1f} s (run() {runs['peftdsl'][-1]['run']:.1f} s), "
              f"peak RSS {C.mib(runs['peftdsl'][-1]['rss'])}")
        if mergekit:
            shutil.rmtree(root / "out-mergekit", ignore_errors=True)
            S.evict(inputs, args.cold)
            runs["mergekit"].append(S.measure([mergekit, "--model", str(root / "ft"), "--base-model",
                                               str(root / "base"), "--out-path", str(root / "out-mergekit"),
                                               "--max-rank", str(args.rank)]))
            print(f"  mergekit: {runs['mergekit'][-1]['wall']:.1f} s, peak RSS {C.mib(runs['mergekit'][-1]['rss'])}")
    outputs = {"peftdsl": root / "out-peftdsl"} | ({"mergekit": root / "out-mergekit"} if mergekit else {})
    sampled = errors(root, outputs, args.rank, world["shape"]["layers"])
    floor = C.median([r["wall"] for r in runs["peftdsl"]])
    table = [(f"peftdsl svd(ft, rank={args.rank})", len(runs["peftdsl"]), C.seconds(floor), "1.00×",
              C.mib(max(r["rss"] for r in runs["peftdsl"])),
              f"{max(r['peftdsl'] for r in sampled):.6f}")]
    if runs["mergekit"]:
        wall = C.median([r["wall"] for r in runs["mergekit"]])
        table.append((f"mergekit-extract-lora --max-rank {args.rank}", len(runs["mergekit"]), C.seconds(wall),
                      f"{wall / floor:.2f}×", C.mib(max(r["rss"] for r in runs["mergekit"])),
                      f"{max(r['mergekit'] for r in sampled):.6f}"))
    text = C.table(("command", "runs", "wall (median)", "÷ peftdsl", "peak RSS", "error ÷ optimum (worst sampled)"),
                   table)
    text += "\n\nsampled modules (error ÷ optimum): " + "; ".join(
        f"{r['module']}: " + ", ".join(f"{t} {r[t]:.6f}" for t in outputs) for r in sampled)
    C.emit(f"LoRA extraction at rank {args.rank} (cpu; --scale {args.scale:g}: {world['params'] / 1e9:.2f} B params, "
           f"bf16; cache {args.cold})", text, args.md)
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
