"""STQ1_0: Sherry 1.25-bit — ternary with exactly one zero in every group of four, block 256.

| qs[32]: 64 four-bit slot codes | sign[8]: 64 sign bits | d: fp16 |   32 + 8 + 2 = 42 bytes = 1.3125 bpw

Group g (0..63) = weights {64*(g // 16) + (g % 16) + 16*p : p = 0..3}: quads are strided by 16
inside each 64-weight chunk, so SIMD kernels load activations at offsets 0/16/32/48.
slot(g) = nibble (g & 1) of qs[g // 2] (low nibble first); sign(g) = bit (g % 8) of sign[g // 8].
CODEBOOK[(sign << 4) | slot] is a byte whose bits 2p..2p+1 hold lane p as (value + 1):

    sign 0: A9 89 29 09 A6 86 26 06 9A 92 1A 12 6A 62 4A 42
    sign 1: 01 21 81 A1 04 24 84 A4 10 18 90 98 40 48 60 68   (= 0xAA - sign-0 byte: negation)

slot = (zero_lane << 2) | b: bit 0 of b makes the 2nd non-zero lane negative, bit 1 the 3rd;
the 1st non-zero lane is +1 when sign = 0. Type id 43 as in llama.cpp PR #22836
(older AngelSlim files carry 42: see `slim-edge gguf retag`).

Reference quantizer: zero the smallest |x| of each quad (first one on ties), keep the signs of the
other three (+ for x >= 0), d = L2-optimal = sum(w*|x|) / sum(w) over the kept weights
(w = importance, 1 without an imatrix), summed in weight order in fp32.
"""

import numpy as np

from .base import Format, fp16_bytes, fp16_from

CODEBOOK = np.array(
    [
        0xA9,
        0x89,
        0x29,
        0x09,
        0xA6,
        0x86,
        0x26,
        0x06,
        0x9A,
        0x92,
        0x1A,
        0x12,
        0x6A,
        0x62,
        0x4A,
        0x42,
        0x01,
        0x21,
        0x81,
        0xA1,
        0x04,
        0x24,
        0x84,
        0xA4,
        0x10,
        0x18,
        0x90,
        0x98,
        0x40,
        0x48,
        0x60,
        0x68,
    ],
    np.uint8,
)
_INDEX = np.full(256, -1, np.int16)
_INDEX[CODEBOOK] = np.arange(32)

# QUADS[g, p] = position inside the 256-block of lane p of group g
QUADS = np.array([[64 * (g // 16) + g % 16 + 16 * p for p in range(4)] for g in range(64)], np.int64)


def quad_layout(block_size: int) -> np.ndarray:
    """Lane positions [block_size // 4, 4] of the stride-16 quads, for any multiple of 64."""
    g = np.arange(block_size // 4)
    return (64 * (g // 16) + g % 16)[:, None] + 16 * np.arange(4)[None, :]


class STQ1_0(Format):
    """Any block that is a multiple of 64 (STQ1_0: 256, STQ1_0_64: 64): qs, then sign bits, then d."""

    rule = "sherry"

    @property
    def quads(self) -> np.ndarray:
        return quad_layout(self.block_size)

    def encode(self, values, d):
        groups = self.block_size // 4
        quads = values[:, self.quads].astype(np.int16) + 1  # [n, groups, 4] lanes in 0..2
        byte = (quads << np.array([0, 2, 4, 6])).sum(axis=2)
        idx = _INDEX[byte]
        if (idx < 0).any():
            raise ValueError(f"{self.name.upper()} needs exactly one zero and three +-1 in every quad")
        slot, sign = (idx & 15).astype(np.uint8), (idx >> 4).astype(np.uint8)
        qs = slot[:, 0::2] | (slot[:, 1::2] << 4)
        signs = (sign.reshape(-1, groups // 8, 8) << np.arange(8, dtype=np.uint8)).sum(axis=2).astype(np.uint8)
        return np.concatenate([qs, signs, fp16_bytes(d)], axis=1)

    def decode(self, raw):
        groups = self.block_size // 4
        qs, signs = raw[:, : groups // 2], raw[:, groups // 2 : groups // 2 + groups // 8]
        slot = np.stack([qs & 15, qs >> 4], axis=2).reshape(-1, groups)
        sign = ((signs[:, :, None] >> np.arange(8, dtype=np.uint8)) & 1).reshape(-1, groups)
        byte = CODEBOOK[(sign << 4) | slot]  # [n, groups]
        lanes = ((byte[:, :, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3).astype(np.int8) - 1
        values = np.empty((raw.shape[0], self.block_size), np.int8)
        values[:, self.quads] = lanes
        return values, fp16_from(raw[:, -2:])

    def quantize_blocks(self, blocks, weights=None):
        values = sherry_values(blocks, self.quads)
        w = np.ones_like(blocks) if weights is None else weights
        kept = values != 0
        num = np.cumsum(np.where(kept, w * np.abs(blocks), 0), axis=1, dtype=np.float32)[:, -1]
        den = np.cumsum(np.where(kept, w, 0), axis=1, dtype=np.float32)[:, -1]
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(den > 0, num / np.where(den > 0, den, 1), 0).astype(np.float32)
        return self.encode(values, d.astype(np.float16))


def sherry_values(blocks: np.ndarray, quads: np.ndarray) -> np.ndarray:
    """3:4 ternary values: per quad the smallest |x| -> 0, others -> sign (+1 for x >= 0)."""
    q = blocks[:, quads]  # [n, groups, 4]
    zero = np.abs(q).argmin(axis=2)
    v = np.where(q >= 0, 1, -1).astype(np.int8)
    np.put_along_axis(v, zero[:, :, None], 0, axis=2)
    out = np.empty(blocks.shape, np.int8)
    out[:, quads] = v
    return out


FORMAT = STQ1_0(
    "stq1_0",
    type_id=43,
    block_size=256,
    type_size=32 + 8 + 2,
    levels=(-1, 0, 1),
    stock=False,
    file_type=42,
    vec_dot="q8_k",
    holds=("sherry",),
)
