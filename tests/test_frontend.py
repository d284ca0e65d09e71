"""The front end through its command line: exit codes, formats, ignores, folder search, schema,
explain, and two promises of DESIGN §5: `lint` never imports torch, and the installed package
(grammar included) parses a recipe from anywhere.

In-process `peftdsl.cli.main([...])` where that is enough; a subprocess where the test is about
the process (imports, the installed package, `python -m peftdsl`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from peftdsl.cli import EXIT_ERRORS, EXIT_OK, EXIT_USAGE, find_recipes, main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "recipes" / "examples").glob("*.yaml"))

# Recipes that need no adapter files: every adapter declares its kind (lint --no-inputs).
CLEAN = """\
peftdsl: 1
adapters:
  chat: {path: adapters/chat, kind: lora, rank: 8}
  toxic: {path: adapters/toxic, kind: lora, rank: 8}
params:
  lam: 0.4
compose:
  detox: chat - lam * toxic
  mix: 0.5 * chat + 0.5 * toxic
  sum: toxic + chat
  twice: chat + chat
  same: (1 - lam) * chat + lam * chat
"""

WARNING_ONLY = """\
peftdsl: 1
adapters:
  chat: {path: adapters/chat, kind: lora}
  spare: {path: adapters/spare, kind: lora}
compose:
  double: 2 * chat
"""

BROKEN = """\
peftdsl: 1
adapters:
  chat: {path: adapters/chat, kind: lora}
  scaler: {path: adapters/scaler, kind: ia3}
compose:
  both: chat + 0.5 * scaler
  odd: chat * scaler
  typo: chta - 1 * chat
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def lint(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(["lint", "--color", "never", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def run_python(code: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


def clean_env() -> dict:
    """The environment without PYTHONPATH: imports come from the installed package only."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["NO_COLOR"] = "1"
    return env


# ---------------------------------------------------------------- exit codes


def test_clean_recipe_exits_0(tmp_path, capsys):
    path = write(tmp_path, "clean.yaml", CLEAN)
    status, out, err = lint(capsys, "--no-inputs", str(path))
    assert status == EXIT_OK
    assert out == ""
    assert "1 recipe checked, no problems" in err


def test_errors_exit_1(tmp_path, capsys):
    path = write(tmp_path, "broken.yaml", BROKEN)
    status, out, _ = lint(capsys, "--no-inputs", "--format", "concise", str(path))
    assert status == EXIT_ERRORS
    codes = re.findall(r"\[([A-Z]\d{3})\]", out)
    assert codes == ["T401", "T402", "N201"]


def test_missing_file_is_a_usage_error(tmp_path, capsys):
    status, _, err = lint(capsys, str(tmp_path / "nope.yaml"))
    assert status == EXIT_USAGE
    assert "no such file or folder" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("value", ["lam", "lam=abc", "=1", "lam=1=2"])
def test_bad_set_is_a_usage_error(tmp_path, capsys, value):
    path = write(tmp_path, "clean.yaml", CLEAN)
    capsys.readouterr()
    status = main(["explain", "--no-inputs", "--set", value, str(path)])
    assert status == EXIT_USAGE
    assert "--set takes NAME=NUMBER" in capsys.readouterr().err


def test_set_of_an_unknown_param_is_a_usage_error(tmp_path, capsys):
    path = write(tmp_path, "clean.yaml", CLEAN)
    capsys.readouterr()
    assert main(["explain", "--no-inputs", "--set", "lamb=0.2", str(path)]) == EXIT_USAGE
    assert "the recipe has no param `lamb` (params: lam)" in capsys.readouterr().err


def test_unknown_flag_is_a_usage_error(tmp_path):
    path = write(tmp_path, "clean.yaml", CLEAN)
    result = subprocess.run([sys.executable, "-m", "peftdsl", "lint", "--frobnicate", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_USAGE
    assert "unrecognized arguments: --frobnicate" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_format_is_a_usage_error(tmp_path, capsys):
    path = write(tmp_path, "clean.yaml", CLEAN)
    with pytest.raises(SystemExit) as exit_info:
        main(["lint", "--format", "xml", str(path)])
    assert exit_info.value.code == EXIT_USAGE


def test_strict_fails_on_warnings(tmp_path, capsys):
    path = write(tmp_path, "warn.yaml", WARNING_ONLY)
    status, out, _ = lint(capsys, "--no-inputs", "--format", "concise", str(path))
    assert status == EXIT_OK
    assert "warning[N208] adapter `spare` is never used" in out
    status, _, _ = lint(capsys, "--no-inputs", "--strict", str(path))
    assert status == EXIT_ERRORS


def test_strict_passes_notes(tmp_path, capsys):
    path = write(tmp_path, "note.yaml", CLEAN + "  paper: pem(0.5 * chat + 0.5 * toxic)\n")
    status, out, _ = lint(capsys, "--no-inputs", "--strict", "--format", "concise", str(path))
    assert "note[T411]" in out
    assert status == EXIT_OK


def test_a_broken_recipe_never_prints_a_traceback(tmp_path):
    path = write(tmp_path, "bad.yaml", "peftdsl: 1\ncompose:\n  x: (((\n")
    result = subprocess.run([sys.executable, "-m", "peftdsl", "lint", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_ERRORS
    assert "Traceback" not in result.stdout + result.stderr
    assert "error[S101]" in result.stdout


# ---------------------------------------------------------------- formats


def test_every_format_is_parseable(tmp_path, capsys):
    path = write(tmp_path, "broken.yaml", BROKEN)
    outputs = {}
    for fmt in ("full", "concise", "json", "github", "sarif"):
        status, out, _ = lint(capsys, "--no-inputs", "--format", fmt, str(path))
        assert status == EXIT_ERRORS, fmt
        outputs[fmt] = out

    records = json.loads(outputs["json"])
    assert [r["code"] for r in records] == ["T401", "T402", "N201"]
    assert {"code", "name", "severity", "message", "file", "line", "column", "end_line", "end_column",
            "help", "label", "labels", "notes"} <= set(records[0])
    assert records[0]["line"] == 6 and records[0]["column"] == 16

    sarif = json.loads(outputs["sarif"])
    assert sarif["version"] == "2.1.0"
    results = sarif["runs"][0]["results"]
    assert [r["ruleId"] for r in results] == ["T401", "T402", "N201"]

    github = outputs["github"].splitlines()
    assert len(github) == 3 and all(line.startswith("::error ") for line in github)
    assert "title=T401 mixed-adapter-kinds" in github[0]

    concise = outputs["concise"].splitlines()
    assert concise[0].startswith(f"{path}:6:16: error[T401] ")

    assert "error[T401]: cannot add `lora` and `ia3` adapters" in outputs["full"]
    assert f"--> {path}:6:16" in outputs["full"]


def test_machine_formats_of_a_clean_recipe(tmp_path, capsys):
    path = write(tmp_path, "clean.yaml", CLEAN)
    _, out, _ = lint(capsys, "--no-inputs", "--format", "json", str(path))
    assert json.loads(out) == []
    _, out, _ = lint(capsys, "--no-inputs", "--format", "sarif", str(path))
    assert json.loads(out)["runs"][0]["results"] == []
    _, out, _ = lint(capsys, "--no-inputs", "--format", "github", str(path))
    assert out == ""


# ---------------------------------------------------------------- ignore comments


def test_ignore_comment_silences_named_codes_on_its_line(tmp_path, capsys):
    text = WARNING_ONLY.replace("  spare: {path: adapters/spare, kind: lora}",
                                "  spare: {path: adapters/spare, kind: lora}   # peftdsl: ignore[N208]")
    path = write(tmp_path, "ignored.yaml", text)
    status, out, _ = lint(capsys, "--no-inputs", "--strict", "--format", "concise", str(path))
    assert (status, out) == (EXIT_OK, "")


def test_ignore_comment_names_codes_not_lines(tmp_path, capsys):
    text = WARNING_ONLY.replace("  spare: {path: adapters/spare, kind: lora}",
                                "  spare: {path: adapters/spare, kind: lora}   # peftdsl: ignore[I306, T409]")
    path = write(tmp_path, "other.yaml", text)
    _, out, _ = lint(capsys, "--no-inputs", "--format", "concise", str(path))
    assert "warning[N208]" in out


def test_ignore_comment_on_another_line_does_not_silence(tmp_path, capsys):
    text = WARNING_ONLY.replace("  double: 2 * chat", "  double: 2 * chat   # peftdsl: ignore[N208]")
    path = write(tmp_path, "elsewhere.yaml", text)
    _, out, _ = lint(capsys, "--no-inputs", "--format", "concise", str(path))
    assert "warning[N208] adapter `spare`" in out


def test_ignore_never_silences_an_error(tmp_path, capsys):
    """An ignored error would only resurface, worse, when `run` trips over it."""
    path = write(tmp_path, "err.yaml", "peftdsl: 1\nadapters:\n  chat: {path: a, kind: lora}\n"
                                       "compose:\n  x: chat * chat   # peftdsl: ignore[T402]\n")
    status, out, _ = lint(capsys, "--no-inputs", "--format", "concise", str(path))
    assert status == EXIT_ERRORS and "error[T402]" in out


# ---------------------------------------------------------------- folder search


def test_folder_search_finds_only_recipes(tmp_path, capsys):
    write(tmp_path, "a.yaml", CLEAN)
    write(tmp_path, "sub/b.yml", CLEAN)
    write(tmp_path, "sub/deeper/c.yaml", "# a comment first\npeftdsl: 1\n")
    write(tmp_path, "ci.yaml", "jobs:\n  test:\n    runs-on: ubuntu\n")  # YAML, not a recipe
    write(tmp_path, "notes.txt", "peftdsl: 1\n")  # a recipe marker, but not YAML by name
    write(tmp_path, ".hidden/d.yaml", CLEAN)  # hidden folders are skipped
    write(tmp_path, "inline.yaml", "tool: {peftdsl: 1}\n")  # the key is not at the top
    found = find_recipes([tmp_path])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.yaml", "sub/b.yml", "sub/deeper/c.yaml"]
    status, _, err = lint(capsys, "--no-inputs", str(tmp_path))
    assert status == EXIT_OK
    assert "3 recipes checked, no problems" in err


def test_folder_and_file_arguments_combine(tmp_path, capsys):
    write(tmp_path, "dir/a.yaml", CLEAN)
    broken = write(tmp_path, "broken.yaml", BROKEN)
    status, out, _ = lint(capsys, "--no-inputs", "--format", "concise", str(tmp_path / "dir"), str(broken))
    assert status == EXIT_ERRORS
    assert {line.split(":")[0] for line in out.splitlines()} == {str(broken)}


# ---------------------------------------------------------------- schema


def schema_json(capsys) -> dict:
    capsys.readouterr()
    assert main(["schema"]) == EXIT_OK
    return json.loads(capsys.readouterr().out)


def test_schema_is_a_json_schema(capsys):
    schema = schema_json(capsys)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["type"] == "object"
    assert schema["required"] == ["peftdsl"]
    assert {"peftdsl", "adapters", "params", "compose", "outputs", "eval", "sweep", "base", "seed"} <= set(
        schema["properties"])
    assert schema["additionalProperties"] is False


def test_schema_validates_the_shipped_examples(capsys):
    jsonschema = pytest.importorskip("jsonschema")
    if not EXAMPLES:
        pytest.skip("no recipes/examples/*.yaml")
    schema = schema_json(capsys)
    validator = jsonschema.Draft202012Validator(schema)
    for path in EXAMPLES:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        errors = [e.message for e in validator.iter_errors(data)]
        assert not errors, f"{path.name}: {errors}"


def test_schema_rejects_what_lint_rejects(capsys):
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft202012Validator(schema_json(capsys))
    bad = [
        {"adapters": {"a": "x"}},  # no version
        {"peftdsl": 2},
        {"peftdsl": 1, "adapter": {}},  # unknown key
        {"peftdsl": 1, "adapters": {"chat-v2": "x"}},  # invalid name
        {"peftdsl": 1, "adapters": {"a": {"path": "x", "rank": 0}}},
        {"peftdsl": 1, "adapters": {"a": {"kind": "lora"}}},  # no path
    ]
    for data in bad:
        assert list(validator.iter_errors(data)), data
    assert not list(validator.iter_errors(yaml.safe_load(CLEAN)))


def test_shipped_examples_lint_without_errors(capsys):
    if not EXAMPLES:
        pytest.skip("no recipes/examples/*.yaml")
    status, out, _ = lint(capsys, "--format", "concise", "--no-inputs", *map(str, EXAMPLES))
    assert status == EXIT_OK, out


# ---------------------------------------------------------------- explain


def test_explain_prints_canonical_forms(tmp_path, capsys):
    path = write(tmp_path, "clean.yaml", CLEAN)
    capsys.readouterr()
    assert main(["explain", "--no-inputs", str(path)]) == EXIT_OK
    out = capsys.readouterr().out
    canonical = dict(re.findall(r"^  (\w+) : \w+\n    expr .*\n(?:      .*\n)*    canonical  (.*)$", out, re.MULTILINE))
    assert canonical == {
        "detox": "chat - 0.4*toxic",
        "mix": "0.5*chat + 0.5*toxic",
        "sum": "chat + toxic",
        "twice": "2*chat",
        "same": "chat",
    }


def test_explain_follows_set(tmp_path, capsys):
    path = write(tmp_path, "clean.yaml", CLEAN)
    capsys.readouterr()
    assert main(["explain", "--no-inputs", "--set", "lam=0.25", str(path)]) == EXIT_OK
    assert "canonical  chat - 0.25*toxic" in capsys.readouterr().out


def test_explain_of_a_broken_recipe_exits_1(tmp_path, capsys):
    path = write(tmp_path, "broken.yaml", BROKEN)
    capsys.readouterr()
    assert main(["explain", "--no-inputs", str(path)]) == EXIT_ERRORS
    captured = capsys.readouterr()
    assert "error[T401]" in captured.err
    assert "canonical" not in captured.out


# ---------------------------------------------------------------- process-level promises


def test_lint_does_not_import_torch_peft_or_transformers(tmp_path, corpus_root):
    """DESIGN §5: lint reads configs and safetensors headers, never tensor data."""
    recipe = write(corpus_root, "frontend_imports.yaml", """\
peftdsl: 1
base: fixtures/base
adapters:
  a: fixtures/lora_r4
  b: fixtures/lora_r8
  s: fixtures/ia3
compose:
  mix: svd(0.5 * a + 0.5 * b, rank=4)
  t: ties(a - b, density=0.5)
  scaled: 2 * s
outputs:
  mix: out/mix
""")
    code = (
        "import sys\n"
        "from peftdsl.cli import main\n"
        f"status = main(['lint', '--format', 'json', {str(recipe)!r}])\n"
        "print(status, sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'peft', 'transformers'}))\n"
    )
    result = run_python(code, tmp_path, clean_env())
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last == "0 []", result.stdout


def test_installed_package_parses_a_recipe_from_elsewhere(tmp_path):
    """The grammar ships inside the package as `peftdsl.grammar`; no path to the checkout is needed."""
    write(tmp_path, "mix.yaml", CLEAN)
    env = clean_env()
    result = subprocess.run([sys.executable, "-m", "peftdsl", "lint", "--no-inputs", "--format", "json", "mix.yaml"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_OK, result.stderr
    assert json.loads(result.stdout) == []
    code = (
        "from importlib import resources\n"
        "import peftdsl.parse as p\n"
        "grammar = resources.files('peftdsl.grammar').joinpath('expr.lark')\n"
        "assert grammar.is_file(), grammar\n"
        "assert p.grammar_text() == grammar.read_text(encoding='utf-8')\n"
        "print('?start' in p.grammar_text())\n"
    )
    result = run_python(code, tmp_path, env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_console_script_runs(tmp_path):
    import shutil

    script = shutil.which("peftdsl")
    if script is None:
        pytest.skip("the `peftdsl` console script is not on PATH")
    write(tmp_path, "mix.yaml", CLEAN)
    result = subprocess.run([script, "lint", "--no-inputs", "mix.yaml"], cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_OK, result.stderr
    assert "1 recipe checked, no problems" in result.stderr


def test_lint_is_fast(corpus_root, capsys, monkeypatch):
    """Lint of a recipe with real inputs takes well under a second; the bound here only catches disasters."""
    recipe = write(corpus_root, "frontend_speed.yaml", """\
peftdsl: 1
base: fixtures/base
adapters:
  a: fixtures/lora_r4
  b: fixtures/lora_r8
compose:
  mix: svd(0.5 * a + 0.5 * b, rank=4)
""")
    monkeypatch.chdir(corpus_root)
    main(["lint", recipe.name])  # warm: the grammar's tables are built once per process
    start = time.perf_counter()
    status = main(["lint", "--format", "json", recipe.name])
    elapsed = time.perf_counter() - start
    assert status == EXIT_OK
    assert elapsed < 5.0


def test_the_pem_note_is_said_once_per_lint_run(tmp_path, capsys):
    for name in ("one.yaml", "two.yaml"):
        write(tmp_path, name, "peftdsl: 1\nadapters:\n  a: {path: a, kind: lora, rank: 4}\n"
                              "  b: {path: b, kind: lora, rank: 4}\ncompose:\n  p: pem(0.5 * a + 0.5 * b)\n")
    capsys.readouterr()
    assert main(["lint", "--no-inputs", "--format", "concise", str(tmp_path)]) == EXIT_OK
    assert capsys.readouterr().out.count("note[T411]") == 1
