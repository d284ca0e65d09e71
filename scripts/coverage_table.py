"""The README's support table: generated from the coverage cases and a run of their tests.

    python scripts/coverage_table.py                 # run tests/test_coverage.py, write README.md's table
    python scripts/coverage_table.py --junit R.xml   # the same from an earlier `pytest --junitxml=R.xml` run
    python scripts/coverage_table.py --check         # exit 1 unless README.md's table is the cases' (no run)
    python scripts/coverage_table.py --print         # the table the cases declare, on stdout

A cell shows what its test did in that run, read from pytest's JUnit XML: ✓ (passed,
checked against PEFT), the diagnostic's code (passed: refused on purpose, asserted), "known
wrong" (a strict xfail, with the reason as a footnote), "n/a" (skipped, with the reason in
the legend). A cell whose test did anything else (failed, passed when it should have
failed, did not run) shows that in bold, and the script exits 1: the table then cannot pass
`--check`, which compares README.md with the table the cases declare and is run by
tests/test_coverage.py. The table lies between `<!-- coverage:begin -->` and
`<!-- coverage:end -->` in README.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from xml.etree import ElementTree

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import coverage_cases as cases

README = ROOT / "README.md"
BEGIN, END = "<!-- coverage:begin -->", "<!-- coverage:end -->"
TEST = "tests/test_coverage.py"
TEST_NAME = "test_cell"
PASSED, FAILED, XFAILED, SKIPPED, MISSING = "passed", "failed", "xfailed", "skipped", "not run"

# What each declared outcome's test does when peftdsl behaves as declared.
EXPECTED_STATUS = {cases.Supported: PASSED, cases.Refused: PASSED, cases.KnownWrong: XFAILED,
                   cases.NotApplicable: SKIPPED}


def declared_results() -> dict[str, str]:
    """Each cell's test status when every cell behaves as the cases declare."""
    return {cell.id: EXPECTED_STATUS[type(cell.outcome)] for cell in cases.cells()}


def junit_results(path: Path) -> dict[str, str]:
    """Each cell's status in a pytest JUnit XML report of tests/test_coverage.py."""
    results = {}
    for case in ElementTree.parse(path).iter("testcase"):
        name = case.get("name", "")
        if not (name.startswith(f"{TEST_NAME}[") and name.endswith("]")):
            continue
        if case.find("failure") is not None or case.find("error") is not None:
            status = FAILED
        elif (skipped := case.find("skipped")) is not None:
            status = XFAILED if skipped.get("type") == "pytest.xfail" else SKIPPED
        else:
            status = PASSED
        results[name[len(TEST_NAME) + 1:-1]] = status
    return results


def run_matrix(extra: list[str]) -> dict[str, str]:
    """Run the matrix's tests with pytest and read their results."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "coverage.xml"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST, "-k", TEST_NAME,
                   f"--junitxml={report}", *extra]
        subprocess.run(command, cwd=ROOT, env=env, check=False)
        if not report.exists():
            raise SystemExit("pytest wrote no report")
        return junit_results(report)


# ----------------------------------------------------------------------- rendering


def _code_link(code: str) -> str:
    return f"[{code}](docs/diagnostics.md#{code.lower()})"


def render(results: dict[str, str]) -> str:
    """The Markdown table (architectures × features), its legend and footnotes, for these results."""
    all_cells = cases.cells()
    footnotes: dict[str, int] = {}  # known-wrong reason -> its number
    for cell in all_cells:
        if isinstance(cell.outcome, cases.KnownWrong):
            footnotes.setdefault(cell.outcome.reason, len(footnotes) + 1)
    by_id = {cell.id: cell for cell in all_cells}
    header = "| architecture | " + " | ".join(f.title for f in cases.FEATURES) + " |"
    lines = [header, "|" + "---|" * (len(cases.FEATURES) + 1)]
    for arch in cases.ARCHS:
        row = [_cell_text(by_id[f"{arch.id}-{feature.id}"], results, footnotes) for feature in cases.FEATURES]
        lines.append(f"| {arch.title} | " + " | ".join(row) + " |")
    counts = _counts(all_cells, results)
    codes = sorted({cell.outcome.code for cell in all_cells if isinstance(cell.outcome, cases.Refused)})
    lines += ["", f"{counts}. Columns:", ""]
    lines += [f"- **{feature.title}**: {feature.doc}." for feature in cases.FEATURES]
    lines += ["", "✓: composed `0.7 * a - 0.3 * b` of two random adapters; the merged model equals PEFT's "
              "`merge_and_unload` tensor for tensor and loads in its Auto class, and the adapter output's logits "
              "in `PeftModel.from_pretrained` are the merged model's. A code: peftdsl refuses such an adapter on "
              "purpose with that diagnostic (" + ", ".join(_code_link(code) for code in codes) + "). "
              "n/a: the pair does not apply ("
              + "; ".join(sorted({c.outcome.reason for c in all_cells if isinstance(c.outcome, cases.NotApplicable)}))
              + "). Known wrong: a strict xfail, for what goes wrong:"]
    if footnotes:
        lines.append("")
        lines += [f"{number}. {reason}." for reason, number in footnotes.items()]
    return "\n".join(lines)


def _cell_text(cell: cases.Cell, results: dict[str, str], footnotes: dict[str, int]) -> str:
    status = results.get(cell.id, MISSING)
    if status != EXPECTED_STATUS[type(cell.outcome)]:
        if status == PASSED and isinstance(cell.outcome, cases.KnownWrong):
            return "**passed: not wrong any more?**"
        return f"**{status}**"
    outcome = cell.outcome
    if isinstance(outcome, cases.Supported):
        return "✓"
    if isinstance(outcome, cases.Refused):
        return f"`{outcome.code}`"
    if isinstance(outcome, cases.KnownWrong):
        return f"known wrong [{footnotes[outcome.reason]}]"
    return "n/a"


def _counts(all_cells: list[cases.Cell], results: dict[str, str]) -> str:
    kinds = {cases.Supported: "supported", cases.Refused: "refused on purpose", cases.KnownWrong: "known wrong",
             cases.NotApplicable: "n/a"}
    tally = {name: 0 for name in kinds.values()}
    for cell in all_cells:
        tally[kinds[type(cell.outcome)]] += 1
    unexpected = sum(results.get(c.id, MISSING) != EXPECTED_STATUS[type(c.outcome)] for c in all_cells)
    text = f"{len(cases.ARCHS)} architectures × {len(cases.FEATURES)} features: " + ", ".join(
        f"{count} {name}" for name, count in tally.items())
    return text + (f"; **{unexpected} not as declared**" if unexpected else "")


# ----------------------------------------------------------------------- README.md


def readme_table(text: str) -> str:
    """What README.md holds between the markers."""
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no {BEGIN} … {END} section")
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def with_table(text: str, table: str) -> str:
    readme_table(text)  # the markers are there
    before, rest = text.split(BEGIN, 1)
    return f"{before}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--junit", type=Path, help="read the results of an earlier pytest --junitxml run")
    mode.add_argument("--check", action="store_true", help="check README.md's table against the cases")
    mode.add_argument("--print", action="store_true", help="print the table the cases declare")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments (after --)")
    args = parser.parse_args(argv)
    if args.print:
        print(render(declared_results()))
        return 0
    if args.check:
        if readme_table(README.read_text(encoding="utf-8")) != render(declared_results()):
            print("README.md's coverage table is not the cases': run python scripts/coverage_table.py",
                  file=sys.stderr)
            return 1
        return 0
    results = junit_results(args.junit) if args.junit else run_matrix(args.pytest_args)
    table = render(results)
    README.write_text(with_table(README.read_text(encoding="utf-8"), table), encoding="utf-8")
    declared = declared_results()
    unexpected = sorted(cell for cell, status in declared.items() if results.get(cell, MISSING) != status)
    for cell in unexpected:
        print(f"{cell}: {results.get(cell, MISSING)}, declared {declared[cell]}", file=sys.stderr)
    print(f"wrote the coverage table to {README.relative_to(ROOT)}"
          + (f"; {len(unexpected)} cells not as declared" if unexpected else ""))
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
