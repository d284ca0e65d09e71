"""Source files and spans: two offsets into a file, turned into line:column only to render."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class SourceFile:
    """The text of one recipe, with a line index for offset -> (line, column)."""

    path: Path
    text: str
    line_starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        starts = [0]
        starts.extend(i + 1 for i, ch in enumerate(self.text) if ch == "\n")
        object.__setattr__(self, "line_starts", tuple(starts))

    @property
    def display_path(self) -> str:
        """The path as the user wrote it (relative where it was given relative)."""
        return str(self.path)

    def line_col(self, offset: int) -> tuple[int, int]:
        """1-based line and column of a character offset (column counts characters)."""
        offset = max(0, min(offset, len(self.text)))
        line = bisect.bisect_right(self.line_starts, offset) - 1
        return line + 1, offset - self.line_starts[line] + 1

    def line_text(self, line: int) -> str:
        """The text of a 1-based line, without its newline."""
        start = self.line_starts[line - 1]
        end = self.line_starts[line] - 1 if line < len(self.line_starts) else len(self.text)
        return self.text[start:end].rstrip("\r")


@dataclass(frozen=True, slots=True)
class Span:
    """A half-open range [start, end) of character offsets into one source file."""

    source: SourceFile = field(repr=False)
    start: int
    end: int

    @property
    def text(self) -> str:
        return self.source.text[self.start : self.end]

    @property
    def line(self) -> int:
        """1-based line of the span's start."""
        return self.source.line_col(self.start)[0]

    @property
    def column(self) -> int:
        """1-based column (in characters) of the span's start."""
        return self.source.line_col(self.start)[1]

    @property
    def path(self) -> Path:
        return self.source.path

    def to(self, other: Span) -> Span:
        """The smallest span covering both `self` and `other`."""
        return Span(self.source, min(self.start, other.start), max(self.end, other.end))

    def sub(self, start: int, end: int) -> Span:
        """A span at offsets relative to this one's start."""
        return Span(self.source, self.start + start, self.start + end)
