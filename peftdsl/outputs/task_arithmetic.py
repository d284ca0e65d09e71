"""Task arithmetic over full fine-tunes, merged straight from the checkpoints' rows (DESIGN §2, §8).

A merged composition that is a plain linear combination of full fine-tunes,
``Σ cᵢ·τᵢ`` with ``τᵢ = θᵢ − θ_base``, is ``θ_base + Σ cᵢ·(θᵢ − θ_base)``: elementwise, for
every tensor the fine-tunes carry. The general dense path computes each module's τ whole
before the writer reaches it (and an embedding's whole, as a part, before the first shard),
reading the base a second time. Here the merge pipeline's reader reads each fine-tune's
rows beside the base's (:meth:`TaskArithmetic.reads`), and the workers compose every block
in pieces small enough to stay in a core's cache (:func:`compose`): nothing is held whole,
the base is read once, and the work per element is a few cached passes, not a dozen over
memory.

The bits are the general path's: each τᵢ in float32 from the stored values, the sum in the
form's term order (``c₀·τ₀``, then ``+ cᵢ·τᵢ``), the base added last, one rounding to the
output dtype (tests/test_full.py checks it bit for bit). Where a composition is anything
else (an operator, a LoRA term, a pickled or in-memory source, a renamed tensor),
:func:`plan` says None and the general path runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from peftdsl import ir
from peftdsl.errors import InputDataError
from peftdsl.runtime.kernels import float32_alpha
from peftdsl.runtime.tensorio import SafetensorsReader, all_finite

PIECE = 1 << 16  # elements composed at a time: τ and its sum (256 KiB each) stay in L2
_COMPOSED_DTYPES = frozenset({"BF16", "F16", "F32"})  # stored dtypes whose τ is computed in float32


@dataclass(frozen=True, slots=True)
class Term:
    """One fine-tune's share of one tensor: ``coef · (its stored tensor − the base's)``."""

    adapter: str
    coef: float
    reader: SafetensorsReader


@dataclass(frozen=True, slots=True)
class TaskArithmetic:
    """A merge transform (``peftdsl.outputs.merge.write_merged``) setting each tensor of ``terms``
    to ``base + Σ cᵢ·τᵢ``, fed by the pipeline with the fine-tunes' rows of every block."""

    terms: Mapping[str, tuple[Term, ...]]  # stored tensor name -> its terms, in the form's order

    @property
    def parts(self) -> Mapping:
        return {}

    @property
    def weight_names(self) -> frozenset[str]:
        return frozenset(self.terms)

    def changes(self, name: str) -> bool:
        return name in self.terms

    def reads(self, name: str) -> tuple[tuple[SafetensorsReader, str], ...]:
        """What the pipeline reads beside each block of the base's ``name``: the same rows of
        every fine-tune carrying it (read ahead by the reader thread, like the base's)."""
        return tuple((term.reader, name) for term in self.terms.get(name, ()))

    def rows(self, name: str, shape: tuple[int, ...]) -> Callable | None:
        terms = self.terms.get(name)
        if terms is None:
            return None
        return lambda block, start, stop, inputs: compose(block, inputs, terms, name)

    def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor | None:
        """The whole tensor (float32) merged, reading each fine-tune's copy whole."""
        terms = self.terms.get(name)
        if terms is None:
            return None
        return compose(tensor, [term.reader.read(name) for term in terms], terms, name)


def compose(block: torch.Tensor, inputs: Sequence[torch.Tensor], terms: Sequence[Term], name: str) -> torch.Tensor:
    """``block += Σ cᵢ·(inputᵢ − block)`` in place, a piece at a time; ``block`` is the base's
    rows in float32 (contiguous), each input the same rows of one fine-tune as stored (:func:`plan`
    checked the shapes). Each τᵢ is one subtraction straight from the stored dtype (widening is
    exact, so it is the bits of widening first); the result is checked finite once per block,
    since NaN and Inf in any input or an overflow of the sum all reach it."""
    flat = block.view(-1)
    values = [value.reshape(-1) for value in inputs]
    total_buffer, tau_buffer = _scratch()
    for start in range(0, flat.numel(), PIECE):
        stop = min(flat.numel(), start + PIECE)
        base, total, tau = flat[start:stop], total_buffer[:stop - start], tau_buffer[:stop - start]
        torch.sub(values[0][start:stop], base, out=total).mul_(terms[0].coef)
        for value, term in zip(values[1:], terms[1:]):
            total.add_(torch.sub(value[start:stop], base, out=tau), alpha=float32_alpha(term.coef))
        base.add_(total)
    if not all_finite(block):
        raise _not_finite(name, values, terms)
    return block


_local = threading.local()  # each worker's two pieces of scratch, allocated once


def _scratch() -> tuple[torch.Tensor, torch.Tensor]:
    buffers = getattr(_local, "buffers", None)
    if buffers is None or buffers[0].numel() < PIECE:
        buffers = _local.buffers = (torch.empty(PIECE), torch.empty(PIECE))
    return buffers


def _not_finite(name: str, values: Sequence[torch.Tensor], terms: Sequence[Term]) -> InputDataError:
    """Why a composed block is not finite: a fine-tune's values, else the base's or an overflow
    (the base's rows were composed in place, so which of the two is no longer known)."""
    for value, term in zip(values, terms):
        if not all_finite(value):
            return InputDataError(f"adapter `{term.adapter}`: `{name}` holds NaN or infinite values")
    return InputDataError(f"the base model's `{name}` holds NaN or infinite values, or the result is not "
                          "finite (float32 overflow): check the base, or scale the coefficients down")


# =========================================================================== when it applies


def plan(form: ir.Combination, task, adapters: Mapping, base, open_reader: Callable) -> TaskArithmetic | None:
    """The transform for merged composition ``form`` (lowered as ``task``), or None when it is
    not a linear combination of full fine-tunes stored as safetensors under the base's names.

    The tensors are exactly those the general path sets: the task's modules (each one's
    weight) and its parts (every other tensor of a full fine-tune). ``open_reader(path)`` is
    the executor's (``Executor.reader``): the files a pin hashed are the ones read.
    """
    if form.kind is not ir.Kind.DENSE or not form.terms or base is None:
        return None
    leaves = [term.leaf for term in form.terms]
    if not all(isinstance(leaf, ir.AdapterLeaf) and _file_backed_full(adapters[leaf.name]) for leaf in leaves):
        return None
    tensors: dict[str, list[str]] = {}  # stored name -> the adapters carrying it
    for group in task.groups:
        for module in group.modules:
            for leaf in leaves:
                info = adapters[leaf.name].modules.get(module)
                if info is not None:
                    tensors.setdefault(info.keys[0], []).append(leaf.name)
    for part in task.parts:
        if part.rows or part.role != "full":
            return None
        for leaf in leaves:
            carried = adapters[leaf.name].parts.get(part.tensor)
            if carried is not None:
                if carried.key != part.tensor:
                    return None
                tensors.setdefault(part.tensor, []).append(leaf.name)
    coefs = {term.leaf.name: term.coef for term in form.terms}
    terms: dict[str, tuple[Term, ...]] = {}
    for tensor, carriers in sorted(tensors.items()):
        stored = base.weights.get(tensor)
        if stored is None or stored.dtype not in _COMPOSED_DTYPES or tensor not in base.files:
            return None  # renamed on disk, tied, or float64: the general path knows how
        row = []
        for name in carriers:
            path = adapters[name].tensor_files.get(tensor)
            reader = open_reader(path) if path is not None else None
            if not isinstance(reader, SafetensorsReader):
                return None
            entry = reader.tensors[tensor]
            if entry.dtype not in _COMPOSED_DTYPES or tuple(entry.shape) != tuple(stored.shape):
                return None
            row.append(Term(name, coefs[name], reader))
        terms[tensor] = tuple(row)
    return TaskArithmetic(terms) if terms else None


def _file_backed_full(info) -> bool:
    return info.kind is ir.Kind.DENSE and info.state is None and bool(info.tensor_files) and \
        all(path.suffix == ".safetensors" for path in info.files)
