"""Property tests (hypothesis) of the front end.

(a) printing an expression and parsing it again gives an equal IR (spans do not take part);
(b) every expression node's span is the text it was parsed from, inside a real YAML recipe;
(c) `analyse` never raises: random text and mutated corpus recipes give diagnostics, never
    an exception, and every diagnostic renders in every format;
(d) canonical forms: `a + a` is `2*a`, `(1-lam)*a + lam*a` is `a`, sums commute.

Example counts are bounded so that the file runs in well under 30 s.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from peftdsl import ir
from peftdsl.build import build_recipe
from peftdsl.operators import OPERATORS
from peftdsl.compiler import Analysis
from peftdsl.compiler import Options, analyse
from peftdsl.diagnostics import CODES, Diagnostic, Sink
from peftdsl.parse import parse_expression
from peftdsl.render import RENDERERS
from peftdsl.spans import SourceFile, Span
from peftdsl.yamlload import RecipeLoader

CORPUS = Path(__file__).resolve().parent / "corpus"
CORPUS_TEXTS = {p.name: p.read_bytes() for p in sorted(CORPUS.glob("*.yaml"))}
NOWHERE = Span(SourceFile(Path("<generated>"), ""), 0, 0)

# ---------------------------------------------------------------- expressions

names = st.sampled_from(["a", "b", "chat", "toxic", "_x", "lam", "mu2", "sst2"]).filter(lambda n: n not in OPERATORS)
numbers = st.one_of(
    st.integers(min_value=0, max_value=10**6).map(float),
    st.floats(min_value=0, max_value=1e20, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.5, 0.1, 1e-5, 2.5e-3, 1e16, 123456789.0]),
)


def _call(args) -> ir.Call:
    arg, rank, majority = args
    keywords = [ir.Keyword(name="rank", value=ir.Number(value=float(rank), span=NOWHERE), span=NOWHERE)]
    func = "svd"
    if majority is not None:
        func = "ties"
        keywords = [
            ir.Keyword(name="density", value=ir.Number(value=0.5, span=NOWHERE), span=NOWHERE),
            ir.Keyword(name="majority", value=ir.String(value=majority, span=NOWHERE), span=NOWHERE),
        ]
    return ir.Call(func=func, args=(arg,), keywords=tuple(keywords), span=NOWHERE, func_span=NOWHERE)


def _extend(children):
    return st.one_of(
        children.map(lambda e: ir.Neg(operand=e, span=NOWHERE)),
        st.tuples(st.sampled_from("+-*/"), children, children).map(
            lambda t: ir.Binary(op=t[0], left=t[1], right=t[2], span=NOWHERE)),
        st.tuples(children, st.integers(1, 64), st.none() | st.sampled_from(["total", "frequency"])).map(_call),
    )


expressions = st.recursive(
    st.one_of(names.map(lambda n: ir.Name(id=n, span=NOWHERE)), numbers.map(lambda v: ir.Number(value=v, span=NOWHERE))),
    _extend,
    max_leaves=12,
)


def parse(text: str) -> ir.Expr | None:
    source = SourceFile(Path("<expr>"), text)
    sink = Sink()
    expr = parse_expression(text, Span(source, 0, len(text)), sink)
    assert not sink.items, [d.message for d in sink.items]
    return expr


@settings(max_examples=300, deadline=None)
@given(expressions)
def test_print_then_parse_gives_the_same_ir(expr):
    text = ir.to_source(expr)
    assert parse(text) == expr, text


def _recipe_line(text: str, quote: bool) -> str:
    try:
        plain = yaml.load(text, Loader=RecipeLoader)
    except yaml.YAMLError:
        plain = None
    if quote or not isinstance(plain, str) or plain != text:
        return f"'{text}'"  # to_source writes strings with double quotes, so single quotes are verbatim
    return text


def _nodes(expr: ir.Expr):
    for node in ir.walk(expr):
        yield node
        if isinstance(node, ir.Call):
            yield from (k for k in node.keywords)


@settings(max_examples=200, deadline=None)
@given(expressions, st.booleans(), st.sampled_from(["", "  ", "\t"]))
def test_every_span_is_the_text_it_was_parsed_from(expr, quote, padding):
    printed = ir.to_source(expr).replace(" ", " " + padding) if padding else ir.to_source(expr)
    recipe = f"peftdsl: 1\n# a comment\ncompose:\n  first: a\n  x: {_recipe_line(printed, quote)}   # trailing\n"
    sink = Sink()
    built = build_recipe(SourceFile(Path("props.yaml"), recipe), sink)
    assert built is not None and not sink.items, [d.message for d in sink.items]
    parsed = built.composition("x").expr
    assert parsed == expr
    scalar = recipe.index(printed, recipe.index("  x: "))
    for node in _nodes(parsed):
        span = node.span
        assert scalar <= span.start <= span.end <= scalar + len(printed), (node, span)
        if isinstance(node, ir.Keyword):
            assert span.text.startswith(node.name) and "=" in span.text
            continue
        if isinstance(node, ir.String):
            assert span.text[1:-1] == node.value
            continue
        assert parse(span.text) == node, (span.text, node)
        if isinstance(node, ir.Call):
            assert node.func_span.text == node.func


# ---------------------------------------------------------------- analyse never raises


def check_outcome(path: Path, options: Options = Options()) -> None:
    sink = Sink()
    result = analyse(path, sink, options)
    assert result is None or isinstance(result, Analysis)
    for diag in sink.items:
        assert isinstance(diag, Diagnostic) and diag.code in CODES
        if diag.span is not None:
            assert 0 <= diag.span.start <= diag.span.end <= len(diag.span.source.text)
    for render in RENDERERS.values():
        assert isinstance(render(sink.items, color=False), str)


@pytest.fixture(scope="module")
def scratch(corpus_root: Path) -> Path:
    """A recipe path beside the session's fixtures, so mutated corpus recipes find their adapters."""
    return corpus_root / "mutated.yaml"


SNIPPETS = [
    "\x00", "\ufeff", "\u202e", "界", "\t", ":", ": ", "- ", "'", '"', "{", "}", "[", "]", "#", "&a ", "*a", "*b ",
    "!!float ", "!!python/object:os.system ", "!tag ", "<<: *a\n", "? ", "|\n", ">-\n", "%YAML 1.2\n", "---\n",
    "...\n", "[" * 80, "{a: " * 80, "-(" * 300, "(" * 30, "9" * 400, "1e999", "-.inf", ".nan", "0x1F", "1_000",
    "a" * 5000, "svd(", "rank=", "=", ",", "\r\n", "\n  ", "\n- x\n", "peftdsl: 1\n", "peftdsl: 99\n",
    "  extra: key\n", "adapters:\n  x: fixtures/lora_r4\n",
]
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n" \
       "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 255)),
    st.tuples(st.just("delete_line"), st.integers(0, 10**3)),
    st.tuples(st.just("duplicate_line"), st.integers(0, 10**3), st.integers(1, 50)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.sampled_from(SNIPPETS).map(str.encode)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x80"])),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("append"), st.sampled_from([BOMB.encode(), b"\n" + b"  " * 200 + b"x: 1\n"])),
)


def mutate(data: bytes, op: tuple) -> bytes:
    kind = op[0]
    if kind == "flip" and data:
        at = op[1] % len(data)
        return data[:at] + bytes([op[2]]) + data[at + 1:]
    if kind in ("delete_line", "duplicate_line"):
        lines = data.splitlines(keepends=True)
        if not lines:
            return data
        at = op[1] % len(lines)
        if kind == "delete_line":
            return b"".join(lines[:at] + lines[at + 1:])
        return b"".join(lines[:at] + [lines[at]] * op[2] + lines[at + 1:])
    if kind == "insert":
        at = op[1] % (len(data) + 1)
        return data[:at] + op[2] + data[at:]
    if kind == "truncate":
        return data[: op[1] % (len(data) + 1)]
    if kind == "append":
        return data + op[1]
    return data


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(CORPUS_TEXTS)), st.lists(mutation, min_size=1, max_size=6), st.booleans())
def test_analyse_never_raises_on_mutated_corpus(scratch, name, ops, use_files):
    data = CORPUS_TEXTS[name]
    for op in ops:
        data = mutate(data, op)
    scratch.write_bytes(data)
    check_outcome(scratch, Options(use_files=use_files))


yamlish = st.text(
    alphabet=st.sampled_from(list("abcdefghijklmnopqrstuvwxyz_0123456789 \t\n:-#*&!'\"[]{},|>?%@`()+/=.\\") + ["界", "\x00"]),
    max_size=300,
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(yamlish, st.text(max_size=200), yamlish.map(lambda t: "peftdsl: 1\n" + t)))
def test_analyse_never_raises_on_random_text(scratch, text):
    scratch.write_text(text, encoding="utf-8", errors="surrogatepass")
    check_outcome(scratch)


@settings(max_examples=150, deadline=None)
@given(expressions, st.booleans())
def test_analyse_never_raises_on_generated_compositions(scratch, expr, use_files):
    text = ir.to_source(expr)
    scratch.write_text(
        "peftdsl: 1\nadapters:\n  a: fixtures/lora_r4\n  b: fixtures/ia3\n"
        "  chat: {path: fixtures/lora_r8, kind: lora, rank: 8}\n  toxic: fixtures/lora_r4b\n"
        f"params:\n  lam: 0.4\n  mu2: 0\ncompose:\n  x: '{text}'\n  y: svd(x, rank=2)\noutputs:\n  x: out/x\n",
        encoding="utf-8")
    check_outcome(scratch, Options(use_files=use_files))


# ---------------------------------------------------------------- canonical forms

DECLARED = "peftdsl: 1\nadapters:\n" + "".join(
    f"  {n}: {{path: adapters/{n}, kind: lora, rank: 4}}\n" for n in ("a", "b", "c", "d"))


def canonical_forms(compose: dict[str, str], params: dict[str, float] | None = None) -> dict[str, ir.Combination]:
    text = DECLARED
    if params:
        text += "params:\n" + "".join(f"  {k}: {v!r}\n" for k, v in params.items())
    text += "compose:\n" + "".join(f"  {k}: '{v}'\n" for k, v in compose.items())
    sink = Sink()
    recipe = build_recipe(SourceFile(Path("canon.yaml"), text), sink)
    assert recipe is not None, [d.message for d in sink.items]
    from peftdsl.compiler import analyse_recipe

    analysis = analyse_recipe(recipe, sink, Options(use_files=False))
    assert not sink.errors, [d.message for d in sink.errors]
    return analysis.canonical


def close(x: ir.Combination, y: ir.Combination) -> bool:
    """Same kind and leaves, coefficients equal to rounding."""
    return (x.kind == y.kind and [t.leaf for t in x.terms] == [t.leaf for t in y.terms]
            and all(math.isclose(s.coef, t.coef, rel_tol=1e-12, abs_tol=1e-300) for s, t in zip(x.terms, y.terms)))


def test_like_terms_collect():
    forms = canonical_forms({"x": "a + a", "y": "2*a", "z": "a + a + a - a", "w": "-(-a) * 2", "v": "4 * a / 2"})
    assert forms["x"] == forms["y"] == forms["z"] == forms["w"] == forms["v"]
    assert ir.combination_text(forms["x"]) == "2*a"


@settings(max_examples=60, deadline=None)
@given(st.floats(min_value=-10, max_value=10, allow_nan=False).filter(lambda v: abs(v) > 1e-6))
def test_convex_combination_of_one_adapter_is_the_adapter(lam):
    forms = canonical_forms({"x": "(1 - lam) * a + lam * a", "y": "a"}, {"lam": lam})
    assert close(forms["x"], forms["y"]), ir.combination_text(forms["x"])


coefficient = st.floats(min_value=-100, max_value=100, allow_nan=False).filter(lambda v: abs(v) > 1e-3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(coefficient, st.sampled_from("abcd")), min_size=1, max_size=6), st.randoms())
def test_sums_commute(terms, random):
    shuffled = list(terms)
    random.shuffle(shuffled)

    def text(items):
        return " + ".join(f"{c!r} * {n}" for c, n in items)

    forms = canonical_forms({"x": text(terms), "y": text(shuffled)})
    x, y = forms.get("x"), forms.get("y")
    assume(x is not None and y is not None and x.terms)  # a sum that cancels entirely has no form to compare
    if len({n for _, n in terms}) == len(terms):  # distinct leaves: nothing is rounded, so equal exactly
        assert x == y
    else:
        assert close(x, y)


@given(expressions)
def test_canonical_forms_keep_their_invariants(expr):
    """After canonicalisation, every form (and every function's argument) is canonical."""
    from peftdsl.canonical import invariant_violations

    text = ir.to_source(expr)
    more = "".join(f"  {n}: {{path: adapters/{n}, kind: lora, rank: 8}}\n" for n in ("chat", "toxic", "sst2", "_x"))
    source = SourceFile(Path("inv.yaml"), DECLARED + more + f"params:\n  lam: 0.4\n  mu2: 0\ncompose:\n  x: '{text}'\n")
    sink = Sink()
    recipe = build_recipe(source, sink)
    if recipe is None:
        return
    from peftdsl.compiler import analyse_recipe

    analysis = analyse_recipe(recipe, sink, Options(use_files=False))
    for name, form in analysis.canonical.items():
        assert invariant_violations(form) == [], (name, text)
