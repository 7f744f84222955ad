"""Read a GGUF file without gguf-py: header, metadata (every value type) and the tensor table, any type id.

gguf-py 0.19.0's GGUFReader refuses type ids outside its enum (43 STQ1_0, 44 Q2_0C, and 42 in PyPI's
release), so it reads neither the tensors nor the metadata of slim-edge's files. This reader never
interprets a type id.

    GGUF v2/v3, little-endian:
      header   magic "GGUF" | version: u32 | n_tensors: u64 | n_kv: u64
      KV       key: str | value_type: u32 | value                         (n_kv times)
      str      length: u64 | UTF-8 bytes (no terminator)
      value    one scalar of VALUE_TYPES, a str, or
      array    item_type: u32 | count: u64 | count items (items may themselves be arrays)
      tensor   name: str | n_dims: u32 | dims: u64 * n_dims | type: u32 | offset: u64   (n_tensors times)
      data     from the next multiple of general.alignment (default 32); offsets are relative to it

dims are in ggml order: dims[0] is the row length.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SlimEdgeError
from ..fsutil import path_kind

MAGIC = b"GGUF"
VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32
# GGUF value type id -> (name, struct code); 8 and 9 are the variable-length string and array
VALUE_TYPES = {
    0: ("uint8", "B"),
    1: ("int8", "b"),
    2: ("uint16", "H"),
    3: ("int16", "h"),
    4: ("uint32", "I"),
    5: ("int32", "i"),
    6: ("float32", "f"),
    7: ("bool", "?"),
    10: ("uint64", "Q"),
    11: ("int64", "q"),
    12: ("float64", "d"),
}
STRING, ARRAY = 8, 9
TYPE_NAMES = {**{k: v[0] for k, v in VALUE_TYPES.items()}, STRING: "string", ARRAY: "array"}
# arrays of arrays this deep exist in no writer; the bound keeps a crafted file from exhausting the stack
MAX_NESTING = 16


@dataclass(frozen=True)
class LongArray:
    """An array read with `array_limit` that held at least that many items: walked, not kept, so a 100 MB
    vocabulary costs nothing to inspect."""

    item_type: str
    count: int

    def __str__(self) -> str:
        return f"[{self.count} items]"


@dataclass
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length
    type_id: int
    offset: int  # relative to the data section
    type_pos: int  # absolute file position of the u32 type field
    span: int = 0  # bytes from this tensor's offset to the next one (or the end of the file)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class GGUFTable:
    version: int
    alignment: int
    data_start: int
    file_size: int
    tensors: list[TensorEntry]
    info_start: int = 0  # file position of the first tensor-info entry (the end of the KV section)
    # filled by read_tensor_table(..., metadata=True): key -> value (lists for arrays), and
    # key -> type name ("uint32", "string", "array[string]", "array[array[int32]]", ...)
    metadata: dict = field(default_factory=dict)
    kv_types: dict[str, str] = field(default_factory=dict)


class _Cursor:
    """Bounds-checked little-endian reads from a buffer; every failure names the file and the offset."""

    def __init__(self, buf, path: Path, array_limit: int | None = None):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)
        self.array_limit = array_limit

    def need(self, n: int, what: str) -> int:
        if n < 0 or self.pos + n > self.size:
            raise SlimEdgeError(
                f"{self.path}: truncated or corrupt GGUF: {what} at byte {self.pos} needs {n} bytes but the "
                f"file ends at byte {self.size}; the file is incomplete (re-download or re-export it)"
            )
        start = self.pos
        self.pos += n
        return start

    def scalar(self, code: str, what: str):
        start = self.need(struct.calcsize(code), what)
        return struct.unpack_from("<" + code, self.buf, start)[0]

    def string(self, what: str, keep: bool = True) -> str | None:
        n = self.scalar("Q", f"length of {what}")
        start = self.need(n, what)
        if not keep:
            return None
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise SlimEdgeError(
                f"{self.path}: {what} at byte {start} is not valid UTF-8 ({e.reason}); the file is corrupt"
            ) from None

    def value(self, vtype: int, what: str, keep: bool, depth: int = 0):
        """One value of GGUF type `vtype`: returned when `keep`, else skipped (None)."""
        if vtype in VALUE_TYPES:
            v = self.scalar(VALUE_TYPES[vtype][1], what)
            return v if keep else None
        if vtype == STRING:
            return self.string(what, keep)
        if vtype == ARRAY:
            if depth >= MAX_NESTING:
                raise SlimEdgeError(
                    f"{self.path}: {what} nests arrays more than {MAX_NESTING} deep (byte "
                    f"{self.pos - 4}); no GGUF writer does that: the file is corrupt"
                )
            itype = self.scalar("I", f"item type of {what}")
            count = self.scalar("Q", f"item count of {what}")
            if keep and self.array_limit is not None and count >= self.array_limit:
                self.value_skip(itype, count, what, depth)
                return LongArray(TYPE_NAMES.get(itype, str(itype)), count)
            if itype in VALUE_TYPES:
                code = VALUE_TYPES[itype][1]
                start = self.need(count * struct.calcsize(code), f"{count} {TYPE_NAMES[itype]} items of {what}")
                if not keep:
                    return None
                return np.frombuffer(self.buf, np.dtype("<" + code), count, start).tolist()
            if itype not in (STRING, ARRAY):
                raise SlimEdgeError(
                    f"{self.path}: {what} is an array of unknown GGUF value type {itype} "
                    f"(byte {self.pos - 12}); known types are 0..12: the file is corrupt or "
                    f"newer than this reader"
                )
            items = [self.value(itype, f"item {i} of {what}", keep, depth + 1) for i in range(count)]
            return items if keep else None
        raise SlimEdgeError(
            f"{self.path}: {what} has unknown GGUF value type {vtype} (byte {self.pos - 4}); "
            f"known types are 0..12: the file is corrupt or newer than this reader"
        )

    def value_skip(self, itype: int, count: int, what: str, depth: int) -> None:
        """Walk past `count` items of type `itype` (the array's header already read)."""
        if itype in VALUE_TYPES:
            self.need(count * struct.calcsize(VALUE_TYPES[itype][1]), f"{count} {TYPE_NAMES[itype]} items of {what}")
            return
        if itype not in (STRING, ARRAY):
            raise SlimEdgeError(
                f"{self.path}: {what} is an array of unknown GGUF value type {itype} "
                f"(byte {self.pos - 12}); known types are 0..12: the file is corrupt or "
                f"newer than this reader"
            )
        for i in range(count):
            self.value(itype, f"item {i} of {what}", False, depth + 1)

    def type_name(self, vtype: int, start: int) -> str:
        """'array[...]' names need the item type, which sits right after the value type field."""
        if vtype != ARRAY:
            return TYPE_NAMES[vtype]
        itype, count = struct.unpack_from("<IQ", self.buf, start)
        if itype == ARRAY:  # named after its first item (an empty array of arrays says no more)
            return f"array[{self.type_name(ARRAY, start + 12)}]" if count else "array[array]"
        return f"array[{TYPE_NAMES[itype]}]"


def require_file(path) -> Path:
    """`path` as a Path when it is a file; a SlimEdgeError that says what it is instead."""
    path = Path(path)
    kind = path_kind(path, "")
    if kind == "a folder":
        raise SlimEdgeError(
            f"{path} is a folder, not a GGUF file; pass a .gguf file (an ONNX export folder holds model.onnx)"
        )
    if kind is None:
        raise SlimEdgeError(f"{path}: no such file")
    if kind != "a file":
        raise SlimEdgeError(f"{path} is {kind}, not a GGUF file; pass a regular .gguf file")
    return path


def read_tensor_table(path: Path, metadata: bool = False, array_limit: int | None = None) -> GGUFTable:
    """Header, KV pairs (parsed when `metadata`, else skipped) and the tensor-info table; no type id is
    rejected. Raises SlimEdgeError naming the file and the fault for anything that is not a whole GGUF.
    array_limit: metadata arrays of at least this many items come back as LongArray (type and count)."""
    path = require_file(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        if head != MAGIC:
            raise SlimEdgeError(
                f"{path}: not a GGUF file (it starts with {head!r}, a GGUF file with {MAGIC!r}); pass a .gguf file"
            )
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(_Cursor(buf, path, array_limit), size, metadata)


def read_metadata(path: Path) -> dict:
    """Every KV pair of the file, arrays as lists, in file order."""
    return read_tensor_table(path, metadata=True).metadata


def _parse(c: _Cursor, size: int, want_meta: bool) -> GGUFTable:
    path = c.path
    c.pos = 4
    version = c.scalar("I", "version")
    if version & 0xFFFF == 0:
        raise SlimEdgeError(
            f"{path}: big-endian GGUF (version field {version:#x}); slim-edge reads "
            f"little-endian files only: convert it on a little-endian machine"
        )
    if version not in VERSIONS:
        raise SlimEdgeError(
            f"{path}: GGUF version {version}; slim-edge reads versions "
            f"{', '.join(map(str, VERSIONS))}: re-convert it with a current llama.cpp"
        )
    n_tensors, n_kv = c.scalar("Q", "tensor count"), c.scalar("Q", "metadata count")
    meta, kv_types = {}, {}
    alignment = DEFAULT_ALIGNMENT
    for i in range(n_kv):
        key = c.string(f"key of metadata entry {i}")
        vtype = c.scalar("I", f"value type of {key!r}")
        start = c.pos
        is_alignment = key == "general.alignment"
        value = c.value(vtype, f"value of {key!r}", want_meta or is_alignment)
        if is_alignment:
            if vtype != 4 or not value or value & (value - 1):
                raise SlimEdgeError(
                    f"{path}: general.alignment is {value!r} ({TYPE_NAMES.get(vtype, vtype)}); "
                    f"GGUF needs a uint32 power of two: the file is corrupt"
                )
            alignment = value
        if want_meta:
            meta[key] = value
            kv_types[key] = c.type_name(vtype, start)
    info_start = c.pos
    tensors = []
    for i in range(n_tensors):
        name = c.string(f"name of tensor {i}")
        n_dims = c.scalar("I", f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise SlimEdgeError(
                f"{path}: tensor {name!r} has {n_dims} dimensions; GGUF allows 1 to {MAX_DIMS}: the file is corrupt"
            )
        shape = tuple(c.scalar("Q", f"dimension {d} of tensor {name!r}") for d in range(n_dims))
        type_pos = c.pos
        type_id, offset = c.scalar("I", f"type of tensor {name!r}"), c.scalar("Q", f"offset of tensor {name!r}")
        tensors.append(TensorEntry(name, shape, type_id, offset, type_pos))
    data_start = -(-c.pos // alignment) * alignment
    by_offset = sorted(tensors, key=lambda t: t.offset)
    for t, nxt in zip(by_offset, by_offset[1:] + [None]):
        end = nxt.offset if nxt is not None else size - data_start
        t.span = end - t.offset
        if t.span < 0:
            raise SlimEdgeError(
                f"{path}: tensor {t.name!r} at data offset {t.offset} lies past the end of the "
                f"file ({size} bytes); the file is truncated (re-download or re-export it)"
            )
    return GGUFTable(version, alignment, data_start, size, tensors, info_start, meta, kv_types)
