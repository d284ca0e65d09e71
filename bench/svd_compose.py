"""SVD composition: peftdsl's factor-space SVD vs PEFT's ``add_weighted_adapter(combination_type="svd")``.

(a) one module at 7B shape (up_proj, 11008×4096), 4 rank-16 LoRAs, target rank 16,
    in process: ``kernels.svd_from_factors(kernels.exact_sum(...))`` vs PEFT's
    ``add_weighted_adapter`` on a model holding just that Linear (dense ΔW sum +
    full ``torch.linalg.svd``). Target: ≥ 100× faster. Also the largest absolute
    difference between the two results' ΔW = B·A.
(b) the whole process on a multi-layer Llama: an svd recipe run by a fresh interpreter
    through the API (``peftdsl.load(recipe).run()``, what ``peftdsl run`` does) vs a PEFT
    script (load base + adapters, add_weighted_adapter(svd), save_pretrained), both as
    subprocesses, interpreter start included.

    python bench/svd_compose.py [--quick] [--device cpu|cuda] [--repeats N] [--md FILE]
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

WEIGHTS = [0.5, 0.3, -0.4, 0.2]


def per_module(out: int, inn: int, r: int, rank: int, repeats: int, peft_repeats: int, device: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from peftdsl.runtime import kernels

    alpha = 2.0 * r
    generator = torch.Generator().manual_seed(0)
    factors = [((torch.randn(r, inn, generator=generator) * 0.02).to(device),
                (torch.randn(out, r, generator=generator) * 0.02).to(device)) for _ in WEIGHTS]
    scale = alpha / r

    def ours():
        terms = [(w, A[None], B[None], scale) for w, (A, B) in zip(WEIGHTS, factors)]
        result = kernels.svd_from_factors(*kernels.exact_sum(terms), rank=rank)
        C.sync(device)
        return result

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.up_proj = nn.Linear(inn, out, bias=False)

    names = [f"a{i}" for i in range(len(WEIGHTS))]
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["up_proj"], lora_dropout=0.0)
    model = get_peft_model(One().to(device), config, adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    layer = model.base_model.model.up_proj
    with torch.no_grad():
        for name, (A, B) in zip(names, factors):
            layer.lora_A[name].weight.copy_(A)
            layer.lora_B[name].weight.copy_(B)

    def theirs():
        if "svd" in layer.lora_A:
            model.delete_adapter("svd")
        model.add_weighted_adapter(names, WEIGHTS, "svd", combination_type="svd", svd_rank=rank)
        C.sync(device)

    ours()  # warm up (first linalg call loads LAPACK / cuSOLVER)
    if device.startswith("cuda"):
        theirs()
    t_ours, t_theirs = [], []
    for i in range(max(repeats, peft_repeats)):
        if i < repeats:
            t_ours.append(C.timed(ours))
        if i < peft_repeats:
            t_theirs.append(C.timed(theirs))
    A, B = ours()
    with torch.no_grad():
        ref = layer.get_delta_weight("svd").double()
        mine = (B[0].double() @ A[0].double())
        exact = sum(w * scale * (Bi.double() @ Ai.double()) for w, (Ai, Bi) in zip(WEIGHTS, factors))
    diff = float((mine - ref).abs().max())
    return {"ours": C.median(t_ours), "theirs": C.median(t_theirs), "n_ours": len(t_ours),
            "n_theirs": len(t_theirs), "diff": diff, "scale": float(ref.abs().max()),
            "resid": float((exact - ref).abs().max())}


def whole_process(root: Path, layers: int, hidden: int, inter: int, r: int, rank: int, repeats: int,
                  device: str) -> dict:
    base = C.save_llama(root / "base", layers, hidden, inter, vocab=1024)
    modules = C.llama_modules(layers, hidden, inter)
    adapters = [C.write_lora(root / f"lora{i}", modules, r=r, alpha=2 * r, seed=10 + i, base=str(base))
                for i in range(len(WEIGHTS))]
    expr = " + ".join(f"({w}) * a{i}" for i, w in enumerate(WEIGHTS))
    recipe = C.recipe(root, f"""peftdsl: 1
adapters:
{chr(10).join(f"  a{i}: lora{i}" for i in range(len(WEIGHTS)))}
compose:
  small: svd({expr}, rank={rank})
outputs:
  small: out/peftdsl
""")
    ours_cmd = C.peftdsl_run_cmd(recipe, force=True, device=device)
    theirs_cmd = [sys.executable, str(Path(__file__).parent / "_anchors.py"), "peft-weighted",
                  "--base", str(base), "--adapters", *map(str, adapters),
                  "--weights", *map(str, WEIGHTS), "--combination", "svd", "--rank", str(rank),
                  "--out", str(root / "out/peft"), "--device", device]
    t_ours, t_theirs = [], []
    for _ in range(repeats):
        t_ours.append(C.run_cmd(ours_cmd)[0])
        shutil.rmtree(root / "out/peft", ignore_errors=True)
        t_theirs.append(C.run_cmd(theirs_cmd)[0])
    diff, _ = C.max_product_diff(root / "out/peftdsl", root / "out/peft")
    size = sum(p.stat().st_size for p in base.glob("*.safetensors"))
    return {"ours": C.median(t_ours), "theirs": C.median(t_theirs), "diff": diff, "modules": len(modules),
            "base_mib": size / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes: runs in seconds")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--md", type=Path, default=None, help="append the tables to this markdown file")
    parser.add_argument("--skip-process", action="store_true", help="only part (a)")
    parser.add_argument("--peft-repeats", type=int, default=None, help="repeats of PEFT's dense SVD in (a)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for (a), both sides (on a loaded machine 1 is the stable choice)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    if args.quick:
        shape, proc = (1376, 512), dict(layers=2, hidden=256, inter=688)
        repeats, peft_repeats, proc_repeats = 5, 3, 2
    else:
        shape, proc = (11008, 4096), dict(layers=4, hidden=1024, inter=2752)
        cuda = args.device.startswith("cuda")
        repeats, peft_repeats, proc_repeats = (10, 5, 2) if cuda else (5, 3, 3)
    if args.repeats:
        repeats = peft_repeats = proc_repeats = args.repeats
    peft_repeats = args.peft_repeats or peft_repeats

    import torch

    print(f"machine: {C.machine()}; device {args.device}; torch threads {torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    a = per_module(*shape, r=16, rank=16, repeats=repeats, peft_repeats=peft_repeats, device=args.device)
    rows = [[f"{shape[0]}×{shape[1]}, 4×r16 → r16", C.seconds(a["ours"]), C.seconds(a["theirs"]),
             f"{a['theirs'] / a['ours']:.0f}×", f"{a['diff']:.1e} (max |ΔW| {a['scale']:.1e})",
             "yes" if a["theirs"] / a["ours"] >= 100 else "no"]]
    C.emit(f"svd per module ({args.device}, {torch.get_num_threads()} threads; medians of {a['n_ours']} / {a['n_theirs']} runs)",
           C.table(["module", "peftdsl", "PEFT svd", "speed-up", "max |ΔW diff|", "≥ 100×?"], rows), args.md)

    if args.skip_process:
        return
    with tempfile.TemporaryDirectory(prefix="bench-svd-") as tmp:
        b = whole_process(Path(tmp), **proc, r=16, rank=16, repeats=proc_repeats, device=args.device)
    label = (f"{proc['layers']} layers × 7 modules, hidden {proc['hidden']}/{proc['inter']}, "
             f"base {b['base_mib']:.0f} MiB")
    rows = [[label, C.seconds(b["ours"]), C.seconds(b["theirs"]), f"{b['theirs'] / b['ours']:.1f}×",
             f"{b['diff']:.1e}"]]
    C.emit(f"svd whole process ({args.device}; subprocess wall time, medians of {proc_repeats})",
           C.table(["model", "peftdsl run", "PEFT script", "speed-up", "max |ΔW diff|"], rows), args.md)


if __name__ == "__main__":
    main()
