"""``peftdsl lint`` latency: one recipe, and a folder of 100 recipes, as a pre-commit hook runs it.

Wall time of the subprocess, interpreter start included, with real adapter
folders and a real base so that inputs are read (configs and safetensors
headers). Targets: ≤ 0.3 s for one recipe, ≤ 2 s for 100. The anchor is a bare
``python -c pass`` (the interpreter's own start). With ``--importtime`` (or when a
target is missed) ``python -X importtime`` lists the slowest imports.

    python bench/lint_latency.py [--quick] [--repeats N] [--md FILE] [--importtime]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

TEMPLATES = [
    "  mix: {w} * a + (1 - {w}) * b\n",
    "  neg: a - {w} * c\n  small: svd(neg, rank=4)\n",
    "  analogy: a + {w} * (b - c)\n",
    "  p: pem({w} * a + (1 - {w}) * b)\n",
    "  t: svd(ties(0.5 * a + 0.5 * b, density={w}), rank=4)\n",
]


def make_lab(root: Path, count: int) -> tuple[Path, Path]:
    from tests.factories import make_lora, save_tiny_llama

    save_tiny_llama(root / "base")
    for i, name in enumerate("abc"):
        make_lora(root / "adapters" / name, seed=i + 1, r=4, alpha=8, base_model_name_or_path="../base")
    folder = root / "recipes"
    folder.mkdir()
    for i in range(count):
        body = TEMPLATES[i % len(TEMPLATES)].format(w=round(0.1 + 0.8 * i / count, 3))
        first = body.split(":")[0].strip()
        last = body.strip().splitlines()[-1].split(":")[0].strip()
        (folder / f"r{i:03d}.yaml").write_text(
            f"peftdsl: 1\nname: r{i:03d}\nbase: ../base\n"
            "adapters:\n  a: ../adapters/a\n  b: ../adapters/b\n  c: ../adapters/c\n"
            f"compose:\n{body}outputs:\n  {last}: ../out/r{i:03d}\n"
            + ("" if first == last else "")
        )
    return folder / "r000.yaml", folder


def importtime(recipe: Path, top: int = 12) -> str:
    _, proc = C.run_cmd([sys.executable, "-X", "importtime", "-m", "peftdsl", "lint", str(recipe)], check=False)
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, self_us, cumulative, name = line.split("|")[0], *line.split("|")
        self_us = int(line.split(":")[1].split("|")[0])
        depth = len(name) - len(name.lstrip())
        rows.append((int(cumulative), self_us, depth, name.strip()))
    outer = sorted((r for r in rows if r[2] <= 5), reverse=True)[:top]
    return C.table(["module", "cumulative ms", "self ms"],
                   [[n, f"{c / 1000:.1f}", f"{s / 1000:.1f}"] for c, s, _, n in outer])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--md", type=Path, default=None)
    parser.add_argument("--importtime", action="store_true")
    args = parser.parse_args()
    count, repeats = (20, 3) if args.quick else (100, 7)
    repeats = args.repeats or repeats
    print(f"machine: {C.machine()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-lint-") as tmp:
        one, folder = make_lab(Path(tmp), count)
        # every recipe must lint clean (exit 0), or the benchmark measures error paths
        _, proc = C.run_cmd(C.peftdsl_cmd("lint", "--format", "concise", str(folder)), check=False)
        if proc.returncode != 0:
            raise SystemExit(f"lint of the generated recipes failed:\n{proc.stdout}\n{proc.stderr}")
        times = {"python -c pass": [], "lint 1 recipe": [], f"lint {count} recipes": [],
                 "lint --no-inputs 1 recipe": []}
        for _ in range(repeats):
            times["python -c pass"].append(C.run_cmd([sys.executable, "-c", "pass"])[0])
            times["lint 1 recipe"].append(C.run_cmd(C.peftdsl_cmd("lint", str(one)))[0])
            times[f"lint {count} recipes"].append(C.run_cmd(C.peftdsl_cmd("lint", str(folder)))[0])
            times["lint --no-inputs 1 recipe"].append(C.run_cmd(C.peftdsl_cmd("lint", "--no-inputs", str(one)),
                                                                check=False)[0])
        med = {k: C.median(v) for k, v in times.items()}
        targets = {"lint 1 recipe": 0.3, f"lint {count} recipes": 2.0 * count / 100}
        rows = []
        for name, value in med.items():
            target = targets.get(name)
            rows.append([name, C.seconds(value), f"{value / med['python -c pass']:.1f}×",
                         f"≤ {target:g} s: {'met' if value <= target else 'missed'}" if target else ""])
        C.emit(f"lint latency (subprocess wall time, medians of {repeats})",
               C.table(["command", "median", "÷ bare interpreter", "target"], rows), args.md)
        if args.importtime or any(med[k] > t for k, t in targets.items()):
            C.emit("slowest imports of `peftdsl lint` (python -X importtime, one run)", importtime(one), args.md)


if __name__ == "__main__":
    main()
