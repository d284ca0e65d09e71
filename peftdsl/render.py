"""Render diagnostics for people and for machines: full, concise, json, github, sarif.

Spans stay character offsets until here (STYLE.md); this module is the one place that
turns them into positions, with the same conventions in every format:

- lines and columns are 1-based and count characters (Unicode code points, as Python
  indexes a `str`), so a column agrees with `SourceFile.line_col`; a tab is one column;
- the end of a span is exclusive: the line of its last character, and that character's
  column plus one. An empty span ends where it starts.

Only the `full` format looks at how wide characters are on screen (tabs, CJK, combining
marks), and only to place underlines; it never changes the numbers it prints.

`peftdsl lint` runs inside pre-commit hooks, so this module imports only light parts of
the standard library (json lazily) and never torch or rich: colour is plain ANSI.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import groupby
from pathlib import PurePath

from peftdsl.diagnostics import CODES, Diagnostic, Severity
from peftdsl.spans import SourceFile, Span

__all__ = [
    "DOCS_URI",
    "FORMATS",
    "RENDERERS",
    "Region",
    "region",
    "render_concise",
    "render_full",
    "render_github",
    "render_json",
    "render_sarif",
    "summary_line",
]

# Where each code is explained; `#t401` anchors exist in that file (one per code).
DOCS_URI = "docs/diagnostics.md"
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"

# ---------------------------------------------------------------------------------------
# Positions


@dataclass(frozen=True, slots=True)
class Region:
    """A span as people count: 1-based line and column (characters); the end is exclusive."""

    source: SourceFile
    line: int
    column: int
    end_line: int
    end_column: int

    @property
    def path(self) -> str:
        """The path as the user wrote it, for people."""
        return self.source.display_path

    @property
    def posix_path(self) -> str:
        """The path with forward slashes, so machine output is the same on every OS."""
        return PurePath(self.source.path).as_posix()


def region(span: Span) -> Region:
    """Line:column of a span's start and exclusive end.

    The end is computed from the last character, not from the end offset, so a span that
    ends with its line's newline stays on that line instead of ending at column 1 of the
    next one.
    """
    source = span.source
    start = _clamp(span.start, source)
    end = max(start, _clamp(span.end, source))
    line, column = source.line_col(start)
    if end == start:
        return Region(source, line, column, line, column)
    end_line, last_column = source.line_col(end - 1)
    return Region(source, line, column, end_line, last_column + 1)


def _clamp(offset: int, source: SourceFile) -> int:
    return max(0, min(offset, len(source.text)))


def _bare_path(diag: Diagnostic) -> str | PurePath | None:
    """The file of a diagnostic that has no span, when it carries one.

    `Diagnostic` has no such field yet; reading it with getattr lets a later `path`
    field (or a subclass) work without touching the renderers.
    """
    return getattr(diag, "path", None)


# ---------------------------------------------------------------------------------------
# Colour


_ANSI = {
    "error": "1;31",
    "warning": "1;33",
    "note": "1;36",
    "gutter": "1;34",
    "secondary": "1;34",
    "bold": "1",
}


def _paint(text: str, style: str, color: bool) -> str:
    """Wrap text in an ANSI style when colour is on; plain text otherwise."""
    if not (color and style and text):
        return text
    return f"\x1b[{_ANSI[style]}m{text}\x1b[0m"


# ---------------------------------------------------------------------------------------
# concise


def render_concise(diagnostics: Sequence[Diagnostic], *, color: bool = False) -> str:
    """One line per diagnostic, `path:line:col: error[CODE] message`, for editors and grep."""
    return "".join(_concise_line(d, color) + "\n" for d in diagnostics)


def _concise_line(diag: Diagnostic, color: bool) -> str:
    level = diag.level.value
    head = _paint(f"{level}[{diag.code}]", level, color)
    where = _concise_where(diag)
    message = _printable(diag.message, newlines=False)
    return f"{where}: {head} {message}" if where else f"{head} {message}"


def _concise_where(diag: Diagnostic) -> str:
    if diag.span is not None:
        r = region(diag.span)
        return f"{r.path}:{r.line}:{r.column}"
    path = _bare_path(diag)
    return str(path) if path is not None else ""


# ---------------------------------------------------------------------------------------
# full: the source line, underlined, rustc/ruff style


def summary_line(diagnostics: Sequence[Diagnostic], *, color: bool = False) -> str:
    """`error: 2 errors, 1 warning emitted`, or "" when there is nothing to count.

    Kept apart from `render_full` so the CLI decides whether (and after which files) to
    print it. Notes are not counted: they never change the exit status.
    """
    errors = sum(d.level is Severity.ERROR for d in diagnostics)
    warnings = sum(d.level is Severity.WARNING for d in diagnostics)
    parts = [_plural(n, word) for n, word in ((errors, "error"), (warnings, "warning")) if n]
    if not parts:
        return ""
    level = "error" if errors else "warning"
    return f"{_paint(level, level, color)}: {', '.join(parts)} emitted"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def render_full(diagnostics: Sequence[Diagnostic], *, color: bool = False) -> str:
    """Each diagnostic with its source lines underlined, a blank line between them."""
    return "\n".join(_full_block(d, color) for d in diagnostics)


@dataclass(frozen=True, slots=True)
class _Mark:
    """One underline on one source line; start/end index characters of that line."""

    line: int
    start: int
    end: int
    primary: bool
    message: str


def _full_block(diag: Diagnostic, color: bool) -> str:
    level = diag.level.value
    groups = _mark_groups(diag)
    width = max((len(str(m.line)) for _, marks, _ in groups for m in marks), default=1)
    message = _printable(diag.message, newlines=True)
    out = [_paint(f"{level}[{diag.code}]", level, color) + _paint(f": {message}", "bold", color)]
    if not groups and _bare_path(diag) is not None:
        out.append(_paint(f"{' ' * width}-->", "gutter", color) + f" {_bare_path(diag)}")
    for index, (source, marks, first) in enumerate(groups):
        out.extend(_group_lines(source, marks, first, index, width, level, color))
    out.extend(_footer(diag, width, color))
    return "\n".join(out) + "\n"


def _mark_groups(diag: Diagnostic) -> list[tuple[SourceFile, list[_Mark], Region]]:
    """Marks grouped by file: the primary span's file first, then labels' files in order.

    Each group keeps the region of its first span, which its `-->`/`:::` line points at.
    """
    spans: list[tuple[Span, bool, str]] = []
    if diag.span is not None:
        spans.append((diag.span, True, diag.label))
    spans.extend((label.span, False, label.message) for label in diag.labels)
    groups: dict[SourceFile, tuple[list[_Mark], Region]] = {}
    for span, primary, message in spans:
        if span.source not in groups:
            groups[span.source] = ([], region(span))
        groups[span.source][0].append(_mark(span, primary, message))
    return [(source, marks, first) for source, (marks, first) in groups.items()]


def _mark(span: Span, primary: bool, message: str) -> _Mark:
    """Underline a span on its first line; a span over several lines says where it ends."""
    r = region(span)
    text = span.source.line_text(r.line)
    start = min(r.column - 1, len(text))
    if r.end_line == r.line:
        end = min(r.end_column - 1, len(text))
    else:
        end = len(text)
        message = f"{message} (continues to line {r.end_line})".lstrip()
    return _Mark(r.line, start, max(start, end), primary, _printable(message, newlines=False))


def _group_lines(
    source: SourceFile, marks: list[_Mark], first: Region, index: int, width: int, level: str, color: bool
) -> list[str]:
    """The `-->` line, then each marked line (with context or `...` between) and its art."""
    bar = _paint(f"{' ' * width} |", "gutter", color)
    arrow = "-->" if index == 0 else ":::"
    out = [] if index == 0 else [bar]
    out.append(_paint(f"{' ' * width}{arrow}", "gutter", color) + f" {first.path}:{first.line}:{first.column}")
    out.append(bar)
    previous = None
    for line in sorted({m.line for m in marks}):
        out.extend(_gap_lines(source, previous, line, width, color))
        out.append(_source_line(source, line, width, color))
        art = _annotation_rows([m for m in marks if m.line == line], source.line_text(line), level, color)
        out.extend(f"{bar} {row}" for row in art)
        previous = line
    return out


def _gap_lines(source: SourceFile, previous: int | None, line: int, width: int, color: bool) -> list[str]:
    """Between two marked lines: the one line between them, or `...` for a longer gap."""
    if previous is None or line - previous <= 1:
        return []
    if line - previous == 2:
        return [_source_line(source, previous + 1, width, color)]
    return [_paint("...", "gutter", color)]


def _source_line(source: SourceFile, line: int, width: int, color: bool) -> str:
    shown, _ = _display(source.line_text(line))
    return (_paint(f"{line:<{width}} |", "gutter", color) + f" {shown}").rstrip()


def _footer(diag: Diagnostic, width: int, color: bool) -> list[str]:
    """`= help: …` then `= note: …`; continuation lines align under the text."""
    items = ([("help", diag.help)] if diag.help else []) + [("note", note) for note in diag.notes]
    out = []
    for kind, text in items:
        indent = " " * (width + 1)
        first, *rest = _printable(text, newlines=True).split("\n")
        out.append(indent + _paint("=", "gutter", color) + " " + _paint(kind, "bold", color) + f": {first}")
        out.extend(" " * (len(indent) + len(kind) + 4) + more for more in rest)
    return out


# -- drawing the underlines and labels --------------------------------------------------


class _Row:
    """One row of annotation art, cell by display column, so later marks paint over earlier."""

    def __init__(self) -> None:
        self.cells: list[tuple[str, str]] = []

    def put(self, column: int, text: str, style: str) -> None:
        while len(self.cells) <= column:
            self.cells.append((" ", ""))
        self.cells[column] = (text, style)

    def write(self, column: int, text: str, style: str) -> None:
        """Put a message: it ends the row, so whatever was to its right is dropped."""
        del self.cells[column:]
        self.put(column, text, style)

    def render(self, color: bool) -> str:
        """The row's text, one ANSI sequence per run of equally styled cells."""
        runs = groupby(self.cells, key=lambda cell: cell[1])
        return "".join(_paint("".join(text for text, _ in run), style, color) for style, run in runs).rstrip()


# A mark with the display columns [start, end) it covers on screen.
_Placed = tuple[tuple[int, int], _Mark]


def _annotation_rows(marks: list[_Mark], text: str, level: str, color: bool) -> list[str]:
    """rustc's layout: underlines, the rightmost message inline, others hung on `|` lines."""
    _, columns = _display(text)
    placed: list[_Placed] = [(_screen_range(m, columns), m) for m in marks]
    underline = _Row()
    for (start, end), mark in sorted(placed, key=lambda item: item[1].primary):
        for column in range(start, end):
            underline.put(column, "^" if mark.primary else "-", _style(mark, level))
    labelled = sorted((p for p in placed if p[1].message), key=lambda p: p[0])
    rightmost = max(end for (_, end), _ in placed)
    if labelled and labelled[-1][0][1] >= rightmost:
        (_, end), mark = labelled.pop()
        underline.write(end + 1, mark.message, _style(mark, level))
    rows = [underline]
    if labelled:
        rows.append(_hanging_row(labelled, None, level))
        rows.extend(_hanging_row(labelled, i, level) for i in reversed(range(len(labelled))))
    return [row.render(color) for row in rows]


def _hanging_row(labelled: list[_Placed], upto: int | None, level: str) -> _Row:
    """Bars for the marks left of `upto`, then its message; all bars when `upto` is None."""
    row = _Row()
    bars = labelled if upto is None else labelled[:upto]
    for (start, _), mark in bars:
        row.put(start, "|", _style(mark, level))
    if upto is not None:
        (start, _), mark = labelled[upto]
        row.write(start, mark.message, _style(mark, level))
    return row


def _style(mark: _Mark, level: str) -> str:
    return level if mark.primary else "secondary"


def _screen_range(mark: _Mark, columns: list[int]) -> tuple[int, int]:
    """Display columns of a mark; at least one cell, so empty spans still get a caret."""
    start = columns[mark.start]
    return start, max(columns[mark.end], start + 1)


# -- what a source line looks like on screen --------------------------------------------

_TAB = "    "
_INVISIBLE = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _display(text: str) -> tuple[str, list[int]]:
    """The line as shown, and the display column where each character (and the end) begins.

    Tabs become four spaces (as rustc shows them), control characters their visible
    pictures and bidirectional overrides U+FFFD, so the art lines up and a source line
    cannot reorder or clear the terminal.
    """
    shown, columns, column = [], [], 0
    for ch in text:
        columns.append(column)
        visible = _visible(ch)
        shown.append(visible)
        column += sum(_cell_width(c) for c in visible)
    columns.append(column)
    return "".join(shown), columns


def _printable(text: str, *, newlines: bool) -> str:
    """A message safe to print: no control sequences from recipe text reach the terminal.

    Newlines are kept where a format has room for more lines, else become spaces.
    """
    if text.isprintable():
        return text
    return "".join(ch if newlines and ch == "\n" else " " if ch == "\n" else _visible(ch) for ch in text)


def _visible(ch: str) -> str:
    code = ord(ch)
    if ch == "\t":
        return _TAB
    if code < 0x20:
        return chr(0x2400 + code)
    if code == 0x7F:
        return "\u2421"
    if 0x80 <= code < 0xA0 or ch in _INVISIBLE:
        return "\ufffd"
    return ch


def _cell_width(ch: str) -> int:
    """Terminal cells a character takes: 2 for wide East Asian, 0 for combining marks."""
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


# ---------------------------------------------------------------------------------------
# json


def render_json(diagnostics: Sequence[Diagnostic], *, color: bool = False) -> str:
    """A JSON array, keys in a fixed order, ASCII-only so any pipe or terminal carries it."""
    import json

    return json.dumps([_json_diagnostic(d) for d in diagnostics], indent=2) + "\n"


def _json_diagnostic(diag: Diagnostic) -> dict:
    """One diagnostic; positions and optional texts are null when absent."""
    position = _json_position(diag.span, _bare_path(diag))
    return {
        "code": diag.code,
        "name": diag.name,
        "severity": diag.level.value,
        "message": diag.message,
        **position,
        "help": diag.help or None,
        "label": diag.label or None,
        "labels": [{**_json_position(label.span, None), "message": label.message} for label in diag.labels],
        "notes": list(diag.notes),
    }


def _json_position(span: Span | None, path: str | PurePath | None) -> dict:
    if span is None:
        file = PurePath(path).as_posix() if path is not None else None
        return {"file": file, "line": None, "column": None, "end_line": None, "end_column": None}
    r = region(span)
    return {
        "file": r.posix_path,
        "line": r.line,
        "column": r.column,
        "end_line": r.end_line,
        "end_column": r.end_column,
    }


# ---------------------------------------------------------------------------------------
# github


_GITHUB_COMMAND = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.NOTE: "notice"}


def render_github(diagnostics: Sequence[Diagnostic], *, color: bool = False) -> str:
    """GitHub Actions workflow commands, which become annotations on the pull request."""
    return "".join(_github_line(d) + "\n" for d in diagnostics)


def _github_line(diag: Diagnostic) -> str:
    properties = {**_github_position(diag), "title": f"{diag.code} {diag.name}"}
    joined = ",".join(f"{key}={_github_property(str(value))}" for key, value in properties.items())
    return f"::{_GITHUB_COMMAND[diag.level]} {joined}::{_github_data(_long_message(diag))}"


def _github_position(diag: Diagnostic) -> dict:
    """file/line/col/endLine/endColumn; columns only when the span is on one line.

    GitHub ignores (its API rejects) columns on annotations spanning several lines.
    """
    if diag.span is None:
        path = _bare_path(diag)
        return {"file": PurePath(path).as_posix()} if path is not None else {}
    r = region(diag.span)
    if r.line != r.end_line:
        return {"file": r.posix_path, "line": r.line, "endLine": r.end_line}
    return {"file": r.posix_path, "line": r.line, "col": r.column, "endLine": r.end_line, "endColumn": r.end_column}


def _long_message(diag: Diagnostic) -> str:
    """The message with its help and notes, for formats that show only one text."""
    lines = [diag.message]
    if diag.help:
        lines.append(f"help: {diag.help}")
    lines.extend(f"note: {note}" for note in diag.notes)
    return "\n".join(lines)


def _github_data(text: str) -> str:
    """Escape a command's message as the Actions runner unescapes it (`%` first)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _github_property(text: str) -> str:
    """Escape a property value: as data, plus `:` and `,` which end values."""
    return _github_data(text).replace(":", "%3A").replace(",", "%2C")


# ---------------------------------------------------------------------------------------
# sarif


_SARIF_LEVEL = {Severity.ERROR: "error", Severity.WARNING: "warning", Severity.NOTE: "note"}


def render_sarif(diagnostics: Sequence[Diagnostic], *, color: bool = False) -> str:
    """A SARIF 2.1.0 log (code scanning): one run, every code as a rule, one result each.

    Columns count Unicode code points, which the run states with `columnKind`; SARIF's
    end column is exclusive, as everywhere here.
    """
    import json

    log = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [
            {
                "tool": {"driver": _sarif_driver()},
                "columnKind": "unicodeCodePoints",
                "results": [_sarif_result(d) for d in diagnostics],
            }
        ],
    }
    return json.dumps(log, indent=2) + "\n"


def _sarif_driver() -> dict:
    from peftdsl import __version__

    return {"name": "peftdsl", "version": __version__, "rules": [_sarif_rule(code) for code in CODES]}


def _sarif_rule(code: str) -> dict:
    entry = CODES[code]
    return {
        "id": entry.id,
        "name": entry.name,
        "shortDescription": {"text": entry.summary},
        "helpUri": f"{DOCS_URI}#{entry.id.lower()}",
        "defaultConfiguration": {"level": _SARIF_LEVEL[entry.severity]},
    }


_RULE_INDEX = {code: index for index, code in enumerate(CODES)}


def _sarif_result(diag: Diagnostic) -> dict:
    """A result; without a span it has a file-only location, or none without a file."""
    result: dict = {
        "ruleId": diag.code,
        "ruleIndex": _RULE_INDEX[diag.code],
        "level": _SARIF_LEVEL[diag.level],
        "message": {"text": _long_message(diag)},
    }
    location = _sarif_primary_location(diag)
    if location is not None:
        result["locations"] = [location]
    if diag.labels:
        result["relatedLocations"] = [
            {"id": i, **_sarif_location(label.span), "message": {"text": label.message}}
            for i, label in enumerate(diag.labels)
        ]
    return result


def _sarif_primary_location(diag: Diagnostic) -> dict | None:
    if diag.span is not None:
        location = _sarif_location(diag.span)
        if diag.label:
            location["message"] = {"text": diag.label}
        return location
    path = _bare_path(diag)
    if path is None:
        return None
    return {"physicalLocation": {"artifactLocation": {"uri": _artifact_uri(path)}}}


def _sarif_location(span: Span) -> dict:
    r = region(span)
    return {
        "physicalLocation": {
            "artifactLocation": {"uri": _artifact_uri(r.source.path)},
            "region": {
                "startLine": r.line,
                "startColumn": r.column,
                "endLine": r.end_line,
                "endColumn": r.end_column,
            },
        }
    }


def _artifact_uri(path: str | PurePath) -> str:
    """A URI reference: relative paths stay relative (forward slashes, percent-encoded)."""
    from urllib.parse import quote

    pure = PurePath(path)
    if pure.is_absolute():
        return pure.as_uri()
    return quote(pure.as_posix(), safe="/")


# ---------------------------------------------------------------------------------------

Renderer = Callable[..., str]

RENDERERS: dict[str, Renderer] = {
    "full": render_full,
    "concise": render_concise,
    "json": render_json,
    "github": render_github,
    "sarif": render_sarif,
}

FORMATS: tuple[str, ...] = tuple(RENDERERS)
