"""A merged model's shards, streamed: reading, merging and writing overlap (DESIGN §3, §8).

:func:`write_shards` is what ``peftdsl.outputs.merge.write_merged`` runs inside its atomic
temporary folder. The stages run at once, each in its own threads, with bounded memory:

- a **reader** thread reads the base's tensors in plan order, one input file open at a
  time, with ``preadv`` into reused buffers; a tensor of many rows comes as blocks of
  about ``BLOCK_ELEMENTS`` elements (:func:`row_blocks`), at most ``READ_AHEAD_BYTES`` ahead;
- the **calling** thread takes the blocks in order and decides, per tensor, how to merge
  it (below); it merges whole tensors itself, and hands blocks of rows to
- **workers** (``MERGE_WORKERS`` threads, torch single-threaded in each), which convert a
  block to float32 in a reused buffer, fold the delta into it in place, cast it once to
  the output dtype into a reused buffer, and check it is finite (``tensorio.stored``);
- a **writer** thread writes each result at its offset in its shard (the header went
  first: every shape is in the plan), at most ``WRITE_BEHIND_BYTES`` behind, asks the
  kernel to start writing the pages back as it goes (``sync_file_range``) so that the
  fsync that closes each shard has little left to do.

torch and these system calls release the GIL, so a merge takes about as long as its
slowest stage: on most machines, the disk. Block buffers are allocated once and reused
(:class:`_Pool`): no allocator growth across threads and no page faults per block.

**Transforms.** ``transform(name, tensor)`` gets a whole tensor in float32 and returns
the merged one or None (unchanged), as it always has. A transform may say more, and then
a large tensor (a 128k×2048 embedding: 1 GiB in float32) is never held whole:

- ``changes(name) -> bool``: False when it leaves ``name`` as it is. Such a tensor is
  copied as stored (or only cast to the output dtype) a block at a time, and the
  transform is not called.
- ``rows(name, shape) -> fold | None``: ``fold(block, start, stop)`` returns rows
  ``start:stop`` merged, or None for unchanged; ``block`` is those rows in float32, in a
  buffer of the pipeline's that the fold may update in place. None instead of a fold
  means the transform can only take ``name`` whole. Called once per tensor, in the
  calling thread, when the stream reaches it (so a lazy delta is computed just in
  time); the fold itself runs on the workers, several blocks at once.

``merge.MergeTransform`` offers both, through ``fold.delta_rows``; other transforms are
called whole, as before. Either way the bits are those of the whole merge: dense,
(IA)³ and part updates are elementwise, and LoRA's ``addmm`` over blocks of at least
``MIN_BLOCK_ROWS`` rows gives the same bits as over the whole weight
(tests/test_pipeline.py checks it; blocks of a few rows would not).

**Failures.** The first exception in any thread stops the others; the calling thread
joins them all and raises that exception as it was raised, so a full disk is still the
runner's R601 and ``atomic_output`` still removes the temporary folder. A
KeyboardInterrupt (SIGINT) lands in the calling thread and does the same.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import queue
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from peftdsl.errors import InputDataError
from peftdsl.outputs.write import SAFETENSORS_METADATA
from peftdsl.runtime.fold import check_part, fold_part, part_rows
from peftdsl.runtime.tensorio import TORCH_DTYPES, StreamingSafetensors, all_finite, stored

if TYPE_CHECKING:
    from peftdsl.outputs.merge import TensorEntry, Transform

BLOCK_ELEMENTS = 2 * 1024 * 1024  # a block of rows: 8 MiB in float32
MIN_BLOCK_ROWS = 256  # LoRA's addmm is bit-identical on row blocks this tall (module docstring)
ROW_ALIGN = 64
READ_AHEAD_BYTES = 64 << 20
WRITE_BEHIND_BYTES = 64 << 20
WRITEBACK_BYTES = 64 << 20  # start the kernel's writeback once this many bytes are written
# The work per element is a cast, a thin GEMM (rank ≪ width) and a sum, so blocks are
# merged in parallel by threads each running torch single-threaded: no synchronisation
# inside an op. torch's own OpenMP threads, when the cores are busy with other work, wait
# on each other at every op (4–20× slower per op, measured on 2 shared cores).
MERGE_WORKERS = max(1, min(4, os.cpu_count() or 1))


def row_blocks(shape: Sequence[int]) -> list[tuple[int, int]] | None:
    """The row ranges a tensor of ``shape`` is read, merged and written in; None: it goes whole.

    Blocks are ``ROW_ALIGN``-aligned, at least ``MIN_BLOCK_ROWS`` rows and about
    ``BLOCK_ELEMENTS`` elements; the last one takes the remainder, so none is shorter.
    """
    if not shape:
        return None
    rows, width = shape[0], math.prod(shape[1:])
    per = max(MIN_BLOCK_ROWS, BLOCK_ELEMENTS // max(width, 1) // ROW_ALIGN * ROW_ALIGN)
    if rows < 2 * per:
        return None
    edges = [i * per for i in range(rows // per)] + [rows]
    return list(zip(edges[:-1], edges[1:]))


def write_shards(
    tmp: Path,
    shards: Sequence[Sequence[TensorEntry]],
    transform: Transform,
    groups: Mapping[str, tuple[str, ...]],
    dtype: torch.dtype | None,
    count: int,
    open_source: Callable[[Path], contextlib.AbstractContextManager],
) -> dict[str, str]:
    """Write ``shards`` (planned by ``merge.plan_shards``) as ``model-NNNNN-of-{count}.safetensors``
    in ``tmp``; return the weight map. ``open_source(path)`` opens one base file for reading:
    a context manager giving an object with ``read(name)`` and ``read_rows(name, start, stop, out)``.
    """
    entries = [entry for shard in shards for entry in shard]
    weight_map: dict[str, str] = {}
    reads = getattr(transform, "reads", None)
    with _torch_threads(1), _Pipeline(entries, open_source, MERGE_WORKERS, reads) as pipe:
        blocks = pipe.blocks()
        for number, shard in enumerate(shards, start=1):
            filename = f"model-{number:05d}-of-{count:05d}.safetensors"
            specs = {entry.name: (_output_dtype(entry, dtype), entry.shape) for entry in shard}
            pipe.write(("open", tmp / filename, specs))
            merges = []
            for entry in shard:
                merge = _TensorMerge(entry, transform, groups.get(entry.name, (entry.name,)), dtype)
                while True:
                    block = next(blocks)
                    assert block.entry is entry
                    pipe.merge(merge, block)
                    if block.last:
                        break
                whole = merge.whole()  # whole mode: merged here, in stream order (a transform may be lazy)
                if whole is not None:
                    pipe.write(("write", entry.name, None, whole), nbytes=_nbytes(whole))
                merges.append(merge)
                weight_map[entry.name] = filename
            pipe.drain()  # every block of the shard merged and handed to the writer
            for merge in merges:
                merge.check()
            pipe.write(("close",))
        pipe.finish()
    return weight_map


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` for the duration, then put back."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(count, before))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _output_dtype(entry: TensorEntry, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if (dtype is not None and entry.dtype.is_floating_point) else entry.dtype


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _view(buffer: torch.Tensor, dtype: torch.dtype, shape: Sequence[int]) -> torch.Tensor:
    """The first bytes of a pool buffer as a tensor of ``dtype`` and ``shape``."""
    return buffer[:math.prod(shape) * dtype.itemsize].view(dtype).reshape(tuple(shape))


# =========================================================================== one tensor's merge


def merged_tensor(
    entry: TensorEntry, tensor: torch.Tensor, transform: Transform, names: tuple[str, ...], dtype: torch.dtype | None
) -> torch.Tensor:
    """A whole tensor merged: the transform under every name of its tie group, then one cast.

    A delta on a tied parameter (``lm_head`` of a tied model) lands on the one
    shared tensor, as in PEFT's merge, which assigns to the shared Parameter:
    ``merge_and_unload`` + ``save_pretrained`` keeps one tensor with both deltas
    and the config stays tied. (The merged model then differs from the unmerged
    PeftModel, where each delta acts on one side only; PEFT warns about it.)
    """
    if not tensor.is_floating_point():
        return tensor.contiguous()
    compute = torch.promote_types(tensor.dtype, torch.float32)  # float64 bases stay float64
    current, touched = tensor.to(compute), False
    for name in names:
        changed = transform(name, current)
        if changed is not None:
            if tuple(changed.shape) != entry.shape:
                raise ValueError(f"transform changed the shape of `{name}`: {entry.shape} -> {tuple(changed.shape)}")
            current = changed.to(compute)
            touched = True
    # A part sets the stored tensor of its own name, never another side of a tie: a saved
    # `lm_head` of a tied model is written as a tensor of its own (merge._added_parts).
    part = getattr(transform, "parts", {}).get(entry.name)
    if part is not None:
        try:
            current, touched = fold_part(current, part, name=entry.name).to(compute), True
        except ValueError as err:
            raise InputDataError(str(err)) from err
    return stored(current, dtype or entry.dtype, entry.name) if touched else current.to(dtype or entry.dtype).contiguous()


@dataclass(slots=True)
class _Block:
    entry: TensorEntry
    start: int
    stop: int
    data: torch.Tensor  # rows start:stop (the whole tensor when not split), as stored: a view of buffer
    buffer: torch.Tensor  # the read pool's, given back once data is used
    split: bool
    last: bool
    # the same rows of the tensors the transform reads beside this one (``reads``), as
    # stored, each with its read pool buffer: a fine-tune's rows for task arithmetic
    inputs: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()


class _TensorMerge:
    """One tensor's merge, fed its blocks in order.

    Decided at its first block, in the calling thread: ``copy`` (unchanged and not cast: the
    stored bytes go out), ``cast`` (unchanged, another output dtype), ``rows`` (merged a
    block at a time, on the workers) or ``whole`` (the blocks are put together and
    :func:`merged_tensor` runs once, in the calling thread).
    """

    def __init__(self, entry: TensorEntry, transform: Transform, names: tuple[str, ...], dtype: torch.dtype | None):
        self.entry, self.transform, self.names, self.dtype = entry, transform, names, dtype
        self.out_dtype = _output_dtype(entry, dtype)
        self.compute = torch.promote_types(entry.dtype, torch.float32) if entry.dtype.is_floating_point else None
        self.part = getattr(transform, "parts", {}).get(entry.name)
        self.mode: str | None = None
        self.folds: list[tuple[str, Callable]] = []
        self.buffer: torch.Tensor | None = None  # whole mode: the tensor put together
        self.overflow: torch.Tensor | None = None  # a block whose cast overflowed (a copy)
        self.nonfinite = False  # some merged block holds NaN or Inf before the cast
        # rows mode: blocks handed to workers and not merged yet, and whether the last was
        # handed; once both say done, the folds (and the deltas they hold) are let go, so a
        # shard's merges do not keep every delta of the shard alive until it closes
        self._lock = threading.Lock()
        self._in_flight = 0
        self._all_handed = False

    def start(self, block: _Block) -> str:
        if self.mode is None:
            self.mode = self._mode(block.split, streamed=bool(block.inputs))
        return self.mode

    def collect(self, block: _Block) -> None:
        """Whole mode: keep a copy of the block (its buffer goes back) until :meth:`whole`."""
        if self.buffer is None:
            self.buffer = torch.empty(self.entry.shape, dtype=self.entry.dtype)
        if block.split:
            self.buffer[block.start:block.stop] = block.data
        else:
            self.buffer.copy_(block.data)

    def whole(self) -> torch.Tensor | None:
        """Whole mode, after the last block: the merged tensor."""
        if self.mode != "whole":
            return None
        tensor, self.buffer = self.buffer, None
        return merged_tensor(self.entry, tensor, self.transform, self.names, self.dtype)

    def merge_block(self, block: _Block, work: torch.Tensor, out: torch.Tensor) -> None:
        """Cast or rows mode, on a worker: the block's output rows into ``out`` (several blocks
        of one tensor may run at once). ``work`` is the worker's buffer in the compute dtype."""
        current = work.copy_(block.data)  # the float32 rows: exact from the stored dtype
        touched = False
        if self.mode == "rows":
            inputs = [data for data, _ in block.inputs]
            for name, fold in self.folds:
                if inputs and name == self.entry.name:  # the rows read beside it are its fold's
                    changed = fold(current, block.start, block.stop, inputs)
                else:
                    changed = fold(current, block.start, block.stop)
                if changed is not None:
                    if changed.shape != current.shape:
                        raise ValueError(f"transform changed the shape of rows {block.start}:{block.stop} of "
                                         f"`{name}`: {tuple(current.shape)} -> {tuple(changed.shape)}")
                    current, touched = changed.to(self.compute), True
            if self.part is not None:
                touched = True
                part = part_rows(self.part, block.start, block.stop)
                if part is not None:
                    current = fold_part(current, part, name=self.entry.name).to(self.compute)
        out.copy_(current)  # the one rounding to the output dtype (copy_ is what .to() runs)
        # tensorio.stored's check, over the whole tensor (see check): an overflow is an error
        # unless the float32 result itself holds NaN or Inf somewhere.
        if touched and not all_finite(out):
            if all_finite(current):
                self.overflow = current.clone()
            else:
                self.nonfinite = True

    def handed(self, block: _Block) -> None:
        """A block goes to a worker (rows and cast modes)."""
        with self._lock:
            self._in_flight += 1
            self._all_handed = self._all_handed or block.last

    def merged(self) -> None:
        """A worker finished one of this tensor's blocks: after the last, drop the folds."""
        with self._lock:
            self._in_flight -= 1
            if self._all_handed and not self._in_flight:
                self.folds, self.part = [], None

    def check(self) -> None:
        """After every block is merged: raise an overflow, as ``stored`` would on the whole tensor."""
        if self.overflow is not None and not self.nonfinite:
            stored(self.overflow, self.out_dtype, self.entry.name)  # raises: finite in float32, not when cast

    def _mode(self, split: bool, streamed: bool = False) -> str:
        """``streamed``: the transform reads more rows beside this tensor's (``reads``), which
        only its row fold takes, so the tensor goes by rows even when it is one block."""
        if self.compute is None:
            return "copy"  # integer tensors are never transformed
        changes = getattr(self.transform, "changes", None)
        changing = [name for name in self.names if changes is None or changes(name)]
        if changes is not None and not changing and self.part is None:
            return "copy" if self.out_dtype == self.entry.dtype else "cast"
        rows = getattr(self.transform, "rows", None)
        if rows is None or not (split or streamed):
            return "whole"
        for name in changing:
            fold = rows(name, self.entry.shape)
            if fold is None:
                if streamed:
                    raise ValueError(f"the transform reads rows beside `{name}` but has no row fold for it")
                self.folds = []
                return "whole"
            self.folds.append((name, fold))
        if self.part is not None:  # checked against the whole tensor: the errors of an unsplit merge
            try:
                check_part(self.entry.shape, self.part, name=self.entry.name)
            except ValueError as err:
                raise InputDataError(str(err)) from err
        return "rows"


# =========================================================================== the threads


class _Failure:
    """The first exception of any thread; setting it wakes every thread that waits."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.waiters: list[threading.Condition] = []

    def set(self, error: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = error
        for cond in self.waiters:
            with cond:
                cond.notify_all()

    def __bool__(self) -> bool:
        return self.error is not None


class _Pool:
    """Byte buffers handed out and given back, at most ``capacity`` bytes of them in all:
    the flow control between two stages, and memory that is allocated once and reused.

    A taker waits while the pool is spent (one request larger than the whole pool goes
    alone). A given-back buffer is reused for any request it holds (the smallest such);
    when none does, free ones are dropped to make room for a new one. Blocks of one size
    dominate a model, so the pool settles on a few buffers of that size.
    """

    GRAIN = 1 << 20

    def __init__(self, capacity: int, failure: _Failure):
        self.capacity, self.failure = capacity, failure
        self.used = 0  # bytes of the buffers handed out
        self.free: list[torch.Tensor] = []
        self.cond = threading.Condition()
        failure.waiters.append(self.cond)

    def take(self, nbytes: int) -> torch.Tensor | None:
        """A buffer of at least ``nbytes``; None when a thread has failed: stop."""
        buffers = self.take_all([nbytes])
        return None if buffers is None else buffers[0]

    def take_all(self, sizes: Sequence[int]) -> list[torch.Tensor] | None:
        """Buffers of at least ``sizes`` bytes, taken together (a block and the rows read beside
        it: taken one by one, two readers' halves could wait on each other); None on failure."""
        sizes = [max(1, -(-nbytes // self.GRAIN)) * self.GRAIN for nbytes in sizes]
        with self.cond:
            while self.used and self.used + sum(sizes) > self.capacity and not self.failure:
                self.cond.wait()
            if self.failure:
                return None
            return [self._one(size) for size in sizes]

    def _one(self, size: int) -> torch.Tensor:
        fits = [i for i, b in enumerate(self.free) if b.numel() >= size]
        if fits:
            buffer = self.free.pop(min(fits, key=lambda i: self.free[i].numel()))
            self.used += buffer.numel()
            return buffer
        self.free.sort(key=torch.Tensor.numel)
        while self.free and self.used + size + sum(b.numel() for b in self.free) > self.capacity:
            self.free.pop()  # the largest: none of them holds this request
        self.used += size
        return torch.empty(size, dtype=torch.uint8)

    def give(self, buffer: torch.Tensor) -> None:
        with self.cond:
            self.used -= buffer.numel()
            self.free.append(buffer)
            self.cond.notify_all()


class _Budget:
    """Bytes of fresh tensors (whole-tensor results) waiting for the writer."""

    def __init__(self, capacity: int, failure: _Failure):
        self.capacity, self.used, self.failure = capacity, 0, failure
        self.cond = threading.Condition()
        failure.waiters.append(self.cond)

    def take(self, nbytes: int) -> bool:
        with self.cond:
            while self.used and self.used + nbytes > self.capacity and not self.failure:
                self.cond.wait()
            if self.failure:
                return False
            self.used += nbytes
            return True

    def give(self, nbytes: int) -> None:
        with self.cond:
            self.used -= nbytes
            self.cond.notify_all()


_END = object()


class _Pipeline:
    """The reader, the workers and the writer around the calling thread's loop over blocks."""

    def __init__(self, entries: Sequence[TensorEntry], open_source: Callable, workers: int,
                 reads: Callable | None = None):
        self.failure = _Failure()
        self.reads = reads
        self.read_pool = _Pool(READ_AHEAD_BYTES, self.failure)
        self.out_pool = _Pool(WRITE_BEHIND_BYTES, self.failure)
        self.whole_budget = _Budget(WRITE_BEHIND_BYTES, self.failure)
        self.read_queue: queue.SimpleQueue = queue.SimpleQueue()
        self.write_queue: queue.SimpleQueue = queue.SimpleQueue()
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.pending, self.idle = 0, threading.Condition()
        self.failure.waiters.append(self.idle)
        self.reader = threading.Thread(target=self._guard, args=(self._read, entries, open_source),
                                       name="peftdsl-read", daemon=True)
        self.writer = threading.Thread(target=self._guard, args=(self._write,), name="peftdsl-write", daemon=True)
        self.workers = [threading.Thread(target=self._guard, args=(self._work,), name=f"peftdsl-merge-{i}",
                                         daemon=True) for i in range(workers)]

    def __enter__(self) -> _Pipeline:
        for thread in (self.reader, self.writer, *self.workers):
            thread.start()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if error is not None:  # the calling thread failed (or was interrupted): stop the others
            self.failure.set(error)
        self.write_queue.put(_END)
        for _ in self.workers:
            self.tasks.put(_END)
        for thread in (self.reader, self.writer, *self.workers):
            thread.join()

    # ------------------------------------------------------------ the calling thread

    def blocks(self) -> Iterator[_Block]:
        while True:
            item = self.read_queue.get()
            if item is _END:
                self._raise()
                return
            yield item

    def merge(self, merge: _TensorMerge, block: _Block) -> None:
        """Hand one block on: to the writer as it is, to a worker, or to its tensor's buffer."""
        self._raise()
        mode = merge.start(block)
        if mode == "copy":  # the read buffer goes to the writer, which gives it back
            self.write(("write", block.entry.name, block.start if block.split else None, block.data),
                       give=(self.read_pool, block.buffer))
        elif mode == "whole":
            merge.collect(block)
            self.read_pool.give(block.buffer)
            for _, buffer in block.inputs:  # never: a tensor with rows read beside it goes by rows
                self.read_pool.give(buffer)
        else:
            with self.idle:
                self.pending += 1
            merge.handed(block)
            self.tasks.put((merge, block))

    def write(self, op: tuple, *, nbytes: int = 0, give: tuple | None = None) -> None:
        """An operation for the writer; ``nbytes`` of fresh tensors wait for room first,
        ``give`` is a (pool, buffer) the writer gives back once it is written."""
        if nbytes and not self.whole_budget.take(nbytes):
            self._raise()
        self.write_queue.put((op, nbytes, give))

    def drain(self) -> None:
        """Wait until the workers have merged every block handed to them."""
        with self.idle:
            while self.pending and not self.failure:
                self.idle.wait()
        self._raise()

    def finish(self) -> None:
        """Wait for the writer to be done; raise what any thread raised."""
        self.write_queue.put(_END)
        self.writer.join()
        self._raise()

    def _raise(self) -> None:
        error = self.failure.error
        if error is not None:
            raise error

    # ------------------------------------------------------------ the threads

    def _guard(self, work: Callable, *args) -> None:
        try:
            work(*args)
        except BaseException as err:  # noqa: BLE001 — handed to the calling thread, which raises it
            self.failure.set(err)
        finally:
            if threading.current_thread() is self.reader:
                self.read_queue.put(_END)

    def _read(self, entries: Sequence[TensorEntry], open_source: Callable) -> None:
        stack = contextlib.ExitStack()
        with stack:
            source = reader = None
            sequential: set[int] = set()  # the files read beside the base's, told once
            for entry in entries:
                if entry.source != source:
                    stack.close()  # one input file open at a time
                    reader = stack.enter_context(open_source(entry.source))
                    source = entry.source
                    _read_sequentially(reader)
                blocks = row_blocks(entry.shape)
                beside = self.reads(entry.name) if self.reads is not None else ()
                dtypes = (entry.dtype, *(_stored_dtype(other, key) for other, key in beside))
                for other, _ in beside:
                    if id(other) not in sequential:
                        sequential.add(id(other))
                        _read_sequentially(other)
                for i, (start, stop) in enumerate(blocks or [(0, entry.shape[0] if entry.shape else 1)]):
                    shape = (stop - start, *entry.shape[1:]) if blocks is not None else entry.shape
                    buffers = self.read_pool.take_all([math.prod(shape) * dtype.itemsize for dtype in dtypes])
                    if buffers is None:
                        return
                    data = _read_block(reader, entry.name, entry.dtype, shape, start, stop, buffers[0])
                    inputs = tuple((_read_block(other, key, dtype, shape, start, stop, buffer), buffer)
                                   for (other, key), dtype, buffer in zip(beside, dtypes[1:], buffers[1:]))
                    last = blocks is None or i == len(blocks) - 1
                    self.read_queue.put(_Block(entry, start, stop, data, buffers[0], blocks is not None, last,
                                               inputs))

    def _work(self) -> None:
        scratch: dict[torch.dtype, torch.Tensor] = {}  # this worker's compute buffers, grown as needed
        while True:
            task = self.tasks.get()
            if task is _END or self.failure:
                return
            merge, block = task
            try:
                shape = tuple(block.data.shape)
                numel = math.prod(shape)
                if scratch.get(merge.compute) is None or scratch[merge.compute].numel() < numel:
                    scratch[merge.compute] = torch.empty(numel, dtype=merge.compute)
                work = scratch[merge.compute][:numel].view(shape)
                buffer = self.out_pool.take(numel * merge.out_dtype.itemsize)
                if buffer is None:
                    return
                out = _view(buffer, merge.out_dtype, shape)
                try:
                    merge.merge_block(block, work, out)
                finally:
                    merge.merged()
                for read in (block.buffer, *(read for _, read in block.inputs)):
                    self.read_pool.give(read)
                self.write(("write", block.entry.name, block.start if block.split else None, out),
                           give=(self.out_pool, buffer))
            finally:
                with self.idle:
                    self.pending -= 1
                    self.idle.notify_all()

    def _write(self) -> None:
        writer: StreamingSafetensors | None = None
        dirty: list[int] = []  # the byte range written since writeback was last started
        try:
            while True:
                item = self.write_queue.get()
                if item is _END or self.failure:
                    return
                (op, *args), nbytes, give = item
                if op == "open":
                    path, specs = args
                    writer = StreamingSafetensors(path, specs, SAFETENSORS_METADATA)
                elif op == "write":
                    key, start, tensor = args
                    if start is None:
                        writer.write(key, tensor)
                    else:
                        writer.write_rows(key, start, tensor)
                    begin = writer.data_start + writer.offsets[key][0]
                    if start:
                        begin += start * _nbytes(tensor) // tensor.shape[0]
                    dirty = [min(dirty[0], begin), max(dirty[1], begin + _nbytes(tensor))] if dirty else \
                        [begin, begin + _nbytes(tensor)]
                    if dirty[1] - dirty[0] >= WRITEBACK_BYTES:
                        _start_writeback(writer.fd, dirty[0], dirty[1] - dirty[0])
                        dirty = []
                else:  # close: every tensor is in; fsync
                    done, writer, dirty = writer, None, []
                    done.close()
                if nbytes:
                    self.whole_budget.give(nbytes)
                if give is not None:
                    pool, buffer = give
                    pool.give(buffer)
        finally:
            if writer is not None:
                writer.abort()


def _stored_dtype(reader, key: str) -> torch.dtype:
    return TORCH_DTYPES[reader.tensors[key].dtype]


def _read_block(reader, key: str, dtype: torch.dtype, shape: Sequence[int], start: int, stop: int,
                buffer: torch.Tensor) -> torch.Tensor:
    """Rows ``start:stop`` of ``key`` (the whole of a scalar) into ``buffer``, as a tensor of ``shape``."""
    data = _view(buffer, dtype, shape)
    if shape:
        reader.read_rows(key, start, stop, out=buffer)
    else:  # a scalar
        data.copy_(reader.read(key))
    return data


def _read_sequentially(reader) -> None:
    """Tell the kernel the file is read front to back (a larger read-ahead window)."""
    fd = getattr(reader, "fd", None)
    if fd is not None and hasattr(os, "posix_fadvise"):
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)


_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Callable | None:
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None  # not Linux: the fsync at the end does all the work
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    return function


_SYNC = _sync_file_range()


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing the file's dirty pages back, without waiting (Linux ``sync_file_range``).

    Otherwise the kernel waits until gigabytes are dirty and the closing fsync writes
    them all while nothing else happens; started early, writing back overlaps reading.
    A failure is not lost: the fsync that closes the shard reports it.
    """
    if _SYNC is not None:
        _SYNC(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)
