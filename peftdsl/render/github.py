"""The `github` format: GitHub Actions workflow commands (pull-request annotations)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePath

from peftdsl.diagnostics import Diagnostic, Severity
from peftdsl.render.positions import _bare_path, _long_message, region

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


def _github_data(text: str) -> str:
    """Escape a command's message as the Actions runner unescapes it (`%` first)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _github_property(text: str) -> str:
    """Escape a property value: as data, plus `:` and `,` which end values."""
    return _github_data(text).replace(":", "%3A").replace(",", "%2C")
