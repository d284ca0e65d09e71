"""Anchor processes run by the benchmarks as subprocesses (interpreter start included).

    python bench/_anchors.py peft-weighted --base DIR --adapters A B … --weights 1 -0.5 … \
        --combination svd --rank 16 --out DIR [--device cpu|cuda]

loads the base with transformers, every adapter with PEFT, runs
``add_weighted_adapter`` and saves the new adapter: what a PEFT user runs today.
"""

from __future__ import annotations

import argparse
import time


def peft_weighted(args: argparse.Namespace) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32).to(args.device)
    names = [f"a{i}" for i in range(len(args.adapters))]
    peft_model = PeftModel.from_pretrained(model, args.adapters[0], adapter_name=names[0])
    for name, path in zip(names[1:], args.adapters[1:]):
        peft_model.load_adapter(path, adapter_name=name)
    loaded = time.perf_counter()
    kwargs = {"svd_rank": args.rank} if args.combination == "svd" else {}
    peft_model.add_weighted_adapter(names, args.weights, "merged", combination_type=args.combination, **kwargs)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    combined = time.perf_counter()
    peft_model.save_pretrained(args.out, selected_adapters=["merged"], safe_serialization=True)
    saved = time.perf_counter()
    print(f"phases load={loaded - started:.3f} combine={combined - loaded:.3f} save={saved - combined:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    weighted = sub.add_parser("peft-weighted")
    weighted.add_argument("--base", required=True)
    weighted.add_argument("--adapters", nargs="+", required=True)
    weighted.add_argument("--weights", nargs="+", type=float, required=True)
    weighted.add_argument("--combination", default="svd")
    weighted.add_argument("--rank", type=int, default=16)
    weighted.add_argument("--out", required=True)
    weighted.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.command == "peft-weighted":
        peft_weighted(args)


if __name__ == "__main__":
    main()
