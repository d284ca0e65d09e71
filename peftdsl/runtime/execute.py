"""Stage 8: execute a lowered task, a group of modules at a time, on CPU or CUDA.

For each group the canonical form is evaluated bottom-up: adapter leaves are read
lazily from safetensors (only this group's tensors), operator leaves get their
argument prepared as their registry row says and run the row's kernel
(`peftdsl.runtime.ops`), sums run `exact_sum` (or a dense sum once a dense term appears).
Large groups are cut into chunks under a memory budget, so peak memory is about
one chunk, not a whole model. Results come back per module, on the CPU, in float32.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError

from peftdsl import ir
from peftdsl.errors import InputDataError, InternalError, UsageError
from peftdsl.inputs import AdapterInfo, BaseInfo
from peftdsl.lower import DEFAULT_CHUNK_BYTES, Group, Task, modules_per_chunk, working_bytes
from peftdsl.operators import OPERATORS, Argument
from peftdsl.runtime import experts, kernels, ops
from peftdsl.runtime.fold import DenseDelta, IA3Delta, LoraDelta, PartDelta
from peftdsl.parts import drops_full_parts
from peftdsl.runtime.parts import compute_parts, dropped_tensors, extract_embeddings, task_vector_norm2
from peftdsl.runtime.tensorio import CACHED_BLOCK_ELEMENTS, SafetensorsReader, all_finite
from peftdsl.runtime.values import Dense, Ia3, Lora, Value, dense_of, folded_B

Kind = ir.Kind


def pick_device(choice: str | torch.device | None) -> torch.device:
    """`auto` (or None) is CUDA when present, else CPU; `cuda[:N]` must exist."""
    if choice is None or choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except (RuntimeError, TypeError):
        raise UsageError(f"device must be auto, cpu or cuda[:N], not {choice!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but torch sees no CUDA device")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {choice}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"device must be auto, cpu or cuda[:N], not {choice!r}")
    return device


class Executor:
    """Evaluates tasks; keeps the adapters' safetensors files open for lazy reads.

    It needs the adapters' metadata only: the forms to compute come with each task,
    so one executor serves every sweep point of a run.
    """

    def __init__(self, adapters: Mapping[str, AdapterInfo], *, device: torch.device, seed: int,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, base: BaseInfo | None = None):
        self.adapters, self.device, self.seed = adapters, device, seed
        self.base = base  # read for the task vectors of saved modules, biases and token rows
        self.chunk_bytes = chunk_bytes
        self._stack = contextlib.ExitStack()
        self._files: dict[str, object] = {}
        # ‖x‖² of each `svd` argument that drops a full fine-tune's other tensors, by chunk
        # (a chunk computed again overwrites itself): for the share of ‖x‖ they held
        self.kept_norms: dict[ir.OpLeaf, dict[tuple[str, ...], float]] = {}

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _shard(self, path):
        """A reader of one weight shard (a full fine-tune's, or the base's), kept open."""
        return self.reader(path)

    def reader(self, path):
        """The open reader of one safetensors file, opened once: a source's pin is hashed from
        it (runner.verify_pins) and its tensors are read from it, so both see the same bytes."""
        if path not in self._files:
            if Path(path).suffix == ".bin":  # a pickled full fine-tune (`run --allow-pickle`): loaded whole
                self._files[path] = _PickledFile(path)
            else:
                self._files[path] = self._stack.enter_context(SafetensorsReader(path))
        return self._files[path]

    def _file(self, adapter: str):
        if adapter not in self._files:
            info = self.adapters[adapter]
            path = info.weights
            if info.state is not None:  # given in memory (the Python API)
                self._files[adapter] = _InMemoryFile(info.state)
            elif path.suffix == ".bin":  # the front end accepted it: `run --allow-pickle`
                self._files[adapter] = _PickledFile(path)
            else:
                self._files[adapter] = self.reader(path)
        return self._files[adapter]

    # ------------------------------------------------------------ driving

    def run(self, task: Task, advance=None) -> dict[str, LoraDelta | DenseDelta | IA3Delta | PartDelta]:
        """Every module's result, keyed by module name, and every part's (a saved module's
        weight, a bias, token rows), keyed by tensor name; in sorted order."""
        results: dict[str, LoraDelta | DenseDelta | IA3Delta | PartDelta] = {}
        for chunk in self.stream(task, advance):
            results.update(chunk)
        results.update(self.parts(task))
        results.update(extract_embeddings(self, task.form))
        return dict(sorted(results.items()))

    def parts(self, task: Task) -> dict[str, PartDelta]:
        """The task's tensors beside the factors, composed (peftdsl.runtime.parts)."""
        return compute_parts(self, task.form, task.parts) if task.parts else {}

    def dropped_share(self, leaf: ir.OpLeaf) -> tuple[float, tuple[str, ...]] | None:
        """For an `svd` that left out a full fine-tune's tensors no LoRA holds (norms, biases,
        embeddings): the share of its argument's Frobenius norm those tensors carried,
        √(Σ‖x_dropped‖² / ‖x‖²), and their names. None when it dropped nothing or was not run.
        Reads the dropped tensors (and the base's) once more; the modules' part of ‖x‖² was
        summed as they were computed."""
        if leaf not in self.kept_norms:
            return None
        tensors = dropped_tensors(self.adapters, leaf)
        if not tensors:
            return None
        dropped = sum(task_vector_norm2(self, leaf.arg, tensor) for tensor in tensors)
        total = dropped + sum(self.kept_norms[leaf].values())
        return (math.sqrt(dropped / total) if total > 0 else 0.0), tensors

    def stream(self, task: Task, advance=None) -> Iterator[dict[str, LoraDelta | DenseDelta | IA3Delta]]:
        """The results chunk by chunk, so that a writer can store each and let it go.

        `advance(n)` is told after each chunk how many modules it held (progress bars).
        """
        chunks = self._reading_order(self.chunks(task))
        for chunk in chunks[:_READ_AHEAD]:
            self.read_ahead(chunk)
        for i, chunk in enumerate(chunks):
            if i + _READ_AHEAD < len(chunks):
                self.read_ahead(chunks[i + _READ_AHEAD])
            yield self.compute(task, chunk)
            if advance is not None:
                advance(len(chunk.modules))

    def _reading_order(self, chunks: list[Group]) -> list[Group]:
        """The chunks in the order they are computed: where they read full fine-tunes, the one
        that reads least goes first, since nothing computes while the first is read (cold, a
        128k-row `lm_head` and its base are 1 GB); the rest are then read while it computes.
        Outputs are written at planned offsets, so the order changes no byte of them."""
        if len(chunks) < 2 or not any(self.adapters[a].tensor_files for c in chunks for a in c.adapters):
            return chunks
        first = min(range(len(chunks)), key=lambda i: len(chunks[i].modules) * chunks[i].out_features
                    * chunks[i].in_features)
        return [chunks[first], *chunks[:first], *chunks[first + 1:]]

    def read_ahead(self, chunk: Group) -> None:
        """Start the disk on a chunk's full-fine-tune (and base) tensors, so that they are read
        while the chunks before it compute (cold, a 1.5 GB fine-tune and its base are 3 s of
        reading). LoRA files are small and read whole; they are left alone."""
        for adapter in chunk.adapters:
            info = self.adapters[adapter]
            if not info.tensor_files:
                continue
            for key in (info.modules[m].keys[0] for m in chunk.modules if m in info.modules):
                for path in (info.tensor_files.get(key), self.base.files.get(key) if self.base else None):
                    if path is None or Path(path).suffix != ".safetensors":
                        continue
                    try:
                        self._shard(path).will_need([key])
                    except (OSError, KeyError):  # the read itself reports it, at its place
                        pass

    def chunks(self, task: Task) -> list[Group]:
        """The task's groups cut under the memory budget: the units `compute` takes."""
        return [chunk for group in task.groups for chunk in self._chunks(task, group)]

    def compute(self, task: Task, chunk: Group) -> dict[str, LoraDelta | DenseDelta | IA3Delta]:
        """The results of one chunk of a task, per module."""
        value = _Evaluation(self, chunk).combination(task.form)
        _check_finite(value, chunk)
        return _split(value, chunk)

    def _chunks(self, task: Task, group: Group) -> list[Group]:
        per_module = working_bytes(task, group)
        size = modules_per_chunk(per_module, self.chunk_bytes)
        mods = group.modules
        return [Group(mods[i:i + size], group.out_features, group.in_features, group.layout,
                      group.feedforward, group.ranks) for i in range(0, len(mods), size)]

    # ------------------------------------------------------------ reading

    def _read_stack(self, adapter: str, keys: list[str]) -> torch.Tensor:
        """One tensor per key, stacked, on the device in float32, and checked: a NaN or Inf
        in an input would silently poison every output."""
        try:
            info = self.adapters[adapter]
            if info.tensor_files:  # a full fine-tune: its keys may lie in several shards
                stacked = _stacked([self._shard(info.tensor_files[k]).read_stacked([k]) for k in keys])
            else:
                stacked = self._file(adapter).read_stacked(keys)
        except (SafetensorError, OSError) as err:
            raise InputDataError(f"adapter `{adapter}`: cannot read `{keys[0]}` ({err})") from err
        if not all_finite(stacked):
            bad = next(k for k, t in zip(keys, stacked) if not all_finite(t))
            raise InputDataError(f"adapter `{adapter}`: `{bad}` holds NaN or infinite values")
        return stacked.to(self.device, torch.float32)

    def read_lora(self, adapter: str, group: Group) -> Lora:
        infos = [self.adapters[adapter].modules[m] for m in group.modules]
        if any(info.expert is not None for info in infos):  # experts share fused factors (peftdsl.experts)
            A, B = experts.read_factors(lambda key: self._read_stack(adapter, [key])[0], infos)
        else:
            A = self._read_stack(adapter, [info.keys[0] for info in infos])
            B = self._read_stack(adapter, [info.keys[1] for info in infos])
        scales = [info.scaling for info in infos]
        scale = scales[0] if len(set(scales)) == 1 else torch.tensor(scales, dtype=torch.float32, device=self.device)
        return Lora(A, B, scale)

    def read_dense(self, adapter: str, group: Group) -> Dense:
        """A full fine-tune's task vectors θ − θ_base on a group's modules, in the factor frame."""
        keys = [self.adapters[adapter].modules[m].keys[0] for m in group.modules]
        if len(keys) == 1 and self.device.type == "cpu":
            delta = self._dense_by_rows(adapter, keys[0])
            if delta is not None:
                return Dense(delta if group.layout == "linear" else delta.transpose(1, 2))
        tuned = self._read_stack(adapter, keys)
        # subtracted in its stored dtype (the float32 arithmetic happens element by element), so
        # that a 128k-row lm_head never has a second float32 copy beside τ
        delta = tuned.sub_(self._read_base_stack(keys))
        return Dense(delta if group.layout == "linear" else delta.transpose(1, 2))

    def _dense_by_rows(self, adapter: str, key: str) -> torch.Tensor | None:
        """θ − θ_base of one large tensor ([1, rows, cols], float32) built a block of rows at a
        time, so that neither checkpoint's copy is ever held whole beside it (a 128k-vocab
        `lm_head`: 1 GiB for τ, not 2.5). None where a whole read is as good (small tensors,
        pickles)."""
        tuned = self._shard(self.adapters[adapter].tensor_files[key])
        base = self._shard(self.base.files[key]) if self.base is not None else None
        if not isinstance(tuned, SafetensorsReader) or not isinstance(base, SafetensorsReader):
            return None
        shape = tuple(tuned.tensors[key].shape)
        if len(shape) != 2 or shape[0] * shape[1] < _ROW_BLOCK_ELEMENTS:
            return None
        out = torch.empty((1, *shape), dtype=torch.float32)
        step = max(1, _CACHED_BLOCK_ELEMENTS // shape[1])  # rows per block: each step works in cache
        tuned_buffer = torch.empty(step * shape[1] * 8, dtype=torch.uint8)  # any stored dtype fits
        base_buffer = torch.empty_like(tuned_buffer)
        try:
            for start in range(0, shape[0], step):
                stop = min(shape[0], start + step)
                rows = out[0, start:stop]
                tuned_rows = tuned.read_rows(key, start, stop, out=tuned_buffer)
                base_rows = base.read_rows(key, start, stop, out=base_buffer)
                rows.copy_(tuned_rows).sub_(base_rows)
                if not all_finite(rows):  # a NaN or Inf in either input reaches τ: find which
                    if not all_finite(tuned_rows):
                        raise InputDataError(f"adapter `{adapter}`: `{key}` holds NaN or infinite values")
                    if not all_finite(base_rows):
                        raise InputDataError(f"the base model's `{key}` holds NaN or infinite values")
                    # both finite: θ − θ_base overflowed float32, which the result's check reports
        except (SafetensorError, OSError) as err:
            raise InputDataError(f"adapter `{adapter}`: cannot read `{key}` ({err})") from err
        return out

    def _read_base_stack(self, keys: list[str]) -> torch.Tensor:
        """The base's tensors for `keys`, stacked on the device in their stored dtype, checked."""
        if self.base is None:
            raise InternalError("a full fine-tune reached execution without a base")
        try:
            stacked = _stacked([self._shard(self.base.files[k]).read_stacked([k]) for k in keys])
        except (SafetensorError, OSError, KeyError) as err:
            raise InputDataError(f"the base model: cannot read `{keys[0]}` ({err})") from err
        if not all_finite(stacked):
            broken = next(k for k, tensor in zip(keys, stacked) if not all_finite(tensor))
            raise InputDataError(f"the base model's `{broken}` holds NaN or infinite values")
        return stacked.to(self.device)

    def read_ia3(self, adapter: str, group: Group) -> Ia3:
        infos = [self.adapters[adapter].modules[m] for m in group.modules]
        return Ia3(self._read_stack(adapter, [info.keys[0] for info in infos]))


_READ_AHEAD = 2  # chunks whose tensors are asked of the disk ahead of the one computing
_ROW_BLOCK_ELEMENTS = 1 << 24  # a tensor past this many elements (64 MiB in float32) is read in blocks of rows
_CACHED_BLOCK_ELEMENTS = CACHED_BLOCK_ELEMENTS  # ... of this many (here so that tests can shrink it)


def _stacked(reads: list[torch.Tensor]) -> torch.Tensor:
    """One-tensor reads (each [1, …]) as one stack; a single read is used as it is, not copied."""
    return reads[0] if len(reads) == 1 else torch.cat(reads)


class _InMemoryFile:
    """The reader interface over a state dict held in memory."""

    def __init__(self, state: Mapping[str, torch.Tensor]):
        self._state = state

    def read_stacked(self, keys: list[str]) -> torch.Tensor:
        return torch.stack([self._state[key].detach() for key in keys])


class _PickledFile(_InMemoryFile):
    """A pickled state dict, loaded with `weights_only=True` (`run --allow-pickle`)."""

    def __init__(self, path):
        from peftdsl.inputs import InputError, load_pickled

        try:
            super().__init__(load_pickled(path))
        except InputError as err:
            raise InputDataError(err.message) from err


def _check_finite(value: Value | None, group: Group) -> None:
    """Finite inputs can still overflow float32 (`1e38 * a + 1e38 * a`): never write Inf or NaN."""
    if value is None:
        return
    stacks = [getattr(value, name) for name in ("A", "B", "delta", "l") if hasattr(value, name)]
    for stack in stacks:
        if not all_finite(stack):
            module = next(m for m, t in zip(group.modules, stack) if not all_finite(t))
            raise InputDataError(f"the result for module `{module}` is not finite (float32 overflow): "
                                 "scale the coefficients down")




class _Evaluation:
    """The canonical form on one chunk; each operator leaf is computed once (shared)."""

    def __init__(self, executor: Executor, group: Group):
        self.executor, self.group = executor, group
        self.present = dict(group.ranks)
        self.memo: dict[ir.Leaf, Value | None] = {}

    def leaf(self, leaf: ir.Leaf) -> Value | None:
        if leaf not in self.memo:
            self.memo[leaf] = self._compute(leaf)
        return self.memo[leaf]

    def _compute(self, leaf: ir.Leaf) -> Value | None:
        if isinstance(leaf, ir.AdapterLeaf):
            if leaf.name not in self.present:
                return None  # this adapter does not target these modules: it contributes nothing
            kind = self.executor.adapters[leaf.name].kind
            readers = {Kind.LORA: self.executor.read_lora, Kind.IA3: self.executor.read_ia3,
                       Kind.DENSE: self.executor.read_dense}
            return readers[kind](leaf.name, self.group)
        return self._operator(leaf)

    def combination(self, comb: ir.Combination) -> Value | None:
        if comb.kind is Kind.DENSE:
            return self._dense_combination(comb)
        parts = [(t.coef, v) for t in comb.terms if (v := self.leaf(t.leaf)) is not None]
        if not parts:
            return None
        if comb.kind is Kind.IA3:
            return Ia3(kernels.ia3_combine([(c, v.l) for c, v in parts]))
        if all(isinstance(v, Lora) for _, v in parts):
            if len(parts) == 1 and parts[0][0] == 1.0 and _is_unit(parts[0][1].scale):
                return parts[0][1]
            A, B = kernels.exact_sum([(c, v.A, v.B, v.scale) for c, v in parts])
            return Lora(A, B)
        return self._dense_combination(comb)  # dense values under another kind: summed all the same

    def _dense_combination(self, comb: ir.Combination) -> Dense | None:
        """Σ cᵢ·xᵢ of a dense form, each term added as soon as it is read: a full fine-tune's τ
        is not kept for later (it is read again if another leaf needs it), so three fine-tunes
        of a 128k-vocab model hold two `lm_head`-sized tensors at a time, not four. A lone
        term of weight 1 is its value; otherwise the sum is one new stack (`dense_of(x) * c`
        allocates), so no leaf's value is ever changed in place."""
        total = None
        for term in comb.terms:
            leaf = term.leaf
            value = self._compute(leaf) if self._read_once(leaf) else self.leaf(leaf)
            if value is None:
                continue
            if total is None:
                total = value if term.coef == 1.0 and isinstance(value, Dense) and len(comb.terms) == 1 \
                    else dense_of(value) * term.coef
            else:
                total.add_(dense_of(value), alpha=kernels.float32_alpha(term.coef))
            del value
        if total is None:
            return None
        return total if isinstance(total, Dense) else Dense(total)

    def _read_once(self, leaf: ir.Leaf) -> bool:
        return (isinstance(leaf, ir.AdapterLeaf) and leaf.name in self.present
                and self.executor.adapters[leaf.name].kind is Kind.DENSE)

    # ------------------------------------------------------------ operators

    def _operator(self, leaf: ir.OpLeaf) -> Value | None:
        """An operator leaf: its argument prepared as its registry row asks, then its kernel."""
        operator = OPERATORS.get(leaf.func)
        if operator is None:
            raise InternalError(f"operator `{leaf.func}` reached execution but has no registry row")
        argument = self._argument(operator.argument, leaf.arg)
        if argument is None:  # no term targets these modules
            return None
        if isinstance(argument, Dense) and drops_full_parts(leaf):
            norms = self.executor.kept_norms.setdefault(leaf, {})
            norms[self.group.modules] = float(kernels.squared_norms(argument.delta).sum())
        return _kernel(operator)(argument, dict(leaf.options), self.context())

    def _argument(self, mode: Argument, comb: ir.Combination):
        if mode is Argument.VALUE:
            return self.combination(comb)
        values = [(t.coef, v) for t in comb.terms if (v := self.leaf(t.leaf)) is not None]
        if not values:
            return None
        if mode is Argument.FACTORS:
            return [(coef, v.A, v.B, v.scale) for coef, v in values]
        if mode is Argument.TASKS:
            stacked = torch.stack([dense_of(v) for _, v in values])
            return stacked, torch.tensor([c for c, _ in values], dtype=torch.float32, device=stacked.device)
        raise InternalError(f"unknown argument mode {mode!r}")

    def context(self) -> ops.Context:
        return ops.Context(seed=self.executor.seed, modules=self.group.modules, layout=self.group.layout)


def _kernel(operator):
    kernel = getattr(ops, operator.kernel, None)
    if kernel is None:
        raise InternalError(f"operator `{operator.name}` names kernel `{operator.kernel}`, "
                            "which peftdsl.runtime.ops does not define")
    return kernel


def _is_unit(scale: object) -> bool:
    return isinstance(scale, float) and scale == 1.0


def _split(value: Value | None, group: Group) -> dict[str, LoraDelta | DenseDelta | IA3Delta]:
    if value is None:
        return {}
    out = {}
    layout = group.layout
    B = folded_B(value) if isinstance(value, Lora) else None
    for i, module in enumerate(group.modules):
        if isinstance(value, Lora) and value.ranks is not None:  # rank selection: each module its own
            r = value.ranks[i]
            out[module] = LoraDelta(A=value.A[i, :r].cpu(), B=B[i, :, :r].cpu(), layout=layout,
                                    kept=value.kept[i])
        elif isinstance(value, Lora):
            out[module] = LoraDelta(A=value.A[i].cpu(), B=B[i].cpu(), layout=layout)
        elif isinstance(value, Dense):
            out[module] = DenseDelta(delta=value.delta[i].cpu(), layout=layout)
        else:
            out[module] = IA3Delta(l=value.l[i].cpu(), feedforward=group.feedforward, layout=layout)
    return out
