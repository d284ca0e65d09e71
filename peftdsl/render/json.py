"""The `json` format: an array of diagnostics, keys in a fixed order.

Named after its format like its siblings; `import json` here and in `sarif` is absolute,
so it is the standard library's module, not this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePath

from peftdsl.diagnostics import Diagnostic
from peftdsl.render.positions import _bare_path, region
from peftdsl.spans import Span


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
