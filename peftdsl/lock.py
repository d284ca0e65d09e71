"""`peftdsl lock`: write sha256 pins into a recipe, keeping its comments and layout.

The recipe is edited as text, at the spans the loader recorded, so nothing but the
pins changes: a short form `chat: path` becomes `chat: {path: path, sha256: "…"}`,
a long form gains (or updates) its `sha256:` line, a flow mapping its entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

from peftdsl.build import build_recipe, read_source
from peftdsl.diagnostics import Sink
from peftdsl.inputs import InputError, locate_adapter, source_files
from peftdsl.numbers import plural
from peftdsl.spans import SourceFile
from peftdsl.yamlload import load_yaml


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """A source's pin: its one file's sha256, or for a sharded model the sha256 of the lines
    `<shard name> <shard sha256>`, in order (a changed, renamed or added shard changes it)."""
    return combine_sha256([(p.name, sha256_file(p)) for p in paths])


def combine_sha256(digests: list[tuple[str, str]]) -> str:
    """The pin of files whose (name, sha256) are `digests`, in order (see `sha256_files`)."""
    if len(digests) == 1:
        return digests[0][1]
    lines = "".join(f"{name} {digest}\n" for name, digest in digests)
    return hashlib.sha256(lines.encode()).hexdigest()


def lock_command(path: Path) -> int:
    """`peftdsl lock PATH`: pin every adapter's sha256 into the recipe, keeping its text."""
    from peftdsl.console import EXIT_ERRORS, EXIT_OK, print_diagnostics

    source = read_source(path)
    sink = Sink()
    recipe = build_recipe(source, sink)
    pins: dict[str, str] = {}
    if recipe is not None:
        for adapter in recipe.adapters:
            try:
                # The file `run` reads and checks the pin of: the safetensors, else a pickle.
                files = source_files(adapter.name, locate_adapter(adapter), allow_pickle=True)
                pins[adapter.name] = sha256_files(files)
            except InputError as err:
                sink.emit(err.code, err.message, adapter.span, help=err.help)
            except OSError as err:
                sink.emit("I304", f"cannot read adapter `{adapter.name}`: {err.strerror or err}", adapter.span)
    print_diagnostics(sink.items, "full", sys.stderr.isatty())
    if recipe is None or sink.has_errors():
        return EXIT_ERRORS
    text = pinned_text(source, pins)
    try:
        _check_pinned(source, text, pins)
    except ValueError as err:  # a layout the text edit does not handle: say so, write nothing
        print(f"peftdsl: error: cannot pin {path} in place ({err}); add the sha256 pins by hand",
              file=sys.stderr)
        return EXIT_ERRORS
    if text != source.text:
        try:
            _replace(path.resolve(), text)  # a symlinked recipe: pin its target, keep the link
        except OSError as err:
            print(f"peftdsl: error: cannot write the pinned recipe {path}: {err.strerror or err}; "
                  "nothing was changed", file=sys.stderr)
            return EXIT_ERRORS
    print(f"pinned {plural(len(pins), 'adapter')} in {path}", file=sys.stderr)
    return EXIT_OK


def pinned_text(source, pins: dict[str, str]) -> str:
    """The recipe's text with every adapter in `pins` pinned; all else byte for byte."""
    loaded = load_yaml(source, Sink())
    edits: list[tuple[int, int, str]] = []
    text = source.text
    newline = "\r\n" if "\r\n" in text else "\n"
    for name, digest in pins.items():
        loc = loaded.spans[("adapters", name)]
        value = loaded.data["adapters"][name]
        pin = f'"{digest}"'
        if not isinstance(value, dict):  # short form: the path, quoted so that `a,b` or `1e3` stay text
            path = loc.value.text if loc.quoted else json.dumps(loc.value.text)
            edits.append((loc.value.start, loc.value.end, f"{{path: {path}, sha256: {pin}}}"))
        elif "sha256" in value:
            old = loaded.spans[("adapters", name, "sha256")].value
            edits.append((old.start, old.end, pin))
        elif loc.value.text.startswith("{"):
            close = loc.value.end - 1  # the closing brace
            comma = "" if text[:close].rstrip().endswith((",", "{")) else ","
            edits.append((close, close, f"{comma} sha256: {pin}"))
        else:
            path_key = loaded.spans[("adapters", name, "path")]
            line_end = text.find("\n", path_key.value.end)
            line_end = len(text) if line_end < 0 else line_end
            if text[line_end - 1:line_end] == "\r":
                line_end -= 1
            indent = path_key.key.start - text.rfind("\n", 0, path_key.key.start) - 1
            edits.append((line_end, line_end, newline + " " * indent + f"sha256: {pin}"))
    for start, end, replacement in sorted(edits, reverse=True):
        text = text[:start] + replacement + text[end:]
    return text


def _check_pinned(source, text: str, pins: dict[str, str]) -> None:
    """The edited recipe must mean what the original meant, plus the pins: never write otherwise."""
    sink = Sink()
    before, after = build_recipe(source, Sink()), build_recipe(SourceFile(source.path, text), sink)
    if after is None or sink.has_errors():
        raise ValueError("the pinned recipe does not build")
    for adapter in before.adapters:
        edited = after.adapter(adapter.name)
        if edited is None or edited.location != adapter.location or edited.sha256 != pins.get(adapter.name):
            raise ValueError(f"pinning changed adapter `{adapter.name}`")


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
