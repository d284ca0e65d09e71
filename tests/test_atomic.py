"""Outputs are atomic: a run killed with SIGKILL at any moment leaves, at each output
path, nothing, the old complete output, or the new complete one — never a mix — and
the next run removes what the killed one left behind. A full disk is a diagnostic.

Design of the kill test. A tiny Llama with 4 layers of width 512 (a 37 MB merged
model, so writing and fsync take a noticeable part of a run) and two LoRA adapters.
A recipe writes an adapter output (`svd`) and a merged output. Two reference runs
made in this process give the *old* outputs (`--set lam=0.2`) and the *new* ones
(`--set lam=0.6`); both load with PeftModel / AutoModelForCausalLM, and a complete
output is one whose files match a reference byte for byte (determinism makes that
exact). Then, with a seeded RNG:

- once, `python -m peftdsl run` itself is started and killed at a random moment
  after its first temporary folder appears (its interpreter start alone takes
  seconds on 2 cores);
- `ITERATIONS` more times, the same command line runs in a child forked from a
  process that has already imported torch (so that every kill lands in the run, not
  in imports), killed after a random delay drawn over the length of an
  uninterrupted run.

Before each kill the RNG also sets each output's starting state (absent, old, or
whatever the previous iteration left). After each kill each output must be
unchanged or new; an output moved aside (`.<name>.peftdsl-old-*`) when the kill
came between two renames must still hold the old files, and be put back by the next
run. Leftovers accumulate across iterations; a final uninterrupted run must leave
exactly the new outputs and no `.<name>.peftdsl-*` entry.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from peftdsl.cli import main
from tests.factories import make_lora, save_tiny_llama

ITERATIONS = 12
SEED = 1234
OUTPUTS = ("out_small", "out_merged")
RECIPE = """peftdsl: 1
base: {root}/base
adapters:
  a: {root}/a
  b: {root}/b
params:
  lam: 0.4
compose:
  mix: a - lam * b
  small: svd(mix, rank=4)
outputs:
  small: out_small
  mix: {{path: out_merged, merge: true}}
"""


def run_argv(recipe: Path, lam: float) -> list[str]:
    return ["run", str(recipe), "--quiet", "--no-eval", "--force", "--device", "cpu", "--set", f"lam={lam}"]


def fingerprint(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under `folder`."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".peftdsl-" in p.name)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """Inputs, and the old (lam=0.2) and new (lam=0.6) reference outputs, checked to load."""
    root = tmp_path_factory.mktemp("atomic")
    model = dict(layers=4, hidden=512, intermediate=1024, heads=8, kv_heads=4)
    save_tiny_llama(root / "base", **model)
    for name, seed in (("a", 1), ("b", 2)):
        make_lora(root / name, base=root / "base", seed=seed, r=8, targets=("q_proj", "v_proj", "up_proj"))
    refs = {}
    for label, lam in (("old", 0.2), ("new", 0.6)):
        folder = root / label
        folder.mkdir()
        recipe = folder / "recipe.yaml"
        recipe.write_text(RECIPE.format(root=root))
        assert main(run_argv(recipe, lam)) == 0
        refs[label] = {out: fingerprint(folder / out) for out in OUTPUTS}
    assert refs["old"]["out_merged"] != refs["new"]["out_merged"]
    _check_loads(root, root / "new")
    return root, refs


def _check_loads(root: Path, folder: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(folder / "out_merged")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), folder / "out_small")
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        assert torch.isfinite(merged(ids).logits).all()
        assert torch.isfinite(peft_model(ids).logits).all()


class Scene:
    """One working folder; outputs whose states are checked after every kill."""

    def __init__(self, root: Path, refs: dict, folder: Path):
        self.root, self.refs, self.folder = root, refs, folder
        folder.mkdir()
        self.recipe = folder / "recipe.yaml"
        self.recipe.write_text(RECIPE.format(root=root))
        self.saw_leftovers = 0
        self.states: list[tuple[str, str]] = []

    def state_of(self, out: str) -> str:
        path = self.folder / out
        if not path.exists():
            return "absent"
        prints = fingerprint(path)
        for label in ("old", "new"):
            if prints == self.refs[label][out]:
                return label
        return "MIXED"

    def prepare(self, rng: random.Random) -> dict[str, str]:
        """Set each output to absent, old, or leave it; return the states before the run."""
        for out in OUTPUTS:
            choice = rng.choice(("absent", "old", "keep"))
            path = self.folder / out
            if choice != "keep" and (path.exists() or path.is_symlink()):
                shutil.rmtree(path)
            if choice == "old":
                shutil.copytree(self.root / "old" / out, path)
        return {out: self.state_of(out) for out in OUTPUTS}

    def check(self, before: dict[str, str], what: str) -> None:
        for out in OUTPUTS:
            after = self.state_of(out)
            self.states.append((out, after))
            assert after != "MIXED", f"{what}: `{out}` holds a mix of files"
            if after == "absent" and before[out] != "absent":
                # Killed between moving the old output aside and renaming the new one in.
                aside = sorted(self.folder.glob(f".{out}.peftdsl-old-*"))
                assert aside, f"{what}: `{out}` was {before[out]} and is now gone"
                assert fingerprint(aside[0]) == self.refs[before[out]][out], f"{what}: moved-aside copy differs"
            else:
                assert after in (before[out], "new"), f"{what}: `{out}` went from {before[out]} to {after}"
        self.saw_leftovers += bool(leftovers(self.folder))
        print(f"{what}: {before} -> {dict(self.states[-len(OUTPUTS):])}, leftovers {leftovers(self.folder)}")


def _wait_for_tmp(folder: Path, proc: subprocess.Popen, limit: float) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        if any(".peftdsl-tmp-" in p.name for p in folder.iterdir()):
            return True
        time.sleep(0.002)
    return False


# A warm process that has imported torch & co. (but run nothing, so no thread pool exists
# yet) and forks one child per request; the child runs the CLI as `python -m peftdsl`
# would. It reaps a child only when told, so the pid the test kills is never reused.
FORK_SERVER = r"""
import json, os, sys
import torch, safetensors.torch, transformers, peft
import peftdsl.runner, peftdsl.runtime.execute, peftdsl.outputs.write, peftdsl.outputs.merge, peftdsl.outputs.atomic, peftdsl.lower
from peftdsl.cli import main
print("ready", flush=True)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        code = 70
        try:
            code = main(json.loads(line))
        finally:
            os._exit(code)
    print(pid, flush=True)
    sys.stdin.readline()  # "reap"
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), flush=True)
"""


class ForkServer:
    def __init__(self):
        env = {k: v for k, v in os.environ.items() if k != "PEFTDSL_DEBUG"}
        self.proc = subprocess.Popen([sys.executable, "-c", FORK_SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def wait_ready(self) -> None:
        assert self.proc.stdout.readline().strip() == "ready"

    def start(self, argv: list[str]) -> int:
        self.proc.stdin.write(json.dumps(argv) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def reap(self) -> int:
        self.proc.stdin.write("reap\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def test_kill_9_never_leaves_a_mixed_output(lab, tmp_path):
    root, refs = lab
    rng = random.Random(SEED)
    scene = Scene(root, refs, tmp_path / "work")
    argv = run_argv(scene.recipe, 0.6)

    server = ForkServer()  # imports while the first run does
    try:
        # 1. The real command line, killed while it writes.
        before = scene.prepare(rng)
        env = {k: v for k, v in os.environ.items() if k != "PEFTDSL_DEBUG"}
        proc = subprocess.Popen([sys.executable, "-m", "peftdsl", *argv], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            started = _wait_for_tmp(scene.folder, proc, limit=120)
            time.sleep(rng.uniform(0, 0.5))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
        assert started, "the run never started writing"
        scene.check(before, "python -m peftdsl run, SIGKILL")

        # 2. Children forked from a warm process: the kill lands anywhere in the run itself.
        server.wait_ready()
        start = time.monotonic()
        server.start(argv)
        assert server.reap() == 0  # an uninterrupted run, to time it
        length = time.monotonic() - start
        for i in range(ITERATIONS):
            before = scene.prepare(rng)
            delay = rng.uniform(0, length)
            pid = server.start(argv)
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)  # still ours: running, or a zombie until reaped
            status = server.reap()
            scene.check(before, f"iteration {i}, SIGKILL after {delay:.2f} s of {length:.2f} s (exit {status})")
    finally:
        server.close()

    # 3. The next run cleans up and writes the new outputs.
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(argv) == 0
    assert leftovers(scene.folder) == []
    assert {out: fingerprint(scene.folder / out) for out in OUTPUTS} == refs["new"]
    assert scene.saw_leftovers, "no kill landed while writing: the test did not exercise the cleaner"


# ---------------------------------------------------------------- a full disk


def _small_recipe(folder: Path, fixtures: Path) -> Path:
    recipe = folder / "recipe.yaml"
    recipe.write_text(f"peftdsl: 1\nbase: {fixtures}/base\nadapters:\n  a: {fixtures}/lora_r4\n"
                      "compose:\n  mix: 2 * a\noutputs:\n  mix: {path: merged, merge: true}\n")
    return recipe


def _assert_disk_full_diagnostic(status: int, text: str, folder: Path) -> None:
    assert status == 1, text
    assert "internal error" not in text and "Traceback" not in text, text
    assert "error[R601]" in text and "No space left on device" in text, text
    assert sorted(p.name for p in folder.iterdir()) == ["recipe.yaml"], "an output or a leftover was written"


def test_disk_full_on_a_small_tmpfs(corpus_root, tmp_path):
    """A real ENOSPC: the output folder is a 256 KiB tmpfs, the merged model ~0.4 MB (in process)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        recipe = _small_recipe(mount, corpus_root / "fixtures")
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            status = main(["run", str(recipe), "--quiet", "--no-eval"])
        _assert_disk_full_diagnostic(status, out.getvalue(), mount)
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize(("module", "function"), [
    ("peftdsl.runtime.tensorio", "_write_all"),  # while tensors stream to the output file
    ("peftdsl.outputs.atomic", "_fsync_tree"),  # found by the fsync before the rename (delayed allocation)
])
def test_disk_full_is_r601(corpus_root, tmp_path, monkeypatch, module, function):
    """A full disk is an R601 diagnostic, not an internal error, and leaves nothing behind."""
    import importlib

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(importlib.import_module(module), function, full)
    recipe = _small_recipe(tmp_path, corpus_root / "fixtures")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = main(["run", str(recipe), "--quiet", "--no-eval"])
    _assert_disk_full_diagnostic(status, out.getvalue(), tmp_path)


def test_safetensors_disk_full_is_an_os_error(tmp_path, monkeypatch):
    """safetensors' own writer (used for (IA)³ outputs) reports ENOSPC as a SafetensorError."""
    from safetensors import SafetensorError

    import peftdsl.outputs.atomic

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(peftdsl.outputs.atomic, "_save_file", full)
    with pytest.raises(OSError) as caught:
        peftdsl.outputs.atomic.save_file({"x": torch.zeros(2)}, str(tmp_path / "x.safetensors"), metadata={})
    assert caught.value.errno == errno.ENOSPC


