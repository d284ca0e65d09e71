"""Fuzz the front end (`lint`, `explain`) and a sample of `run` with hostile recipes.

    python bench/fuzz.py                       # 10,000 lint cases + 20 runs, seed 0
    python bench/fuzz.py --cases 50000 --seed 7 --keep /tmp/fuzz-failures

Cases come from two generators:

- **mutations** of seed recipes (``tests/corpus/``, ``recipes/examples/``,
  ``recipes/demo/*.yaml``): byte flips, token swaps from a dictionary of grammar and
  YAML tokens, line deletion/duplication, deep nesting (parentheses, unary minus,
  YAML flow and block nesting), huge numbers (``1e400``, a 400-digit integer), long
  names (10^5 characters), NUL bytes, invalid UTF-8, billion-laughs alias bombs,
  YAML tags (``!!python/object/apply:os.system``), merge keys, several documents,
  tabs, CRLF and byte order marks; one to three stacked per case;
- **hypothesis strategies** over the expression grammar (``expressions()``) and the
  recipe's YAML schema (``recipe_documents()``).

Each case is written to a file beside real tiny adapters and run through
``peftdsl.cli.main`` in process (stdout and stderr captured), so the renderers
run too. A case fails when it raises, prints "internal error", exits with a
status outside {0, 1, 2}, takes longer than ``--case-limit`` seconds, or makes a
YAML tag run code (a sentinel file appears). The report gives the number of
cases, failures, statuses seen, the slowest case and the wall time; the exit
status is 1 when anything failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _p in (REPO, REPO / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

FORMATS = ("full", "concise", "json", "github", "sarif")
ALLOWED_STATUSES = frozenset({0, 1, 2})
SENTINEL_NAME = "PWNED-by-yaml-tag"
MAX_CASE_BYTES = 64 << 20  # the largest recipe file peftdsl reads (build.MAX_RECIPE_BYTES)

# ----------------------------------------------------------------------- seeds and workspace


@dataclass(frozen=True)
class Seed:
    label: str  # e.g. corpus/clean_full.yaml
    text: str
    folder: Path  # where mutants of this seed are written (relative paths resolve there)
    runnable: bool  # its inputs exist, so `run` can execute it


@dataclass
class Workspace:
    root: Path
    seeds: list[Seed]
    sentinel: Path

    def folder(self, seed: Seed) -> Path:
        return seed.folder


def build_workspace(root: Path, fixtures: Path | None = None) -> Workspace:
    """Lay out the seed recipes in ``root`` so that their relative paths resolve.

    ``corpus/`` holds the corpus seeds beside ``fixtures/`` (built with
    ``tests/conftest.py``'s ``build_fixtures`` unless ``fixtures`` is given, then
    linked); ``recipes/examples`` and ``recipes/demo`` are real folders whose
    entries (assets, data) are symlinks to the repository's, so nothing is ever
    written into the repository.
    """
    root = Path(root)
    corpus = root / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    if fixtures is not None:
        if not (corpus / "fixtures").exists():
            (corpus / "fixtures").symlink_to(Path(fixtures).resolve(), target_is_directory=True)
    elif not (corpus / "fixtures").exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from conftest import build_fixtures

        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            build_fixtures(corpus / "fixtures")
    seeds = [Seed(f"corpus/{p.name}", p.read_text(encoding="utf-8"), corpus, p.name.startswith("clean_"))
             for p in sorted((REPO / "tests" / "corpus").glob("*.yaml"))]
    for sub in ("examples", "demo"):
        source = REPO / "recipes" / sub
        if not source.is_dir():
            continue
        mirror = root / "recipes" / sub
        mirror.mkdir(parents=True, exist_ok=True)
        for entry in source.iterdir():
            if entry.suffix not in (".yaml", ".yml") and not (mirror / entry.name).exists():
                (mirror / entry.name).symlink_to(entry.resolve())
        for recipe in sorted([*source.glob("*.yaml"), *source.glob("*.yml")]):
            seeds.append(Seed(f"recipes/{sub}/{recipe.name}", recipe.read_text(encoding="utf-8"), mirror, True))
    return Workspace(root, seeds, root / SENTINEL_NAME)


# ----------------------------------------------------------------------- mutations

def _operator_tokens() -> list[str]:
    """Operator and keyword names, from the registry (the one list of them)."""
    from peftdsl.operators import OPERATORS

    return [*OPERATORS, *sorted({k.name for op in OPERATORS.values() for k in op.keywords})]


GRAMMAR_TOKENS = ["+", "-", "*", "/", "(", ")", ",", "=", *_operator_tokens(), "base", "chat", "toxic", "lam", "0", "1", "-1", "0.5", "1e-3", "1e400", "1e-400", ".5", "5.", "1_000",
                  '"total"', "'frequency'", '"', "'", "x" * 40, "_", "nan", "inf", "2**8"]
YAML_TOKENS = [":", ": ", "- ", "-", "[", "]", "{", "}", ",", "?", "&a", "*a", "!!str", "!!int", "!!float",
               "!!binary", "!!timestamp", "!!set", "!!omap", "!!python/object/apply:os.system", "!custom",
               "<<", "<<: *a", "---", "...", "|", ">", "|-", "#", "%YAML 1.1", "%TAG ! tag:x,2000:", "~",
               "null", "true", "yes", "no", "on", "off", ".inf", "-.inf", ".nan", "0x1F", "0o17", "1:30",
               "2001-12-14", "\t", "\r", "\r\n", "\ufeff", "\u2028", "\x85", "\\", "\"", "'", "@", "`", "%"]
SCHEMA_TOKENS = ["peftdsl", "name", "base", "seed", "adapters", "params", "compose", "outputs", "eval",
                 "sweep", "path", "sha256", "kind", "rank", "merge", "dtype", "models", "metric", "data",
                 "select", "goal", "max", "min", "lora", "ia3", "dense", "float16", "bfloat16", "perplexity",
                 "accuracy", "generate", "labels", "limit", "batch_size", "hf:org/name@main", "hf:",
                 "/", "..", "../../..", "/etc/passwd", "/dev/zero", "/proc/self/mem", "fixtures/pickled",
                 "fixtures/truncated", "fixtures/dora", "fixtures/loha", "fixtures/not_a_folder.txt",
                 '"x\\0y"', '"\\0"', "~nouser/x", "~", "hf:" + "n" * 300, "/dev/zero"]
DICTIONARY = GRAMMAR_TOKENS + YAML_TOKENS + SCHEMA_TOKENS
_TOKEN = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*|\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\s+|.", re.DOTALL)
_NAME = re.compile(rb"(?<![A-Za-z0-9_./])[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(rb"(?<![A-Za-z0-9_.])\d+(?:\.\d*)?(?:[eE][-+]?\d+)?")


def _billion_laughs(levels: int = 9, width: int = 9) -> bytes:
    lines = ['a0: &a0 "lol"']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return ("\n".join(lines) + "\n").encode()


def _nest_parens(n: int) -> bytes:
    return b"(" * n + b"chat" + b")" * n


def _compose_line(data: bytes) -> int | None:
    """Index of a line under `compose:` holding an expression, if any."""
    lines = data.split(b"\n")
    inside = False
    for i, line in enumerate(lines):
        if line.startswith(b"compose:"):
            inside = True
            continue
        if inside and line[:1] not in (b" ", b"\t") and line.strip():
            break
        if inside and b":" in line and line.strip() and not line.strip().startswith(b"#"):
            return i
    return None


def _replace_expression(data: bytes, expression: bytes) -> bytes:
    lines = data.split(b"\n")
    i = _compose_line(data)
    if i is None:
        return data + b"\ncompose:\n  deep: " + expression + b"\n"
    key, _, _ = lines[i].partition(b":")
    lines[i] = key + b": " + expression
    return b"\n".join(lines)


class Mutator:
    """Seeded mutations of a recipe's bytes; each returns new bytes."""

    def __init__(self, rng: random.Random, sentinel: Path):
        self.rng, self.sentinel = rng, sentinel
        self.operators: list[Callable[[bytes], bytes]] = [
            self.byte_flip, self.byte_flip, self.token_swap, self.token_swap, self.token_insert,
            self.line_delete, self.line_duplicate, self.line_swap, self.deep_parens, self.deep_unary,
            self.deep_yaml, self.huge_number, self.long_name, self.nul_bytes, self.invalid_utf8,
            self.alias_bomb, self.python_tag, self.merge_key, self.multi_document, self.tabs,
            self.line_endings, self.duplicate_key, self.truncate, self.indent_shift,
        ]

    def mutate(self, data: bytes) -> tuple[bytes, list[str]]:
        names = []
        for _ in range(self.rng.choice((1, 1, 1, 2, 2, 3))):
            op = self.rng.choice(self.operators)
            mutated = op(data)
            if len(mutated) > MAX_CASE_BYTES:  # long_name over deep_yaml: 10^5-char names × 50,000 levels
                continue  # is gigabytes, past the loader's limit: not a case, an OOM of the fuzzer
            data = mutated
            names.append(op.__name__)
        return data, names

    # -- small, local changes

    def byte_flip(self, data: bytes) -> bytes:
        if not data:
            return b"\xff"
        out = bytearray(data)
        for _ in range(self.rng.randint(1, 4)):
            i = self.rng.randrange(len(out))
            out[i] ^= 1 << self.rng.randrange(8)
        return bytes(out)

    def _tokens(self, data: bytes) -> list[bytes]:
        return _TOKEN.findall(data)

    def token_swap(self, data: bytes) -> bytes:
        tokens = self._tokens(data)
        if not tokens:
            return data
        for _ in range(self.rng.randint(1, 3)):
            tokens[self.rng.randrange(len(tokens))] = self.rng.choice(DICTIONARY).encode()
        return b"".join(tokens)

    def token_insert(self, data: bytes) -> bytes:
        tokens = self._tokens(data)
        tokens.insert(self.rng.randrange(len(tokens) + 1), self.rng.choice(DICTIONARY).encode())
        return b"".join(tokens)

    def line_delete(self, data: bytes) -> bytes:
        lines = data.split(b"\n")
        del lines[self.rng.randrange(len(lines))]
        return b"\n".join(lines)

    def line_duplicate(self, data: bytes) -> bytes:
        lines = data.split(b"\n")
        i = self.rng.randrange(len(lines))
        lines.insert(i, lines[i])
        return b"\n".join(lines)

    def line_swap(self, data: bytes) -> bytes:
        lines = data.split(b"\n")
        i, j = self.rng.randrange(len(lines)), self.rng.randrange(len(lines))
        lines[i], lines[j] = lines[j], lines[i]
        return b"\n".join(lines)

    def truncate(self, data: bytes) -> bytes:
        return data[: self.rng.randrange(len(data) + 1)]

    def indent_shift(self, data: bytes) -> bytes:
        lines = data.split(b"\n")
        i = self.rng.randrange(len(lines))
        lines[i] = self.rng.choice((b" ", b"   ", b"")) + lines[i].lstrip(b" ") if self.rng.random() < 0.5 \
            else b" " + lines[i]
        return b"\n".join(lines)

    # -- hostile shapes

    def deep_parens(self, data: bytes) -> bytes:
        return _replace_expression(data, _nest_parens(self.rng.choice((50, 200, 1000, 10_000, 100_000))))

    def deep_unary(self, data: bytes) -> bytes:
        n = self.rng.choice((50, 500, 5000, 100_000))
        op = self.rng.choice((b"-", b"+", b"- ", b"-+"))
        return _replace_expression(data, op * n + b"chat")

    def deep_yaml(self, data: bytes) -> bytes:
        n = self.rng.choice((40, 70, 200, 2000, 50_000))
        style = self.rng.randrange(3)
        if style == 0:
            nested = b"[" * n + b"1" + b"]" * n
        elif style == 1:
            nested = b"{a: " * n + b"1" + b"}" * n
        else:
            nested = b"".join(b"\n" + b" " * (2 * (i + 1)) + b"k:" for i in range(min(n, 400))) + b" 1"
        return data + b"\nextra: " + nested + b"\n"

    def huge_number(self, data: bytes) -> bytes:
        big = self.rng.choice((b"1e400", b"-1e400", b"1e-400", b"9" * 400, b"1" + b"0" * 400,
                               b"1" + b"0" * 5000 + b".5", b"0." + b"0" * 400 + b"1", b"1e99999999999",
                               b"18446744073709551616", b"-9223372036854775809", b"0x" + b"f" * 300))
        matches = list(_NUMBER.finditer(data))
        if not matches:
            return data + b"\nparams: {big: " + big + b"}\n"
        m = self.rng.choice(matches)
        return data[: m.start()] + big + data[m.end():]

    def long_name(self, data: bytes) -> bytes:
        long = b"n" * self.rng.choice((1000, 100_000))
        matches = list(_NAME.finditer(data))
        if not matches:
            return data + b"\n" + long + b": 1\n"
        chosen = self.rng.choice(matches).group()
        if self.rng.random() < 0.5:  # every occurrence: a consistent, valid but huge name
            return re.sub(rb"\b" + re.escape(chosen) + rb"\b", long, data)
        m = self.rng.choice(matches)
        return data[: m.start()] + long + data[m.end():]

    def nul_bytes(self, data: bytes) -> bytes:
        i = self.rng.randrange(len(data) + 1)
        return data[:i] + b"\x00" * self.rng.randint(1, 3) + data[i:]

    def invalid_utf8(self, data: bytes) -> bytes:
        bad = self.rng.choice((b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
                               b"\x80", b"\xe2\x82", b"\xc0\xaf"))
        i = self.rng.randrange(len(data) + 1)
        return data[:i] + bad + data[i:]

    def alias_bomb(self, data: bytes) -> bytes:
        bomb = _billion_laughs(self.rng.choice((3, 9, 12)), self.rng.choice((2, 9, 20)))
        where = self.rng.randrange(3)
        if where == 0:
            return bomb + data
        if where == 1:
            return data + b"\n" + bomb
        return data + b"\nparams:\n  big: &x [1, 2]\n  more: *x\n"

    def python_tag(self, data: bytes) -> bytes:
        target = str(self.sentinel).encode()
        tag = self.rng.choice((
            b"!!python/object/apply:os.system [\"touch " + target + b"\"]",
            b"!!python/object/apply:subprocess.check_call [[touch, " + target + b"]]",
            b"!!python/object/new:os.system [\"touch " + target + b"\"]",
            b"!!python/name:os.system",
            b"!!python/module:os",
            b"!!python/object:__main__.X {a: 1}",
            b"!<tag:yaml.org,2002:python/object/apply:os.system> [\"touch " + target + b"\"]",
        ))
        lines = data.split(b"\n")
        candidates = [i for i, line in enumerate(lines) if re.match(rb"^\s*[A-Za-z_]+:\s*\S", line)]
        if candidates and self.rng.random() < 0.7:
            i = self.rng.choice(candidates)
            key, _, _ = lines[i].partition(b":")
            lines[i] = key + b": " + tag
            return b"\n".join(lines)
        return data + b"\nseed: " + tag + b"\n"

    def merge_key(self, data: bytes) -> bytes:
        return data + self.rng.choice((
            b"\nbase_defaults: &d {kind: lora, rank: 4}\nadapters:\n  x:\n    <<: *d\n    path: fixtures/lora_r4\n",
            b"\nparams:\n  <<: {lam: 0.4}\n",
            b"\n<<: {peftdsl: 1}\n",
            b"\nadapters:\n  <<: [*nothing]\n",
        ))

    def multi_document(self, data: bytes) -> bytes:
        return self.rng.choice((
            data + b"\n---\n" + data,
            b"---\n" + data + b"\n...\n",
            b"--- !!python/object/apply:os.system [\"true\"]\n" + data,
            data + b"\n---\n",
            b"%YAML 1.2\n---\n" + data,
            b"%YAML 9.9\n---\n" + data,
        ))

    def tabs(self, data: bytes) -> bytes:
        if self.rng.random() < 0.5:
            return re.sub(rb"(?m)^  ", b"\t", data, count=self.rng.randint(1, 5))
        return data.replace(b": ", b":\t", self.rng.randint(1, 5))

    def line_endings(self, data: bytes) -> bytes:
        return self.rng.choice((data.replace(b"\n", b"\r\n"), data.replace(b"\n", b"\r"),
                                b"\xef\xbb\xbf" + data, data.replace(b"\n", b"\xe2\x80\xa8", 2),
                                "\ufeff".encode("utf-16") + data.decode("utf-8", "replace").encode("utf-16")))

    def duplicate_key(self, data: bytes) -> bytes:
        lines = data.split(b"\n")
        keys = [i for i, line in enumerate(lines) if re.match(rb"^[A-Za-z_]+:", line)]
        if not keys:
            return data
        i = self.rng.choice(keys)
        return b"\n".join(lines + [lines[i]])


# ----------------------------------------------------------------------- hypothesis strategies


def strategies():
    """``expressions()`` over the grammar and ``recipe_documents()`` over the YAML schema."""
    from hypothesis import strategies as st

    from peftdsl.operators import OPERATORS

    names = st.sampled_from(["chat", "toxic", "ia", "lam", "mix", "base", "undefined_name", "svd", "x" * 300])
    numbers = st.one_of(st.integers(0, 10**6).map(str),
                        st.floats(allow_nan=False, allow_infinity=False, min_value=0).map(repr),
                        st.sampled_from(["1e400", "1e-400", "0.0", "0", "9" * 400, ".5", "5."]))
    strings = st.sampled_from(['"total"', '"frequency"', "'total'", '"most"', '""'])
    functions = st.sampled_from([*OPERATORS, "nope"])
    keywords = st.sampled_from(sorted({k.name for op in OPERATORS.values() for k in op.keywords} | {"rnak"}))

    def extend(inner):
        binary = st.tuples(inner, st.sampled_from(["+", "-", "*", "/"]), inner).map(lambda t: f"{t[0]} {t[1]} {t[2]}")
        unary = st.tuples(st.sampled_from(["-", "+"]), inner).map("".join)
        parens = inner.map(lambda e: f"({e})")
        kwarg = st.tuples(keywords, st.one_of(numbers, strings, inner)).map(lambda t: f"{t[0]}={t[1]}")
        call = st.tuples(functions, st.lists(st.one_of(inner, kwarg), max_size=4)).map(
            lambda t: f"{t[0]}({', '.join(t[1])})")
        return st.one_of(binary, unary, parens, call)

    expressions = st.recursive(st.one_of(names, numbers), extend, max_leaves=25)
    junk = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=20),
                     st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(),
                                                                         max_size=2))
    adapter_paths = st.sampled_from(["fixtures/lora_r4", "fixtures/lora_r4b", "fixtures/lora_r8", "fixtures/ia3",
                                     "fixtures/dora", "fixtures/pickled", "fixtures/truncated", "fixtures/loha",
                                     "fixtures/no_config", "fixtures/broken_config", "fixtures/rank_lie",
                                     "fixtures/lora_wide", "fixtures/gpt2_lora", "fixtures/not_a_folder.txt",
                                     "missing", "/", "hf:org/name@main", "hf:", ""])
    long_adapter = st.fixed_dictionaries({"path": adapter_paths}, optional={
        "kind": st.one_of(st.sampled_from(["lora", "ia3", "dense"]), junk),
        "rank": st.one_of(st.integers(-3, 64), junk),
        "sha256": st.one_of(st.just("0" * 64), st.text(max_size=70), junk),
    })
    adapter_names = st.sampled_from(["chat", "toxic", "ia", "base", "1bad", "lam"])
    adapters = st.dictionaries(adapter_names, st.one_of(adapter_paths, long_adapter, junk), max_size=4)
    compose_names = st.sampled_from(["mix", "small", "detox", "chat", "base"])
    output = st.one_of(st.sampled_from(["out/a", "out/b", ""]),
                       st.fixed_dictionaries({"path": st.sampled_from(["out/m", ""])}, optional={
                           "merge": st.one_of(st.booleans(), junk),
                           "dtype": st.sampled_from(["float32", "bfloat16", "int8", "float16"])}), junk)
    eval_entry = st.fixed_dictionaries({
        "name": st.sampled_from(["ppl", "acc", "bad name"]),
        "models": st.one_of(st.lists(st.sampled_from(["base", "chat", "mix", "nope"]), max_size=3), junk),
        "metric": st.sampled_from(["perplexity", "accuracy", "generate", "bleu"]),
        "data": st.sampled_from(["fixtures/data/toxic.txt", "fixtures/data/sst2.jsonl", "missing.txt"]),
    }, optional={"batch_size": st.one_of(st.integers(-1, 8), junk), "labels": junk})
    sweep = st.fixed_dictionaries({}, optional={
        "lam": st.one_of(st.lists(st.floats(allow_nan=True), max_size=4), junk),
        "select": st.one_of(st.fixed_dictionaries({"eval": st.just("ppl"), "model": compose_names,
                                                   "goal": st.sampled_from(["min", "max", "avg"])}), junk),
    })
    recipe = st.fixed_dictionaries({"peftdsl": st.one_of(st.just(1), st.just(1), junk)}, optional={
        "name": st.one_of(st.sampled_from(["r", "bad name"]), junk),
        "base": st.one_of(st.sampled_from(["fixtures/base", "missing"]), junk),
        "seed": st.one_of(st.integers(-1, 2**64), junk),
        "adapters": st.one_of(adapters, junk),
        "params": st.one_of(st.dictionaries(st.sampled_from(["lam", "mu", "chat"]),
                                            st.one_of(st.floats(), st.integers(), junk), max_size=3), junk),
        "compose": st.one_of(st.dictionaries(compose_names, st.one_of(expressions, junk), max_size=3), junk),
        "outputs": st.one_of(st.dictionaries(compose_names, output, max_size=2), junk),
        "eval": st.one_of(st.lists(eval_entry, max_size=2), junk),
        "sweep": st.one_of(sweep, junk),
        "unknown": junk,
    })
    return expressions, recipe


def _dump_expression_recipe(expression: str) -> bytes:
    return (
        "peftdsl: 1\nbase: fixtures/base\nadapters:\n  chat: fixtures/lora_r4\n  toxic: fixtures/lora_r8\n"
        "  ia: fixtures/ia3\nparams:\n  lam: 0.4\ncompose:\n  mix: " + json.dumps(expression) + "\n"
        "outputs:\n  mix: out/mix\n"
    ).encode()


def _dump_document(document: dict, flow: bool) -> bytes:
    import yaml

    return yaml.safe_dump(document, default_flow_style=flow, sort_keys=False, allow_unicode=True).encode()


# ----------------------------------------------------------------------- running a case


@dataclass
class Case:
    name: str
    data: bytes
    folder: Path
    argv: tuple[str, ...] = ("lint",)


@dataclass
class Outcome:
    case: str
    command: str
    status: int | None
    seconds: float
    failure: str | None = None  # why this case fails the fuzz run, or None


class _CaseTimeout(BaseException):
    pass


def _alarm(signum, frame):  # noqa: ARG001
    raise _CaseTimeout()


def run_case(case: Case, *, case_limit: float = 30.0) -> Outcome:
    """Write ``case`` to a file and run the CLI on it in process, output captured."""
    from peftdsl.cli import main

    path = case.folder / "fuzzcase.yaml"
    path.write_bytes(case.data)
    argv = [case.argv[0], str(path), *case.argv[1:]]
    out, err = io.StringIO(), io.StringIO()
    failure = None
    status: int | None = None
    use_alarm = hasattr(signal, "SIGALRM") and case_limit > 0
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, case_limit)
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            status = main(argv)
    except SystemExit as exit_:  # argparse
        status = exit_.code if isinstance(exit_.code, int) else 2
    except _CaseTimeout:
        failure = f"no answer within {case_limit:g} s"
    except BaseException as exc:  # noqa: BLE001 - a traceback is exactly what we are looking for
        failure = f"raised {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        seconds = time.perf_counter() - start
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    if status in (130, 143):  # the CLI caught our own Ctrl-C or SIGTERM: stop fuzzing, do not count a case
        raise KeyboardInterrupt
    stderr = err.getvalue()
    if failure is None and "internal error" in stderr:
        failure = "internal error: " + stderr.split("internal error", 1)[1].strip().splitlines()[0][:200]
    if failure is None and "Traceback" in stderr + out.getvalue():
        failure = "printed a traceback"
    if failure is None and status not in ALLOWED_STATUSES:
        failure = f"exit status {status}"
    return Outcome(case.name, " ".join(case.argv), status, seconds, failure)


# ----------------------------------------------------------------------- generating cases


def lint_argv(rng: random.Random) -> tuple[str, ...]:
    roll = rng.random()
    if roll < 0.06:
        return ("explain",) if rng.random() < 0.5 else ("explain", "--no-inputs")
    argv = ["lint", "--format", rng.choice(FORMATS)]
    if rng.random() < 0.15:
        argv.append("--no-inputs")
    if rng.random() < 0.1:
        argv.append("--strict")
    return tuple(argv)


def mutation_cases(ws: Workspace, count: int, seed: int) -> Iterator[Case]:
    rng = random.Random(seed)
    mutator = Mutator(rng, ws.sentinel)
    for i in range(count):
        source = rng.choice(ws.seeds)
        data, ops = mutator.mutate(source.text.encode("utf-8"))
        yield Case(f"m{i}:{source.label}:{'+'.join(ops)}", data, source.folder, lint_argv(rng))


def hypothesis_cases(ws: Workspace, count: int, seed: int, kind: str) -> Iterator[Case]:
    """Draw ``count`` examples from a hypothesis strategy (``expression`` or ``document``)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    if count <= 0:  # hypothesis refuses max_examples=0 (`--cases 0`: surfaces only)
        return
    expressions, documents = strategies()
    drawn: list[bytes] = []
    if kind == "expression":
        strategy = expressions.map(_dump_expression_recipe)
    else:
        strategy = st.tuples(documents, st.booleans()).map(lambda t: _dump_document(*t))

    @hseed(seed)
    @settings(max_examples=count, database=None, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(data):
        drawn.append(data)

    collect()
    rng = random.Random(seed)
    folder = ws.root / "corpus"
    for i, data in enumerate(drawn[:count]):
        yield Case(f"h{kind[0]}{i}", data, folder, lint_argv(rng))


def run_sample(ws: Workspace, count: int, seed: int, *, case_limit: float) -> list[Outcome]:
    """Mutants of runnable seeds, through `run --no-eval --force` with real tiny adapters."""
    rng = random.Random(seed + 1)
    mutator = Mutator(rng, ws.sentinel)
    runnable = [s for s in ws.seeds if s.runnable]
    outcomes = []
    report = ws.root / "reports"
    for i in range(count):
        source = runnable[i % len(runnable)]
        gentle = [mutator.token_swap, mutator.huge_number, mutator.line_duplicate, mutator.byte_flip]
        data = source.text.encode()
        ops = []
        if i % 3:  # a third run unchanged seeds: the run path proper, not only its refusals
            op = rng.choice(gentle)
            data, ops = op(data), [op.__name__]
        case = Case(f"r{i}:{source.label}:{'+'.join(ops) or 'as-is'}", data, source.folder,
                    ("run", "--quiet", "--no-eval", "--force", "--device", "cpu", "--report", str(report)))
        outcomes.append(run_case(case, case_limit=case_limit))
    return outcomes


# ----------------------------------------------------------------------- hostile safetensors headers
#
# A valid adapter's weights file, mutated at the header (offsets, dtypes, shapes, names,
# `__metadata__`, the declared length, the JSON text itself) and at the bytes around it,
# then linted. Besides the common oracle (no traceback, no internal error, status 0 or
# 1), the safetensors library is the reference: a file it refuses must be refused (exit 1,
# error[I304] naming the file). `header_cases` is the generator `fuzz()` registers;
# `header_fuzz` runs this surface alone, through the CLI and the API.

HEADER_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "F8_E8M0",
                 "F4", "F6_E2M3", "C64", "U16", "f32", "", "F17", None, 4, ["F32"]]
HEADER_NUMBERS = [0, 1, -1, 2, 7, 8, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, 2**64 + 1, 10**30, 1.5, -0.0, True,
                  None, "8", [8], float("nan")]


def _header_parts(raw: bytes) -> tuple[dict, bytes]:
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _header_file(header_text: bytes, data: bytes, length: int | None = None) -> bytes:
    return (len(header_text) if length is None else length).to_bytes(8, "little") + header_text + data


class HeaderMutator:
    """Seeded mutations of a safetensors file; each returns new file bytes."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.operators = [self.offsets, self.offsets, self.dtype, self.shape, self.shape, self.field, self.name,
                          self.metadata, self.metadata, self.duplicate, self.length, self.length, self.data,
                          self.text_flip, self.nesting, self.constants]

    def mutate(self, raw: bytes) -> tuple[bytes, list[str]]:
        names = []
        for _ in range(self.rng.choice((1, 1, 1, 2, 3))):
            op = self.rng.choice(self.operators)
            try:
                raw = op(raw)
            except (ValueError, KeyError, IndexError, TypeError, OverflowError, RecursionError):  # not JSON: skip
                continue
            names.append(op.__name__)
        return raw, names

    def _entry(self, header: dict) -> str:
        keys = [k for k in header if k != "__metadata__"]
        return self.rng.choice(keys) if keys else "__none__"

    def _number(self, old):
        roll = self.rng.random()
        if roll < 0.4 and isinstance(old, int) and not isinstance(old, bool):
            return old + self.rng.choice((-8, -4, -2, -1, 1, 2, 4, 8, 64))
        return self.rng.choice(HEADER_NUMBERS)

    def _rewrite(self, raw: bytes, edit) -> bytes:
        header, data = _header_parts(raw)
        header = edit(header)
        return _header_file(json.dumps(header).encode(), data)

    def offsets(self, raw: bytes) -> bytes:
        def edit(h):
            key = self._entry(h)
            entry = dict(h.get(key) or {})
            offsets = list(entry.get("data_offsets") or [0, 0])
            roll = self.rng.random()
            if roll < 0.15:
                offsets.reverse()
            elif roll < 0.25:
                offsets = offsets[: self.rng.choice((0, 1))] + ([] if self.rng.random() < 0.5 else [0, 0])
            else:
                i = self.rng.randrange(2) if len(offsets) == 2 else 0
                offsets[i:i + 1] = [self._number(offsets[i] if offsets else 0)]
            entry["data_offsets"] = offsets
            return {**h, key: entry}
        return self._rewrite(raw, edit)

    def dtype(self, raw: bytes) -> bytes:
        return self._rewrite(raw, lambda h: {**h, (k := self._entry(h)): {**(h.get(k) or {}),
                                                                            "dtype": self.rng.choice(HEADER_DTYPES)}})

    def shape(self, raw: bytes) -> bytes:
        def edit(h):
            key = self._entry(h)
            entry = dict(h.get(key) or {})
            shape = list(entry.get("shape") or [])
            roll = self.rng.random()
            if roll < 0.2 and shape:
                shape.pop(self.rng.randrange(len(shape)))
            elif roll < 0.4:
                shape.insert(self.rng.randrange(len(shape) + 1), self.rng.choice((0, 1, 2, 2**40)))
            elif roll < 0.5:
                shape = shape[::-1]
            elif roll < 0.6:
                shape = self.rng.choice((None, 4, "4", {"a": 1}, [[4]], [2**33, 2**33, 2**33]))
            elif shape:
                i = self.rng.randrange(len(shape))
                shape[i] = self._number(shape[i])
            entry["shape"] = shape
            return {**h, key: entry}
        return self._rewrite(raw, edit)

    def field(self, raw: bytes) -> bytes:
        def edit(h):
            key = self._entry(h)
            entry = dict(h.get(key) or {})
            name = self.rng.choice(("dtype", "shape", "data_offsets"))
            if self.rng.random() < 0.5:
                entry.pop(name, None)
            else:
                entry["extra"] = self.rng.choice((1, "x", None, [1], {"k": "v"}))
            value = self.rng.choice((entry, entry, None, [], "entry", 7, [entry]))
            return {**h, key: value}
        return self._rewrite(raw, edit)

    def name(self, raw: bytes) -> bytes:
        def edit(h):
            key = self._entry(h)
            new = self.rng.choice(("", "__metadata__", "x" * 100_000, "\u0000", "\udc80"[:0] + "é" * 10,
                                   key + ".lora_A.weight", "base_model.model.x.lora_B.weight", "../" * 50))
            return {(new if k == key else k): v for k, v in h.items()}
        return self._rewrite(raw, edit)

    def metadata(self, raw: bytes) -> bytes:
        value = self.rng.choice(([["format", "pt"]], "pt", 7, None, {"format": 1}, {"format": None},
                                 {"format": ["pt"]}, {"format": {"a": "b"}}, {"a" * 1000: "b" * 1000},
                                 {str(i): "v" for i in range(2000)}, {}, {"format": "pt"}))
        return self._rewrite(raw, lambda h: {**h, "__metadata__": value})

    def duplicate(self, raw: bytes) -> bytes:
        header, data = _header_parts(raw)
        keys = list(header)
        key, donor = self.rng.choice(keys), self.rng.choice(keys)
        text = json.dumps(header).encode()[:-1] + b", " + json.dumps(key).encode() + b": " \
            + json.dumps(header[donor]).encode() + b"}"
        return _header_file(text, data)

    def length(self, raw: bytes) -> bytes:
        header_len = int.from_bytes(raw[:8], "little")
        new = self.rng.choice((0, 1, 7, header_len - 1, header_len + 1, header_len + 8, len(raw), len(raw) - 8,
                               len(raw) - 7, 100_000_000, 100_000_001, 2**63, 2**64 - 1))
        return min(max(new, 0), 2**64 - 1).to_bytes(8, "little") + raw[8:]

    def data(self, raw: bytes) -> bytes:
        roll = self.rng.random()
        cut = self.rng.randrange(len(raw) + 1)
        if roll < 0.4:
            return raw[:cut]
        if roll < 0.7:
            return raw + b"\0" * self.rng.choice((1, 4, 8, 4096))
        return raw[:cut] + raw[cut + self.rng.choice((1, 4, 8)):]

    def text_flip(self, raw: bytes) -> bytes:
        header_len = int.from_bytes(raw[:8], "little")
        data = bytearray(raw)
        if 8 + header_len > len(data) or not header_len:
            return raw
        for _ in range(self.rng.choice((1, 1, 2, 5))):
            i = 8 + self.rng.randrange(header_len)
            data[i] = self.rng.choice((0, 0x22, 0x2C, 0x5B, 0x5D, 0x7B, 0x7D, 0x80, 0xFF, self.rng.randrange(256)))
        return bytes(data)

    def nesting(self, raw: bytes) -> bytes:
        _, data = _header_parts(raw)
        depth = self.rng.choice((100, 5000, 100_000))
        text = b'{"x": ' + b"[" * depth + b"]" * depth + b"}"
        return _header_file(text, data)

    def constants(self, raw: bytes) -> bytes:
        header, data = _header_parts(raw)
        text = json.dumps(header).encode()
        word = self.rng.choice((b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-0", b"1" * 5000))
        text = re.sub(rb"\d+", word, text, count=self.rng.choice((1, 3)))
        return _header_file(text, data)


HEADER_RECIPE = b"peftdsl: 1\nadapters:\n  a: hdr\n  b: fixtures/lora_r4b\ncompose:\n  m: 0.5 * a + b\n" \
                b"outputs:\n  m: out/m\n"


def _header_target(ws: Workspace) -> tuple[Path, Path, bytes]:
    """(the folder of the case recipe, the mutated adapter's weights, the valid weights' bytes)."""
    folder = ws.root / "corpus"
    adapter = folder / "hdr"
    if not adapter.exists():
        adapter.mkdir()
        source = folder / "fixtures" / "lora_r4"
        shutil.copy(source / "adapter_config.json", adapter / "adapter_config.json")
        shutil.copy(source / "adapter_model.safetensors", adapter / "pristine.safetensors")
    return folder, adapter / "adapter_model.safetensors", (adapter / "pristine.safetensors").read_bytes()


def header_cases(ws: Workspace, count: int, seed: int) -> Iterator[Case]:
    """Lint cases over a mutated adapter file: each writes the file before it is yielded (the
    caller runs a case before it draws the next), so the common `run_case` lints it."""
    rng = random.Random(seed + 14)
    mutator = HeaderMutator(rng)
    folder, weights, pristine = _header_target(ws)
    for i in range(count):
        data, ops = mutator.mutate(pristine) if i % 50 else (pristine, [])
        weights.write_bytes(data)
        yield Case(f"s{i}:{'+'.join(ops) or 'valid'}", HEADER_RECIPE, folder, lint_argv(rng))


def library_refuses(path: Path) -> bool:
    """The reference: whether the safetensors library refuses to open `path` and read it whole."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has keys(), not __iter__
                handle.get_tensor(key)
            handle.metadata()
    except Exception:  # noqa: BLE001 - any refusal counts
        return True
    return False


def _api_outcome(case: Case, refused: bool) -> str | None:
    """The same case through the Python API: `peftdsl.load` returns, never raises, and has an
    I304 error when the library refuses the file (`refused`)."""
    import peftdsl

    path = case.folder / "fuzzcase.yaml"
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            recipe = peftdsl.load(path)
    except BaseException as exc:  # noqa: BLE001 - what the API must never raise
        return f"API raised {type(exc).__name__}: {str(exc)[:200]}"
    if refused and not any(d.code == "I304" for d in recipe.errors):
        return "the API accepted a file the safetensors library refuses"
    return None


def header_fuzz(ws: Workspace, *, cases: int, seed: int, case_limit: float = 30.0, api_every: int = 10,
                progress: bool = False) -> Summary:
    """This surface alone: every case through the CLI (lint/explain), every `api_every`-th through
    the API too, and the library's verdict as the reference for refusals."""
    summary = Summary()
    start = time.perf_counter()
    _, weights, _ = _header_target(ws)
    for i, case in enumerate(header_cases(ws, cases, seed)):
        outcome = run_case(case, case_limit=case_limit)
        refused = library_refuses(weights)
        if outcome.failure is None and outcome.command.startswith("lint") and "--no-inputs" not in outcome.command \
                and outcome.status == 0 and refused:
            outcome.failure = "lint accepted a file the safetensors library refuses"
        if outcome.failure is None and i % api_every == 0:
            outcome.failure = _api_outcome(case, refused)
        summary.add(outcome)
        if progress and summary.cases % 1000 == 0:
            print(f"  {summary.cases} header cases, {len(summary.failures)} failures, "
                  f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    summary.seconds = time.perf_counter() - start
    return summary

# ----------------------------------------------------------------------- surfaces
#
# A surface is a generator of cases for one part of the product, run by `fuzz_surfaces`
# with the same oracle as the lint cases (`run_case`, or `run_api_case` for library
# calls). Each is one function plus one line in SURFACES.

_HEAD_SOURCES = ["fixtures/head_a", "fixtures/head_b", "fixtures/lora_r4", "fixtures/lora_r4b", "fixtures/ia3"]
_COEFFICIENTS = ["0.5", "1", "-1", "0.3", "0.7", "2", "0", "1e-30", "1e30", "lam", "(1 - lam)", "-lam", "1e400"]


def _linear(rng: random.Random, names: list[str]) -> str:
    """A weighted sum over `names` (one to four terms), sometimes inside an operator."""
    terms = [f"{rng.choice(_COEFFICIENTS)} * {rng.choice(names)}" for _ in range(rng.randint(1, 4))]
    expression = " + ".join(terms) if rng.random() < 0.7 else " - ".join(terms)
    roll = rng.random()
    if roll < 0.15:
        return f"svd({expression}, rank={rng.choice([1, 2, 4, 8, 0, -1, 10**6])})"
    if roll < 0.25:
        return f"{rng.choice(['pem', 'peft_linear'])}({expression})"
    if roll < 0.35:
        return f"{rng.choice(['ties', 'dare_linear', 'dare_ties', 'magnitude_prune'])}({expression}, " \
               f"density={rng.choice(['0.5', '0', '1', '1.5', '-0.1', 'lam'])})"
    return expression


def _output_lines(rng: random.Random, names: list[str]) -> list[str]:
    lines = ["outputs:"]
    for name in rng.sample(names, rng.randint(1, len(names))):
        merge = rng.random() < 0.5
        dtype = rng.choice(["", "float32", "bfloat16", "float16"])
        body = f"{{path: out/{name}" + (", merge: true" if merge else "") + (f", dtype: {dtype}" if dtype else "") + "}"
        lines.append(f"  {name}: {body}")
    return lines


def _maybe_mutate(rng: random.Random, mutator: Mutator, text: str) -> tuple[bytes, str]:
    data = text.encode()
    if rng.random() < 0.3:
        op = rng.choice(mutator.operators)
        return op(data), op.__name__
    return data, "clean"


def _surface_argv(rng: random.Random, ws: Workspace, run_share: float) -> tuple[str, ...]:
    if rng.random() < run_share:
        return ("run", "--quiet", "--no-eval", "--force", "--device", "cpu", "--report", str(ws.root / "reports"))
    return lint_argv(rng)


def head_cases(ws: Workspace, count: int, seed: int, run_share: float = 0.05) -> Iterator[Case]:
    """Recipes over adapters that save `lm_head` (modules_to_save), mixed with plain LoRA and (IA)³:
    affine and non-affine weights, operators, adapter and merged outputs, a base or none."""
    rng = random.Random(seed)
    mutator = Mutator(rng, ws.sentinel)
    for i in range(count):
        sources = rng.sample(_HEAD_SOURCES, rng.randint(1, 4))
        names = [f"s{j}" for j in range(len(sources))]
        lines = ["peftdsl: 1", f"seed: {rng.randint(0, 3)}"]
        if rng.random() < 0.8:
            lines.append("base: fixtures/base")
        lines += ["adapters:", *(f"  {n}: {p}" for n, p in zip(names, sources, strict=True))]
        lines += ["params:", f"  lam: {rng.choice(['0.4', '0.5', '1', '-2'])}", "compose:"]
        comps = [f"c{j}" for j in range(rng.randint(1, 3))]
        lines += [f"  {c}: {_linear(rng, names + comps[:j])}" for j, c in enumerate(comps)]
        lines += _output_lines(rng, comps)
        data, how = _maybe_mutate(rng, mutator, "\n".join(lines) + "\n")
        yield Case(f"heads{i}:{how}", data, ws.root / "corpus", _surface_argv(rng, ws, run_share))


def full_cases(ws: Workspace, count: int, seed: int, run_share: float = 0.05) -> Iterator[Case]:
    """Full fine-tunes (`kind: full`, detected or declared, true or not) as task vectors beside
    LoRA: task arithmetic, LoRA extraction with svd(rank/keep/tol/rest), a missing or foreign base."""
    rng = random.Random(seed)
    mutator = Mutator(rng, ws.sentinel)
    for i in range(count):
        lines = ["peftdsl: 1"]
        lines.append("base: " + rng.choices(["fixtures/base", "fixtures/gpt2_base", "missing"], [8, 1, 1])[0]
                     if rng.random() < 0.9 else "seed: 1")
        full = rng.choice(["fixtures/full_ft", "fixtures/full_ft", "fixtures/lora_r4", "fixtures/base"])
        kind = rng.choice(["", "", "full", "lora", "dense"])
        lines += ["adapters:", f"  ft: {{path: {full}" + (f", kind: {kind}" if kind else "") + "}",
                  "  ft2: fixtures/full_ft", "  lo: fixtures/lora_r4", "params:", "  lam: 0.5", "compose:"]
        x = _linear(rng, ["ft", "ft2", "lo"])
        lines.append(f"  task: {x}")
        options = [f"rank={rng.choice([1, 4, 16, 0])}"]
        options += rng.sample([f"keep={rng.choice(['0.9', '1', '0', '1.5'])}", f"tol={rng.choice(['0.01', '0', '-1'])}",
                               f'rest="{rng.choice(["save", "drop", "keep"])}"'], rng.randint(0, 2))
        lines.append(f"  small: svd(task, {', '.join(options)})")
        lines += _output_lines(rng, ["task", "small"])
        data, how = _maybe_mutate(rng, mutator, "\n".join(lines) + "\n")
        yield Case(f"full{i}:{how}", data, ws.root / "corpus", _surface_argv(rng, ws, run_share))


# -- the library, called with hostile arguments

_API_RECIPE = """peftdsl: 1
base: fixtures/base
adapters:
  a: fixtures/lora_r4
  b: fixtures/lora_r4b
  h: fixtures/head_a
  i: fixtures/ia3
params:
  lam: 0.4
compose:
  mix: a - lam * b
  small: svd(mix, rank=2)
  heads: 0.5 * h + 0.5 * a
  scale: 2 * i
outputs:
  small: out/api-small
  mix: {path: out/api-merged, merge: true}
"""


def _hostile_values(ws: Workspace) -> list:
    nan, inf = float("nan"), float("inf")
    return [None, 0, -1, 1, True, 10**400, -10**400, 1e308, nan, inf, -inf, -0.0, "", "\0", "x" * 5000,
            "mix", "a", "base", "small", "heads", "scale", "lam", "cpu", "cuda", "cuda:99", "tpu", "auto",
            b"bytes", [], ["mix"], ["nope"], {}, {"lam": nan}, {"lam": inf}, {"lam": 10**400}, {"lam": "0.3"},
            {"lam": None}, {1: 2.0}, {"nope": 1.0}, {"lam": 0.7}, object(), Path("/dev/zero"), "/etc/passwd",
            "/proc/self/mem", "/", str(ws.root / "corpus" / "fixtures" / "lora_r4"), "out/api-x",
            str(ws.root / "corpus" / "out" / "api-saved"), "~nouser/x", 3.5, (1, 2), {"a": None},
            {"a": {"x": 1}}, {"zz": (object(), None)}, {"base": {}}, "hf:org/name"]


def _api_call(rng: random.Random, ws: Workspace, values: list):
    """A random call of `peftdsl`'s API (docs/api.md), each argument hostile with probability
    0.4 (else a valid value, so that calls reach deep): (label, thunk)."""
    import peftdsl

    def v(valid):
        return rng.choice(values) if rng.random() < 0.4 else valid

    folder = ws.root / "corpus"
    good = folder / "api.yaml"
    out = str(folder / "out" / f"api-{rng.randrange(4)}")
    choice = rng.randrange(9)

    def recipe():
        return peftdsl.load(good, params=v(None) if rng.random() < 0.3 else None)

    def composition(name="mix"):
        return recipe().compose(v(name), device=v("cpu"), params=v(None) if rng.random() < 0.3 else None)

    if choice == 0:
        kwargs = {k: v(d) for k, d in rng.sample([("params", {"lam": 0.2}), ("adapters", None),
                                                   ("allow_pickle", False)], rng.randint(0, 3))}
        return f"load(path, {sorted(kwargs)})", lambda: peftdsl.load(v(good), **kwargs)
    if choice == 1:
        text = rng.choice([_API_RECIPE, v(_API_RECIPE), _API_RECIPE.replace("lora_r4", "\0"), _API_RECIPE * 2])
        return "loads(text, root)", lambda: peftdsl.loads(text, root=v(folder), params=v(None))
    if choice == 2:
        return "canonical(name)", lambda: recipe().canonical(v(rng.choice(["mix", "small", "heads", "a"])))
    if choice == 3:
        return "compose(name, device, params)", lambda: composition(rng.choice(["mix", "scale", "heads"]))
    if choice == 4:
        return "compose().deltas()", lambda: (composition(rng.choice(["mix", "small", "scale", "heads"])).deltas(),
                                              None)
    if choice == 5:
        return "compose().save(path, force)", lambda: composition(rng.choice(["small", "scale", "heads", "mix"])).save(
            v(out), force=v(True))
    if choice == 6:
        kwargs = {k: v(d) for k, d in rng.sample([("only", ["small"]), ("device", "cpu"), ("force", True),
                                                   ("report", str(folder / "out" / "api-report")),
                                                   ("executor", "local"), ("address", None), ("locked", False),
                                                   ("memory_guard", True)], rng.randint(1, 3))}
        kwargs.setdefault("force", True)
        return f"run({sorted(kwargs)})", lambda: recipe().run(no_eval=True, quiet=True, **kwargs)
    if choice == 7:
        return "compose().applied(model)", lambda: _enter(composition().applied(v(object())))
    return "Recipe properties", lambda: (recipe().compositions, recipe().outputs, repr(recipe()),
                                         recipe().raise_for_errors())


def _enter(context) -> None:
    with context:
        pass


def run_api_case(name: str, call, cwd: Path | None = None, *, case_limit: float = 30.0) -> Outcome:
    """One library call: it must return, or raise one of peftdsl's own errors (PeftdslError:
    RecipeError, UsageError …), never anything else, within `case_limit` seconds."""
    from peftdsl.errors import PeftdslError

    label, thunk = call
    failure, status = None, 0
    before = os.getcwd()
    if cwd is not None:  # hostile names are relative paths too: they land in `cwd`, never in a checkout
        cwd.mkdir(exist_ok=True)
        os.chdir(cwd)
    use_alarm = hasattr(signal, "SIGALRM") and case_limit > 0
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, case_limit)
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            thunk()
    except PeftdslError:
        status = 1
    except KeyboardInterrupt:  # ours (Ctrl-C, SIGTERM), not the call's
        raise
    except _CaseTimeout:
        failure = f"no answer within {case_limit:g} s"
    except BaseException as exc:  # noqa: BLE001 - anything else escaping the API is what we look for
        failure = f"raised {type(exc).__name__}: {str(exc)[:200]}"
    finally:
        seconds = time.perf_counter() - start
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        os.chdir(before)
    return Outcome(name, label, status, seconds, failure)


def api_cases(ws: Workspace, count: int, seed: int) -> Iterator[tuple[str, tuple, Path]]:
    (ws.root / "corpus" / "api.yaml").write_text(_API_RECIPE)
    rng = random.Random(seed)
    values = _hostile_values(ws)
    for i in range(count):
        yield f"api{i}", _api_call(rng, ws, values), ws.root / "cwd"


# name -> (generator of cases, runner of one case); one line per surface
SURFACES: dict[str, tuple[Callable, Callable]] = {
    "heads": (head_cases, run_case),
    "full": (full_cases, run_case),
    "api": (api_cases, lambda case, case_limit: run_api_case(*case, case_limit=case_limit)),
    "header": (header_cases, None),  # its own oracle, the safetensors library's verdict: header_fuzz
}


def fuzz_surfaces(ws: Workspace, names: list[str], *, cases: int, seed: int, case_limit: float = 30.0,
                  keep: Path | None = None) -> dict[str, Summary]:
    """`cases` cases of each surface in `names`; a summary per surface."""
    summaries = {}
    for name in names:
        generate, run_one = SURFACES[name]
        if run_one is None:
            summaries[name] = header_fuzz(ws, cases=cases, seed=seed, case_limit=case_limit)
            continue
        summary, start = Summary(), time.perf_counter()
        for case in generate(ws, cases, seed):
            outcome = run_one(case, case_limit=case_limit)
            if ws.sentinel.exists():
                outcome.failure = "a YAML tag ran code (sentinel file created)"
            summary.add(outcome)
            if outcome.failure and keep is not None and isinstance(case, Case):
                keep.mkdir(parents=True, exist_ok=True)
                (keep / f"{name}-{len(summary.failures):04d}.yaml").write_bytes(case.data)
        summary.seconds = time.perf_counter() - start
        summaries[name] = summary
    return summaries


# ----------------------------------------------------------------------- the report


@dataclass
class Summary:
    cases: int = 0
    failures: list[Outcome] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    slowest: Outcome | None = None
    seconds: float = 0.0
    by_command: Counter = field(default_factory=Counter)

    def add(self, outcome: Outcome) -> None:
        self.cases += 1
        self.statuses[outcome.status] += 1
        self.by_command[outcome.command.split()[0]] += 1
        if outcome.failure:
            self.failures.append(outcome)
        if self.slowest is None or outcome.seconds > self.slowest.seconds:
            self.slowest = outcome

    def as_dict(self) -> dict:
        return {"cases": self.cases, "failures": [vars(f) for f in self.failures],
                "statuses": {str(k): v for k, v in sorted(self.statuses.items(), key=str)},
                "commands": dict(self.by_command), "wall_s": round(self.seconds, 2),
                "slowest": vars(self.slowest) if self.slowest else None}


def fuzz(ws: Workspace, *, cases: int, seed: int, runs: int = 0, case_limit: float = 30.0,
         keep: Path | None = None, progress: bool = False) -> tuple[Summary, Summary]:
    """Run ``cases`` lint/explain cases and ``runs`` run cases; the sentinel must never appear."""
    lint, run = Summary(), Summary()
    n_hyp = cases // 10
    generators = [mutation_cases(ws, cases - 2 * n_hyp, seed),
                  hypothesis_cases(ws, n_hyp, seed, "expression"),
                  hypothesis_cases(ws, n_hyp, seed, "document"), header_cases(ws, n_hyp, seed)]
    start = time.perf_counter()
    for generator in generators:
        for case in generator:
            outcome = run_case(case, case_limit=case_limit)
            if ws.sentinel.exists():
                outcome.failure = "a YAML tag ran code (sentinel file created)"
            lint.add(outcome)
            if outcome.failure and keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                (keep / f"{len(lint.failures):04d}.yaml").write_bytes(case.data)
            if progress and lint.cases % 1000 == 0:
                print(f"  {lint.cases} cases, {len(lint.failures)} failures, "
                      f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    lint.seconds = time.perf_counter() - start
    start = time.perf_counter()
    if runs:
        for outcome in run_sample(ws, runs, seed, case_limit=max(case_limit, 120.0)):
            run.add(outcome)
    run.seconds = time.perf_counter() - start
    return lint, run


def _print(title: str, summary: Summary) -> None:
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(summary.statuses.items(), key=str))
    print(f"## {title}")
    print(f"cases          {summary.cases} ({', '.join(f'{k} {v}' for k, v in summary.by_command.items())})")
    print(f"failures       {len(summary.failures)}")
    print(f"exit statuses  {{{statuses}}}")
    if summary.slowest:
        print(f"slowest case   {summary.slowest.seconds:.3f} s ({summary.slowest.case}, {summary.slowest.command})")
    print(f"wall time      {summary.seconds:.1f} s"
          + (f" ({summary.seconds / summary.cases * 1000:.1f} ms a case)" if summary.cases else ""))
    for failure in summary.failures[:20]:
        print(f"  FAIL {failure.case} [{failure.command}]: {failure.failure}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="lint/explain cases (default 10000)")
    parser.add_argument("--runs", type=int, default=20, help="`run` cases (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--case-limit", type=float, default=30.0, help="seconds before a case counts as hung")
    parser.add_argument("--keep", type=Path, default=None, help="save failing cases here")
    parser.add_argument("--json", type=Path, default=None, help="write the summary as JSON")
    parser.add_argument("--surfaces", nargs="*", default=[], choices=sorted(SURFACES), metavar="NAME",
                        help=f"also fuzz these surfaces ({', '.join(SURFACES)}), --surface-cases each")
    parser.add_argument("--surface-cases", type=int, default=1000, help="cases per surface (default 1000)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.pop("PEFTDSL_DEBUG", None)
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 1000))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="peftdsl-fuzz-") as tmp:
        print(f"building the workspace in {tmp} …", file=sys.stderr)
        ws = build_workspace(Path(tmp))
        print(f"{len(ws.seeds)} seed recipes; fuzzing …", file=sys.stderr)
        lint, run = fuzz(ws, cases=args.cases, seed=args.seed, runs=args.runs, case_limit=args.case_limit,
                         keep=args.keep, progress=True)
        surfaces = fuzz_surfaces(ws, args.surfaces, cases=args.surface_cases, seed=args.seed,
                                 case_limit=args.case_limit, keep=args.keep)
        sentinel = ws.sentinel.exists()
        shutil.rmtree(ws.root / "reports", ignore_errors=True)
    print(f"# peftdsl fuzz: seed {args.seed}, python bench/fuzz.py {' '.join(argv or sys.argv[1:])}".rstrip())
    _print("lint / explain (in process)", lint)
    _print("run (in process, real tiny adapters)", run)
    for name, summary in surfaces.items():
        _print(f"surface {name}", summary)
    print(f"YAML tags ran code: {'YES' if sentinel else 'no'}")
    print(f"total wall time {time.perf_counter() - started:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "lint": lint.as_dict(), "run": run.as_dict(),
                                         "surfaces": {k: v.as_dict() for k, v in surfaces.items()},
                                         "sentinel": sentinel}, indent=2, default=str) + "\n")
    everything = [lint, run, *surfaces.values()]
    bad_status = set().union(*(set(s.statuses) for s in everything))
    ok = not any(s.failures for s in everything) and not sentinel and bad_status <= ALLOWED_STATUSES
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
