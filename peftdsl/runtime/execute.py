"""Stage 8: execute a lowered task, a group of modules at a time, on CPU or CUDA.

For each group the canonical form is evaluated bottom-up: adapter leaves are read
lazily from safetensors (only this group's tensors), function leaves run their
batched kernel, sums run `exact_sum` (or a dense sum once a dense term appears).
Large groups are cut into chunks under a memory budget, so peak memory is about
one chunk, not a whole model. Results come back per module, on the CPU, in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from safetensors import SafetensorError

from peftdsl import ir
from peftdsl.runtime import kernels
from peftdsl.evaluation.apply import DenseDelta, IA3Delta, LoraDelta
from peftdsl.check import Analysis
from peftdsl.lower import Group, Task
from peftdsl.runtime.tensorio import SafetensorsReader

Kind = ir.Kind
DEFAULT_CHUNK_BYTES = 512 * 1024 * 1024


@dataclass
class Lora:
    A: torch.Tensor  # [g, r, in]
    B: torch.Tensor  # [g, out, r]
    scale: object = 1.0  # float or Tensor[g]


@dataclass
class Dense:
    delta: torch.Tensor  # [g, out, in]


@dataclass
class Ia3:
    l: torch.Tensor  # noqa: E741  [g, ...]


Value = Lora | Dense | Ia3


class InputDataError(ValueError):
    """An input's tensor data is unusable (undecodable, NaN, Inf): a user error, not a bug."""


def pick_device(choice: str) -> torch.device:
    """`auto` is CUDA when present, else CPU; `cuda[:N]` must exist."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(choice)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    return device


class Executor:
    """Evaluates tasks; keeps the adapters' safetensors files open for lazy reads."""

    def __init__(self, analysis: Analysis, *, device: torch.device, seed: int,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self.analysis, self.device, self.seed = analysis, device, seed
        self.chunk_bytes = chunk_bytes
        self._stack = contextlib.ExitStack()
        self._files: dict[str, object] = {}

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _file(self, adapter: str):
        if adapter not in self._files:
            path = self.analysis.adapters[adapter].weights
            if path.suffix == ".bin":  # the front end accepted it: `run --allow-pickle`
                self._files[adapter] = _PickledFile(path)
            else:
                self._files[adapter] = self._stack.enter_context(SafetensorsReader(path))
        return self._files[adapter]

    # ------------------------------------------------------------ driving

    def run(self, task: Task, advance=None) -> dict[str, LoraDelta | DenseDelta | IA3Delta]:
        """Every module's result, keyed by module name, in sorted order."""
        results: dict[str, LoraDelta | DenseDelta | IA3Delta] = {}
        for chunk in self.stream(task, advance):
            results.update(chunk)
        return dict(sorted(results.items()))

    def stream(self, task: Task, advance=None) -> Iterator[dict[str, LoraDelta | DenseDelta | IA3Delta]]:
        """The results chunk by chunk, so that a writer can store each and let it go.

        `advance(n)` is told after each chunk how many modules it held (progress bars).
        """
        for chunk in self.chunks(task):
            yield self.compute(task, chunk)
            if advance is not None:
                advance(len(chunk.modules))

    def chunks(self, task: Task) -> list[Group]:
        """The task's groups cut under the memory budget: the units `compute` takes."""
        return [chunk for group in task.groups for chunk in self._chunks(task, group)]

    def compute(self, task: Task, chunk: Group) -> dict[str, LoraDelta | DenseDelta | IA3Delta]:
        """The results of one chunk of a task, per module."""
        value = _Evaluation(self, chunk).combination(task.form)
        _check_finite(value, chunk)
        return _split(value, chunk)

    def _chunks(self, task: Task, group: Group) -> list[Group]:
        per_module = _bytes_per_module(task, group)
        size = max(1, self.chunk_bytes // max(per_module, 1))
        mods = group.modules
        return [Group(mods[i:i + size], group.out_features, group.in_features, group.layout,
                      group.feedforward, group.ranks) for i in range(0, len(mods), size)]

    # ------------------------------------------------------------ reading

    def _read_stack(self, adapter: str, keys: list[str]) -> torch.Tensor:
        """One tensor per key, stacked, on the device in float32, and checked: a NaN or Inf
        in an input would silently poison every output."""
        try:
            stacked = self._file(adapter).read_stacked(keys)
        except (SafetensorError, OSError) as err:
            raise InputDataError(f"adapter `{adapter}`: cannot read `{keys[0]}` ({err})") from err
        if not _all_finite(stacked):
            bad = next(k for k, t in zip(keys, stacked) if not _all_finite(t))
            raise InputDataError(f"adapter `{adapter}`: `{bad}` holds NaN or infinite values")
        return stacked.to(self.device, torch.float32)

    def read_lora(self, adapter: str, group: Group) -> Lora:
        infos = [self.analysis.adapters[adapter].modules[m] for m in group.modules]
        A = self._read_stack(adapter, [info.keys[0] for info in infos])
        B = self._read_stack(adapter, [info.keys[1] for info in infos])
        scales = [info.scaling for info in infos]
        scale = scales[0] if len(set(scales)) == 1 else torch.tensor(scales, dtype=torch.float32, device=self.device)
        return Lora(A, B, scale)

    def read_ia3(self, adapter: str, group: Group) -> Ia3:
        infos = [self.analysis.adapters[adapter].modules[m] for m in group.modules]
        return Ia3(self._read_stack(adapter, [info.keys[0] for info in infos]))


class _PickledFile:
    """The reader interface over a pickled state dict, loaded with `weights_only=True`."""

    def __init__(self, path):
        from peftdsl.inputs import InputError, load_pickled

        try:
            self._state = load_pickled(path)
        except InputError as err:
            raise InputDataError(err.message) from err

    def read_stacked(self, keys: list[str]) -> torch.Tensor:
        return torch.stack([self._state[key] for key in keys])


def _check_finite(value: Value | None, group: Group) -> None:
    """Finite inputs can still overflow float32 (`1e38 * a + 1e38 * a`): never write Inf or NaN."""
    if value is None:
        return
    stacks = [getattr(value, name) for name in ("A", "B", "delta", "l") if hasattr(value, name)]
    for stack in stacks:
        if not _all_finite(stack):
            module = next(m for m, t in zip(group.modules, stack) if not _all_finite(t))
            raise InputDataError(f"the result for module `{module}` is not finite (float32 overflow): "
                                 "scale the coefficients down")


def _all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or ±Inf in ``tensor``.

    A sum is finite only if every term is (NaN and ±Inf propagate), and summing is
    the cheapest reduction there is: 20× faster than ``aminmax`` and 90× faster than
    ``isfinite(t).all()`` on 2 CPU cores. Only when the sum is not finite — a NaN, an
    Inf, or finite values whose sum overflows — does the exact min/max check decide.
    """
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    if torch.isfinite(tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)):
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _bytes_per_module(task: Task, group: Group) -> int:
    out, inn = group.out_features, group.in_features
    factors = sum(r * (out + inn) for _, r in group.ranks) * 4
    dense = out * inn * 4 * (len(group.ranks) + 3)
    has_dense = any(isinstance(l, ir.OpLeaf) and l.kind is Kind.DENSE
                    for l in _all_leaves(task.form)) or task.kind is Kind.DENSE
    return dense if has_dense else 4 * factors + 1


def _all_leaves(comb: ir.Combination):
    for term in comb.terms:
        yield term.leaf
        if isinstance(term.leaf, ir.OpLeaf):
            yield from _all_leaves(term.leaf.arg)


class _Evaluation:
    """The canonical form on one chunk; each function leaf is computed once (shared)."""

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
            kind = self.executor.analysis.adapters[leaf.name].kind
            reader = self.executor.read_lora if kind is Kind.LORA else self.executor.read_ia3
            return reader(leaf.name, self.group)
        return getattr(self, f"_op_{leaf.func}", self._op_dense)(leaf)

    def combination(self, comb: ir.Combination) -> Value | None:
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
        return Dense(sum(c * _dense(v) for c, v in parts))

    # ------------------------------------------------------------ functions

    def _op_svd(self, leaf: ir.OpLeaf) -> Value | None:
        options = dict(leaf.options)
        value = self.combination(leaf.arg)
        if value is None:
            return None
        if isinstance(value, Lora):
            A, B = kernels.svd_from_factors(value.A, _folded_B(value), options["rank"], options.get("clamp"))
        else:
            A, B = kernels.svd_dense(value.delta, options["rank"], options.get("clamp"))
        return Lora(A, B)

    def _factor_terms(self, leaf: ir.OpLeaf) -> list[tuple]:
        terms = []
        for term in leaf.arg.terms:
            value = self.leaf(term.leaf)
            if value is not None:
                terms.append((term.coef, value.A, value.B, value.scale))
        return terms

    def _op_pem(self, leaf: ir.OpLeaf) -> Value | None:
        terms = self._factor_terms(leaf)
        return Lora(*kernels.pem(terms)) if terms else None

    def _op_peft_linear(self, leaf: ir.OpLeaf) -> Value | None:
        terms = self._factor_terms(leaf)
        return Lora(*kernels.peft_linear(terms)) if terms else None

    def _op_dense(self, leaf: ir.OpLeaf) -> Value | None:
        """ties, dare_linear, dare_ties, magnitude_prune over the task tensors ΔWᵢ."""
        coefs, tasks = [], []
        for term in leaf.arg.terms:
            value = self.leaf(term.leaf)
            if value is not None:
                coefs.append(term.coef)
                tasks.append(_dense(value))
        if not tasks:
            return None
        stacked = torch.stack(tasks)
        weights = torch.tensor(coefs, dtype=torch.float32, device=stacked.device)
        options = dict(leaf.options)
        density = options["density"]
        if leaf.func == "ties":
            return Dense(kernels.ties(stacked, weights, density, options["majority"]))
        if leaf.func == "magnitude_prune":
            return Dense(kernels.magnitude_prune(stacked, weights, density))
        generators = [kernels.module_generator(self.executor.seed, m, "cpu") for m in self.group.modules]
        transposed = self.group.layout != "linear"
        if leaf.func == "dare_linear":
            return Dense(kernels.dare_linear(stacked, weights, density, generators, transposed))
        return Dense(kernels.dare_ties(stacked, weights, density, generators, options["majority"], transposed))


def _is_unit(scale: object) -> bool:
    return isinstance(scale, float) and scale == 1.0


def _folded_B(value: Lora) -> torch.Tensor:
    """B with the module scaling folded in (s·B), so that the factors alone give ΔW."""
    if _is_unit(value.scale):
        return value.B
    scale = value.scale if isinstance(value.scale, float) else value.scale.view(-1, 1, 1)
    return value.B * scale


def _dense(value: Value) -> torch.Tensor:
    if isinstance(value, Dense):
        return value.delta
    return kernels.lora_delta(value.A, value.B, value.scale)


def _split(value: Value | None, group: Group) -> dict[str, LoraDelta | DenseDelta | IA3Delta]:
    if value is None:
        return {}
    out = {}
    layout = group.layout
    B = _folded_B(value) if isinstance(value, Lora) else None
    for i, module in enumerate(group.modules):
        if isinstance(value, Lora):
            out[module] = LoraDelta(A=value.A[i].cpu(), B=B[i].cpu(), layout=layout)
        elif isinstance(value, Dense):
            out[module] = DenseDelta(delta=value.delta[i].cpu(), layout=layout)
        else:
            out[module] = IA3Delta(l=value.l[i].cpu(), feedforward=group.feedforward, layout=layout)
    return out
