"""What several formats share: positions of spans, colour, and message text.

`region` is the one place a span's character offsets become a line and column (see the
package docstring for the conventions). `_paint` is the plain-ANSI colour, `_printable`
keeps control sequences in recipe text from reaching a terminal, and `_long_message`
folds help and notes into one text for formats that show only one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePath

from peftdsl.diagnostics import Diagnostic
from peftdsl.spans import SourceFile, Span

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
# Text

_TAB = "    "
_INVISIBLE = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


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


def _long_message(diag: Diagnostic) -> str:
    """The message with its help and notes, for formats that show only one text."""
    lines = [diag.message]
    if diag.help:
        lines.append(f"help: {diag.help}")
    lines.extend(f"note: {note}" for note in diag.notes)
    return "\n".join(lines)
