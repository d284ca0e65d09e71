"""Stage 2: parse expression scalars with the Lark grammar in `grammar/expr.lark`.

Parse errors become S101 diagnostics in a person's words, at their real line and
column inside the recipe file: an expression node's span is the scalar's start plus
Lark's offsets, or the whole scalar where the YAML text is not the value verbatim
(block or escaped scalars).
"""

from __future__ import annotations

import functools
import math
from importlib import resources

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from peftdsl import ir
from peftdsl.diagnostics import Sink
from peftdsl.spans import Span

# Deeper trees are refused rather than risking Python's recursion limit in later passes.
MAX_DEPTH = 200
MAX_LENGTH = 20_000

_BINARY = {"add": "+", "sub": "-", "mul": "*", "div": "/"}

_TERMINAL_WORDS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a quoted string",
    "LPAR": "`(`",
    "RPAR": "`)`",
    "PLUS": "`+`",
    "MINUS": "`-`",
    "STAR": "`*`",
    "SLASH": "`/`",
    "COMMA": "`,`",
    "EQUAL": "`=`",
}


@functools.cache
def grammar_text() -> str:
    """The grammar as shipped inside the package (the source of truth for syntax)."""
    return resources.files("peftdsl.grammar").joinpath("expr.lark").read_text(encoding="utf-8")


@functools.cache
def _parser() -> Lark:
    # cache=True keeps the built LALR tables in the temp folder: building them costs
    # ~0.1 s, a third of lint's latency budget.
    options = dict(parser="lalr", propagate_positions=True, maybe_placeholders=False)
    try:
        return Lark(grammar_text(), cache=True, **options)
    except OSError:  # read-only temp folder
        return Lark(grammar_text(), **options)


def expression_base(text: str, scalar: Span, quoted: bool) -> int | None:
    """Offset in the file where `text` starts verbatim, or None (spans fall back to the scalar)."""
    source = scalar.source.text
    for start in (scalar.start, scalar.start + 1) if quoted else (scalar.start,):
        if source[start : start + len(text)] == text:
            return start
    return None


def parse_expression(text: str, scalar: Span, sink: Sink, *, quoted: bool = False) -> ir.Expr | None:
    """Parse one expression scalar; report S101/S102 and return None on failure."""
    base = expression_base(text, scalar, quoted)

    def span_at(start: int, end: int) -> Span:
        return Span(scalar.source, base + start, base + end) if base is not None else scalar

    if len(text) > MAX_LENGTH:
        sink.emit("S102", f"expression is {len(text)} characters long (the limit is {MAX_LENGTH})", scalar,
                  help="split it into named compositions")
        return None
    if not text.strip():
        sink.emit("S101", "empty expression", scalar, help="write an expression such as `0.5 * a + 0.5 * b`")
        return None
    try:
        tree = _parser().parse(text)
    except UnexpectedInput as err:
        _report_syntax_error(err, text, span_at, sink)
        return None
    depth = _depth(tree)
    if depth > MAX_DEPTH:
        sink.emit("S102", f"expression nests {depth} levels deep (the limit is {MAX_DEPTH})", scalar,
                  help="split it into named compositions")
        return None
    builder = _Builder(span_at, sink)
    expr = builder.build(tree)
    return None if builder.failed else expr  # a number too large to represent (T408)


# Operators of one precedence level: a chain of them (`a + b - c`) is one level of nesting.
_LEVEL = {"add": "sum", "sub": "sum", "mul": "product", "div": "product"}


def _depth(tree: Tree) -> int:
    """How deep the expression nests, computed without recursion (inputs may nest thousands deep).

    Parentheses, calls, unary operators and changes of precedence nest; the left operand
    of a left-associative chain does not: `a + b + … + z` is long, not deep, and every
    later pass walks such a chain with a loop (`ir.left_spine`).
    """
    deepest, stack = 0, [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        level = _LEVEL.get(node.data)
        for i, child in enumerate(node.children):
            if isinstance(child, Tree):
                flat = i == 0 and level is not None and _LEVEL.get(child.data) == level
                stack.append((child, depth if flat else depth + 1))
    return deepest


def _report_syntax_error(err: UnexpectedInput, text: str, span_at, sink: Sink) -> None:
    pos = getattr(err, "pos_in_stream", None)
    if isinstance(err, UnexpectedCharacters):
        char = text[pos] if pos is not None and pos < len(text) else "?"
        message, span = f"unexpected character `{char}`", span_at(pos, pos + 1)
    elif isinstance(err, UnexpectedToken) and err.token.type != "$END":
        token = err.token
        message = f"unexpected {_describe(token)}"
        span = span_at(token.start_pos, token.end_pos)
    else:  # the text ended while an operand or a `)` was still expected
        end = len(text.rstrip())
        message, span = "expression ends too early", span_at(max(end - 1, 0), end)
    # `accepts` (what the parser really accepts here) is sharper than LALR's `expected`.
    terminals = getattr(err, "accepts", None) or getattr(err, "expected", None) or ()
    expected = sorted({_TERMINAL_WORDS.get(t, "") for t in terminals} - {""})
    label = f"expected {_or_list(expected)}" if expected else ""
    sink.emit("S101", message, span, label=label, help=_syntax_help(message, text))


def _describe(token: Token) -> str:
    word = _TERMINAL_WORDS.get(token.type)
    if token.type in ("NAME", "NUMBER", "STRING"):
        return f"{word[2:] if word.startswith('a ') else word} `{token}`"
    return word or f"`{token}`"


def _or_list(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _syntax_help(message: str, text: str) -> str:
    if text.count("(") != text.count(")"):
        return "parentheses are unbalanced"
    if "ends too early" in message:
        return "an operator needs an operand on each side"
    return ""


class _Builder:
    """Lark tree -> IR nodes, with spans mapped into the recipe file."""

    def __init__(self, span_at, sink: Sink):
        self.span_at, self.sink = span_at, sink
        self.failed = False

    def span(self, item: Tree | Token) -> Span:
        if isinstance(item, Token):
            return self.span_at(item.start_pos, item.end_pos)
        return self.span_at(item.meta.start_pos, item.meta.end_pos)

    def build(self, item: Tree | Token) -> ir.Expr:
        if isinstance(item, Token):  # a bare NUMBER/NAME can surface when inlined
            return self._token(item)
        method = getattr(self, f"_{item.data}")
        return method(item)

    def _token(self, token: Token) -> ir.Expr:
        if token.type == "NUMBER":
            return self._to_number(token, self.span(token))
        return ir.Name(id=str(token), span=self.span(token))

    def _to_number(self, token: Token, span: Span) -> ir.Number:
        value = float(token)
        if not math.isfinite(value):
            self.sink.emit("T408", f"number `{token}` is too large to represent", span,
                           help="numbers are 64-bit floats, up to about 1.8e308")
            self.failed, value = True, 0.0
        return ir.Number(value=value, span=span)

    def _number(self, tree: Tree) -> ir.Expr:
        return self._to_number(tree.children[0], self.span(tree))

    def _name(self, tree: Tree) -> ir.Expr:
        return ir.Name(id=str(tree.children[0]), span=self.span(tree))

    def _neg(self, tree: Tree) -> ir.Expr:
        return ir.Neg(operand=self.build(tree.children[0]), span=self.span(tree))

    def _pos(self, tree: Tree) -> ir.Expr:
        return self.build(tree.children[0])

    def _binary(self, tree: Tree) -> ir.Expr:
        """A left-associative chain (`a + b - c + …`) built by a loop down its left spine:
        a flat sum of thousands of terms is long, not deep, and must not recurse per term."""
        spine = [tree]
        while isinstance(spine[-1].children[0], Tree) and spine[-1].children[0].data in _BINARY:
            spine.append(spine[-1].children[0])
        expr = self.build(spine[-1].children[0])
        for node in reversed(spine):
            expr = ir.Binary(op=_BINARY[node.data], left=expr, right=self.build(node.children[1]),
                             span=self.span(node))
        return expr

    _add = _sub = _mul = _div = _binary

    def _call(self, tree: Tree) -> ir.Expr:
        name, *rest = tree.children
        items = rest[0].children if rest else []
        args: list[ir.Expr] = []
        keywords: list[ir.Keyword] = []
        for item in items:
            if isinstance(item, Tree) and item.data == "keyword":
                keywords.append(self._keyword(item))
            else:
                if keywords:
                    self.sink.emit("S101", "positional argument after a keyword argument", self.span(item),
                                   help="put positional arguments first")
                args.append(self.build(item))
        return ir.Call(func=str(name), args=tuple(args), keywords=tuple(keywords),
                       span=self.span(tree), func_span=self.span(name))

    def _keyword(self, tree: Tree) -> ir.Keyword:
        name, value = tree.children
        if isinstance(value, Token) and value.type == "STRING":
            built: ir.Expr | ir.Literal = ir.String(value=str(value)[1:-1], span=self.span(value))
        else:
            built = self.build(value)
            if isinstance(built, ir.Name) and built.id in ("true", "false"):  # a flag, not a param
                built = ir.Flag(value=built.id == "true", span=built.span)
        return ir.Keyword(name=str(name), value=built, span=self.span(tree))
