"""`peftdsl lock`: write sha256 pins into a recipe, keeping its comments and layout.

The recipe is edited as text, at the spans the loader recorded, so nothing but the
pins changes: a short form `chat: path` becomes `chat: {path: path, sha256: "…"}`,
a long form gains (or updates) its `sha256:` line, a flow mapping its entry.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

from peftdsl.build import build_recipe, read_source
from peftdsl.diagnostics import Sink
from peftdsl.inputs import InputError, adapter_weights, locate_adapter
from peftdsl.yamlload import load_yaml


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lock_command(args) -> int:
    from peftdsl.cli import EXIT_ERRORS, EXIT_OK, print_diagnostics

    source = read_source(args.recipe)
    sink = Sink()
    recipe = build_recipe(source, sink)
    pins: dict[str, str] = {}
    if recipe is not None:
        for adapter in recipe.adapters:
            try:
                # The file `run` reads and checks the pin of: the safetensors, else a pickle.
                weights = adapter_weights(adapter.name, locate_adapter(adapter), allow_pickle=True)
                pins[adapter.name] = sha256_file(weights)
            except InputError as err:
                sink.emit(err.code, err.message, adapter.span, help=err.help)
            except OSError as err:
                sink.emit("I304", f"cannot read adapter `{adapter.name}`: {err.strerror or err}", adapter.span)
    print_diagnostics(sink.items, "full", sys.stderr.isatty())
    if recipe is None or sink.has_errors():
        return EXIT_ERRORS
    text = pinned_text(source, pins)
    if text != source.text:
        _replace(args.recipe, text)
    print(f"pinned {len(pins)} adapter{'s' if len(pins) != 1 else ''} in {args.recipe}", file=sys.stderr)
    return EXIT_OK


def pinned_text(source, pins: dict[str, str]) -> str:
    """The recipe's text with every adapter in `pins` pinned; all else byte for byte."""
    loaded = load_yaml(source, Sink())
    edits: list[tuple[int, int, str]] = []
    text = source.text
    for name, digest in pins.items():
        loc = loaded.spans[("adapters", name)]
        value = loaded.data["adapters"][name]
        pin = f'"{digest}"'
        if isinstance(value, str):
            edits.append((loc.value.start, loc.value.end, f"{{path: {loc.value.text}, sha256: {pin}}}"))
        elif "sha256" in value:
            old = loaded.spans[("adapters", name, "sha256")].value
            edits.append((old.start, old.end, pin))
        elif loc.value.text.startswith("{"):
            close = loc.value.end - 1  # the closing brace
            edits.append((close, close, f", sha256: {pin}"))
        else:
            path_key = loaded.spans[("adapters", name, "path")]
            line_end = text.find("\n", path_key.value.end)
            line_end = len(text) if line_end < 0 else line_end
            indent = path_key.key.start - text.rfind("\n", 0, path_key.key.start) - 1
            edits.append((line_end, line_end, "\n" + " " * indent + f"sha256: {pin}"))
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def _replace(path: Path, text: str) -> None:
    """Write beside the file, then rename: an interrupted lock leaves the old recipe whole."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as out:
            out.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
