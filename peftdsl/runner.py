"""`peftdsl run`: compile, execute, write outputs, evaluate, sweep (DESIGN §3, §4).

The front end runs first and every user error is reported before any tensor is
read: names, kinds, shapes, pins, existing outputs. Execution errors become
diagnostics that point at the composition that failed. Outputs are written
atomically; nothing half-written is ever left in place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
import hashlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from peftdsl import __version__, canonical, ir
from peftdsl.compiler import Options, analyse, sweep_points
from peftdsl.console import (
    EXIT_ERRORS,
    EXIT_OK,
    UsageError,
    check_sets,
    parse_sets,
    print_diagnostics,
)
from peftdsl.diagnostics import Sink
from peftdsl.lock import sha256_file
from peftdsl.lower import adapter_leaves, estimate, group_rank, lower

Kind = ir.Kind


@dataclass
class RunState:
    analysis: object
    sink: Sink
    hashes: dict[str, str] = field(default_factory=dict)
    recipe_sha256: str = ""
    written: list[str] = field(default_factory=list)  # outputs complete on disk, in order
    console: object = None  # rich Console on stderr, quiet with --quiet


def run_command(args) -> int:
    sets = parse_sets(args.sets)
    sink = Sink()
    analysis = analyse(args.recipe, sink, Options(use_files=True, allow_pickle=args.allow_pickle, overrides=sets))
    if analysis is not None:
        check_sets(analysis, sets)
        _check_only(analysis, args.only)
        state = RunState(analysis, sink)
        if not sink.has_errors():
            _verify_pins(state, locked=args.locked)
            _check_outputs_free(state, args)
    print_diagnostics(sink.items, "full", sys.stderr.isatty())
    if analysis is None or sink.has_errors():
        return EXIT_ERRORS
    return _execute(state, args, dict(sets))


def _check_only(analysis, only: list[str]) -> None:
    names = {o.name for o in analysis.recipe.outputs}
    unknown = [n for n in only if n not in names]
    if unknown:
        raise UsageError(f"--only {unknown[0]}: the recipe has no output `{unknown[0]}`"
                         + (f" (outputs: {', '.join(sorted(names))})" if names else ""))


def _selected_outputs(analysis, only: list[str]) -> list[ir.Output]:
    return [o for o in analysis.recipe.outputs if not only or o.name in only]


# ---------------------------------------------------------------- before compute


def _verify_pins(state: RunState, *, locked: bool) -> None:
    """Hash every adapter's weights (for provenance) and check the recipe's pins."""
    recipe, sink = state.analysis.recipe, state.sink
    state.recipe_sha256 = hashlib.sha256(recipe.span.source.text.encode("utf-8")).hexdigest()
    for adapter in recipe.adapters:
        info = state.analysis.adapters.get(adapter.name)
        if info is None:
            continue
        state.hashes[adapter.name] = digest = sha256_file(info.weights)
        if adapter.sha256 is None and locked:
            sink.emit("I311", f"adapter `{adapter.name}` has no sha256 pin and --locked was given",
                      adapter.name_span, help="run `peftdsl lock` to pin every adapter")
        elif adapter.sha256 is not None and adapter.sha256 != digest:
            sink.emit("I309", f"adapter `{adapter.name}` does not match its pin: its sha256 is {digest[:12]}…",
                      adapter.span, help="the weights changed since the recipe was locked; re-run "
                      "`peftdsl lock` if the change is intended")


def _check_outputs_free(state: RunState, args) -> None:
    for out in _selected_outputs(state.analysis, args.only):
        try:
            exists = out.path.exists()
        except OSError as err:  # e.g. a component longer than the file system allows
            state.sink.emit("R601", f"output path of `{out.name}` cannot be used: {err.strerror or err}", out.span)
            continue
        if exists and not args.force:
            state.sink.emit("R602", f"output `{out.name}` already exists at `{out.path}`", out.span,
                            help="pass --force to replace it")
        elif exists and not _replaceable(out.path):
            state.sink.emit("R602", f"output `{out.name}` would replace `{out.path}`, which peftdsl did not write",
                            out.span, help="--force replaces earlier peftdsl outputs only (they hold "
                            "peftdsl.json); move that folder away yourself if it is meant to go")


def _replaceable(path: Path) -> bool:
    """An earlier peftdsl output (it holds its provenance) or an empty folder."""
    return path.is_dir() and not path.is_symlink() and (
        (path / "peftdsl.json").is_file() or not any(path.iterdir()))


# ---------------------------------------------------------------- compute


def _execute(state: RunState, args, overrides: dict[str, float]) -> int:
    from peftdsl.runtime.execute import Executor, pick_device

    analysis = state.analysis
    try:
        device = pick_device(args.device)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if analysis.recipe.evals and not args.no_eval:  # a bad report folder is found before, not after, the work
        try:
            _report_dir(args, analysis.recipe).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UsageError(f"--report: cannot create `{_report_dir(args, analysis.recipe)}`: "
                             f"{err.strerror or err}") from None
    reported = len(state.sink.items)
    if not args.force and not _fits_in_memory(state, args, device):
        print_diagnostics(state.sink.items[reported:], "full", sys.stderr.isatty())
        return EXIT_ERRORS
    console = state.console = _console(args.quiet)
    recipe = analysis.recipe
    results, selected = [], None
    started = time.perf_counter()
    with Executor(analysis, device=device, seed=recipe.seed) as executor:
        try:
            evals = [] if args.no_eval else list(recipe.evals)
            params = {p.name: p.value for p in recipe.params} | overrides
            if evals:
                results, selected = _evaluate(state, executor, evals, params, overrides, args, console)
                params |= selected or {}
                canonical.canonicalise(analysis, Sink(), params)  # sweeps leave the last point's forms
            for out in _selected_outputs(analysis, args.only):
                _write_output(state, executor, out, params, device, args.force, args.allow_pickle)
                state.written.append(out.name)
                console.print(f"wrote {out.name} -> {out.path}")
        except _RunFailed:
            print_diagnostics(state.sink.items[reported:], "full", sys.stderr.isatty())
            return EXIT_ERRORS
    if results:
        _report(state, results, selected, args, console)
    console.print(f"done in {time.perf_counter() - started:.1f} s on {device}")
    return EXIT_OK


class _RunFailed(Exception):
    pass


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


def planned_memory(state: RunState, args) -> tuple[int, str]:
    """Peak bytes the plan needs, and the task that needs them (see DESIGN §6 on streaming).

    The executor holds one chunk of a group at a time (at most its chunk budget). A
    LoRA adapter output is streamed to disk chunk by chunk; every other task (merged
    and (IA)³ outputs, evaluated models) also holds its float32 results, and
    evaluation holds the base model.
    """
    from peftdsl.runtime.execute import DEFAULT_CHUNK_BYTES

    analysis = state.analysis
    streamed = {o.name for o in _selected_outputs(analysis, args.only)
                if not o.merge and analysis.canonical[o.name].kind is Kind.LORA}
    evals = [] if args.no_eval else analysis.recipe.evals
    held = [o.name for o in _selected_outputs(analysis, args.only) if o.name not in streamed]
    held += [m for t in evals for m in t.models if m != "base"]
    base_bytes = 0
    if evals and analysis.base is not None:
        base_bytes = sum(t.offsets[1] - t.offsets[0] for t in analysis.base.weights.values())
    peak, worst = 0, ""
    for name in dict.fromkeys([*streamed, *held]):
        est = estimate(analysis, lower(analysis, name))
        need = min(est.peak_bytes, DEFAULT_CHUNK_BYTES) + (0 if name in streamed and name not in held
                                                              else est.bytes_written)
        if need > peak:
            peak, worst = need, name
    return peak + base_bytes, worst


def _fits_in_memory(state: RunState, args, device) -> bool:
    free = available_memory(device)
    if free is None:
        return True
    needed, worst = planned_memory(state, args)
    if needed <= free:
        return True
    recipe = state.analysis.recipe
    span = recipe.composition(worst).span if recipe.composition(worst) else recipe.span
    state.sink.emit("R603", f"the plan needs about {needed / 2**30:.2f} GiB ({'`' + worst + '`' if worst else 'base'}) "
                    f"but only {free / 2**30:.2f} GiB is free on {device}", span,
                    help="free memory, run on another device, or pass --force to try anyway")
    return False


def _console(quiet: bool):
    from rich.console import Console

    return Console(stderr=True, quiet=quiet)


def _deltas(state: RunState, executor, name: str):
    """Every module's delta for composition (or adapter) `name`; failures become R601/R603."""
    task = lower(state.analysis, name)
    with _task_errors(state, task, name), _progress(state, f"computing {name}", task.modules) as advance:
        return executor.run(task, advance)


@contextlib.contextmanager
def _progress(state: RunState, description: str, total: int):
    """A transient progress bar over modules, on a terminal only, silent with --quiet."""
    console = state.console
    if console is None or console.quiet or not console.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


class _LazyDeltas(Mapping):
    """Module deltas computed a chunk at a time, when the merged writer first asks for one of
    the chunk's modules, and dropped once read: a dense merge never holds a whole model of
    deltas, only the chunks whose modules the shards have not reached yet."""

    def __init__(self, state: RunState, executor, task, name: str):
        self.state, self.executor, self.task, self.name = state, executor, task, name
        self.chunk_of = {m: chunk for chunk in executor.chunks(task) for m in chunk.modules}
        self.ready: dict = {}

    def __getitem__(self, module: str):
        if module not in self.ready:
            with _task_errors(self.state, self.task, self.name):
                self.ready.update(self.executor.compute(self.task, self.chunk_of[module]))
        return self.ready.pop(module)

    def __iter__(self):
        return iter(self.chunk_of)

    def __len__(self) -> int:
        return len(self.chunk_of)


def _lazy_deltas(state: RunState, executor, name: str) -> _LazyDeltas:
    return _LazyDeltas(state, executor, lower(state.analysis, name), name)


@contextlib.contextmanager
def _task_errors(state: RunState, task, name: str):
    """Turn what can go wrong while computing `name` into a diagnostic at its recipe span."""
    try:
        yield
    except MemoryError:
        _fail(state, "R603", f"out of memory computing `{name}`", task)
    except RuntimeError as err:
        if "out of memory" in str(err).lower():
            _fail(state, "R603", f"out of memory computing `{name}`: {_first_line(err)}", task)
        _fail(state, "R601", f"computing `{name}` failed: {_first_line(err)}", task)
    except (OSError, ValueError) as err:  # unreadable or non-finite input data (execute.InputDataError)
        _fail(state, "R601", f"computing `{name}` failed: {_first_line(err)}", task)


def _fail(state: RunState, code: str, message: str, task) -> None:
    written = ", ".join(f"`{name}`" for name in state.written)
    state.sink.emit(code, message, task.spans[0] if task.spans else None,
                    help=f"check the adapters' files; outputs {written} were written whole before this, "
                    "the rest not at all" if written else "check the adapters' files; nothing was written")
    raise _RunFailed()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------- outputs


# Which stored dtypes an output keeps; anything else (fp8, say) is written as float32.
_OUTPUT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _output_dtype(state: RunState, out: ir.Output, name: str) -> str:
    """The dtype written: the recipe's, else the base's for a merged model (its shards keep
    it), else the first input adapter's."""
    if out.dtype:
        return out.dtype
    if out.merge and state.analysis.base is not None:
        weights = state.analysis.base.weights.values()
        stored = next((t.dtype for t in weights if t.dtype in ("F32", "F16", "BF16", "F64")), "F32")
    else:
        first = state.analysis.adapters[adapter_leaves(state.analysis.canonical[name])[0]]
        stored = next(iter(first.modules.values())).dtype
    return _OUTPUT_DTYPES.get(stored, "float32")


def _provenance(state: RunState, out: ir.Output, params: dict, device, dtype: str) -> dict:
    # Versions from package metadata: importing peft just to read its version costs 2.5 s.
    from importlib.metadata import version

    recipe = state.analysis.recipe
    form = state.analysis.canonical[out.name]
    used = adapter_leaves(form)
    return {
        "peftdsl": __version__,
        "torch": version("torch").split("+")[0],
        "peft": version("peft"),
        "recipe": {"file": recipe.path.name, "name": recipe.name, "sha256": state.recipe_sha256,
                   "text": recipe.span.source.text},
        "output": out.name,
        "kind": form.kind.value,
        "canonical": ir.combination_text(form),
        "inputs": {n: {"path": recipe.adapter(n).location, "sha256": state.hashes.get(n)} for n in used},
        "params": {k: params[k] for k in sorted(params)},
        "seed": recipe.seed,
        "device": device.type,
        "dtype": dtype,
        "merge": out.merge,
    }


def _write_output(state: RunState, executor, out: ir.Output, params: dict, device, force: bool,
                  allow_pickle: bool) -> None:
    from peftdsl.outputs import merge
    from peftdsl.outputs import write
    from peftdsl.outputs.atomic import OutputExists

    analysis = state.analysis
    form = analysis.canonical[out.name]
    dtype = _output_dtype(state, out, out.name)
    provenance = _provenance(state, out, params, device, dtype)
    template = analysis.adapters[adapter_leaves(form)[0]].config
    try:
        if out.merge:
            dense = form.kind is Kind.DENSE  # full-size deltas: computed as the shards reach them
            deltas = _lazy_deltas(state, executor, out.name) if dense else _deltas(state, executor, out.name)
            merge.write_merged(out.path, base_dir=analysis.base.path,
                               transform=merge.merge_transform(deltas, dense=dense),
                               dtype=out.dtype, force=force, allow_pickle=allow_pickle, provenance=provenance)
        elif form.kind is Kind.IA3:
            deltas = _deltas(state, executor, out.name)
            config, tensors = write.ia3_adapter_files(deltas, template=template, dtype=dtype)
            write.write_adapter(out.path, config=config, tensors=tensors, provenance=provenance, force=force)
        else:
            _stream_lora_output(state, executor, out, template, dtype, provenance, force)
    except OutputExists:
        state.sink.emit("R602", f"output `{out.name}` already exists at `{out.path}`", out.span,
                        help="pass --force to replace it")
        raise _RunFailed() from None
    except merge.PickledWeights as err:
        state.sink.emit("I310", f"the base model stores its weights as a pickle (`{err.path.name}`)",
                        state.analysis.recipe.base_span,
                        help="convert it to safetensors, or pass --allow-pickle to load it with weights_only=True")
        raise _RunFailed() from None
    except (OSError, KeyError, ValueError) as err:
        state.sink.emit("R601", f"writing `{out.name}` failed: {getattr(err, 'strerror', None) or err}", out.span,
                        help="nothing was left half-written at the output path")
        raise _RunFailed() from None


def _stream_lora_output(state: RunState, executor, out: ir.Output, template: dict, dtype: str,
                        provenance: dict, force: bool) -> None:
    """A LoRA adapter written a chunk at a time: the plan gives every shape, so the file's
    header goes first and no more than one chunk of the output is ever in memory."""
    import torch

    from peftdsl.outputs import write

    task = lower(state.analysis, out.name)
    torch_dtype = getattr(torch, dtype)
    ranks, layouts, specs = {}, set(), {}
    for group in task.groups:
        rank = group_rank(task.form, group)
        layouts.add(group.layout)
        for module in group.modules:
            ranks[module] = rank
            key_a, key_b = write.lora_keys(module, group.layout)
            specs[key_a] = (torch_dtype, (rank, group.in_features))
            specs[key_b] = (torch_dtype, (group.out_features, rank))

    def chunks():
        with _task_errors(state, task, out.name), _progress(state, f"writing {out.name}", task.modules) as advance:
            for chunk in executor.stream(task, advance):
                tensors = {}
                for module, delta in chunk.items():
                    key_a, key_b = write.lora_keys(module, delta.layout)
                    tensors[key_a], tensors[key_b] = delta.A.to(torch_dtype), delta.B.to(torch_dtype)
                yield tensors

    config = write.lora_adapter_config(ranks, layouts, template)
    write.write_adapter_streaming(out.path, config=config, specs=specs, chunks=chunks(),
                                  provenance=provenance, force=force)


# ---------------------------------------------------------------- evaluation and sweeps


def _evaluate(state: RunState, executor, evals, params, overrides, args, console):
    from peftdsl.evaluation.evaluate import EvalDataError
    from peftdsl.outputs.merge import PickledWeights
    from peftdsl.evaluation.report import select_best
    from peftdsl.evaluation.sweep import PointJob, RayMissing, evaluate_point, run_on_ray

    recipe = state.analysis.recipe
    points = sweep_points(recipe, overrides) or [{}]
    jobs = [PointJob(recipe=recipe.path, params=tuple(sorted((params | point).items())),
                     point=tuple(point.items()), device=str(executor.device), quiet=args.quiet,
                     allow_pickle=args.allow_pickle) for point in points]
    try:
        if args.executor == "ray":
            results = run_on_ray(jobs, args.address)
        else:
            results, cache = [], {}
            for job in jobs:
                if job.point:
                    console.print("sweep point " + ", ".join(f"{k}={v:g}" for k, v in job.point))
                results.extend(evaluate_point(state.analysis, executor, job,
                                              lambda name: _deltas(state, executor, name), cache))
    except RayMissing as err:
        raise UsageError(str(err)) from None
    except PickledWeights as err:
        state.sink.emit("I310", f"the base model stores its weights as a pickle (`{err.path.name}`)",
                        recipe.base_span, help="convert it to safetensors, or pass --allow-pickle to load it "
                        "with weights_only=True")
        raise _RunFailed() from None
    except EvalDataError as err:
        failing = next((t for t in evals if t.data.name in str(err)), evals[0])  # its message names the file
        state.sink.emit("E501", f"evaluation data: {err}", failing.span)
        raise _RunFailed() from None
    except OSError as err:
        state.sink.emit("E501", f"cannot load base model `{recipe.base}`: {_first_line(err)}", recipe.base_span)
        raise _RunFailed() from None
    selected = None
    sweep = recipe.sweep
    if sweep is not None and sweep.select is not None and points != [{}]:
        s = sweep.select
        selected = select_best(results, s.eval, s.model, s.goal)
        console.print("selected " + ", ".join(f"{k}={v:g}" for k, v in selected.items()))
    return results, selected


def _report_dir(args, recipe) -> Path:
    return args.report or Path("peftdsl-reports") / recipe.name


def _report(state: RunState, results, selected, args, console) -> None:
    from peftdsl.evaluation.report import print_table, write_report

    recipe = state.analysis.recipe
    directory = _report_dir(args, recipe)
    swept = [name for name, _ in recipe.sweep.grid] if recipe.sweep else []
    print_table(results, console, swept)
    written = write_report(directory, recipe.name, results, selected, swept)
    console.print(f"report: {written[0].parent}")
