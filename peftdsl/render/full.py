"""The `full` format: the source line, underlined, rustc/ruff style; and `summary_line`.

Only this format looks at how wide characters are on screen (tabs, CJK, combining
marks), and only to place underlines; it never changes the numbers it prints.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby

from peftdsl.diagnostics import Diagnostic, Severity
from peftdsl.numbers import plural
from peftdsl.render.positions import (
    Region,
    _bare_path,
    _paint,
    _printable,
    _visible,
    region,
)
from peftdsl.spans import SourceFile, Span


def summary_line(diagnostics: Sequence[Diagnostic], *, color: bool = False) -> str:
    """`error: 2 errors, 1 warning emitted`, or "" when there is nothing to count.

    Kept apart from `render_full` so the CLI decides whether (and after which files) to
    print it. Notes are not counted: they never change the exit status.
    """
    errors = sum(d.level is Severity.ERROR for d in diagnostics)
    warnings = sum(d.level is Severity.WARNING for d in diagnostics)
    parts = [plural(n, word) for n, word in ((errors, "error"), (warnings, "warning")) if n]
    if not parts:
        return ""
    level = "error" if errors else "warning"
    return f"{_paint(level, level, color)}: {', '.join(parts)} emitted"




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


def _cell_width(ch: str) -> int:
    """Terminal cells a character takes: 2 for wide East Asian, 0 for combining marks."""
    if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
