"""Q2_0: stock llama.cpp 2-bit, block 64 — slim-edge's exact fallback when a row is not a multiple of 256/512.

    | d: fp16 | qs[16]: code j at bits 2*(j%4) of qs[j/4] |   18 bytes / 64 weights = 2.25 bpw
    weight = (code - 1) * d, code in 0..3, i.e. levels {-1, 0, +1, +2}

Ternary {-1, 0, +1} (Sherry, Tequila, absmean ternary) is a subset of this grid, so ternary-trained
tensors export to it bit-exactly and run on the unpatched runtime.
"""

import numpy as np

from .base import Format, absmax_roundf, fp16_bytes, fp16_from, pack_2bit, unpack_2bit


class Q2_0(Format):
    def encode(self, values, d):
        return np.concatenate([fp16_bytes(d), pack_2bit(values.astype(np.int16) + 1, lanes=1)], axis=1)

    def decode(self, raw):
        return (unpack_2bit(raw[:, 2:], lanes=1).astype(np.int8) - 1), fp16_from(raw[:, :2])

    def quantize_blocks(self, blocks, weights=None):
        # quantize_row_q2_0_ref: d = absmax, roundf(x / d) (clamped to [-1, 2], so +2 never occurs)
        return self.encode(*absmax_roundf(blocks))


FORMAT = Q2_0(
    "q2_0",
    type_id=42,
    block_size=64,
    type_size=2 + 64 // 4,
    levels=(-1, 0, 1, 2),
    file_type=41,
    vec_dot="q8_0",
    holds=("ternary", "sherry"),
)
