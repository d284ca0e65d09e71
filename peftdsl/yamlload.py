"""Stage 1: load a recipe's YAML keeping the span of every key and value.

PyYAML's composer gives nodes with marks (character offsets); we walk them into
plain Python values plus a table of spans keyed by path, so that later stages can
point at `adapters.toxic.rank` as `detox.yaml:9:11`. Only the safe core schema is
accepted: no object tags, and a node budget that stops alias bombs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from peftdsl.diagnostics import Sink
from peftdsl.spans import SourceFile, Span

Path_ = tuple[str | int, ...]

# Far more nodes than any real recipe has; an alias bomb reaches it in microseconds.
MAX_NODES = 20_000
MAX_DEPTH = 64

class RecipeLoader(yaml.SafeLoader):
    """The safe loader, with YAML 1.2 floats: `1e-3` is a number, not the string YAML 1.1 makes it.

    It notes every alias (`*x`) it composes, so the recipe can refuse them (Y007): an alias
    makes two places share one node, and with it one position. Aliases that are the value
    of a `<<` merge key are left to the merge key's own diagnostic.
    """

    def __init__(self, stream):
        super().__init__(stream)
        self.aliases: list[tuple[yaml.AliasEvent, yaml.Node | None]] = []

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            merge = isinstance(index, yaml.ScalarNode) and index.tag == "tag:yaml.org,2002:merge"
            if not merge:
                self.aliases.append((event, self.anchors.get(event.anchor)))
        return super().compose_node(parent, index)


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)

_STANDARD_TAGS = {
    "tag:yaml.org,2002:" + t
    for t in ("str", "int", "float", "bool", "null", "map", "seq", "timestamp", "binary")
}


@dataclass(frozen=True, slots=True)
class Located:
    """Where a value sits: the span of its key (if any) and of the value itself."""

    value: Span
    key: Span | None = None
    quoted: bool = False  # the scalar was written in quotes (so `'12'` is a string)


@dataclass
class LoadedYaml:
    source: SourceFile
    data: Any
    spans: dict[Path_, Located] = field(default_factory=dict)

    def span(self, path: Path_, *, key: bool = False) -> Span:
        """The span of the value at `path` (or of its key), else of the nearest ancestor."""
        for cut in range(len(path), -1, -1):
            loc = self.spans.get(tuple(path[:cut]))
            if loc is not None:
                return (loc.key or loc.value) if key and cut == len(path) else loc.value
        return Span(self.source, 0, 0)


class _TooComplex(Exception):
    pass


def load_yaml(source: SourceFile, sink: Sink) -> LoadedYaml | None:
    """Parse `source`; report Y001/Y002/Y007 to `sink`; None when unusable."""
    loader = None
    try:
        loader = RecipeLoader(source.text)  # its reader refuses NUL bytes and the like at once
        nodes = []
        while loader.check_node():
            nodes.append(loader.get_node())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = mark.index if mark is not None else 0
        problem = (err.problem or err.context or "invalid YAML").strip()
        sink.emit("Y001", f"invalid YAML: {problem}", Span(source, at, min(at + 1, len(source.text))))
        return None
    except yaml.YAMLError as err:  # reader errors: NUL bytes, bad encodings
        sink.emit("Y001", f"invalid YAML: {_first_line(str(err))}", Span(source, 0, 0))
        return None
    except RecursionError:  # PyYAML composes nested collections recursively: `[[[[…` thousands deep
        at = min(loader.pointer, len(source.text)) if loader is not None else 0
        sink.emit("Y007", f"the recipe nests deeper than {MAX_DEPTH} levels", Span(source, at, at),
                  help="a recipe needs a few levels of nesting; write the values out")
        return None
    finally:
        if loader is not None:
            loader.dispose()
    if loader.aliases:  # the first one is enough: the file is refused either way
        alias, anchor = loader.aliases[0]
        more = len(loader.aliases) - 1
        sink.emit("Y007", f"YAML alias `*{alias.anchor}` is not allowed in a recipe",
                  Span(source, alias.start_mark.index, alias.end_mark.index),
                  labels=_label(_node_span(source, anchor), "its anchor") if anchor is not None else (),
                  help="write the value out in full; aliases hide where a value was written",
                  notes=(f"the file has {more} more alias{'es' if more > 1 else ''}",) if more else ())
        return None
    if len(nodes) > 1:
        second = nodes[1]
        sink.emit("Y001", "a recipe holds one YAML document, this file has several",
                  _node_span(source, second))
        return None
    loaded = LoadedYaml(source, None)
    if not nodes or nodes[0] is None:
        return loaded
    walker = _Walker(source, sink, loaded.spans)
    try:
        loaded.data = walker.walk(nodes[0], (), None)
    except _TooComplex as err:
        sink.emit("Y007", str(err), walker.last_span,
                  help="write the values out; a recipe does not need this many nodes")
        return None
    return loaded


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "invalid YAML"


def _node_span(source: SourceFile, node: yaml.Node) -> Span:
    return Span(source, node.start_mark.index, node.end_mark.index)


class _Walker:
    """Turns composed nodes into plain values, recording spans and refusing oddities."""

    def __init__(self, source: SourceFile, sink: Sink, spans: dict[Path_, Located]):
        self.source, self.sink, self.spans = source, sink, spans
        self.count = 0
        self.constructor = RecipeLoader("")
        self.last_span = Span(source, 0, 0)

    def walk(self, node: yaml.Node, path: Path_, key_span: Span | None, depth: int = 0) -> Any:
        self.count += 1
        span = _node_span(self.source, node)
        self.last_span = span
        if self.count > MAX_NODES:
            raise _TooComplex(f"the recipe expands to more than {MAX_NODES} YAML nodes (an alias bomb?)")
        if depth > MAX_DEPTH:
            raise _TooComplex(f"the recipe nests deeper than {MAX_DEPTH} levels")
        quoted = isinstance(node, yaml.ScalarNode) and node.style in ("'", '"')
        self.spans[path] = Located(_trim(span, node), key_span, quoted)
        if node.tag not in _STANDARD_TAGS:
            shown = node.tag.replace("tag:yaml.org,2002:", "!!", 1)
            self.sink.emit("Y007", f"YAML tag `{shown}` is not allowed in a recipe", span,
                           help="recipes use plain YAML values only")
            node = self._untagged(node)  # read on as if untagged, so one tag is one error
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path, depth)
        if isinstance(node, yaml.SequenceNode):
            return [self.walk(item, (*path, i), None, depth + 1) for i, item in enumerate(node.value)]
        return self._scalar(node, span)

    def _untagged(self, node: yaml.Node) -> yaml.Node:
        if isinstance(node, yaml.ScalarNode):
            tag = self.constructor.resolve(yaml.ScalarNode, node.value, (True, False))
            return yaml.ScalarNode(tag, node.value, node.start_mark, node.end_mark, style=node.style)
        kind, tag = ((yaml.MappingNode, "map") if isinstance(node, yaml.MappingNode) else (yaml.SequenceNode, "seq"))
        return kind("tag:yaml.org,2002:" + tag, node.value, node.start_mark, node.end_mark,
                    flow_style=node.flow_style)

    def _mapping(self, node: yaml.MappingNode, path: Path_, depth: int) -> dict:
        out: dict[str, Any] = {}
        first_seen: dict[str, Span] = {}
        for key_node, value_node in node.value:
            key_span = _node_span(self.source, key_node)
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag == "tag:yaml.org,2002:merge":
                self.sink.emit("Y007", "YAML merge keys (`<<`) are not allowed in a recipe", key_span,
                               help="write the keys out in full")
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                self.sink.emit("Y007", "mapping keys must be plain names", key_span)
                continue
            key = key_node.value
            if key in first_seen:
                self.sink.emit("Y002", f"duplicate key `{key}`", key_span, label="defined again here",
                               labels=_label(first_seen[key], "first defined here"),
                               help="remove one of them; YAML would silently keep the last")
                continue
            first_seen[key] = key_span
            out[key] = self.walk(value_node, (*path, key), key_span, depth + 1)
        return out

    def _scalar(self, node: yaml.ScalarNode, span: Span) -> Any:
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as err:
            self.sink.emit("Y001", f"invalid YAML value: {_first_line(str(err))}", span)
            return None
        except (ValueError, OverflowError, IndexError, TypeError, AttributeError):  # `!!float ""`, `!!timestamp x`
            kind = node.tag.rsplit(":", 1)[-1]
            self.sink.emit("Y001", f"invalid YAML value: `{node.value}` is not a valid {kind}", span)
            return None


def _trim(span: Span, node: yaml.Node) -> Span:
    """Block scalars' end marks run into the next line; keep spans on their text."""
    text = span.text
    stripped = text.rstrip()
    return Span(span.source, span.start, span.start + len(stripped)) if stripped else span


def _label(span: Span, message: str):
    from peftdsl.diagnostics import Label

    return (Label(span, message),)
