"""Reliability, second round (issue 12): each failure mode a diagnostic or a clean refusal.

Long flat sums are not deep (S102), nested outputs and `--report` folders are checked
before any work, unreadable reports and eval data are diagnostics, SIGTERM is an
interruption like Ctrl-C, leftovers of another live run survive cleanup wherever its
pid lives, and a bad Ray address fails fast. Signal tests run the CLI in a
subprocess with a timeout.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from peftdsl.cli import main

ROOT = Path(__file__).resolve().parent.parent


def cli(*argv: str) -> tuple[int, str]:
    """The CLI in process; (status, stdout + stderr). Never a traceback or an internal error."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = main(list(argv))
    text = out.getvalue()
    assert "internal error" not in text and "Traceback" not in text, text
    return status, text


def write_recipe(folder: Path, adapter: Path, compose: str, outputs: str = "", extra: str = "") -> Path:
    path = folder / "recipe.yaml"
    path.write_text(f"peftdsl: 1\n{extra}adapters:\n  a: {adapter}\n  b: {adapter.parent / 'lora_r4b'}\n"
                    f"compose:\n{compose}" + (f"outputs:\n{outputs}" if outputs else ""))
    return path


# ---------------------------------------------------------------- S102: depth, not length


def test_a_flat_sum_of_500_terms_is_not_deep(corpus_root, tmp_path):
    """`a + b + …` (500 terms, left-associative) lints, explains and runs; its canonical
    form is the count of each term, checked against the file PEFT loads."""
    from safetensors.torch import load_file

    fx = corpus_root / "fixtures"
    terms = " + ".join("a" if i % 2 else "b" for i in range(500)) + " - 0.5 * a"
    path = write_recipe(tmp_path, fx / "lora_r4", f"  x: {terms}\n", f"  x: {tmp_path / 'out'}\n")
    status, text = cli("lint", str(path))
    assert status == 0, text
    status, text = cli("explain", str(path))
    assert status == 0 and "canonical  249.5*a + 250*b" in text, text[-2000:]
    assert len(text.splitlines()) < 600  # one line per term, not a staircase
    status, text = cli("run", str(path), "--quiet")
    assert status == 0, text
    (tmp_path / "ref").mkdir()
    one = write_recipe(tmp_path / "ref", fx / "lora_r4", "  x: 249.5 * a + 250 * b\n", f"  x: {tmp_path / 'ref_out'}\n")
    assert cli("run", str(one), "--quiet")[0] == 0
    got, want = (load_file(p / "adapter_model.safetensors") for p in (tmp_path / "out", tmp_path / "ref_out"))
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)


@pytest.mark.parametrize("op", ["+", "-", "*"])
def test_a_chain_as_long_as_the_length_limit_allows_is_fine(corpus_root, tmp_path, op):
    """9,999 operators (20,000 characters): no pass recurses per term."""
    fx = corpus_root / "fixtures"
    chain = op.join(["a"] * 9_999) if op != "*" else "*".join(["1"] * 9_999) + "*a"
    path = write_recipe(tmp_path, fx / "lora_r4", f"  x: {chain}\n  y: b\n")
    for command in ("lint", "explain"):
        status, text = cli(command, str(path))
        assert status == 0, text[-2000:]


@pytest.mark.parametrize("deep", [
    "a" + "+(a" * 300 + ")" * 300,  # right-nested sums: parentheses that nest
    "-(" * 300 + "a" + ")" * 300,
    "2*(" * 300 + "a" + ")" * 300,
    "svd(" * 300 + "a" + ", rank=2)" * 300,
])
def test_deep_parentheses_still_fail(corpus_root, tmp_path, deep):
    path = write_recipe(tmp_path, corpus_root / "fixtures" / "lora_r4", f"  x: {deep}\n  y: b\n")
    status, text = cli("lint", str(path), "--format", "concise")
    assert status == 1 and "error[S102]" in text and "levels deep (the limit is 200)" in text, text


def test_depth_counts_nesting_exactly():
    """The measure itself: chains of one precedence level are one level; anything else nests."""
    from peftdsl.parse import _depth, _parser

    def depth(text: str) -> int:
        return _depth(_parser().parse(text))

    assert depth("a") == 1
    assert depth("a + b") == depth("a + b + c + d - e") == 2
    assert depth("a * b * c / d") == 2
    assert depth("a + b * c") == 3 and depth("a * b + c") == 3  # a product inside a sum
    assert depth("a + (b + c)") == 3 and depth("(a + b) + c") == 2  # the same tree as `a + b + c`
    assert depth("-a") == 2 and depth("--a") == 3
    assert depth("a - (b - (c - d))") == 4


# ---------------------------------------------------------------- SIGTERM is an interruption

# The CLI in a child process whose merged output pauses once its temporary folder is full,
# so the signal lands while an output is half-built, every time.
_PAUSED_RUN = r"""
import sys, time
import peftdsl.outputs.atomic as atomic
flush = atomic._fsync_tree
def slow(root):
    if "out_merged" in str(root):
        print("paused", flush=True)
        time.sleep(60)
    flush(root)
atomic._fsync_tree = slow
from peftdsl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _fingerprint(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_run_cleans_up_and_names_what_was_replaced(corpus_root, tmp_path, signum, status):
    fx = corpus_root / "fixtures"
    path = tmp_path / "recipe.yaml"
    path.write_text(f"peftdsl: 1\nbase: {fx / 'base'}\nadapters:\n  a: {fx / 'lora_r4'}\nparams:\n  lam: 1\n"
                    "compose:\n  small: lam * a\n  mix: lam * a\n"
                    "outputs:\n  small: out_small\n  mix: {path: out_merged, merge: true}\n")
    assert cli("run", str(path), "--quiet")[0] == 0  # the old outputs, at lam = 1
    old = {name: _fingerprint(tmp_path / name) for name in ("out_small", "out_merged")}
    env = {k: v for k, v in os.environ.items() if k != "PEFTDSL_DEBUG"}
    proc = subprocess.Popen([sys.executable, "-c", _PAUSED_RUN, "run", str(path), "--quiet", "--force",
                             "--set", "lam=2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "paused"
        assert [p.name for p in tmp_path.glob(".out_merged.peftdsl-tmp-*")], "no output was half-built"
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    name = signal.Signals(signum).name
    assert proc.returncode == status, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert f"interrupted ({name}); already written whole: `small` (replaced the old one)" in err, err
    assert not [p.name for p in tmp_path.iterdir() if ".peftdsl-" in p.name], "temporary leftovers"
    assert _fingerprint(tmp_path / "out_merged") == old["out_merged"]  # untouched
    assert _fingerprint(tmp_path / "out_small") != old["out_small"]  # the new one, whole
    assert json.loads((tmp_path / "out_small" / "peftdsl.json").read_text())["params"] == {"lam": 2.0}


def test_sigterm_before_any_output_says_nothing_was_written(corpus_root, tmp_path):
    """The handler is in place for the whole command, and restored afterwards."""
    fx = corpus_root / "fixtures"
    path = write_recipe(tmp_path, fx / "lora_r4", "  x: 2 * a\n", "  x: out\n")
    script = ("import os, signal, sys\nimport peftdsl.runner as r\nreal = r._execute\n"
              "def stop(*a, **k):\n    os.kill(os.getpid(), signal.SIGTERM)\n    return real(*a, **k)\n"
              "r._execute = stop\nfrom peftdsl.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", script, "run", str(path), "--quiet"], capture_output=True,
                          text=True, timeout=120, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 143, proc.stderr
    assert "interrupted (SIGTERM); no output was written or replaced" in proc.stderr
    assert not (tmp_path / "out").exists()
    before = signal.getsignal(signal.SIGTERM)
    assert cli("lint", str(path))[0] == 0
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------- cleanup tells live from dead by a lock

# Holds an flock on the folder it is given until its stdin closes: a run writing that
# folder, from a pid namespace where its pid means nothing to us.
_HOLDER = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("holding", flush=True)
sys.stdin.read()
"""


def _unused_pid() -> int:
    pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 12345  # above any pid this namespace hands out
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return pid


def test_cleanup_spares_a_live_run_from_another_pid_namespace(tmp_path):
    from peftdsl.outputs.atomic import atomic_output

    target = tmp_path / "out"
    live = tmp_path / f".out.peftdsl-tmp-{_unused_pid()}-0a0a0a0a"
    live.mkdir()
    (live / "half.safetensors").write_bytes(b"being written")
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(live)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with atomic_output(target, force=False) as tmp:  # cleans leftovers first
            (tmp / "f").write_text("f")
        assert (live / "half.safetensors").read_bytes() == b"being written"  # the pid alone would say dead
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with atomic_output(target, force=True) as tmp:  # its holder is gone now: a dead run's leftover
        (tmp / "f").write_text("g")
    assert not live.exists() and (target / "f").read_text() == "g"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


_TRY_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    sys.exit(3)
"""


def test_a_run_holds_its_own_temporary_folder_locked(tmp_path):
    """While a run writes, another process cannot take its folder's lock; once done, nothing is left."""
    import fcntl

    from peftdsl.outputs.atomic import atomic_output

    target = tmp_path / "out"
    with atomic_output(target, force=False) as tmp:
        probe = subprocess.run([sys.executable, "-c", _TRY_LOCK, str(tmp)], timeout=30, check=False)
        assert probe.returncode == 3  # held
        (tmp / "f").write_text("f")
    fd = os.open(target, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the output in place
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------- read-only folders, full disks, reports


@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_lock_in_a_really_read_only_folder(corpus_root, tmp_path):
    """A read-only mount (root ignores permission bits, not a read-only file system)."""
    with tmpfs(tmp_path / "ro", "1m") as folder:
        recipe = folder / "r.yaml"
        text = f"peftdsl: 1\nadapters:\n  a: {corpus_root / 'fixtures' / 'lora_r4'}\ncompose:\n  x: 2 * a\n"
        recipe.write_text(text)
        assert subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=False).returncode == 0
        status, out = cli("lock", str(recipe))
        assert status == 1 and "cannot write the pinned recipe" in out and "Read-only file system" in out, out
        assert recipe.read_text() == text and sorted(p.name for p in folder.iterdir()) == ["r.yaml"]


@pytest.fixture(scope="module")
def eval_base(tmp_path_factory) -> Path:
    from factories import save_tiny_llama_with_tokenizer

    return save_tiny_llama_with_tokenizer(tmp_path_factory.mktemp("evalbase") / "base")


def _eval_recipe(folder: Path, base: Path) -> Path:
    (folder / "t.txt").write_text("the cat sat on the mat\n")
    path = folder / "recipe.yaml"
    path.write_text(f"peftdsl: 1\nbase: {base}\neval:\n  - name: p\n    models: [base]\n    metric: perplexity\n"
                    f"    data: t.txt\n")
    return path


def _report_state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_report_on_a_full_disk_keeps_the_previous_one(eval_base, tmp_path):
    path = _eval_recipe(tmp_path, eval_base)
    with tmpfs(tmp_path / "small", "64k") as report:
        assert cli("run", str(path), "--quiet", "--report", str(report))[0] == 0
        before = _report_state(report)
        assert set(before) == {"report.json", "report.md"}
        with contextlib.suppress(OSError), (report / "filler").open("wb") as filler:
            while True:  # take every byte that is left
                filler.write(b"\0" * 4096)
                filler.flush()
        before = _report_state(report)
        status, text = cli("run", str(path), "--quiet", "--report", str(report))
        assert status == 1 and "error[R601]" in text and "No space left on device" in text, text
        assert "the previous report there is unchanged" in text
        assert _report_state(report) == before  # whole, not truncated; no temporary files


def test_a_failed_report_write_does_not_truncate_the_old_one(eval_base, tmp_path, monkeypatch):
    """Anywhere (no mount needed): the disk fills after report.json, before report.md."""
    import errno

    import peftdsl.evaluation.report as report_module

    path = _eval_recipe(tmp_path, eval_base)
    report = tmp_path / "report"
    (report).mkdir()
    (report / "notes.txt").write_text("mine")
    assert cli("run", str(path), "--quiet", "--report", str(report))[0] == 0
    before = _report_state(report)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(report_module, "report_markdown", full)
    status, text = cli("run", str(path), "--quiet", "--report", str(report))
    assert status == 1 and "error[R601]" in text and "writing the report" in text, text
    assert _report_state(report) == before
    monkeypatch.undo()
    assert cli("run", str(path), "--quiet", "--report", str(report))[0] == 0
    assert set(_report_state(report)) == {"notes.txt", "report.json", "report.md"}


@pytest.mark.parametrize("where", ["adapter", "base", "data", "output"])
def test_report_inside_an_input_or_output_is_refused(corpus_root, eval_base, tmp_path, where):
    fx = corpus_root / "fixtures"
    path = tmp_path / "recipe.yaml"
    (tmp_path / "t.txt").write_text("the cat sat\n")
    path.write_text(f"peftdsl: 1\nbase: {eval_base}\nadapters:\n  a: {fx / 'lora_r4'}\ncompose:\n  x: 2 * a\n"
                    f"outputs:\n  x: out\neval:\n  - name: p\n    models: [base]\n    metric: perplexity\n"
                    f"    data: t.txt\n")
    report = {"adapter": fx / "lora_r4" / "reports", "base": eval_base, "data": tmp_path / "t.txt",
              "output": tmp_path / "out" / "r"}[where]
    listing = sorted(p.name for p in (fx / "lora_r4").iterdir())
    status, text = cli("run", str(path), "--quiet", "--report", str(report))
    assert status == 2 and "--report" in text and "lies inside" in text, text
    assert not (tmp_path / "out").exists() and not (fx / "lora_r4" / "reports").exists()
    assert sorted(p.name for p in (fx / "lora_r4").iterdir()) == listing


# ---------------------------------------------------------------- eval data that is not text


@pytest.mark.parametrize("data, words", [
    (b'{"text": "ok"}\n{"text": "a \\ud800 b"}\n', "2: a string holds a lone UTF-16 surrogate"),
    (b'{"text": "ok"}\n{"text": "\xed\xa0\x80"}\n', "2: not valid UTF-8"),  # a surrogate encoded raw
    (b'{"text": "ok"}\n' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"\n", "2: the JSON nests too deeply"),
])
def test_jsonl_rows_that_are_not_text_are_e501(eval_base, tmp_path, data, words):
    (tmp_path / "d.jsonl").write_bytes(data)
    path = tmp_path / "recipe.yaml"
    path.write_text(f"peftdsl: 1\nbase: {eval_base}\neval:\n  - name: p\n    models: [base]\n"
                    "    metric: perplexity\n    data: d.jsonl\n")
    status, text = cli("run", str(path), "--quiet", "--report", str(tmp_path / "r"))
    assert status == 1 and "error[E501]" in text and words in text, text
    assert not (tmp_path / "r" / "report.json").exists()


def test_a_line_separator_inside_a_json_string_is_text(tmp_path):
    """JSONL rows end at \\n: U+2028 and form feeds inside strings do not split a row (they did:
    str.splitlines broke the row in two, and the halves were "invalid JSON")."""
    from peftdsl.evaluation.evaluate import _read_jsonl

    rows = [{"text": "the cat\u2028sat\x0con\x85the mat"}, {"text": "two"}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows),
                                      encoding="utf-8")
    assert _read_jsonl(tmp_path / "d.jsonl", None) == [(1, rows[0]), (2, rows[1])]


# ---------------------------------------------------------------- a bad Ray address fails fast


@pytest.fixture()
def no_ray_init(monkeypatch):
    """`ray.init` must not be reached: it would retry a dead address for a minute or more."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("Ray is already running in this process")

    def forbidden(*args, **kwargs):
        raise AssertionError("ray.init was called")

    monkeypatch.setattr(ray, "init", forbidden)
    return ray


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again: connecting is refused


@pytest.mark.parametrize("address, words", [
    ("127.0.0.1:{closed}", "no Ray cluster answers there (Connection refused)"),
    ("ray://127.0.0.1:{closed}", "no Ray cluster answers there (Connection refused)"),
    ("just-a-name", "expected HOST:PORT"),
    ("127.0.0.1:99999", "expected HOST:PORT"),
])
def test_a_bad_ray_address_is_a_usage_error_in_bounded_time(eval_base, tmp_path, no_ray_init, address, words):
    path = _eval_recipe(tmp_path, eval_base)
    started = time.monotonic()
    status, text = cli("run", str(path), "--quiet", "--executor", "ray", "--address",
                       address.format(closed=_closed_port()), "--report", str(tmp_path / "r"))
    assert status == 2 and words in text, text
    assert "base model" not in text
    assert time.monotonic() - started < 30  # the probe itself: well under a second


def test_a_ray_connection_error_is_not_blamed_on_the_base_model(eval_base, tmp_path, monkeypatch):
    """Something listens (the probe passes) but it is not Ray: Ray's ConnectionError (an OSError)
    used to reach the runner's handler for an unloadable base model."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("Ray is already running in this process")

    def refuse(*args, **kwargs):
        raise ConnectionError("Could not find any running Ray instance. Please specify the one to connect to")

    monkeypatch.setattr(ray, "init", refuse)
    path = _eval_recipe(tmp_path, eval_base)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        status, text = cli("run", str(path), "--quiet", "--executor", "ray", "--address",
                           f"127.0.0.1:{server.getsockname()[1]}", "--report", str(tmp_path / "r"))
    assert status == 2 and "cannot connect to the Ray cluster at" in text and "Could not find" in text, text
    assert "base model" not in text


def test_the_probe_gives_up_after_its_timeout(monkeypatch):
    from peftdsl.errors import UsageError
    from peftdsl.evaluation import sweep

    seen = {}

    def silent(address, timeout):
        seen["timeout"] = timeout
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", silent)
    with pytest.raises(UsageError, match=r"no Ray cluster answers there \(timed out\)"):
        sweep.probe_address("10.1.2.3:6379")
    assert seen["timeout"] == sweep.PROBE_SECONDS


# ---------------------------------------------------------------- the API with arguments of the wrong type


@pytest.mark.parametrize("call, words", [
    (lambda p, r: __import__("peftdsl").load(123), "`path` must be str or a path, not int"),
    (lambda p, r: __import__("peftdsl").load(p, params="lam=1"), "`params` must be a mapping"),
    (lambda p, r: __import__("peftdsl").load(p, params={"lam": 10**400}), "params['lam'] must be a finite number"),
    (lambda p, r: __import__("peftdsl").load(p, adapters=["a"]), "`adapters` must be a mapping"),
    (lambda p, r: __import__("peftdsl").load("x\0y"), "no such file"),
    (lambda p, r: __import__("peftdsl").loads({"peftdsl": 1}, root="."), "`text` must be str, not dict"),
    (lambda p, r: r.canonical({"x": 1}), "`name` must be str, not dict"),
    (lambda p, r: r.compose("x", device=0), "`device` must be str or NoneType, not int"),
    (lambda p, r: r.run(only="x"), "`only` must be a list of names, not str"),
    (lambda p, r: r.run(report=7), "`report` must be str or a path or NoneType, not int"),
    (lambda p, r: r.run(force="yes"), "`force` must be bool, not str"),
    (lambda p, r: r.compose("x", device="cpu").save(None), "`path` must be str or a path, not NoneType"),
])
def test_api_arguments_of_the_wrong_type_are_usage_errors(corpus_root, tmp_path, call, words):
    import peftdsl
    from peftdsl.errors import UsageError

    path = write_recipe(tmp_path, corpus_root / "fixtures" / "lora_r4", "  x: 2 * a\n  y: b\n",
                        extra="params:\n  lam: 1\n")
    with pytest.raises(UsageError) as caught:
        call(path, peftdsl.load(path))
    assert words in str(caught.value)
