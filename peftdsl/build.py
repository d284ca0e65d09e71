"""Stage 3: build the recipe IR from positioned YAML.

Checks the format version first (so a file from a newer release says so instead of
listing unknown keys), validates the shape with the pydantic schema and maps every
error back to the YAML span it concerns, then builds `ir.Recipe` with expressions
parsed and paths resolved against the recipe's folder.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

from pydantic import BaseModel, ValidationError

from peftdsl import ir, schema
from peftdsl.diagnostics import Label, Sink
from peftdsl.errors import UsageError
from peftdsl.operators import OPERATORS
from peftdsl.parse import parse_expression
from peftdsl.spans import SourceFile, Span
from peftdsl.yamlload import LoadedYaml, Located, load_yaml

# Operator names are reserved too, so `svd: a + b` cannot shadow svd(...).
RESERVED = frozenset(("base", *OPERATORS))
_NAME = re.compile(schema.NAME_PATTERN)


def resolve_location(folder: Path, location: str) -> Path:
    """`location` against the recipe's folder; a path no file can have stays as written.

    `~user` with no such user stays unexpanded, and a path with a NUL character (YAML's
    `"\\0"`) or too long for the OS is not resolved, so the stage that looks for the file
    reports it missing (I301) instead of crashing here.
    """
    path = Path(location)
    try:
        path = path.expanduser()
    except RuntimeError:  # `~nouser/...`
        pass
    try:
        return (folder / path).resolve()
    except (OSError, ValueError):
        return folder / path


MAX_RECIPE_BYTES = 64 << 20  # far past any recipe; a file this big (or /dev/zero) is not one


def read_source(path: Path) -> SourceFile:
    """Read a recipe as text; undecodable bytes are replaced so the loader can say where."""
    try:
        with path.open("rb") as handle:  # one read past the limit tells a file that is too large
            data = handle.read(MAX_RECIPE_BYTES + 1)
    except OSError as err:  # /proc/self/mem, a folder, a file that vanished: the command was used wrongly
        raise UsageError(f"cannot read {path}: {err.strerror or err}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise UsageError(f"{path} is larger than {MAX_RECIPE_BYTES >> 20} MiB: not a recipe")
    return SourceFile(path, data.decode("utf-8", errors="replace"))


def build_recipe(source: SourceFile, sink: Sink) -> ir.Recipe | None:
    """YAML text -> `ir.Recipe`, reporting every problem found; None when unusable."""
    if "\ufffd" in source.text:
        at = source.text.index("\ufffd")
        sink.emit("Y001", "the file is not valid UTF-8", Span(source, at, at + 1))
        return None
    loaded = load_yaml(source, sink)
    if loaded is None:
        return None
    if not _check_version(loaded, sink):
        return None
    _expand_short_forms(loaded)
    _keep_text_of_string_fields(loaded)
    spec = _validate(loaded, sink)
    if spec is None:
        return None
    return _Builder(loaded, spec, sink).recipe()


def _check_version(loaded: LoadedYaml, sink: Sink) -> bool:
    data, source = loaded.data, loaded.source
    if not isinstance(data, dict):
        sink.emit("Y009", "a recipe is a YAML mapping with a `peftdsl:` version key",
                  loaded.span(()), help="start the file with `peftdsl: 1`")
        return False
    if "peftdsl" not in data:
        sink.emit("Y005", "missing `peftdsl:` format version", Span(source, 0, 0),
                  help="start the file with `peftdsl: 1`")
        return False
    version = data["peftdsl"]
    if isinstance(version, bool) or not isinstance(version, int):
        sink.emit("Y004", f"`peftdsl:` must be an integer format version, not `{version!r}`",
                  loaded.span(("peftdsl",)), help="write `peftdsl: 1`")
        return False
    if version not in schema.FORMAT_VERSIONS:
        known = ", ".join(map(str, schema.FORMAT_VERSIONS))
        sink.emit("Y006", f"recipe format version {version} is not supported (this release reads {known})",
                  loaded.span(("peftdsl",)), help="upgrade peftdsl, or write the recipe for version 1")
        return False
    return True


def _expand_short_forms(loaded: LoadedYaml) -> None:
    """`toxic: ../adapters/toxic` means `toxic: {path: ../adapters/toxic}`; spans follow."""
    for section, key in schema.SHORT_FORMS.items():
        entries = loaded.data.get(section)
        if not isinstance(entries, dict):
            continue
        for name, value in entries.items():
            if value is not None and not isinstance(value, (dict, list)):  # `a: 2024` is a path too
                loc = loaded.spans[(section, name)]
                entries[name] = {key: value if isinstance(value, str) else loc.value.text}
                loaded.spans[(section, name, key)] = Located(loc.value, loc.key, loc.quoted)


# Fields that are always text: an unquoted pin of 64 digits, or a path named `2024`,
# is read as YAML writes it, not as the number YAML would make of it.
_STRING_FIELDS = (("base",), ("name",), ("adapters", None, "path"), ("adapters", None, "sha256"),
                  ("outputs", None, "path"), ("eval", None, "data"), ("eval", None, "name"),
                  ("eval", None, "include_path"), ("eval", None, "measure"))


def _keep_text_of_string_fields(loaded: LoadedYaml) -> None:
    for path, loc in loaded.spans.items():
        if loc.quoted or len(path) not in (1, 3):
            continue
        if not any(len(p) == len(path) and all(a is None or a == b for a, b in zip(p, path))
                   for p in _STRING_FIELDS):
            continue
        parent = loaded.data
        for part in path[:-1]:
            parent = parent[part] if isinstance(parent, (dict, list)) else None
            if parent is None:
                break
        value = parent.get(path[-1]) if isinstance(parent, dict) else None
        if value is not None and not isinstance(value, (str, bool, dict, list)):  # numbers, dates
            parent[path[-1]] = loc.value.text


# ---------------------------------------------------------------- schema errors

_MODELS_BY_PATH: tuple[tuple[tuple[str | None, ...], type[BaseModel]], ...] = (
    ((), schema.RecipeSpec),
    (("adapters", None), schema.AdapterSpec),
    (("outputs", None), schema.OutputSpec),
    (("eval", None), schema.EvalSpec),
    (("sweep",), schema.SweepSpec),
    (("sweep", "select"), schema.SelectSpec),
    (("search",), schema.SearchSpec),
    (("search", "objective"), schema.SelectSpec),
    (("search", "penalty"), schema.PenaltySpec),
)


def _model_at(path: tuple) -> type[BaseModel] | None:
    for pattern, model in _MODELS_BY_PATH:
        if len(pattern) == len(path) and all(p is None or p == q for p, q in zip(pattern, path)):
            return model
    return None


def _validate(loaded: LoadedYaml, sink: Sink) -> schema.RecipeSpec | None:
    try:
        return schema.RecipeSpec.model_validate(loaded.data)
    except ValidationError as err:
        seen: set[tuple] = set()
        for error in err.errors():
            loc = tuple(error["loc"])
            if loc in seen:  # one message per place is enough
                continue
            seen.add(loc)
            _report_schema_error(loaded, error, loc, sink)
        return None


def _dotted(loc: tuple) -> str:
    return ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[")


def _report_schema_error(loaded: LoadedYaml, error: dict, loc: tuple, sink: Sink) -> None:
    kind, key = error["type"], loc[-1] if loc else ""
    if len(loc) == 2 and loc[0] == "sweep" and isinstance(error.get("input"), dict):
        kind = "extra_forbidden"  # a mapping under `sweep:` is no grid: a misspelt `select`
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        known = sorted(model.model_fields) if model else []
        guess = difflib.get_close_matches(str(key), known, n=1)
        where = f" in `{_dotted(loc[:-1])}`" if loc[:-1] else ""
        sink.emit("Y003", f"unknown key `{key}`{where}", loaded.span(loc, key=True),
                  help=f"did you mean `{guess[0]}`?" if guess else f"known keys: {', '.join(known)}")
        return
    if kind == "too_short" and loc[:1] == ("sweep",) and len(loc) == 2:
        sink.emit("E502", f"sweep over `{key}` has no values", loaded.span(loc),
                  help=f"list the values to try: `{key}: [0.2, 0.4]`")
        return
    if kind == "missing":
        sink.emit("Y005", f"missing key `{key}` in `{_dotted(loc[:-1]) or 'the recipe'}`",
                  loaded.span(loc[:-1], key=True), help=f"add `{key}: …`")
        return
    message = error["msg"].replace(" after validation", "")
    message = message[0].lower() + message[1:]
    got = error.get("input")
    shown = f", not `{got!r}`" if not isinstance(got, (dict, list)) else ""
    help_text = ""
    if kind == "literal_error" and isinstance(got, str):
        options = re.findall(r"'([^']*)'", error["msg"])
        guess = difflib.get_close_matches(got, options, n=1)
        help_text = f"did you mean `{guess[0]}`?" if guess else ""
    if kind == "string_pattern_mismatch" and "sha256" in map(str, loc):
        message, help_text = "a sha256 pin is 64 lowercase hex digits", "`peftdsl lock` writes pins"
    sink.emit("Y004", f"`{_dotted(loc)}`: {message}{shown}", loaded.span(loc), help=help_text)


# ---------------------------------------------------------------- the IR


# What `kind:` declares: a full fine-tune's value is a dense task vector.
_DECLARED_KINDS = {"lora": ir.Kind.LORA, "ia3": ir.Kind.IA3, "full": ir.Kind.DENSE}

class _Builder:
    def __init__(self, loaded: LoadedYaml, spec: schema.RecipeSpec, sink: Sink):
        self.loaded, self.spec, self.sink = loaded, spec, sink
        self.folder = loaded.source.path.parent
        self.defined: dict[str, Span] = {}
        self.rejected = False  # the last `_define` refused the name (reserved or duplicate)

    def span(self, *path, key: bool = False) -> Span:
        return self.loaded.span(path, key=key)

    def recipe(self) -> ir.Recipe:
        spec = self.spec
        # A name rejected as reserved or duplicate is left out, so later stages do not see two `chat`s.
        adapters = tuple(a for n, s in spec.adapters.items() if (a := self._adapter(n, s)))
        params = tuple(p for n, v in spec.params.items() if (p := self._param(n, v)))
        compose = tuple(c for n, e in spec.compose.items() if (c := self._composition(n, e)))
        outputs = tuple(self._output(n, o) for n, o in spec.outputs.items())
        evals = tuple(self._eval(i, e) for i, e in enumerate(spec.eval))
        base_path = self._resolve(spec.base) if spec.base else None
        return ir.Recipe(
            path=self.loaded.source.path,
            name=spec.name or self.loaded.source.path.stem,
            version=spec.peftdsl,
            base=spec.base,
            base_path=base_path,
            seed=spec.seed,
            adapters=adapters,
            params=params,
            compose=compose,
            outputs=outputs,
            evals=evals,
            sweep=self._sweep(spec.sweep) if spec.sweep else None,
            span=self.span(),
            base_span=self.span("base") if spec.base else None,
            search=self._search(spec.search) if spec.search else None,
        )

    def _resolve(self, location: str) -> Path | None:
        if location.startswith("hf:"):
            return None
        return resolve_location(self.folder, location)

    def _define(self, section: str, name: str) -> Span:
        """Check a definition's name: pattern, reserved, unique across sections."""
        key_span = self.span(section, name, key=True)
        self.rejected = False
        if not _NAME.match(name):
            self.sink.emit("Y008", f"`{name}` is not a valid name", key_span,
                           help="names match [A-Za-z_][A-Za-z0-9_]*")
        elif name in RESERVED:
            what = "the base model" if name == "base" else "a function"
            self.sink.emit("N205", f"`{name}` is reserved for {what}", key_span, help="choose another name")
            self.rejected = True
        elif name in self.defined:
            self.sink.emit("N204", f"`{name}` is defined twice", key_span, label="defined again here",
                           labels=(Label(self.defined[name], "first defined here"),),
                           help="names are shared by adapters, params and compose")
            self.rejected = True
        else:
            self.defined[name] = key_span
        return key_span

    def _adapter(self, name: str, spec: schema.AdapterSpec) -> ir.Adapter | None:
        name_span = self._define("adapters", name)
        if self.rejected:
            return None
        return ir.Adapter(
            name=name, location=spec.path, path=self._resolve(spec.path), sha256=spec.sha256,
            kind=_DECLARED_KINDS.get(spec.kind), rank=spec.rank,
            span=self.span("adapters", name, "path"), name_span=name_span,
        )

    def _param(self, name: str, value: float) -> ir.Param | None:
        name_span = self._define("params", name)
        if self.rejected:
            return None
        return ir.Param(name=name, value=value, span=self.span("params", name), name_span=name_span)

    def _composition(self, name: str, text: str) -> ir.Composition | None:
        name_span = self._define("compose", name)
        rejected = self.rejected
        loc = self.loaded.spans[("compose", name)]
        expr = parse_expression(text, loc.value, self.sink, quoted=loc.quoted)  # syntax errors still reported
        if expr is None or rejected:
            return None
        return ir.Composition(name=name, expr=expr, span=loc.value, name_span=name_span)

    def _output(self, name: str, spec: schema.OutputSpec) -> ir.Output:
        return ir.Output(
            name=name, path=self._resolve(spec.path) or Path(spec.path), merge=spec.merge, dtype=spec.dtype,
            span=self.span("outputs", name, "path"), name_span=self.span("outputs", name, key=True),
        )

    def _eval(self, index: int, spec: schema.EvalSpec) -> ir.EvalTarget:
        defaults = schema.EvalSpec.model_fields
        skip = {"name", "models", "metric", "data"}
        options = tuple(
            (k, v) for k, v in spec.model_dump().items() if k not in skip and v != defaults[k].default
        )
        if spec.include_path is not None:  # a folder, relative to the recipe's like every path
            resolved = str(self._resolve(spec.include_path) or spec.include_path)
            options = tuple((k, resolved if k == "include_path" else v) for k, v in options)
        data = None if spec.data is None else self._resolve(spec.data) or Path(spec.data)
        return ir.EvalTarget(
            name=spec.name, models=tuple(spec.models), metric=spec.metric, data=data, options=options,
            span=self.span("eval", index),
            model_spans=tuple(self.span("eval", index, "models", i) for i in range(len(spec.models))),
        )

    def _sweep(self, spec: schema.SweepSpec) -> ir.Sweep:
        grid = tuple((k, tuple(v)) for k, v in (spec.__pydantic_extra__ or {}).items())
        select = None
        if spec.select:
            s = spec.select
            select = ir.Select(eval=s.eval, model=s.model, goal=s.goal, span=self.span("sweep", "select"))
        return ir.Sweep(grid=grid, select=select, span=self.span("sweep"),
                        param_spans=tuple(self.span("sweep", k, key=True) for k, _ in grid))


    def _search(self, spec: schema.SearchSpec) -> ir.Search:
        s = spec.objective
        objective = ir.Select(eval=s.eval, model=s.model, goal=s.goal, span=self.span("search", "objective"))
        return ir.Search(
            bounds=tuple((k, float(lo), float(hi)) for k, (lo, hi) in spec.params.items()), objective=objective,
            l1=spec.penalty.l1 if spec.penalty else 0.0, optimizer=spec.optimizer, budget=spec.budget,
            seed=spec.seed, batch=spec.batch, span=self.span("search"),
            param_spans=tuple(self.span("search", "params", k, key=True) for k in spec.params),
            bound_spans=tuple(self.span("search", "params", k) for k in spec.params),
            optimizer_span=self.span("search", "optimizer"),  # the block's span when not given
        )


def load_recipe(path: Path, sink: Sink) -> ir.Recipe | None:
    """Read and build one recipe file."""
    return build_recipe(read_source(path), sink)


