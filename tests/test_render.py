"""Tests for peftdsl.render: golden files per format, SARIF structure, docs, properties.

Golden files live in tests/golden/render/. After an intended change to the output, run
`PEFTDSL_REGEN_GOLDEN=1 python -m pytest tests/test_render.py` and review the diff.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path, PurePath

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from peftdsl.diagnostics import CODES, Diagnostic, Label, Severity
from peftdsl.render import (
    FORMATS,
    RENDERERS,
    region,
    render_concise,
    render_full,
    render_github,
    render_json,
    render_sarif,
    summary_line,
)
from peftdsl.spans import SourceFile, Span

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).resolve().parent / "golden" / "render"
DOCS = ROOT / "docs" / "diagnostics.md"


def assert_golden(name: str, actual: str) -> None:
    """Compare with tests/golden/render/<name> byte for byte, or rewrite it on request."""
    path = GOLDEN / name
    if os.environ.get("PEFTDSL_REGEN_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(actual.encode("utf-8"))
        return
    assert path.exists(), f"no golden file {path}; run with PEFTDSL_REGEN_GOLDEN=1 and review it"
    assert actual == path.read_bytes().decode("utf-8")


# ---------------------------------------------------------------------------------------
# A recipe with something wrong on most lines, and the diagnostics a checker would give.

RECIPE = """\
peftdsl: 1
name: detox
base: ../models/tiny-llama
adapters:
  chat: ../adapters/chat
  toxic: ../adapters/toxic
  scaler:
    path: ../adapters/scaler
    kind: ia3
params:
  lam: 0.4
compose:
  detox: chat - 0.4 * toxic
  both: chat + 0.5 * scaler
  small: svd(detox +
             both, rank=16)
  mixed: pem(0.5 * chat + 0.5 * toxic)
  detox: chat - toxic
outputs:
  small: ../out/small
  detox: ../out/detox
"""

SOURCE = SourceFile(Path("recipes/detox.yaml"), RECIPE)


def span_of(source: SourceFile, needle: str, line: int | None = None) -> Span:
    """The span of the first `needle` on `line` (1-based), or in the whole file."""
    start = source.line_starts[line - 1] if line else 0
    index = source.text.index(needle, start)
    return Span(source, index, index + len(needle))


@dataclass(frozen=True, slots=True)
class FileDiagnostic(Diagnostic):
    """A diagnostic about a whole file; stands in for a `path` field Diagnostic lacks."""

    path: str | None = None


def style_example() -> Diagnostic:
    """The example of STYLE.md and the brief (its primary span is `0.5 * scaler`)."""
    return Diagnostic(
        "T401",
        "cannot add `lora` and `ia3` adapters",
        span_of(SOURCE, "0.5 * scaler"),
        label="`scaler` is an (IA)³ adapter",
        labels=(Label(span_of(SOURCE, "chat", line=14), "`chat` is a LoRA adapter"),),
        help="compose each kind separately, or convert with svd(...) first",
    )


def corpus() -> list[Diagnostic]:
    return [
        style_example(),
        Diagnostic(
            "N208",
            "param `lam` is never used",
            span_of(SOURCE, "lam", line=11),
            help="use `lam` in an expression, or remove it",
        ),
        Diagnostic(
            "T413",
            "`svd` takes a `lora` or `dense` argument, not `ia3`",
            span_of(SOURCE, "svd(detox +\n             both, rank=16)"),
            label="this call",
            labels=(Label(span_of(SOURCE, "both", line=16), "`both` is (IA)³ because of `scaler`"),),
        ),
        Diagnostic(
            "I306",
            "adapters name different base models",
            span_of(SOURCE, "toxic", line=6),
            label="trained on `meta-llama/Llama-2-7b-hf`",
            labels=(Label(span_of(SOURCE, "../adapters/scaler"), "trained on `/models/llama2-7b`"),),
            notes=("module shapes agree, so this may be the same model under two names",),
        ),
        Diagnostic(
            "T411",
            "`pem` is parameter-space arithmetic, not a sum of weight deltas",
            span_of(SOURCE, "pem(0.5 * chat + 0.5 * toxic)"),
            notes=("the result has cross terms B_j·A_i; write `0.5 * chat + 0.5 * toxic` for the exact sum",),
        ),
        Diagnostic(
            "Y002",
            "duplicate key `detox`",
            span_of(SOURCE, "detox", line=18),
            label="defined again here",
            labels=(Label(span_of(SOURCE, "detox", line=13), "first defined here"),),
            help="rename one of them",
        ),
        Diagnostic(
            "I301",
            "adapter folder `../adapters/chat` does not exist",
            help="relative paths are relative to the recipe's folder,\nnot to the working directory",
            notes=("looked in `recipes/../adapters/chat`", "checked before any weight is read"),
        ),
        FileDiagnostic("R602", "output `../out/detox` already exists", help="pass --force", path="out/detox"),
    ]


# ---------------------------------------------------------------------------------------
# full


STYLE_EXAMPLE_BODY = """\
   |
14 |   both: chat + 0.5 * scaler
   |         ----   ^^^^^^^^^^^^ `scaler` is an (IA)³ adapter
   |         |
   |         `chat` is a LoRA adapter
   = help: compose each kind separately, or convert with svd(...) first
"""


def test_full_matches_the_style_example():
    text = render_full([style_example()])
    head, arrow, body = text.split("\n", 2)
    assert head == "error[T401]: cannot add `lora` and `ia3` adapters"
    assert arrow == "  --> recipes/detox.yaml:14:16"  # where `0.5 * scaler` starts
    assert body == STYLE_EXAMPLE_BODY


def test_full_corpus_golden():
    diags = corpus()
    assert_golden("full.txt", render_full(diags) + "\n" + summary_line(diags) + "\n")


def test_full_color_golden():
    text = render_full(corpus()[:2], color=True)
    assert "\x1b[1;31merror[T401]\x1b[0m" in text
    assert "\x1b[1;33mwarning[N208]\x1b[0m" in text
    assert_golden("full_color.txt", text)


def test_full_without_color_has_no_escapes():
    assert "\x1b" not in render_full(corpus()) + summary_line(corpus())


def test_full_layout_golden():
    """Three labels on a line, tabs, wide characters, an empty span past the end, CRLF."""
    text = "x:\tfoo(a, b, c)\r\nname: 界界 + ä\r\nlast"
    source = SourceFile(Path("layout.yaml"), text)
    three = Diagnostic(
        "T406",
        "unknown argument",
        span_of(source, "c"),
        label="here",
        labels=(
            Label(span_of(source, "foo"), "`foo` takes two"),
            Label(span_of(source, "a"), "first"),
            Label(span_of(source, "b"), ""),
        ),
    )
    wide = Diagnostic("Y008", "bad name", span_of(source, "+ ä"), label="after wide text")
    past_end = Diagnostic("Y005", "missing key", Span(source, len(text), len(text)), label="expected `path:`")
    on_cr = Diagnostic("Y001", "stray carriage return", span_of(source, "\r", line=1), label="here")
    assert_golden("full_layout.txt", render_full([three, wide, past_end, on_cr]))


def test_full_labels_in_another_file_golden():
    main = SourceFile(Path("recipes/a.yaml"), "compose:\n  x: chat\n")
    other = SourceFile(Path("recipes/b.yaml"), "adapters:\n  chat: ../c\n")
    diag = Diagnostic(
        "N204",
        "`chat` is defined twice",
        span_of(main, "x"),
        label="used here",
        labels=(Label(span_of(other, "chat"), "defined here"), Label(span_of(main, "chat"), "and here")),
    )
    assert_golden("full_other_file.txt", render_full([diag]))


def test_full_empty_and_summary():
    assert render_full([]) == ""
    assert summary_line([]) == ""
    warn = corpus()[1]
    assert summary_line([warn]) == "warning: 1 warning emitted"
    assert summary_line(corpus()) == "error: 5 errors, 2 warnings emitted"
    note_only = corpus()[4]
    assert summary_line([note_only]) == ""


# ---------------------------------------------------------------------------------------
# concise, json, github


def test_concise_golden():
    text = render_concise(corpus())
    assert text.splitlines()[0] == "recipes/detox.yaml:14:16: error[T401] cannot add `lora` and `ia3` adapters"
    assert "error[I301] adapter folder" in text.splitlines()[6]
    assert text.splitlines()[7].startswith("out/detox: error[R602] ")
    assert_golden("concise.txt", text)


def test_json_golden_and_shape():
    text = render_json(corpus())
    items = json.loads(text)
    assert list(items[0]) == [
        "code", "name", "severity", "message", "file", "line", "column", "end_line",
        "end_column", "help", "label", "labels", "notes",
    ]  # fmt: skip
    assert list(items[0]["labels"][0]) == ["file", "line", "column", "end_line", "end_column", "message"]
    assert (items[0]["line"], items[0]["column"], items[0]["end_line"], items[0]["end_column"]) == (14, 16, 14, 28)
    assert text.isascii()
    assert_golden("json.json", text)


def test_github_golden():
    assert_golden("github.txt", render_github(corpus()))


def test_github_escapes_data_and_properties():
    source = SourceFile(Path("a,b:c%.yaml"), "x: 1\n")
    diag = Diagnostic("Y004", "100% wrong\r\nreally", span_of(source, "1"))
    line = render_github([diag])
    assert line == (
        "::error file=a%2Cb%3Ac%25.yaml,line=1,col=4,endLine=1,endColumn=5,"
        "title=Y004 wrong-value-type::100%25 wrong%0D%0Areally\n"
    )
    note = Diagnostic("T411", "n", span_of(source, "x"))
    assert render_github([note]).startswith("::notice ")


def test_github_multiline_span_has_no_columns():
    line = render_github([corpus()[2]])
    assert "line=15,endLine=16,title=" in line and "col=" not in line


# ---------------------------------------------------------------------------------------
# sarif

SARIF_SUBSET_SCHEMA = {
    "type": "object",
    "required": ["version", "runs", "$schema"],
    "properties": {
        "version": {"const": "2.1.0"},
        "runs": {
            "type": "array",
            "minItems": 1,
            "maxItems": 1,
            "items": {
                "type": "object",
                "required": ["tool", "results"],
                "properties": {
                    "columnKind": {"enum": ["utf16CodeUnits", "unicodeCodePoints"]},
                    "tool": {
                        "type": "object",
                        "required": ["driver"],
                        "properties": {
                            "driver": {
                                "type": "object",
                                "required": ["name", "rules"],
                                "properties": {
                                    "name": {"type": "string"},
                                    "version": {"type": "string"},
                                    "rules": {"type": "array", "items": {"$ref": "#/$defs/rule"}},
                                },
                            }
                        },
                    },
                    "results": {"type": "array", "items": {"$ref": "#/$defs/result"}},
                },
            },
        },
    },
    "$defs": {
        "message": {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}},
        "rule": {
            "type": "object",
            "required": ["id", "name", "shortDescription", "helpUri"],
            "properties": {
                "id": {"type": "string"},
                "shortDescription": {"$ref": "#/$defs/message"},
                "helpUri": {"type": "string"},
                "defaultConfiguration": {
                    "type": "object",
                    "properties": {"level": {"enum": ["none", "note", "warning", "error"]}},
                },
            },
        },
        "region": {
            "type": "object",
            "required": ["startLine", "startColumn", "endLine", "endColumn"],
            "properties": {
                key: {"type": "integer", "minimum": 1}
                for key in ("startLine", "startColumn", "endLine", "endColumn")
            },
        },
        "location": {
            "type": "object",
            "required": ["physicalLocation"],
            "properties": {
                "physicalLocation": {
                    "type": "object",
                    "required": ["artifactLocation"],
                    "properties": {
                        "artifactLocation": {
                            "type": "object",
                            "required": ["uri"],
                            "properties": {"uri": {"type": "string", "pattern": "^[^\\\\ ]+$"}},
                        },
                        "region": {"$ref": "#/$defs/region"},
                    },
                },
                "message": {"$ref": "#/$defs/message"},
            },
        },
        "result": {
            "type": "object",
            "required": ["ruleId", "level", "message"],
            "properties": {
                "ruleId": {"type": "string"},
                "ruleIndex": {"type": "integer", "minimum": 0},
                "level": {"enum": ["none", "note", "warning", "error"]},
                "message": {"$ref": "#/$defs/message"},
                "locations": {"type": "array", "items": {"$ref": "#/$defs/location"}},
                "relatedLocations": {"type": "array", "items": {"$ref": "#/$defs/location"}},
            },
        },
    },
}


def test_sarif_golden():
    assert_golden("sarif.json", render_sarif(corpus()))


def test_sarif_structure():
    log = json.loads(render_sarif(corpus()))
    assert log["version"] == "2.1.0" and log["$schema"].endswith("sarif-2.1.0.json")
    (run,) = log["runs"]
    driver = run["tool"]["driver"]
    from peftdsl import __version__

    assert (driver["name"], driver["version"]) == ("peftdsl", __version__)
    assert [rule["id"] for rule in driver["rules"]] == list(CODES)
    for rule in driver["rules"]:
        assert rule["name"] == CODES[rule["id"]].name
        assert rule["shortDescription"]["text"]
        assert rule["helpUri"] == f"docs/diagnostics.md#{rule['id'].lower()}"
    for diag, result in zip(corpus(), run["results"], strict=True):
        assert result["ruleId"] == diag.code
        assert driver["rules"][result["ruleIndex"]]["id"] == diag.code
        assert result["level"] == diag.level.value
        assert result["message"]["text"].startswith(diag.message)
    first = run["results"][0]["locations"][0]["physicalLocation"]
    assert first["artifactLocation"]["uri"] == "recipes/detox.yaml"
    assert first["region"] == {"startLine": 14, "startColumn": 16, "endLine": 14, "endColumn": 28}
    assert "locations" not in run["results"][6]  # no span, no file
    assert run["results"][7]["locations"][0]["physicalLocation"] == {"artifactLocation": {"uri": "out/detox"}}


def test_sarif_validates_against_schema_subset():
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(json.loads(render_sarif(corpus())), SARIF_SUBSET_SCHEMA)
    jsonschema.validate(json.loads(render_sarif([])), SARIF_SUBSET_SCHEMA)


def test_sarif_uri_is_relative_and_percent_encoded():
    source = SourceFile(PurePath("my recipes/ä.yaml"), "x: 1\n")
    log = json.loads(render_sarif([Diagnostic("Y004", "m", span_of(source, "1"))]))
    uri = log["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["artifactLocation"]["uri"]
    assert uri == "my%20recipes/%C3%A4.yaml"


# ---------------------------------------------------------------------------------------
# the registry and its documentation

KEBAB = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
HEADING = re.compile(r"^## ([A-Z]\d{3}) (\S+)$", re.MULTILINE)


def doc_sections() -> dict[str, tuple[str, str]]:
    """code -> (name in the heading, the section's text up to the next heading)."""
    text = DOCS.read_text(encoding="utf-8")
    matches = list(HEADING.finditer(text))
    sections = {}
    for match, following in zip(matches, [*matches[1:], None]):
        end = following.start() if following else len(text)
        assert match.group(1) not in sections, f"{match.group(1)} documented twice"
        sections[match.group(1)] = (match.group(2), text[match.end() : end])
    return sections


def test_every_code_is_documented():
    sections = doc_sections()
    assert set(sections) == set(CODES)
    text = DOCS.read_text(encoding="utf-8")
    for code, entry in CODES.items():
        assert sections[code][0] == entry.name, code
        assert f'<a id="{code.lower()}"></a>' in text, f"anchor for SARIF helpUri of {code}"


def test_code_names_are_unique_kebab_case():
    names = [entry.name for entry in CODES.values()]
    assert len(names) == len(set(names))
    assert all(KEBAB.match(name) for name in names), [n for n in names if not KEBAB.match(n)]
    assert all(code == entry.id for code, entry in CODES.items())


def test_doc_examples_are_yaml():
    """Each section shows a recipe; all but `invalid-yaml`'s must at least load as YAML."""
    for code, (_, body) in doc_sections().items():
        blocks = re.findall(r"```yaml\n(.*?)```", body, re.DOTALL)
        assert blocks, f"{code} has no yaml example"
        if code != "Y001":
            for block in blocks:
                yaml.safe_load(block)


# ---------------------------------------------------------------------------------------
# properties

TEXT = st.text(st.one_of(st.sampled_from("\n\r\t ab:#界\u0301\u202e\x1b"), st.characters()), max_size=120)


@st.composite
def spans(draw, source: SourceFile) -> Span:
    start = draw(st.integers(0, len(source.text)))
    end = draw(st.integers(start, len(source.text)))
    return Span(source, start, end)


def expected_position(text: str, offset: int) -> tuple[int, int]:
    """Line and column by counting newlines, independently of SourceFile's index."""
    line_start = text.rfind("\n", 0, offset) + 1
    return text.count("\n", 0, offset) + 1, offset - line_start + 1


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_concise_position_counts_newlines(data):
    text = data.draw(TEXT)
    span = data.draw(spans(SourceFile(Path("r.yaml"), text)))
    line = render_concise([Diagnostic("S101", "m", span)])
    assert line.startswith("r.yaml:")
    position = line[len("r.yaml:") :].split(": error[S101] m")[0]
    assert tuple(int(n) for n in position.split(":")) == expected_position(text, span.start)
    r = region(span)
    if span.end > span.start:
        last_line, last_column = expected_position(text, span.end - 1)
        assert (r.end_line, r.end_column) == (last_line, last_column + 1)
    else:
        assert (r.end_line, r.end_column) == (r.line, r.column)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_every_format_renders_any_span(data):
    source = SourceFile(Path("r.yaml"), data.draw(TEXT))
    labels = data.draw(st.lists(st.builds(Label, spans(source), TEXT), max_size=4))
    diag = Diagnostic(
        data.draw(st.sampled_from(list(CODES))),
        data.draw(TEXT),
        data.draw(st.one_of(st.none(), spans(source))),
        label=data.draw(TEXT),
        labels=tuple(labels),
        help=data.draw(TEXT),
        notes=tuple(data.draw(st.lists(TEXT, max_size=2))),
    )
    for color in (False, True):
        full = render_full([diag], color=color)
        assert full.endswith("\n")
    assert render_full([diag]).startswith(f"{diag.level.value}[{diag.code}]")
    for name in FORMATS:
        RENDERERS[name]([diag])
    # one line per diagnostic: newlines in messages are escaped (the runner splits on \r, \n)
    assert render_github([diag]).count("\n") == 1 and "\r" not in render_github([diag])
    assert render_concise([diag]).count("\n") == 1


# ---------------------------------------------------------------------------------------
# the module itself


def test_renderers_registry():
    assert FORMATS == ("full", "concise", "json", "github", "sarif")
    assert render_concise([]) == "" and render_github([]) == ""
    assert json.loads(render_json([])) == []
    assert json.loads(render_sarif([]))["runs"][0]["results"] == []


def test_severity_override_is_rendered():
    diag = Diagnostic("N208", "m", span_of(SOURCE, "lam", line=11), severity=Severity.ERROR)
    assert "error[N208]" in render_concise([diag])


def test_import_is_light():
    """lint runs in pre-commit hooks: importing the renderer must not pull in torch or rich."""
    code = (
        "import sys, peftdsl.render\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'torch', 'peft', 'transformers', 'rich'})\n"
        "print(','.join(heavy))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
