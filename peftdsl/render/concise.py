"""The `concise` format: one `path:line:col: error[CODE] message` line per diagnostic."""

from __future__ import annotations

from collections.abc import Sequence

from peftdsl.diagnostics import Diagnostic
from peftdsl.render.positions import _bare_path, _paint, _printable, region


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
