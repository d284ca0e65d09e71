"""Render diagnostics for people and for machines: full, concise, json, github, sarif.

Spans stay character offsets until here (STYLE.md); this package is the one place that
turns them into positions, with the same conventions in every format:

- lines and columns are 1-based and count characters (Unicode code points, as Python
  indexes a `str`), so a column agrees with `SourceFile.line_col`; a tab is one column;
- the end of a span is exclusive: the line of its last character, and that character's
  column plus one. An empty span ends where it starts.

Only the `full` format looks at how wide characters are on screen (tabs, CJK, combining
marks), and only to place underlines; it never changes the numbers it prints.

`peftdsl lint` runs inside pre-commit hooks, so this package imports only light parts of
the standard library (json lazily) and never torch or rich: colour is plain ANSI.

One module per format (`full`, `concise`, `json`, `github`, `sarif`), each with its
`render_*` emitter; `positions` holds what several of them share.
"""

from __future__ import annotations

from collections.abc import Callable

from peftdsl.render.concise import render_concise
from peftdsl.render.full import render_full, summary_line
from peftdsl.render.github import render_github
from peftdsl.render.json import render_json
from peftdsl.render.positions import Region, region
from peftdsl.render.sarif import DOCS_URI, render_sarif

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

Renderer = Callable[..., str]

RENDERERS: dict[str, Renderer] = {
    "full": render_full,
    "concise": render_concise,
    "json": render_json,
    "github": render_github,
    "sarif": render_sarif,
}

FORMATS: tuple[str, ...] = tuple(RENDERERS)
