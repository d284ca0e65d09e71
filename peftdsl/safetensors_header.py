"""The one safetensors header reader: a file's JSON header, validated as safetensors does.

Every place that reads a header (`peftdsl.inputs` at lint time, the run's readers, the
merged-output writer) goes through `read_header`, so a file is accepted or refused the
same way everywhere — and the way the safetensors library itself would (its Rust
`read_metadata` and `Metadata::validate`): a header of at most 100 MB that fits the
file, a UTF-8 JSON object with no duplicate names, `__metadata__` a map of strings
to strings, known dtypes, and tensors that tile the data buffer exactly: sorted by
offsets each begins where the previous one ends, holds dtype × shape bytes, and the
last one ends at the end of the file (no overlaps, no gaps, no trailing bytes).

One rule is peftdsl's own: a header over 1 MiB that is also over 1/16 of the file is
refused before it is parsed (docs/conventions.md "Safetensors headers"), since no real
weights file is mostly header, and parsing 100 MB of JSON costs seconds and gigabytes.

No torch: this runs at lint time. Errors are `HeaderError`s with a message that does
not name the file; callers add the name and turn it into a diagnostic (I304).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

# safetensors' MAX_HEADER_SIZE (bytes, as in its Rust source).
MAX_HEADER_BYTES = 100_000_000
# peftdsl's own bound: a header larger than this *and* than SHARE of the file is absurd.
SUSPICIOUS_HEADER_BYTES = 1 << 20
SUSPICIOUS_SHARE = 16

# Every dtype safetensors knows, with its size in bits (Rust `Dtype::bitsize`).
DTYPE_BITS = {"BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
              "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
              "C64": 64, "F64": 64, "I64": 64, "U64": 64}
_USIZE = 2**64  # Rust's usize on the 64-bit machines peftdsl runs on: larger values do not parse


class _Pairs(list):
    """A JSON object as its (name, value) pairs, in order: duplicates stay visible."""


class HeaderError(ValueError):
    """A header the safetensors library would refuse; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class Entry:
    dtype: str
    shape: tuple[int, ...]
    offsets: tuple[int, int]  # into the data buffer, which starts at `Header.data_start`


@dataclass(frozen=True, slots=True)
class Header:
    tensors: dict[str, Entry]
    metadata: dict[str, str]
    data_start: int  # 8 + the header's length


def read_header(fd: int, size: int | None = None) -> Header:
    """The validated header of the safetensors file open as `fd` (read with pread, so the
    file position is left alone); `size` is the file's size (fstat when not given)."""
    if size is None:
        size = os.fstat(fd).st_size
    head = os.pread(fd, 8, 0)
    if len(head) < 8:
        raise HeaderError("is too short to be a safetensors file")
    (length,) = struct.unpack("<Q", head)
    if length > MAX_HEADER_BYTES:
        raise HeaderError(f"declares a {length}-byte header, over safetensors' limit of {MAX_HEADER_BYTES} bytes")
    if length > size - 8:
        raise HeaderError(f"declares a {length}-byte header but the file has {size} bytes (truncated or corrupt)")
    if length > SUSPICIOUS_HEADER_BYTES and length * SUSPICIOUS_SHARE > size:
        raise HeaderError(f"declares a {length}-byte header in a {size}-byte file: a weights file is not "
                          f"mostly header (peftdsl refuses headers over 1 MiB and 1/{SUSPICIOUS_SHARE} of the file)")
    raw = _pread_all(fd, length, 8)
    if len(raw) != length:
        raise HeaderError("is shorter than its header says (truncated while reading?)")
    return parse_header(raw, size - 8 - length)


def parse_header(raw: bytes, data_size: int) -> Header:
    """A header's JSON bytes, validated against a data buffer of `data_size` bytes."""
    try:
        pairs = json.loads(raw.decode("utf-8"), object_pairs_hook=_Pairs, parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise HeaderError(f"has a malformed header ({type(err).__name__}: {str(err)[:120]})") from None
    if not isinstance(pairs, _Pairs):
        raise HeaderError("has a malformed header (not a JSON object)")
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        duplicate = next(n for i, n in enumerate(names) if n in names[:i])
        raise HeaderError(f"has a malformed header: `{_short(duplicate)}` appears twice")
    metadata: dict[str, str] = {}
    tensors: dict[str, Entry] = {}
    for name, value in pairs:
        if name == "__metadata__":
            metadata = _metadata(value)
        else:
            tensors[name] = _entry(name, value)
    _check_layout(tensors, data_size)
    return Header(tensors, metadata, 8 + len(raw))


def _no_constant(name: str):
    raise ValueError(f"`{name}` is not JSON")


def _metadata(value: object) -> dict[str, str]:
    if value is None:  # safetensors' Option: `null` means no metadata
        return {}
    if not isinstance(value, _Pairs) or not all(isinstance(v, str) for _, v in value):
        raise HeaderError("has a malformed header: `__metadata__` must map names to strings")
    keys = [k for k, _ in value]
    if len(set(keys)) != len(keys):
        raise HeaderError("has a malformed header: `__metadata__` repeats a key")
    return dict(value)


def _entry(name: str, value: object) -> Entry:
    fields = dict(value) if isinstance(value, _Pairs) else None
    if fields is None or len(fields) != len(value) or not {"dtype", "shape", "data_offsets"} <= set(fields):
        raise HeaderError(f"has a malformed header entry for `{_short(name)}` (it needs dtype, shape and "
                          "data_offsets)")
    dtype, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise HeaderError(f"has a malformed header entry for `{_short(name)}`: unknown dtype {_short(repr(dtype))}")
    if type(shape) is not list or not all(_is_usize(d) for d in shape):
        raise HeaderError(f"has a malformed header entry for `{_short(name)}`: its shape is not a list of "
                          "non-negative integers")
    if type(offsets) is not list or len(offsets) != 2 or not all(_is_usize(o) for o in offsets):
        raise HeaderError(f"has a malformed header entry for `{_short(name)}`: data_offsets must be two "
                          "non-negative integers")
    return Entry(dtype, tuple(shape), (offsets[0], offsets[1]))


def _is_usize(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _USIZE


def _check_layout(tensors: dict[str, Entry], data_size: int) -> None:
    """Each tensor lies in the file and holds dtype × shape bytes; sorted by offsets, they tile
    the data buffer exactly (Rust `validate`, then `MetadataIncompleteBuffer`)."""
    for name, entry in tensors.items():
        begin, end = entry.offsets
        if end < begin:
            raise HeaderError(f"is truncated or corrupt: `{_short(name)}` has data_offsets {[begin, end]}")
        if end > data_size:
            raise HeaderError(f"is truncated: `{_short(name)}` lies past the end of the file")
        count = 1
        for dim in entry.shape:
            count *= dim
            if count >= _USIZE:
                raise HeaderError(f"is corrupt: `{_short(name)}` has a shape too large to address")
        bits = count * DTYPE_BITS[entry.dtype]
        if bits % 8 or end - begin != bits // 8:
            raise HeaderError(f"is corrupt: `{_short(name)}` is {entry.dtype} {list(entry.shape)} but holds "
                              f"{end - begin} bytes")
    position = 0
    for name, entry in sorted(tensors.items(), key=lambda item: item[1].offsets):
        begin, end = entry.offsets
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            raise HeaderError(f"is corrupt: `{_short(name)}` {what} (data_offsets {[begin, end]})")
        position = end
    if position != data_size:
        raise HeaderError(f"is corrupt: its tensors take {position} bytes but the file holds {data_size} after "
                          "the header")


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    parts, done = [], 0
    while done < length:
        block = os.pread(fd, min(length - done, 1 << 24), offset + done)
        if not block:
            break
        parts.append(block)
        done += len(block)
    return b"".join(parts)
