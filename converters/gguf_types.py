"""The one place that bridges gguf-py and slim-edge's type ids.

PyPI gguf 0.19.0 knows neither Q2_0 (42) nor STQ1_0 (43) nor Q2_0C (44): GGUFWriter needs a
GGML_QUANT_SIZES entry and GGUFReader rejects ids outside its enum. So quantized tensors are written
as raw I8 bytes of shape [rows, row_bytes], and then the tensor-info entry is patched in place:

    name | n_dims: u32 | dims: u64 * n_dims | type: u32 | offset: u64

dims[0] becomes the row length in weights and type the real id. Sizes are unchanged, so no offset
moves and the header keeps its length. Reading goes through `gguf_read.read_tensor_table`, which
accepts any id.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ..errors import SlimEdgeError
from ..formats import BY_ID, FORMATS
from .gguf_read import GGUFTable, read_tensor_table

F32, I8 = 0, 24  # GGML_TYPE_F32; GGML_TYPE_I8: one byte per element, block 1
# AngelSlim's first 1.25-bit files stored STQ1_0 as 42, which upstream later gave to Q2_0
LEGACY_IDS = {42: "STQ1_0 in AngelSlim files before llama.cpp PR #22836 took 43 (= Q2_0 in the pinned tree)"}


def file_type(fmt_name: str) -> int:
    """general.file_type (llama_ftype) of a file whose main type is `fmt_name`; 0 (ALL_F32) for a float one."""
    return FORMATS[fmt_name].file_type if fmt_name in FORMATS else 0


def raw_tensor(fmt_name: str, packed: np.ndarray) -> np.ndarray:
    """Bytes [rows, row_bytes] as the I8 array that GGUFWriter accepts for any id."""
    return np.ascontiguousarray(packed, np.uint8).view(np.int8)


def patch_types(path: Path, real: dict[str, tuple[int, int]]) -> None:
    """Set type id and row length (in weights) of each named tensor written by `raw_tensor`."""
    table = read_tensor_table(path)
    by_name = {t.name: t for t in table.tensors}
    with open(path, "r+b") as f:
        for name, (type_id, row_len) in real.items():
            t = by_name.get(name)
            if t is None:
                raise SlimEdgeError(f"{path}: tensor {name!r} was not written; this is a bug in slim-edge")
            fmt = BY_ID[type_id]
            if t.type_id != I8 or t.shape[0] != row_len // fmt.block_size * fmt.type_size:
                raise SlimEdgeError(f"{path}: tensor {name!r} is not raw bytes of a {fmt.name} row of {row_len}")
            f.seek(t.type_pos - 8 * len(t.shape))
            f.write(struct.pack("<Q", row_len))
            f.seek(t.type_pos)
            f.write(struct.pack("<I", type_id))


def _layout(type_id: int) -> tuple[int, int] | None:
    """(block size, bytes per block) of a type id: slim-edge's formats first, then gguf-py's stock table."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    if type_id in BY_ID:
        return BY_ID[type_id].block_size, BY_ID[type_id].type_size
    try:
        return GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        return None


def tensor_bytes(path: Path, name: str, table: GGUFTable | None = None) -> tuple[int, tuple[int, ...], np.ndarray]:
    """(type id, ggml shape, raw bytes) of one tensor, for any id; pass `table` to read many tensors."""
    table = table or read_tensor_table(path)
    for t in table.tensors:
        if t.name == name:
            layout = _layout(t.type_id)
            if layout is None:
                raise SlimEdgeError(
                    f"{path}: tensor {name!r} has type {t.type_id}, which neither slim-edge nor gguf-py can read"
                )
            nbytes = t.n_elements // layout[0] * layout[1]
            if nbytes > t.span:
                raise SlimEdgeError(
                    f"{path}: tensor {name!r} needs {nbytes} bytes, the file holds {t.span}; the file is truncated"
                )
            raw = np.fromfile(path, np.uint8, count=nbytes, offset=table.data_start + t.offset)
            return t.type_id, t.shape, raw
    raise SlimEdgeError(f"{path}: no tensor named {name!r}")


def tensor_values(path: Path, name: str, table: GGUFTable | None = None) -> np.ndarray:
    """One tensor dequantized to float32, in torch order (the ggml shape reversed: [rows, row length]).
    slim-edge's formats decode their own ids; other stock types go through gguf-py's numpy references."""
    type_id, shape, raw = tensor_bytes(path, name, table)
    block, size = _layout(type_id)
    rows = raw.reshape(-1, shape[0] // block * size)
    if type_id == F32:
        values = raw.view(np.float32)
    elif type_id in BY_ID:
        values = BY_ID[type_id].dequantize(rows, shape[0])
    else:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        values = dequantize(rows, GGMLQuantizationType(type_id))
    return values.reshape(shape[::-1]).astype(np.float32, copy=False)
