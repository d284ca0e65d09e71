"""Shared helpers for the benchmarks: timing, tables, synthetic PEFT adapters, memory polling.

Every benchmark runs peftdsl and its anchor on the same inputs in one run,
repeats each several times and reports medians (the machine is noisy), then
prints a small markdown table. Synthetic adapters are written directly in PEFT's
on-disk format (``adapter_config.json`` + ``adapter_model.safetensors`` with
PEFT's key names), so 7B shapes need no 7B model.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ALL7 = ATTN + MLP


# ----------------------------------------------------------------------- timing


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def run_cmd(cmd: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None,
            check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    """Wall time of a subprocess (interpreter start included)."""
    start = time.perf_counter()
    proc = subprocess.run(list(cmd), capture_output=True, text=True, env=_env(env), cwd=cwd)
    wall = time.perf_counter() - start
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return wall, proc


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    if extra:
        env.update(extra)
    return env


def measure_tree(cmd: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 interval: float = 0.01) -> dict[str, float]:
    """Run ``cmd``; return wall seconds and the peak summed RSS (bytes) of its process tree.

    RSS is polled every ``interval`` seconds with psutil (children included), so
    a very short spike can be missed; the poll also reads the leader's own
    ``ru_maxrss``-equivalent via ``memory_info().rss`` only, which is what we want
    for a tree.
    """
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(env), cwd=cwd)
    leader = psutil.Process(proc.pid)
    peak = 0
    stop = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not stop.is_set():
            try:
                procs = [leader, *leader.children(recursive=True)]
                total = 0
                for p in procs:
                    try:
                        total += p.memory_info().rss
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        pass
                peak = max(peak, total)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
            stop.wait(interval)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    stop.set()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{out[-3000:]}\n{err[-3000:]}")
    return {"wall": wall, "peak_rss": float(peak), "stdout": out, "stderr": err}


# ----------------------------------------------------------------------- tables


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(x) for x in row) + " |")
    return "\n".join(lines)


def _cell(x: object) -> str:
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) < 1e-3:
            return f"{x:.1e}"
        if abs(x) >= 100:
            return f"{x:.0f}"
        return f"{x:.3g}"
    return str(x)


def seconds(x: float) -> str:
    return f"{x:.3f} s" if x < 10 else f"{x:.1f} s"


def mib(x: float) -> str:
    return f"{x / 2**20:.0f} MiB"


def emit(title: str, text: str, out: Path | None = None) -> None:
    """Print a markdown block; also append it to ``out`` (a .md file) when given."""
    block = f"\n### {title}\n\n{text}\n"
    print(block, flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as handle:
            handle.write(block)


def machine() -> str:
    import platform

    import torch

    text = f"{platform.machine()} {os.cpu_count()} CPU cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return text


# ------------------------------------------------------------ synthetic models


def llama_modules(layers: int, hidden: int, intermediate: int, kv: int | None = None,
                  targets: Sequence[str] = ALL7) -> dict[str, tuple[int, int]]:
    """Module name → (out, in) for a Llama's linear layers (PEFT's module names)."""
    kv = hidden if kv is None else kv
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden),
              "o_proj": (hidden, hidden), "gate_proj": (intermediate, hidden),
              "up_proj": (intermediate, hidden), "down_proj": (hidden, intermediate)}
    out = {}
    for layer in range(layers):
        for proj in targets:
            part = "self_attn" if proj in ATTN else "mlp"
            out[f"model.layers.{layer}.{part}.{proj}"] = shapes[proj]
    return out


def write_lora(directory: Path, modules: Mapping[str, tuple[int, int]], *, r: int = 16, alpha: float = 32,
               seed: int = 0, dtype: str = "float32", base: str | None = None, scale: float = 0.02,
               device: str = "cpu") -> Path:
    """A PEFT LoRA adapter folder with seeded Gaussian factors (B non-zero), written directly."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    torch_dtype = getattr(torch, dtype)
    tensors = {}
    for name, (out, inn) in sorted(modules.items()):
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"] = (torch.randn(r, inn, generator=generator) * scale).to(torch_dtype)
        tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out, r, generator=generator) * scale).to(torch_dtype)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    targets = sorted({name.rsplit(".", 1)[1] for name in modules})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha,
        "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": base,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return directory


def llama_config(layers: int, hidden: int, intermediate: int, *, vocab: int = 1024, heads: int | None = None):
    from transformers import LlamaConfig

    heads = heads or max(1, hidden // 128)
    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                       tie_word_embeddings=False)


def save_llama(directory: Path, layers: int, hidden: int, intermediate: int, *, vocab: int = 1024,
               dtype: str = "float32", seed: int = 0) -> Path:
    """A randomly initialised Llama saved as a Hugging Face model folder (safetensors)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(layers, hidden, intermediate, vocab=vocab)).to(getattr(torch, dtype))
    model.save_pretrained(directory, safe_serialization=True)
    return Path(directory)


def empty_llama(layers: int, hidden: int, intermediate: int, *, vocab: int = 1024, dtype: str = "bfloat16",
                device: str = "cpu"):
    """A Llama with uninitialised weights (built on meta, then ``to_empty``): costs no init time,
    and pages never touched never become resident. Only for anchors that do not read base weights."""
    import torch
    from transformers import LlamaForCausalLM

    config = llama_config(layers, hidden, intermediate, vocab=vocab)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    return model.to_empty(device=device).eval()


def recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = Path(folder) / name
    path.write_text(text)
    return path


def dir_bytes(path: Path) -> int:
    path = Path(path)
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def peftdsl_cmd(*args: str) -> list[str]:
    """A ``peftdsl`` command as a subprocess (``lint`` latency is the command's own)."""
    return [sys.executable, "-m", "peftdsl", *args]


def peftdsl_run(recipe: Path, **options):
    """`peftdsl run RECIPE --quiet …` in process, through the API: `peftdsl.load(recipe).run(…)`
    (the front end included, as the command runs it). Raises `RecipeError` if the run fails."""
    import peftdsl

    return peftdsl.load(recipe).run(quiet=True, **options)


_RUN_CHILD = """import json, sys
import peftdsl
try:
    peftdsl.load(sys.argv[1]).run(quiet=True, **json.loads(sys.argv[2]))
except peftdsl.RecipeError as err:
    sys.exit(str(err))
"""


def peftdsl_run_cmd(recipe: Path, **options) -> list[str]:
    """A fresh interpreter running ``peftdsl.load(recipe).run(quiet=True, **options)``: what
    ``peftdsl run RECIPE --quiet …`` does, interpreter start and imports included (for the
    benchmarks that time or measure a whole process). Options must be JSON values."""
    return [sys.executable, "-c", _RUN_CHILD, str(recipe), json.dumps(options)]


def _adapter_weights(path: Path) -> tuple[Path, float]:
    folder = Path(path)
    weights = next(folder.rglob("adapter_model.safetensors"))
    config = json.loads((weights.parent / "adapter_config.json").read_text())
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{weights.parent}: rank/alpha patterns are not handled by this helper")
    return weights, config["lora_alpha"] / config["r"]


def max_product_diff(left: Path, right: Path, dtype: str = "float64") -> tuple[float, float]:
    """Largest |ΔW_left − ΔW_right| over modules (ΔW = scaling·B·A), one module at a time,
    and the largest |ΔW_right| for scale. Adapter folders are searched for their weights."""
    import torch
    from safetensors import safe_open

    (wl, sl), (wr, sr) = _adapter_weights(left), _adapter_weights(right)
    torch_dtype = getattr(torch, dtype)
    worst = biggest = 0.0
    with safe_open(str(wl), "pt") as fl, safe_open(str(wr), "pt") as fr:
        keys_l = sorted(k for k in fl.keys() if k.endswith("lora_A.weight"))
        keys_r = sorted(k for k in fr.keys() if k.endswith("lora_A.weight"))
        if keys_l != keys_r:
            raise ValueError(f"different modules: {sorted(set(keys_l) ^ set(keys_r))[:4]}")
        for key in keys_l:
            key_b = key.replace("lora_A", "lora_B")
            dl = sl * (fl.get_tensor(key_b).to(torch_dtype) @ fl.get_tensor(key).to(torch_dtype))
            dr = sr * (fr.get_tensor(key_b).to(torch_dtype) @ fr.get_tensor(key).to(torch_dtype))
            worst = max(worst, float((dl - dr).abs().max()))
            biggest = max(biggest, float(dr.abs().max()))
    return worst, biggest
