"""The `sarif` format: a SARIF 2.1.0 log for code scanning."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import PurePath

from peftdsl.diagnostics import CODES, Diagnostic, Severity
from peftdsl.render.positions import _bare_path, _long_message, region
from peftdsl.spans import Span

# Where each code is explained; `#t401` anchors exist in that file (one per code).
DOCS_URI = "docs/diagnostics.md"
SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"


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
