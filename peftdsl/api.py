"""The Python API (docs/api.md): everything `peftdsl run` does, as library calls.

    recipe = peftdsl.load("detox.yaml", params={"lam": 0.3})
    recipe.raise_for_errors()
    comp = recipe.compose("detox", device="cpu")
    comp.deltas()              # {module name: ΔW in the base weight's layout}
    comp.save("out/detox")     # the bytes `peftdsl run` writes for that output
    with comp.applied(model):  # a loaded transformers model, patched and restored exactly
        ...
    recipe.run(no_eval=True)   # what `peftdsl run` does

`load` runs the front end only (no torch); torch is imported when a composition
first executes. The CLI is a thin layer over these calls.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftdsl import build, ir
from peftdsl.compiler import Analysis, Options, analyse_recipe
from peftdsl.console import check_sets
from peftdsl.diagnostics import Diagnostic, Severity, Sink
from peftdsl.errors import RecipeError, UsageError
from peftdsl.schema import NAME_PATTERN
from peftdsl.spans import SourceFile, Span

if TYPE_CHECKING:
    import torch

    from peftdsl.runner import RunOptions, RunResult

IN_MEMORY = "<in memory>"  # the location shown for a source given in memory
_NAME = re.compile(NAME_PATTERN)


def load(path: str | Path, *, params: Mapping[str, float] | None = None,
         adapters: Mapping[str, Any] | None = None, allow_pickle: bool = False) -> Recipe:
    """Read and check a recipe file. Problems are in `Recipe.diagnostics`, not raised.

    `params` override the recipe's params (as `--set` does); `adapters` gives sources in
    memory by name: a `PeftModel` (its active adapter), `(peft_model, adapter_name)`, or
    `(state_dict, LoraConfig | IA3Config)`, replacing the recipe's adapter of that name or
    adding one. `allow_pickle` reads `.bin` weights with weights_only=True.
    """
    _check_types(path=(path, _PATH), allow_pickle=(allow_pickle, bool))
    path = Path(path)
    try:
        found = path.is_file()
    except (OSError, ValueError):  # a NUL character, a name longer than the OS allows
        found = False
    if not found:
        raise UsageError(f"no such file: {path}")
    return _compile(build.read_source(path), params, adapters, allow_pickle)


def loads(text: str, *, root: str | Path, params: Mapping[str, float] | None = None,
          adapters: Mapping[str, Any] | None = None, allow_pickle: bool = False,
          filename: str = "recipe.yaml") -> Recipe:
    """A recipe from text; relative paths resolve against `root`, diagnostics name `filename`."""
    _check_types(text=(text, str), root=(root, _PATH), filename=(filename, str), allow_pickle=(allow_pickle, bool))
    try:
        path = Path(root).resolve() / filename
    except (OSError, RuntimeError, ValueError) as err:  # a NUL character, a symlink loop
        raise UsageError(f"`root` cannot be used: {err}") from None
    return _compile(SourceFile(path, text), params, adapters, allow_pickle)


_PATH = (str, os.PathLike)


def _check_types(**arguments: tuple[Any, type | tuple[type, ...] | None]) -> None:
    """A UsageError naming the argument whose value has the wrong type: a library call used
    wrongly is a usage error, like a bad flag, never a TypeError from deep inside.
    `None` as the expected type means "a sequence of names" (a list or tuple of str)."""
    for name, (value, expected) in arguments.items():
        if expected is None:
            ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
            wanted = "a list of names"
        else:
            ok = isinstance(value, expected) and (expected is bool or not isinstance(value, bool))
            types = expected if isinstance(expected, tuple) else (expected,)
            wanted = " or ".join("a path" if t is os.PathLike else t.__name__ for t in types)
        if not ok:
            raise UsageError(f"`{name}` must be {wanted}, not {type(value).__name__} {_shown(value)}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "…"


def _compile(source: SourceFile, params, adapters, allow_pickle: bool) -> Recipe:
    if params is not None and not isinstance(params, Mapping):
        raise UsageError(f"`params` must be a mapping of names to numbers, not {type(params).__name__}")
    if adapters is not None and not isinstance(adapters, Mapping):
        raise UsageError(f"`adapters` must be a mapping of names to sources, not {type(adapters).__name__}")
    sink = Sink()
    recipe = build.build_recipe(source, sink)
    analysis = None
    if recipe is not None:
        recipe, given = _given_sources(recipe, adapters or {}, sink)
        overrides = _numbers(params)
        check_sets(recipe, overrides)
        analysis = analyse_recipe(recipe, sink, Options(use_files=True, allow_pickle=allow_pickle,
                                                        overrides=overrides, given=given))
    return Recipe(analysis, sink.items, allow_pickle=allow_pickle, source=source)


def _numbers(params: Mapping[str, float] | None) -> tuple[tuple[str, float], ...]:
    """`params` as (name, float) pairs; a value that is not a finite real number is a UsageError."""
    if params is not None and not isinstance(params, Mapping):
        raise UsageError(f"`params` must be a mapping of names to numbers, not {type(params).__name__}")
    out = []
    for name, value in (params or {}).items():
        try:
            number = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        except OverflowError:  # an int past float's range
            number = None
        if number is None or not math.isfinite(number):
            raise UsageError(f"params[{name!r}] must be a finite number, not {_shown(value)}")
        out.append((str(name), number))
    return tuple(out)


def _given_sources(recipe: ir.Recipe, adapters: Mapping[str, Any], sink: Sink):
    """In-memory sources as `AdapterInfo`s, and the recipe with an entry for each undeclared one."""
    if not adapters:
        return recipe, {}
    from peftdsl.inputs import InputError
    from peftdsl.runtime.sources import adapter_from_memory

    given, added = {}, []
    start = Span(recipe.span.source, 0, 0)
    for name, source in adapters.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise UsageError(f"adapters: {name!r} is not a name a recipe can use ([A-Za-z_][A-Za-z0-9_]*)")
        declared = recipe.adapter(name)
        if declared is None:
            if name in build.RESERVED or any(c.name == name for c in recipe.compose) or recipe.param(name):
                raise UsageError(f"adapters[{name!r}]: `{name}` is already a name in the recipe")
            added.append(ir.Adapter(name=name, location=IN_MEMORY, path=None, span=start, name_span=start))
        try:
            given[name] = adapter_from_memory(name, source)
        except InputError as err:
            given[name] = None  # refused: the recipe's path for it is not read instead
            span = declared.name_span if declared else start
            sink.emit(err.code, err.message.replace("`adapter_model.safetensors`", "its state dict"), span,
                      help=err.help)
    if added:
        recipe = dataclasses.replace(recipe, adapters=recipe.adapters + tuple(added))
    return recipe, given


class Recipe:
    """A recipe, checked: its diagnostics, its compositions, and `run`."""

    def __init__(self, analysis: Analysis | None, diagnostics: Sequence[Diagnostic], *,
                 allow_pickle: bool, source: SourceFile):
        self._analysis = analysis
        self._allow_pickle = allow_pickle
        self.path: Path = source.path
        self.diagnostics: list[Diagnostic] = list(diagnostics)

    def __repr__(self) -> str:
        return f"<peftdsl.Recipe {self.path.name}: {len(self.errors)} errors, {len(self.diagnostics)} diagnostics>"

    @property
    def name(self) -> str | None:
        return self._analysis.recipe.name if self._analysis else None

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity is Severity.ERROR]

    @property
    def compositions(self) -> tuple[str, ...]:
        """Names of the recipe's compositions, in order."""
        return tuple(c.name for c in self._analysis.recipe.compose) if self._analysis else ()

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(o.name for o in self._analysis.recipe.outputs) if self._analysis else ()

    def raise_for_errors(self) -> None:
        """Raise `RecipeError` (rendered like the CLI) if the recipe has errors."""
        if self._analysis is None or self.errors:
            raise RecipeError(self.diagnostics)

    def canonical(self, name: str) -> str:
        """The canonical form of a composition or adapter, as `explain` prints it."""
        _check_types(name=(name, str))
        self.raise_for_errors()
        return ir.combination_text(self._form(self._analysis, name))

    def compose(self, name: str, *, device: str | None = None,
                params: Mapping[str, float] | None = None) -> Composition:
        """One composition (or adapter) of the recipe, at its params (or these), on `device`."""
        _check_types(name=(name, str), device=(device, (str, type(None))))
        self.raise_for_errors()
        analysis = self._analysis
        if params:
            overrides = _numbers(params)
            check_sets(analysis.recipe, overrides)
            sink = Sink()
            analysis = analysis.at(dict(overrides), sink)
            if name not in analysis.canonical and sink.has_errors():  # it does not compute at these params
                raise RecipeError(sink.items)
        self._form(analysis, name)
        if not analysis.canonical[name].terms:
            raise UsageError(f"`{name}` is zero at these params: there is nothing to compose")
        from peftdsl.runtime.execute import pick_device

        return Composition(self, analysis, name, pick_device(device))

    def run(self, *, only: Sequence[str] = (), device: str = "auto", force: bool = False,
            no_eval: bool = False, report: str | Path | None = None, executor: str = "local",
            address: str | None = None, locked: bool = False, quiet: bool = True,
            memory_guard: bool = True, on_diagnostics=None) -> RunResult:
        """What `peftdsl run` does: write the outputs, evaluate, sweep. Raises `RecipeError`
        (with every diagnostic) when the recipe or a step fails; warnings are in the result."""
        from peftdsl.runner import RunOptions

        _check_types(only=(only, None), device=(device, str), force=(force, bool), no_eval=(no_eval, bool),
                     report=(report, (*_PATH, type(None))), executor=(executor, str),
                     address=(address, (str, type(None))), locked=(locked, bool), quiet=(quiet, bool),
                     memory_guard=(memory_guard, bool))
        options = RunOptions(only=tuple(only), device=device, force=force, no_eval=no_eval,
                             report=Path(report) if report is not None else None, executor=executor,
                             address=address, locked=locked, quiet=quiet, memory_guard=memory_guard,
                             on_diagnostics=on_diagnostics)
        return self.run_with(options)

    def run_with(self, options: RunOptions) -> RunResult:
        """`run` with its options as one `RunOptions` (what the CLI builds from its flags)."""
        from peftdsl.runner import run

        if self._analysis is None:
            if options.on_diagnostics is not None:
                options.on_diagnostics(self.diagnostics)
            raise RecipeError(self.diagnostics)
        return run(self._analysis, self._sink(), options, allow_pickle=self._allow_pickle)

    def _sink(self) -> Sink:
        return Sink(items=list(self.diagnostics))

    def _form(self, analysis: Analysis, name: str) -> ir.Combination:
        if name not in analysis.canonical:
            known = ", ".join(n for n in analysis.canonical)
            raise UsageError(f"the recipe has no composition or adapter `{name}` (it has: {known})")
        return analysis.canonical[name]


class Composition:
    """One composition of a recipe, ready to execute: its deltas, an adapter on disk, a patched model."""

    def __init__(self, recipe: Recipe, analysis: Analysis, name: str, device: str | None):
        self._recipe, self._analysis, self.name, self._device = recipe, analysis, name, device
        self._deltas: dict | None = None  # the executor's results (factor frame), once computed

    def __repr__(self) -> str:
        return f"<peftdsl.Composition {self.name} = {self.canonical}>"

    @property
    def kind(self) -> str:
        """`lora`, `ia3` or `dense`."""
        return self._analysis.canonical[self.name].kind.value

    @property
    def canonical(self) -> str:
        return ir.combination_text(self._analysis.canonical[self.name])

    @contextlib.contextmanager
    def _session(self) -> Iterator:
        from peftdsl.runner import Session

        with Session(self._analysis, self._recipe._sink(), device=self._device,
                     allow_pickle=self._recipe._allow_pickle) as session:
            yield session

    def _module_deltas(self) -> dict:
        if self._deltas is None:
            with self._session() as session:
                self._deltas = session.deltas(self.name)
        return self._deltas

    def deltas(self) -> dict[str, torch.Tensor]:
        """{module name: ΔW} in each base weight's own layout (out×in for Linear, in×out for
        GPT-2's Conv1D, vocab×dim for embeddings), float32 on the CPU; (IA)³: the vectors l."""
        from peftdsl.runtime.fold import PartDelta

        return {name: _weight_frame(delta).clone() for name, delta in self._module_deltas().items()
                if not isinstance(delta, PartDelta)}

    def parts(self) -> dict:
        """{tensor name: PartDelta} for what the composition sets beside the factors (saved
        modules, biases, token rows; docs/recipes.md): `.value` the tensor's new value (with
        `.rows`: those rows' values), or with `.add` a delta to add to the base's tensor."""
        from peftdsl.runtime.fold import PartDelta

        return {name: delta for name, delta in self._module_deltas().items() if isinstance(delta, PartDelta)}

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the composition where `path` says, exactly as `peftdsl run` writes the recipe's
        output of this name (merged if that output says `merge: true`), atomically.

        It is written at the composition's params; a sweep's `run` writes at the point it
        selected, so pass `compose(name, params=result.selected)` to save that one.
        `force` replaces an earlier peftdsl output only, never another folder or an input.
        """
        from peftdsl import check
        from peftdsl.runner import replaceable

        _check_types(path=(path, _PATH), force=(force, bool))
        analysis = self._analysis
        declared = next((o for o in analysis.recipe.outputs if o.name == self.name), None)
        try:
            target = Path(path).resolve()
            target.exists()
        except (OSError, RuntimeError, ValueError) as err:  # too long a name, a NUL, a symlink loop
            raise UsageError(f"save(): `path` cannot be used: {err.strerror if isinstance(err, OSError) else err}") \
                from None
        span = declared.span if declared else analysis.recipe.span
        out = (dataclasses.replace(declared, path=target) if declared is not None
               else ir.Output(name=self.name, path=target, span=span, name_span=span))
        sink = Sink()
        checked = dataclasses.replace(analysis, recipe=dataclasses.replace(analysis.recipe, outputs=(out,)))
        check.check_output_paths(checked.recipe, sink)
        check.check_outputs(checked, sink)
        if sink.has_errors():
            raise RecipeError(sink.items)
        if target.exists() and not force:
            raise UsageError(f"`{target}` already exists: save(..., force=True) replaces an earlier peftdsl output")
        if target.exists() and not replaceable(target):
            raise UsageError(f"`{target}` was not written by peftdsl (it holds no peftdsl.json): "
                             "save() never replaces it, even with force=True")
        with self._session() as session:
            session.verify_pins()
            if session.sink.has_errors():
                raise RecipeError(session.sink.items)
            session.write_output(out, force=force)
        return target

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Patch `model` (a loaded transformers model of the base) with this composition inside
        the block; every parameter comes back bit for bit afterwards, even on an exception."""
        from peftdsl.evaluation.apply import applied

        if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
            raise UsageError("applied() patches the base model itself: pass `peft_model.get_base_model()` "
                             "(or a model loaded with transformers), not a PeftModel")
        patching = applied(model, self._module_deltas())
        try:  # the patches are computed (and checked) before any weight changes
            patched = patching.__enter__()
        except (KeyError, ValueError, AttributeError) as err:
            message = err.args[0] if err.args else err
            raise UsageError(f"this model does not fit the recipe's base: {message}") from None
        try:
            yield patched
        except BaseException:
            if not patching.__exit__(*sys.exc_info()):
                raise
        else:
            patching.__exit__(None, None, None)


def _weight_frame(delta) -> torch.Tensor:
    """A module's delta from the factor frame (out×in) into its weight's layout."""
    from peftdsl.evaluation.apply import IA3Delta, LoraDelta

    if isinstance(delta, IA3Delta):
        return delta.l
    frame = delta.B @ delta.A if isinstance(delta, LoraDelta) else delta.delta
    return frame if delta.layout == "linear" else frame.T.contiguous()
