"""What every weight format has: identity, block geometry, exact numpy packing, and the torch grid.

A format stores, per block of `block_size` weights, small integer *values* (multiples of the
block scale `d`, an fp16) and `d` itself. The float weight is `float32(value) * float32(d)`.
`encode`/`decode` move between (values, d) and the raw block bytes, bit for bit;
`quantize` is the reference float -> bytes quantizer (the one the C runtime mirrors);
`fake_quant` is the torch path whose output equals `dequantize(encode(...))` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import SlimEdgeError


@dataclass(frozen=True)
class Format:
    name: str
    type_id: int
    block_size: int
    type_size: int
    levels: tuple[int, ...]  # the integer grid, ascending; weight = level * d
    stock: bool = True  # known to the unpatched pinned llama.cpp
    file_type: int = -1  # llama_ftype, general.file_type of a file whose main type this is (llama.h + patch 0002)
    vec_dot: str = ""  # the activation type the CPU matmul converts inputs to (ggml-cpu.c type_traits_cpu)
    holds: tuple[str, ...] = ()  # scheme values ("ternary", "sherry") it holds exactly: a valid --target
    embedding: bool = False  # a --embedding-type: token_embd rows of this type

    # how the torch grid turns z = w / d into a level: "round" (nearest, halves away from zero), "odd"
    # (the nearest odd level), "sherry" (3:4 ternary per stride-16 quad); a class attribute, set by subclasses
    rule = "round"

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size

    # --- bytes ---------------------------------------------------------------------------
    def encode(self, values: np.ndarray, d: np.ndarray) -> np.ndarray:
        """(values int8 [n_blocks, block_size], d float16 [n_blocks]) -> uint8 [n_blocks, type_size]."""
        raise NotImplementedError

    def decode(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [n_blocks, type_size] -> (values int8 [n_blocks, block_size], d float16 [n_blocks])."""
        raise NotImplementedError

    def quantize_blocks(self, blocks: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """Reference float32 [n_blocks, block_size] -> raw bytes (mirrored by the C runtime)."""
        d = self.reference_scale(blocks, weights)
        return self.encode(self.round_values(blocks, d), d)

    # --- whole tensors -------------------------------------------------------------------
    def check_row(self, n_per_row: int, what: str = "tensor") -> None:
        if n_per_row % self.block_size:
            raise SlimEdgeError(
                f"{what}: row length {n_per_row} is not a multiple of {self.name}'s block size "
                f"{self.block_size}; pick a fallback type whose block divides it"
            )

    def row_bytes(self, n_per_row: int) -> int:
        self.check_row(n_per_row)
        return n_per_row // self.block_size * self.type_size

    def quantize(self, x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """float [..., n] -> uint8 [..., n / block_size * type_size]."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        self.check_row(x.shape[-1])
        blocks = x.reshape(-1, self.block_size)
        w = (
            None
            if weights is None
            else np.broadcast_to(np.asarray(weights, np.float32), x.shape).reshape(-1, self.block_size)
        )
        raw = self.quantize_blocks(blocks, w)
        return raw.reshape(*x.shape[:-1], -1)

    def dequantize(self, raw: np.ndarray, n_per_row: int | None = None) -> np.ndarray:
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        values, d = self.decode(raw.reshape(-1, self.type_size))
        out = values.astype(np.float32) * d.astype(np.float32)[:, None]
        n = raw.shape[-1] // self.type_size * self.block_size if n_per_row is None else n_per_row
        return out.reshape(*raw.shape[:-1], n)

    def pack(self, values: np.ndarray, d: np.ndarray) -> np.ndarray:
        """values int [rows, n], d [rows, n / block_size] -> uint8 [rows, row_bytes]."""
        rows, n = values.shape
        self.check_row(n)
        raw = self.encode(values.reshape(-1, self.block_size).astype(np.int8), np.asarray(d, np.float16).reshape(-1))
        return raw.reshape(rows, -1)

    def unpack(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = raw.shape[0]
        values, d = self.decode(np.ascontiguousarray(raw, np.uint8).reshape(-1, self.type_size))
        return values.reshape(rows, -1), d.reshape(rows, -1)

    # --- the grid ------------------------------------------------------------------------
    def reference_scale(self, blocks: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
        amax = np.abs(blocks).max(axis=-1)
        return (amax / max(abs(self.levels[0]), abs(self.levels[-1]))).astype(np.float16)

    def round_values(self, blocks: np.ndarray, d: np.ndarray) -> np.ndarray:
        """Nearest grid level of x / d (d as stored, fp16); halves round away from zero."""
        d32 = d.astype(np.float32)[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.where(d32 == 0, 0, blocks / np.where(d32 == 0, 1, d32))
        lv = np.asarray(self.levels, np.float32)
        mids = (lv[1:] + lv[:-1]) / 2
        # a value on a midpoint goes to the level farther from zero, like C's roundf
        idx = np.where(x >= 0, np.searchsorted(mids, x, side="right"), np.searchsorted(mids, x, side="left"))
        return lv[idx].astype(np.int8)


def absmax_roundf(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's absmax references (Q2_0, TQ1_0, TQ2_0): d = max|x|, roundf(x * (1/d)); (values, fp16 d)."""
    d = np.abs(blocks).max(axis=1)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    x = blocks * inv[:, None]
    q = np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))
    return q.astype(np.int8), d.astype(np.float16)


def fp16_bytes(d: np.ndarray) -> np.ndarray:
    return np.asarray(d, np.float16).reshape(-1, 1).view(np.uint8)


def fp16_from(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16).reshape(-1)


def pack_2bit(codes: np.ndarray, lanes: int) -> np.ndarray:
    """codes uint8 in 0..3, [n, k]: byte j of every `lanes`-wide chunk holds codes j + lanes*i at bits 2i.

    lanes=1 packs four consecutive codes LSB-first (Q2_0, Q2_0C); lanes=32 is TQ2_0's interleave.
    """
    n, k = codes.shape
    c = codes.reshape(n, k // (4 * lanes), 4, lanes).astype(np.uint8)
    if lanes == 1:
        c = codes.reshape(n, k // 4, 4, 1).astype(np.uint8)
        return c[:, :, 0, 0] | c[:, :, 1, 0] << 2 | c[:, :, 2, 0] << 4 | c[:, :, 3, 0] << 6
    out = c[:, :, 0] | c[:, :, 1] << 2 | c[:, :, 2] << 4 | c[:, :, 3] << 6
    return out.reshape(n, -1)


def unpack_2bit(qs: np.ndarray, lanes: int) -> np.ndarray:
    n, nbytes = qs.shape
    shifts = np.array([0, 2, 4, 6], np.uint8)
    if lanes == 1:
        return ((qs[:, :, None] >> shifts) & 3).reshape(n, -1)
    q = qs.reshape(n, nbytes // lanes, 1, lanes) >> shifts.reshape(1, 1, 4, 1)
    return (q & 3).reshape(n, -1)
