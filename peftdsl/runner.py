"""`Recipe.run` and `peftdsl run`: execute, write outputs, evaluate, sweep (docs/recipes.md).

The front end has run already (`peftdsl.load`), and every user error is reported
before any tensor is read: names, kinds, shapes, pins, existing outputs, memory.
Execution errors become diagnostics that point at the composition that failed.
Outputs are written atomically; nothing half-written is ever left in place.

`Session` is a checked recipe bound to a device, with its adapters open: it
computes compositions and writes outputs, for `run` and for the API's
`Composition` alike, so both write the same bytes. Torch is imported only when a
session starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from peftdsl import __version__, ir
from peftdsl.compiler import Analysis, sweep_points
from peftdsl.diagnostics import Diagnostic, Sink
from peftdsl.errors import (
    EvalDataError,
    InputDataError,
    Interrupted,
    OutputError,
    RecipeError,
    UntrainedWeights,
    UsageError,
)
from peftdsl.lock import combine_sha256, sha256_files
from peftdsl.check import op_leaves
from peftdsl.parts import extracts_embeddings
from peftdsl.lower import adapter_leaves, group_rank, lower, planned_peak
from peftdsl.numbers import show_point
from peftdsl.progress import progress

Kind = ir.Kind


@dataclass(frozen=True)
class RunOptions:
    """What `peftdsl run` takes besides the recipe and its params (each flag, by its name)."""

    only: tuple[str, ...] = ()  # write only these outputs
    device: str = "auto"  # auto | cpu | cuda[:N]
    force: bool = False  # replace earlier peftdsl outputs, and try even when memory looks short
    no_eval: bool = False
    report: Path | None = None  # default: ./peftdsl-reports/<recipe name>/
    executor: str = "local"  # local | ray
    address: str | None = None  # a Ray cluster
    locked: bool = False  # refuse adapters without sha256 pins
    memory_guard: bool = True  # refuse a plan that needs more memory than is free (--no-memory-guard)
    quiet: bool = False  # no progress bars and no "wrote …" lines
    # Called with each batch of diagnostics as the run finds them (the CLI prints them).
    on_diagnostics: Callable[[Sequence[Diagnostic]], None] | None = None


@dataclass(frozen=True)
class RunResult:
    written: tuple[str, ...]  # outputs written, in order
    results: tuple = ()  # evaluation rows (peftdsl.evaluation.report.Result)
    selected: Mapping[str, float] | None = None  # the sweep's or search's best point
    report: Path | None = None  # the report folder, when evaluations ran
    diagnostics: tuple[Diagnostic, ...] = ()  # warnings and notes (errors raise RecipeError)
    device: str = "cpu"
    seconds: float = 0.0
    search: object | None = None  # peftdsl.evaluation.search.SearchOutcome, for a `search` block


def _fail(sink: Sink) -> RecipeError:
    return RecipeError(sink.items)


# ---------------------------------------------------------------- the session


class Session:
    """A checked recipe bound to a device; computes compositions and writes outputs."""

    def __init__(self, analysis: Analysis, sink: Sink, *, device=None, allow_pickle: bool = False,
                 quiet: bool = True, console=None):
        from peftdsl.runtime.execute import Executor, pick_device

        self.analysis, self.sink = analysis, sink
        self.device = pick_device(device)
        self.allow_pickle, self.quiet = allow_pickle, quiet
        self.console = console
        self.hashes: dict[str, str] = {}
        # Unpinned inputs are hashed (for provenance only) on a thread beside the computation,
        # which reads the same open files: the disk works while the CPU computes
        self._hashing: dict[str, Future] = {}
        self._hasher: ThreadPoolExecutor | None = None
        self._stop_hashing = threading.Event()
        self.recipe_sha256 = hashlib.sha256(analysis.recipe.span.source.text.encode("utf-8")).hexdigest()
        self.written: list[str] = []  # outputs complete on disk, in order
        self.rank_summaries: dict[str, str] = {}  # outputs whose ranks `svd(keep=/tol=)` chose
        self.dropped_summaries: dict[str, list[str]] = {}  # outputs whose `svd` dropped full-fine-tune tensors
        self.analysis = analysis = _checked_experts(analysis, sink)
        self.executor = Executor(analysis.adapters, device=self.device, seed=analysis.recipe.seed,
                                 base=analysis.base)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        if self._hasher is not None:  # before the files close; a hash nobody collected is let go
            self._stop_hashing.set()
            self._hasher.shutdown(wait=True)
        self.executor.__exit__(*exc)

    # ------------------------------------------------------------ pins

    def verify_pins(self, *, locked: bool = False) -> None:
        """Hash every adapter's weights (for provenance) and check the recipe's pins. Pinned
        inputs are hashed here, before any compute; unpinned safetensors ones on a thread, which
        `input_hashes` waits for (their sha256 is needed only in the outputs' provenance)."""
        from peftdsl.runtime.sources import memory_sha256

        for adapter in self.analysis.recipe.adapters:
            info = self.analysis.adapters.get(adapter.name)
            if info is None:
                continue
            try:
                if adapter.sha256 is None and not locked and info.state is None and _all_safetensors(info):
                    self._hash_beside(adapter.name, info)
                    continue
                digest = memory_sha256(info) if info.state is not None else self._files_sha256(info)
            except OSError as err:  # unreadable, or written while it was hashed
                self.sink.emit("I304", f"cannot read adapter `{adapter.name}`: {err}", adapter.span)
                continue
            self.hashes[adapter.name] = digest
            if adapter.sha256 is None and locked:
                self.sink.emit("I311", f"adapter `{adapter.name}` has no sha256 pin and --locked was given",
                               adapter.name_span, help="run `peftdsl lock` to pin every adapter")
            elif adapter.sha256 is not None and adapter.sha256 != digest:
                self.sink.emit("I309", f"adapter `{adapter.name}` does not match its pin: its sha256 is "
                               f"{digest[:12]}…", adapter.span, help="the weights changed since the recipe was "
                               "locked; re-run `peftdsl lock` if the change is intended")

    def _files_sha256(self, info) -> str:
        """A source's pin, hashed from the readers the run computes from (tensorio.SafetensorsReader):
        the same open files, so weights replaced after hashing are never read."""
        files = list(info.files) or [info.weights]
        if not _all_safetensors(info):  # a pickle: loaded whole, by path
            return sha256_files(files)
        return combine_sha256([(f.name, self.executor.reader(f).sha256()) for f in files])

    def _hash_beside(self, name: str, info) -> None:
        """Start hashing a source on the hash thread. Its readers are opened here, on this thread
        (the executor's table of open files is not shared across threads), and are the ones the
        computation reads."""
        readers = [(f.name, self.executor.reader(f)) for f in (list(info.files) or [info.weights])]
        stop = self._stop_hashing
        self._hasher = self._hasher or ThreadPoolExecutor(1, thread_name_prefix="peftdsl-hash")
        self._hashing[name] = self._hasher.submit(
            lambda: combine_sha256([(file, reader.sha256(stop)) for file, reader in readers]))

    def input_hashes(self) -> dict[str, str]:
        """Every input's sha256, waiting for those hashed beside the computation; one that
        could not be read is I304 (and nothing is written: the caller is inside the output's
        temporary folder)."""
        for name, future in list(self._hashing.items()):
            try:
                self.hashes[name] = future.result()
            except OSError as err:
                adapter = next(a for a in self.analysis.recipe.adapters if a.name == name)
                self.sink.emit("I304", f"cannot read adapter `{name}`: {err}", adapter.span)
                raise _fail(self.sink) from None
            del self._hashing[name]
        return self.hashes

    # ------------------------------------------------------------ computing

    def deltas(self, name: str, analysis: Analysis | None = None) -> dict:
        """Every module's delta for composition (or adapter) `name`; failures become R601/R603."""
        task = lower(analysis or self.analysis, name)
        with self._task_errors(task, name), progress(f"computing {name}", task.modules,
                                                     quiet=self.quiet) as advance:
            return self.executor.run(task, advance)

    def parts(self, name: str) -> dict:
        """The composed saved modules, biases and token rows of `name`, by tensor name."""
        task = lower(self.analysis, name)
        with self._task_errors(task, name):
            return self.executor.parts(task)

    def dropped(self, name: str) -> list[str]:
        """What each `svd` of composition `name` that dropped full-fine-tune tensors left out,
        with the share of its argument's norm they held (DESIGN §2; lint's T415 names them)."""
        lines, task = [], lower(self.analysis, name)
        for leaf in op_leaves(self.analysis.canonical[name]):
            with self._task_errors(task, name):
                share = self.executor.dropped_share(leaf)
            if share is not None:
                fraction, tensors = share
                shown = ", ".join(tensors[:3]) + (f" and {len(tensors) - 3} more" if len(tensors) > 3 else "")
                lines.append(f"svd dropped {len(tensors)} tensors holding {100 * fraction:.2f}% of ‖x‖_F ({shown})")
        return lines

    def lazy_deltas(self, name: str) -> _LazyDeltas:
        return _LazyDeltas(self, lower(self.analysis, name), name)

    @contextlib.contextmanager
    def _task_errors(self, task, name: str):
        """Turn what can go wrong while computing `name` into a diagnostic at its recipe span."""
        try:
            yield
        except MemoryError:
            self._fail_task("R603", f"out of memory computing `{name}`", task)
        except RuntimeError as err:  # torch reports allocation failures as RuntimeError
            if "out of memory" not in str(err).lower():
                raise
            self._fail_task("R603", f"out of memory computing `{name}`: {_first_line(err)}", task)
        except (OSError, InputDataError) as err:  # unreadable or non-finite input data
            self._fail_task("R601", f"computing `{name}` failed: {_first_line(err)}", task)

    def _fail_task(self, code: str, message: str, task) -> None:
        written = ", ".join(f"`{name}`" for name in self.written)
        self.sink.emit(code, message, task.spans[0] if task.spans else None,
                       help=f"check the adapters' files; outputs {written} were written whole before this, "
                       "the rest not at all" if written else "check the adapters' files; nothing was written")
        raise _fail(self.sink)

    # ------------------------------------------------------------ writing

    def write_output(self, out: ir.Output, *, force: bool = False, results: Sequence = ()) -> None:
        """Write `out` (an adapter directory or a merged model) atomically, with its model card;
        `results` are the run's evaluation rows, whose values for `out` the card shows."""
        from peftdsl.outputs import merge, write
        from peftdsl.outputs.atomic import OutputExists
        from peftdsl.outputs.card import output_card

        analysis = self.analysis
        form = analysis.canonical[out.name]
        dtype = self._output_dtype(out)
        provenance = self._provenance(out, dtype)

        def stamp() -> tuple[dict, bytes]:  # called once the weights are complete: every input's sha256 is known then
            hashes = self.input_hashes()
            provenance["inputs"] = {n: {**entry, "sha256": hashes.get(n)} for n, entry in provenance["inputs"].items()}
            return provenance, output_card(analysis, out, provenance, results)

        template = analysis.adapters[adapter_leaves(form)[0]].config
        try:
            if out.merge:
                transform = self._merge_transform(out.name)
                merge.write_merged(out.path, base_dir=analysis.base.path, transform=transform, dtype=out.dtype,
                                   force=force, allow_pickle=self.allow_pickle, provenance=stamp,
                                   task=analysis.task)
            elif form.kind is Kind.IA3:
                config, tensors = write.ia3_adapter_files(self.deltas(out.name), template=template, dtype=dtype)
                write.write_adapter(out.path, config=config, tensors=tensors, provenance=stamp, force=force)
            elif selects_ranks(form) or extracts_any_embeddings(form):  # not planned before computing: no header first
                deltas = self.deltas(out.name)
                provenance["ranks"] = chosen_ranks(deltas)
                config, tensors = write.lora_adapter_files(deltas, template=template, dtype=dtype)
                write.write_adapter(out.path, config=config, tensors=tensors, provenance=stamp, force=force)
                self.rank_summaries[out.name] = rank_summary(provenance["ranks"])
            else:
                self._stream_lora_output(out, template, dtype, stamp, force)
        except OutputExists:
            self.sink.emit("R602", f"output `{out.name}` already exists at `{out.path}`", out.span,
                           help="pass --force to replace it")
            raise _fail(self.sink) from None
        except merge.PickledWeights as err:
            self._pickled_base(err)
        except (OSError, OutputError, InputDataError) as err:
            self.sink.emit("R601", f"writing `{out.name}` failed: {getattr(err, 'strerror', None) or err}",
                           out.span, help="nothing was left half-written at the output path")
            raise _fail(self.sink) from None
        self.written.append(out.name)

    def _merge_transform(self, name: str):
        """What a merged output of composition `name` folds into the base: task arithmetic over
        full fine-tunes straight from their rows (peftdsl.outputs.task_arithmetic); other dense
        forms' deltas computed as the shards reach them; the rest's computed first."""
        from peftdsl.outputs import merge, task_arithmetic

        analysis, form = self.analysis, self.analysis.canonical[name]
        dense = form.kind is Kind.DENSE
        if dense:
            streamed = task_arithmetic.plan(form, lower(analysis, name), analysis.adapters, analysis.base,
                                            self.executor.reader)
            if streamed is not None:
                return streamed
        deltas = self.lazy_deltas(name) if dense else self.deltas(name)
        parts = self.parts(name) if dense else None
        return merge.merge_transform(deltas, dense=dense, parts=parts, base_dir=analysis.base.path,
                                     allow_pickle=self.allow_pickle)

    def _pickled_base(self, err) -> None:
        self.sink.emit("I310", f"the base model stores its weights as a pickle (`{err.path.name}`)",
                       self.analysis.recipe.base_span,
                       help="convert it to safetensors, or pass --allow-pickle to load it with weights_only=True")
        raise _fail(self.sink) from None

    def _stream_lora_output(self, out: ir.Output, template: dict, dtype: str, stamp: Callable[[], tuple[dict, bytes | None]],
                            force: bool) -> None:
        """A LoRA adapter written a chunk at a time: the plan gives every shape, so the file's
        header goes first and no more than one chunk of the output is ever in memory."""
        import torch

        from peftdsl.outputs import write
        from peftdsl.runtime.experts import AdapterFusion
        from peftdsl.runtime.tensorio import stored

        task = lower(self.analysis, out.name)
        torch_dtype = getattr(torch, dtype)
        ranks, layouts, specs = {}, set(), {}
        fusion = AdapterFusion()  # expert modules go back into PEFT's fused factors
        for group in task.groups:
            rank = group_rank(task.form, group)
            for module in group.modules:
                if fusion.claims(module):
                    fusion.plan(module, rank, group.out_features, group.in_features)
                    continue
                layouts.add(group.layout)
                ranks[module] = rank
                key_a, key_b = write.lora_keys(module, group.layout)
                specs[key_a] = (torch_dtype, (rank, group.in_features))
                specs[key_b] = (torch_dtype, (group.out_features, rank))
        specs.update(fusion.specs(torch_dtype))

        # Parts (heads, biases, token rows) are small beside the factors: computed first, whole,
        # so that their keys and shapes are in the header that goes out before any factor.
        widths = {module: group.out_features for group in task.groups for module in group.modules}
        with self._task_errors(task, out.name):
            fields, part_tensors = write.part_files(self.executor.parts(task), widths, torch_dtype)
        specs.update({key: (t.dtype, tuple(t.shape)) for key, t in part_tensors.items()})

        def chunks():
            with self._task_errors(task, out.name), progress(f"writing {out.name}", task.modules,
                                                             quiet=self.quiet) as advance:
                for chunk in self.executor.stream(task, advance):
                    tensors = {}
                    for module, delta in chunk.items():
                        if fusion.claims(module):
                            fused = fusion.add(module, delta)
                            tensors.update({key: stored(t, torch_dtype, key) for key, t in fused.items()})
                            continue
                        key_a, key_b = write.lora_keys(module, delta.layout)
                        tensors[key_a] = stored(delta.A, torch_dtype, key_a)
                        tensors[key_b] = stored(delta.B, torch_dtype, key_b)
                    yield tensors
            yield part_tensors

        config = {**write.lora_adapter_config(ranks, layouts, template, parameters=fusion.ranks()), **fields}
        write.check_loadable(config)
        write.write_adapter_streaming(out.path, config=config, specs=specs, chunks=chunks(),
                                      provenance=stamp, force=force)

    def _output_dtype(self, out: ir.Output) -> str:
        """The dtype written: the recipe's, else the base's for a merged model (its shards keep
        it), else the first input adapter's."""
        if out.dtype:
            return out.dtype
        analysis = self.analysis
        if out.merge and analysis.base is not None:
            weights = analysis.base.weights.values()
            stored = next((t.dtype for t in weights if t.dtype in ("F32", "F16", "BF16", "F64")), "F32")
        else:
            first = analysis.adapters[adapter_leaves(analysis.canonical[out.name])[0]]
            stored = next(iter(first.modules.values())).dtype
        return _OUTPUT_DTYPES.get(stored, "float32")

    def _provenance(self, out: ir.Output, dtype: str) -> dict:
        # Versions from package metadata: importing peft just to read its version costs 2.5 s.
        from importlib.metadata import version

        recipe, params = self.analysis.recipe, self.analysis.params
        form = self.analysis.canonical[out.name]
        return {
            "peftdsl": __version__,
            "torch": version("torch").split("+")[0],
            "peft": version("peft"),
            "recipe": {"file": recipe.path.name, "name": recipe.name, "sha256": self.recipe_sha256,
                       "text": recipe.span.source.text},
            "output": out.name,
            "kind": form.kind.value,
            "canonical": ir.combination_text(form),
            "inputs": {n: {"path": _location(recipe, self.analysis.adapters[n]), "sha256": None}
                       for n in adapter_leaves(form)},
            "params": {k: params[k] for k in sorted(params)},
            "seed": recipe.seed,
            "device": self.device.type,
            "dtype": dtype,
            "merge": out.merge,
        }


def _all_safetensors(info) -> bool:
    return all(f.suffix == ".safetensors" for f in (list(info.files) or [info.weights]))


def extracts_any_embeddings(form: ir.Combination) -> bool:
    """Whether an `svd(..., embed=true)` of `form` adds embedding factors outside the plan's groups."""
    return any(extracts_embeddings(leaf) for leaf in op_leaves(form))


def selects_ranks(form: ir.Combination) -> bool:
    """Whether an `svd(..., keep=, tol=)` chooses ranks from the data somewhere in `form`."""
    return any(leaf.func == "svd" and ({"keep", "tol"} & dict(leaf.options).keys())
               for leaf in op_leaves(form))


def chosen_ranks(deltas: Mapping) -> dict[str, dict[str, float]]:
    """Each module's rank and the share of ‖ΔW‖_F it keeps (`peftdsl.json`'s `ranks`)."""
    return {name: {"rank": int(d.A.shape[0]), "kept": round(d.kept, 6)}
            for name, d in sorted(deltas.items()) if getattr(d, "kept", None) is not None}


def rank_summary(ranks: Mapping[str, Mapping[str, float]]) -> str:
    values = sorted(r["rank"] for r in ranks.values())
    kept = sorted(r["kept"] for r in ranks.values())
    if not values:
        return "no module ranks chosen"
    return (f"ranks min {values[0]} / median {values[len(values) // 2]} / max {values[-1]} over "
            f"{len(values)} modules, ‖ΔW‖ kept min {kept[0]:.3f} / median {kept[len(kept) // 2]:.3f}")


def _checked_experts(analysis: Analysis, sink: Sink) -> Analysis:
    """Expert parameters checked against the model transformers builds for the base, which
    the front end cannot do for a checkpoint storing experts one tensor each (I307)."""
    if analysis.base is None or not any(m.expert is not None for info in analysis.adapters.values()
                                        for m in info.modules.values()):
        return analysis
    from peftdsl.runtime.experts import check_base

    checked = check_base(analysis, sink)
    if sink.has_errors():
        raise _fail(sink)
    return checked


def _location(recipe: ir.Recipe, info) -> str:
    """Where an input came from, for provenance: the recipe's path, or that it was given in memory."""
    return "<in memory>" if info.state is not None else recipe.adapter(info.name).location


# Which stored dtypes an output keeps; anything else (fp8, say) is written as float32.
_OUTPUT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F64": "float64"}


class _LazyDeltas(Mapping):
    """Module deltas computed a chunk at a time, when the merged writer first asks for one of
    the chunk's modules, and dropped once read: a dense merge never holds a whole model of
    deltas, only the chunks whose modules the shards have not reached yet."""

    def __init__(self, session: Session, task, name: str):
        self.session, self.task, self.name = session, task, name
        self.chunk_of = {m: chunk for chunk in session.executor.chunks(task) for m in chunk.modules}
        self.ready: dict = {}

    def __getitem__(self, module: str):
        if module not in self.ready:
            with self.session._task_errors(self.task, self.name):
                self.ready.update(self.session.executor.compute(self.task, self.chunk_of[module]))
        return self.ready.pop(module)

    def __iter__(self):
        return iter(self.chunk_of)

    def __len__(self) -> int:
        return len(self.chunk_of)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------- run


def run(analysis: Analysis, sink: Sink, options: RunOptions, *, allow_pickle: bool = False) -> RunResult:
    """What `peftdsl run` does, on a recipe the front end has analysed into `sink`/`analysis`."""
    started = time.perf_counter()
    reported = 0

    def say() -> None:
        nonlocal reported
        if options.on_diagnostics is not None and len(sink.items) > reported:
            options.on_diagnostics(sink.items[reported:])
        reported = len(sink.items)

    try:
        _check_only(analysis, options.only)
        if options.executor not in ("local", "ray"):
            raise UsageError(f"executor must be `local` or `ray`, not `{options.executor}`")
        if not sink.has_errors():
            with Session(analysis, sink, device=options.device, allow_pickle=allow_pickle,
                         quiet=options.quiet) as session:
                session.verify_pins(locked=options.locked)
                _check_outputs_free(analysis, sink, options)
                say()
                if sink.has_errors():
                    raise _fail(sink)
                with _interruptible(session, analysis, options):
                    return _execute(session, options, started, say)
        say()
        raise _fail(sink)
    except RecipeError:
        say()
        raise


@contextlib.contextmanager
def _interruptible(session: Session, analysis: Analysis, options: RunOptions):
    """Ctrl-C or SIGTERM (the CLI raises KeyboardInterrupt for both) becomes `Interrupted`,
    which says which outputs were already in place and which of those replaced older ones."""
    existed = {o.name for o in _selected_outputs(analysis, options.only) if o.path.exists()}
    try:
        yield
    except KeyboardInterrupt as err:
        name = getattr(err, "signal", None) or (str(err) if str(err) else "SIGINT")
        written = tuple(session.written)
        raise Interrupted(name, written, [n for n in written if n in existed]) from None


def _check_only(analysis: Analysis, only: Sequence[str]) -> None:
    names = {o.name for o in analysis.recipe.outputs}
    unknown = [n for n in only if n not in names]
    if unknown:
        raise UsageError(f"--only {unknown[0]}: the recipe has no output `{unknown[0]}`"
                         + (f" (outputs: {', '.join(sorted(names))})" if names else ""))


def _selected_outputs(analysis: Analysis, only: Sequence[str]) -> list[ir.Output]:
    return [o for o in analysis.recipe.outputs if not only or o.name in only]


def _check_outputs_free(analysis: Analysis, sink: Sink, options: RunOptions) -> None:
    for out in _selected_outputs(analysis, options.only):
        try:
            exists = out.path.exists()
        except OSError as err:  # e.g. a component longer than the file system allows
            sink.emit("R601", f"output path of `{out.name}` cannot be used: {err.strerror or err}", out.span)
            continue
        if exists and not options.force:
            sink.emit("R602", f"output `{out.name}` already exists at `{out.path}`", out.span,
                      help="pass --force to replace it")
        elif _below_a_file(out.path):
            sink.emit("R601", f"output path of `{out.name}` lies below a file, not a folder: `{out.path}`",
                      out.span, help="outputs are folders; choose a path whose parents are folders")
        elif exists and not replaceable(out.path):
            sink.emit("R602", f"output `{out.name}` would replace `{out.path}`, which peftdsl did not write",
                      out.span, help="--force replaces earlier peftdsl outputs only (they hold "
                      "peftdsl.json); move that folder away yourself if it is meant to go")


def _below_a_file(path: Path) -> bool:
    return any(parent.exists() and not parent.is_dir() for parent in path.parents)


def replaceable(path: Path) -> bool:
    """An earlier peftdsl output (it holds its provenance) or an empty folder."""
    return path.is_dir() and not path.is_symlink() and (
        (path / "peftdsl.json").is_file() or not any(path.iterdir()))


def _execute(session: Session, options: RunOptions, started: float, say) -> RunResult:
    analysis, sink = session.analysis, session.sink
    recipe = analysis.recipe
    evals = [] if options.no_eval else list(recipe.evals)
    report = _report_dir(options, recipe) if evals else None
    if report is not None:  # a bad report folder is found before, not after, the work
        _check_report_dir(report, analysis)
        try:
            report.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"--report: cannot create `{report}`: {err.strerror or err}") from None
    if options.memory_guard and not _fits_in_memory(session, options, evals):
        say()
        raise _fail(sink)
    console = session.console = _console(options.quiet)
    results, selected, outcome = [], None, None
    if evals:
        results, selected, outcome = _evaluate(session, evals, options, console)
        if selected:
            session.analysis = analysis = analysis.at(selected)
    for out in _selected_outputs(analysis, options.only):
        session.write_output(out, force=options.force, results=results)
        console.print(f"wrote {out.name} -> {out.path}")
        if out.name in session.rank_summaries:
            console.print(f"  {out.name}: {session.rank_summaries[out.name]}")
        for line in session.dropped(out.name):
            console.print(f"  {out.name}: {line}")
    if results:
        _report(session, results, selected, report, console, outcome)
    console.print(f"done in {time.perf_counter() - started:.1f} s on {session.device}")
    say()
    return RunResult(written=tuple(session.written), results=tuple(results), selected=selected, report=report,
                     diagnostics=tuple(sink.items), device=str(session.device),
                     seconds=time.perf_counter() - started, search=outcome)


def _console(quiet: bool):
    from rich.console import Console

    return Console(stderr=True, quiet=quiet)


# ---------------------------------------------------------------- resource guard


def available_memory(device) -> int | None:
    """Bytes free for this run: MemAvailable on the host, or free memory on the CUDA device."""
    if device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def planned_memory(analysis: Analysis, options: RunOptions, evals: Sequence) -> tuple[int, str]:
    """Peak bytes the run needs, and the composition that needs them (lower.planned_peak)."""
    outputs = _selected_outputs(analysis, options.only)
    # written a chunk at a time: LoRA adapters, and dense merges (each delta computed as its shard
    # reaches it, peftdsl.runner._LazyDeltas); merged LoRA and (IA)³ outputs hold their results
    streamed = [o.name for o in outputs if (not o.merge and analysis.canonical[o.name].kind is Kind.LORA)
                or (o.merge and analysis.canonical[o.name].kind is Kind.DENSE)]
    held = [o.name for o in outputs if o.name not in streamed]
    held += [m for t in evals for m in t.models if m != "base"]
    return planned_peak(analysis, streamed=streamed, held=held, with_base=bool(evals))


def _fits_in_memory(session: Session, options: RunOptions, evals: Sequence) -> bool:
    free = available_memory(session.device)
    if free is None:
        return True
    needed, worst = planned_memory(session.analysis, options, evals)
    if needed <= free:
        return True
    recipe = session.analysis.recipe
    span = recipe.composition(worst).span if recipe.composition(worst) else recipe.span
    session.sink.emit("R603", f"the plan needs about {needed / 2**30:.2f} GiB "
                      f"({'`' + worst + '`' if worst else 'base'}) but only {free / 2**30:.2f} GiB is free on "
                      f"{session.device}", span,
                      help="free memory, run on another device, or pass --no-memory-guard to try anyway")
    return False


# ---------------------------------------------------------------- evaluation and sweeps


def _evaluate(session: Session, evals, options: RunOptions, console):
    from peftdsl.evaluation.report import select_best
    from peftdsl.evaluation.sweep import PointJob, evaluate_point, run_on_ray
    from peftdsl.outputs.merge import PickledWeights

    analysis, sink = session.analysis, session.sink
    recipe = analysis.recipe
    points = sweep_points(recipe, analysis.overrides) or [{}]
    outcome = None
    jobs = [PointJob(recipe=recipe.path, params=tuple(sorted({**analysis.params, **point}.items())),
                     point=tuple(point.items()), device=str(session.device), quiet=options.quiet,
                     allow_pickle=session.allow_pickle) for point in points]
    try:
        if options.executor == "ray":
            _check_ray(analysis)
        if recipe.search is not None:  # the best candidate becomes the one point evaluated below
            outcome = _search(session, jobs[0], options, console)
            points = [outcome.best] if outcome.best else [{}]
            jobs = [dataclasses.replace(jobs[0], params=tuple(sorted({**analysis.params, **outcome.best}.items())),
                                        point=tuple(outcome.best.items()))]
        if options.executor == "ray":
            results = run_on_ray(jobs, options.address)
        else:
            results, cache = [], {}
            for job in jobs:
                if job.point and recipe.sweep is not None:
                    console.print("sweep point " + show_point(job.point))
                point = analysis.at(dict(job.params))
                results.extend(evaluate_point(point, job, lambda name, p=point: session.deltas(name, p), cache))
    except PickledWeights as err:
        session._pickled_base(err)
    except UntrainedWeights as err:
        sink.emit("E501", f"cannot evaluate {'on base' if err.model == 'base' else f'`{err.model}` on base'} "
                  f"`{recipe.base}`: {err}", recipe.base_span,
                  help="evaluate on a checkpoint that has the head the metric needs, or a composition whose "
                  "adapters carry it; random weights would give a different number on every run")
        raise _fail(sink) from None
    except EvalDataError as err:
        failing = next((t for t in evals if (t.data is not None and t.data.name in str(err))
                        or f"eval `{t.name}`" in str(err)), evals[0])  # its message names the file or eval
        sink.emit("E501", f"evaluation data: {err}", failing.span)
        raise _fail(sink) from None
    except OSError as err:
        sink.emit("E501", f"cannot load base model `{recipe.base}`: {_first_line(err)}", recipe.base_span)
        raise _fail(sink) from None
    selected = None
    sweep = recipe.sweep
    if sweep is not None and sweep.select is not None and points != [{}]:
        s = sweep.select
        selected = select_best(results, s.eval, s.model, s.goal)
        console.print("selected " + show_point(selected))
    if outcome is not None and outcome.best:
        selected = dict(outcome.best)
    return results, selected, outcome


def _check_ray(analysis: Analysis) -> None:
    if not _is_the_file(analysis.recipe):
        raise UsageError("--executor ray rebuilds the recipe from its file on each worker, but this "
                         "recipe was given as text (or its file changed since): use peftdsl.load(path)")
    if any(info.state is not None for info in analysis.adapters.values()):
        raise UsageError("--executor ray rebuilds the recipe from its files on each worker; "
                         "save the in-memory adapters first")


def _search(session: Session, job, options: RunOptions, console):
    """Learned weights: the search block's candidates, evaluated on its objective only
    (peftdsl.evaluation.search); returns the outcome, whose best point the run then uses."""
    from peftdsl.evaluation import search as learned

    analysis = session.analysis
    block = analysis.recipe.search
    pinned = {name: analysis.overrides[name] for name, _, _ in block.bounds if name in analysis.overrides}
    restricted = learned.objective_only(analysis, block.objective)
    if options.executor == "ray":
        evaluate = learned.RayEvaluator(job, block.objective, options.address)
    else:
        def compose(name, at):
            task = lower(at, name)
            with session._task_errors(task, name):
                return session.executor.run(task)

        evaluate = learned.LocalEvaluator(restricted, job, compose)
    with progress("searching", block.budget, quiet=options.quiet) as advance:
        outcome = learned.run_search(block, analysis.params, pinned, evaluate, on_candidate=lambda _: advance(1))
    if isinstance(evaluate, learned.LocalEvaluator):
        outcome = dataclasses.replace(outcome, compose_seconds=evaluate.compose_seconds,
                                      eval_seconds=evaluate.eval_seconds)
    learned.print_candidates(outcome, console)
    return outcome



def _is_the_file(recipe: ir.Recipe) -> bool:
    try:
        return recipe.path.read_text(encoding="utf-8") == recipe.span.source.text
    except (OSError, UnicodeDecodeError):
        return False


def _report_dir(options: RunOptions, recipe: ir.Recipe) -> Path:
    return options.report or Path("peftdsl-reports") / recipe.name


def _report(session: Session, results, selected, directory: Path, console, outcome=None) -> None:
    from peftdsl.evaluation.report import print_table, write_report

    recipe = session.analysis.recipe
    swept = [name for name, _ in recipe.sweep.grid] if recipe.sweep else []
    print_table(results, console, swept)
    try:
        written = write_report(directory, recipe.name, results, selected, swept,
                               search=outcome.to_json() if outcome is not None and outcome.candidates else None,
                               search_goal=outcome.goal if outcome is not None else "min")
    except OSError as err:  # a full disk, a folder made read-only meanwhile
        done = ", ".join(f"`{name}`" for name in session.written)
        session.sink.emit("R601", f"writing the report to `{directory}` failed: {err.strerror or err}",
                          recipe.evals[0].span if recipe.evals else recipe.span,
                          help="the previous report there is unchanged; "
                          + (f"outputs {done} were written" if done else "no output was written"))
        raise _fail(session.sink) from None
    console.print(f"report: {written[0].parent}")


def _check_report_dir(report: Path, analysis: Analysis) -> None:
    """`--report` may not be, or lie inside, what the recipe reads or writes (N210's rule for outputs)."""
    recipe = analysis.recipe
    places = [(f"adapter `{a.name}`", a.path) for a in recipe.adapters if a.path is not None]
    places += [("the base model", recipe.base_path)] if recipe.base_path is not None else []
    places += [(f"the data of eval `{e.name}`", e.data) for e in recipe.evals if e.data is not None]
    places += [(f"output `{o.name}`", o.path) for o in recipe.outputs]
    try:
        folder = report.resolve()
        clash = next((what for what, path in places if folder.is_relative_to(path.resolve())), None)
    except (OSError, RuntimeError, ValueError) as err:  # a path no file can have
        raise UsageError(f"--report: cannot use `{report}`: {err}") from None
    if clash is not None:
        raise UsageError(f"--report {report}: that folder is or lies inside {clash}; writing the report there "
                         "would change what the recipe reads or writes; choose a folder of its own")
