"""The recipe corpus: every file in tests/corpus/ says, beside each offending line, what lint reports.

A line ending in `# expect: error[T401]` (or several, comma-separated) expects those
diagnostics with their primary span starting on that line; a diagnostic at offset 0
(a missing `peftdsl:`) is expected on line 1. The runner lints each file through the
CLI's concise output, and compares exactly: nothing missing, nothing extra. A file with
no expectation must lint clean. A comment `# corpus: --no-inputs` adds that flag.

Recipes refer to adapters as `fixtures/lora_r4` etc.: they are linted from a temporary
folder that holds the session's fixtures (tests/conftest.py), copied beside them.

Golden full renderings of some files live in tests/golden/full/. After an intended change,
run `PEFTDSL_REGEN_GOLDEN=1 python -m pytest tests/test_corpus.py` and review the diff.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest

from peftdsl.cli import main
from peftdsl.diagnostics import CODES

CORPUS = Path(__file__).resolve().parent / "corpus"
GOLDEN = Path(__file__).resolve().parent / "golden" / "full"
FILES = sorted(p.name for p in CORPUS.glob("*.yaml"))

# Codes that only `peftdsl run` can produce: checksums and pins, and failures while running.
RUN_ONLY = {"I309", "I311", "R601", "R602", "R603"}
# codes only a missing optional extra gives (tests/test_search.py uninstalls it to see them)
MISSING_EXTRA_ONLY = {"E504"}

_EXPECT = re.compile(r"#\s*expect:\s*(.*)$")
_ITEM = re.compile(r"^(error|warning|note)\[([A-Z]\d{3})\]$")
_CONCISE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): (?P<sev>error|warning|note)\[(?P<code>[A-Z]\d{3})\] ")
_OPTIONS = re.compile(r"#\s*corpus:\s*(.*)$")

GOLDEN_FILES = (
    "y002_duplicate_key.yaml",
    "y007_alias_bomb.yaml",
    "s101_syntax.yaml",
    "n202_forward.yaml",
    "i305_declaration.yaml",
    "i307_shapes.yaml",
    "t401_mixed_kinds.yaml",
    "t406_bad_arguments.yaml",
    "t409_term_cancelled.yaml",
    "e502_bad_sweep.yaml",
)


def expectations(text: str) -> Counter:
    """(line, severity, code) for every `# expect:` item; a malformed item fails the test."""
    expected: Counter = Counter()
    for number, line in enumerate(text.splitlines(), start=1):
        match = _EXPECT.search(line)
        if not match:
            continue
        for item in filter(None, (part.strip() for part in match.group(1).split(","))):
            parsed = _ITEM.match(item)
            assert parsed, f"line {number}: malformed expectation `{item}`"
            expected[(number, parsed.group(1), parsed.group(2))] += 1
    return expected


def lint_options(text: str) -> list[str]:
    for line in text.splitlines():
        match = _OPTIONS.search(line)
        if match:
            return match.group(1).split()
    return []


@pytest.fixture(scope="module")
def linted_root(corpus_root: Path) -> Path:
    """The fixture folder with every corpus recipe copied beside `fixtures/`."""
    for name in FILES:
        shutil.copy(CORPUS / name, corpus_root / name)
    return corpus_root


def lint(root: Path, name: str, fmt: str, capsys, monkeypatch, extra: list[str] = ()) -> tuple[int, str]:
    monkeypatch.chdir(root)
    capsys.readouterr()
    status = main(["lint", "--format", fmt, "--color", "never", *extra, name])
    return status, capsys.readouterr().out


@pytest.mark.parametrize("name", FILES)
def test_corpus_file(name: str, linted_root: Path, capsys, monkeypatch) -> None:
    text = (CORPUS / name).read_text(encoding="utf-8")
    expected = expectations(text)
    status, out = lint(linted_root, name, "concise", capsys, monkeypatch, lint_options(text))
    actual: Counter = Counter()
    for line in out.splitlines():
        match = _CONCISE.match(line)
        assert match, f"not a concise diagnostic line: {line!r}"
        assert match.group("file") == name
        actual[(int(match.group("line")), match.group("sev"), match.group("code"))] += 1
    missing, extra = expected - actual, actual - expected
    assert not missing and not extra, (
        f"\nmissing: {sorted(missing.elements())}\nextra:   {sorted(extra.elements())}\nlint said:\n{out}")
    has_errors = any(sev == "error" for _, sev, _ in expected)
    assert status == (1 if has_errors else 0)


def test_corpus_is_large_enough() -> None:
    assert len(FILES) >= 40
    clean = [n for n in FILES if not expectations((CORPUS / n).read_text(encoding="utf-8"))]
    assert len(clean) >= 3, "keep a few clean recipes: they prove lint says nothing when nothing is wrong"


def test_corpus_covers_every_lint_code() -> None:
    seen = set()
    for name in FILES:
        seen |= {code for _, _, code in expectations((CORPUS / name).read_text(encoding="utf-8"))}
    assert RUN_ONLY <= set(CODES)
    missing = set(CODES) - RUN_ONLY - MISSING_EXTRA_ONLY - seen
    assert not missing, f"no corpus recipe expects {sorted(missing)}"


def test_expectations_are_parsed() -> None:
    text = "a: 1   # expect: error[N201], warning[N208]\nb: 2\nc: 3 # expect: note[T411]\n"
    assert expectations(text) == Counter({(1, "error", "N201"): 1, (1, "warning", "N208"): 1,
                                          (3, "note", "T411"): 1})


@pytest.mark.parametrize("name", GOLDEN_FILES)
def test_golden_full_rendering(name: str, linted_root: Path, capsys, monkeypatch) -> None:
    text = (CORPUS / name).read_text(encoding="utf-8")
    _, out = lint(linted_root, name, "full", capsys, monkeypatch, lint_options(text))
    golden = GOLDEN / (Path(name).stem + ".txt")
    if os.environ.get("PEFTDSL_REGEN_GOLDEN") == "1":
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_bytes(out.encode("utf-8"))
        return
    assert golden.exists(), f"no golden file {golden}; run with PEFTDSL_REGEN_GOLDEN=1 and review it"
    assert out == golden.read_bytes().decode("utf-8")
